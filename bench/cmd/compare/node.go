package main

import (
	"context"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

// node is one primary with its shipper, their files in a directory of their own.
type node struct {
	c       config
	ship    shipper
	dir     string
	primary *lab.Cluster
	// pg is a connection to the primary kept for the many small queries of the lag
	// sampler and the waits: a connection each would fork a backend each.
	pgMu sync.Mutex
	pg   *pgx.Conn
}

// newNode starts a primary (16 MB segments) for ship, the shipper not yet.
func newNode(ctx context.Context, c config, ship shipper) (*node, error) {
	dir, err := lab.MkdirShared("walship-compare-")
	if err != nil {
		return nil, err
	}
	n := &node{c: c, ship: ship, dir: dir}
	serverDirs := ship.serverDirs(n)
	for _, d := range serverDirs {
		if err := os.Mkdir(d, 0o755); err != nil {
			return nil, err
		}
	}
	conf := map[string]string{"max_wal_size": "4GB", "checkpoint_timeout": "15min"}
	n.primary, err = lab.NewCluster(ctx, lab.Options{Settings: merge(conf, ship.settings(n))})
	if err != nil {
		cleanup("remove "+dir, os.RemoveAll(dir))
		return nil, err
	}
	for _, d := range serverDirs {
		if err := n.primary.Own(d); err != nil {
			n.close()
			return nil, err
		}
	}
	if err := n.primary.Start(ctx); err != nil {
		n.close()
		return nil, err
	}
	return n, nil
}

func merge(a, b map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

func (n *node) close() {
	if n.pg != nil {
		n.pg.Close(context.Background())
	}
	n.ship.stop()
	if n.primary != nil {
		cleanup("remove the primary", n.primary.Close())
	}
	cleanup("remove "+n.dir, os.RemoveAll(n.dir))
}

// query runs a query returning one text value on the node's connection to the primary.
func (n *node) query(ctx context.Context, sql string) (string, error) {
	var s string
	err := n.withConn(ctx, func(pg *pgx.Conn) error { return pg.QueryRow(ctx, sql).Scan(&s) })
	return s, err
}

// withConn runs f on the node's connection to the primary, opened if need be and
// dropped if f fails, so that the next call starts on a fresh one.
func (n *node) withConn(ctx context.Context, f func(*pgx.Conn) error) error {
	n.pgMu.Lock()
	defer n.pgMu.Unlock()
	if n.pg == nil {
		conn, err := n.primary.Connect(ctx)
		if err != nil {
			return err
		}
		n.pg = conn
	}
	if err := f(n.pg); err != nil {
		n.pg.Close(context.Background())
		n.pg = nil
		return err
	}
	return nil
}

// backendPIDs waits until pg_stat_activity lists exactly one backend with each
// application_name of apps, which maps a process's name in the output to its
// application_name, and returns their pids by those names. A shipper's sessions may
// connect a little after it reports that it streams (walship's slot keeper does).
func (n *node) backendPIDs(ctx context.Context, apps map[string]string) (map[string]int, error) {
	var names []string
	for _, app := range apps {
		names = append(names, app)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var out map[string]int
	err := lab.Wait(ctx, 20*time.Millisecond, "backends "+strings.Join(names, ", ")+" in pg_stat_activity", func() (bool, error) {
		byApp := map[string][]int{}
		err := n.withConn(ctx, func(pg *pgx.Conn) error {
			rows, err := pg.Query(ctx, "SELECT application_name, pid FROM pg_stat_activity WHERE application_name = ANY($1)", names)
			if err != nil {
				return err
			}
			defer rows.Close()
			for rows.Next() {
				var app string
				var pid int32
				if err := rows.Scan(&app, &pid); err != nil {
					return err
				}
				byApp[app] = append(byApp[app], int(pid))
			}
			return rows.Err()
		})
		if err != nil {
			return false, err
		}
		out = map[string]int{}
		for proc, app := range apps {
			if len(byApp[app]) != 1 {
				return false, nil
			}
			out[proc] = byApp[app][0]
		}
		return true, nil
	})
	return out, err
}

// queryLSN runs a query returning one LSN as text on the node's connection.
func (n *node) queryLSN(ctx context.Context, sql string) (wal.LSN, error) {
	s, err := n.query(ctx, sql)
	if err != nil {
		return 0, err
	}
	return wal.ParseLSN(s)
}

// flush is the primary's flush position.
func (n *node) flush(ctx context.Context) (wal.LSN, error) {
	return n.queryLSN(ctx, "SELECT pg_current_wal_flush_lsn()::text")
}

// durable is where the shipper's copy of the WAL is durable.
func (n *node) durable(ctx context.Context) (wal.LSN, error) { return n.ship.durable(ctx, n) }

// waitCaughtUp waits until the shipper is durable at the primary's flush position of
// now.
func (n *node) waitCaughtUp(ctx context.Context, what string) error {
	flush, err := n.flush(ctx)
	if err != nil {
		return err
	}
	return lab.Wait(ctx, 10*time.Millisecond, what, func() (bool, error) {
		d, err := n.durable(ctx)
		return err == nil && d >= flush, nil
	})
}
