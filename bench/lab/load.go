package lab

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// LoadTable is the table the load writes into.
const LoadTable = "walship_load"

// Ack is one committed insert: the row's id and when the commit returned.
type Ack struct {
	ID int64
	At time.Time
}

// Load commits single-row inserts from several connections, as fast as they go, and
// logs every acknowledged id with the time its commit returned.
type Load struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	acks   []Ack
	err    error
}

// StartLoad creates the load table if needed and starts clients connections that each
// insert rows of rowBytes bytes of payload.
func StartLoad(ctx context.Context, dsn string, clients, rowBytes int) (*Load, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, err
	}
	_, err = conn.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+LoadTable+" (id bigserial PRIMARY KEY, client int, payload text)")
	conn.Close(context.Background())
	if err != nil {
		return nil, fmt.Errorf("create load table: %w", err)
	}
	lctx, cancel := context.WithCancel(context.Background())
	l := &Load{cancel: cancel}
	payload := strings.Repeat("w", rowBytes)
	for i := 0; i < clients; i++ {
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			_ = l.Stop() // the clients started so far end; the connect error is the one returned
			return nil, err
		}
		l.wg.Add(1)
		go func(client int, conn *pgx.Conn) {
			defer l.wg.Done()
			defer conn.Close(context.Background())
			for lctx.Err() == nil {
				var id int64
				err := conn.QueryRow(lctx, "INSERT INTO "+LoadTable+" (client, payload) VALUES ($1, $2) RETURNING id", client, payload).Scan(&id)
				at := time.Now()
				if err != nil {
					if lctx.Err() == nil {
						l.mu.Lock()
						if l.err == nil {
							l.err = err
						}
						l.mu.Unlock()
					}
					return
				}
				l.mu.Lock()
				l.acks = append(l.acks, Ack{ID: id, At: at})
				l.mu.Unlock()
			}
		}(i, conn)
	}
	return l, nil
}

// Acks returns a copy of the acknowledged inserts so far.
func (l *Load) Acks() []Ack {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Ack(nil), l.acks...)
}

// Count is how many inserts were acknowledged so far.
func (l *Load) Count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.acks)
}

// Stop ends the load and returns the first error a client met while it ran, if any
// (a client whose server died gets one).
func (l *Load) Stop() error {
	l.cancel()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if errors.Is(l.err, context.Canceled) {
		return nil
	}
	return l.err
}

// Loss is what a promoted standby lacks of a load's acknowledged commits.
type Loss struct {
	Acked     int
	Recovered int
	Lost      []Ack // acknowledged commits missing on the standby, oldest first
	// Window is the kill time minus the acknowledgement of the newest commit the
	// standby has; with none, the kill time minus the first acknowledgement.
	Window time.Duration
}

// MeasureLoss counts which acknowledged commits the table on c holds, for a primary
// killed at killAt.
func MeasureLoss(ctx context.Context, c *Cluster, acks []Ack, killAt time.Time) (Loss, error) {
	conn, err := c.Connect(ctx)
	if err != nil {
		return Loss{}, err
	}
	defer conn.Close(context.Background())
	have := map[int64]bool{}
	rows, err := conn.Query(ctx, "SELECT id FROM "+LoadTable)
	if err != nil {
		if strings.Contains(err.Error(), "does not exist") {
			rows = nil // the table itself was lost: nothing was recovered
		} else {
			return Loss{}, err
		}
	}
	if rows != nil {
		for rows.Next() {
			var id int64
			if err := rows.Scan(&id); err != nil {
				return Loss{}, err
			}
			have[id] = true
		}
		if err := rows.Err(); err != nil {
			return Loss{}, err
		}
	}
	l := Loss{Acked: len(acks)}
	var newest time.Time
	for _, a := range acks {
		if !have[a.ID] {
			l.Lost = append(l.Lost, a)
			continue
		}
		l.Recovered++
		if a.At.After(newest) {
			newest = a.At
		}
	}
	sort.Slice(l.Lost, func(i, j int) bool { return l.Lost[i].ID < l.Lost[j].ID })
	switch {
	case !newest.IsZero():
		l.Window = killAt.Sub(newest)
	case len(acks) > 0:
		l.Window = killAt.Sub(acks[0].At)
	}
	return l, nil
}
