package main

import (
	"context"
	"fmt"
	"maps"
	"path/filepath"
	"strings"
	"time"

	"github.com/walship/walship/tail/wal"
)

// idleSettle is how long the primary is left alone after its checkpoint before the
// idle window: the shippers take the checkpoint's record, and the server's background
// work it sets off passes.
const idleSettle = 5 * time.Second

type idleRun struct {
	kind string
	usage
}

// idleCost runs walship and pg_receivewal side by side on one primary that no client
// writes to, and measures each over the same window of c.idleFor, once both have caught
// up and the primary has settled.
func idleCost(ctx context.Context, c config, r *results) error {
	ctx, cancel := context.WithTimeout(ctx, c.idleFor+5*time.Minute)
	defer cancel()
	ships := together{&walship{label: walshipName}, &pgReceivewal{}}
	n, err := newNode(ctx, c, ships)
	if err != nil {
		return err
	}
	defer n.close()
	if err := ships.start(ctx, n); err != nil {
		return err
	}
	if err := n.waitCaughtUp(ctx, "the shippers to catch up"); err != nil {
		return err
	}
	// A checkpoint now rather than one in the window; then let the shippers take its
	// record and the primary settle.
	if err := n.primary.Exec(ctx, "CHECKPOINT"); err != nil {
		return err
	}
	if err := n.waitCaughtUp(ctx, "the shippers to take the checkpoint"); err != nil {
		return err
	}
	if err := sleep(ctx, idleSettle); err != nil {
		return err
	}
	var meters []*meter
	defer func() {
		for _, m := range meters {
			m.close()
		}
	}()
	for _, ship := range ships {
		m, err := beginMeter(ctx, n, ship, c.perfWhy, filepath.Join(n.dir, "perf-stat-"+strings.ReplaceAll(ship.name(), " ", "-")+".txt"))
		if err != nil {
			return err
		}
		meters = append(meters, m)
	}
	if err := sleep(ctx, c.idleFor); err != nil { // the measured window
		return err
	}
	for _, m := range meters {
		u, err := m.end(ctx)
		if err != nil {
			return err
		}
		fmt.Printf("  %-30s CPU %.3f%% of a core over %s; the primary wrote %.0f bytes of WAL\n",
			m.ship.name(), 100*cores(u.cpu(), u.window), u.window.Round(time.Millisecond), u.walMiB*(1<<20))
		r.idle = append(r.idle, idleRun{kind: m.ship.name(), usage: u})
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// together is shippers run side by side on one primary, so that each is measured over
// the same idle period. Their names, process names and backends must not clash.
type together []shipper

func (t together) name() string { return strings.Join(shipperNames(t), " + ") }

func (t together) settings(n *node) map[string]string {
	out := map[string]string{}
	for _, s := range t {
		maps.Copy(out, s.settings(n))
	}
	return out
}

func (t together) serverDirs(n *node) []string {
	var out []string
	for _, s := range t {
		out = append(out, s.serverDirs(n)...)
	}
	return out
}

func (t together) start(ctx context.Context, n *node) error {
	for _, s := range t {
		if err := s.start(ctx, n); err != nil {
			return fmt.Errorf("%s: %w", s.name(), err)
		}
	}
	return nil
}

func (t together) stop() {
	for _, s := range t {
		s.stop()
	}
}

func (t together) streams() bool {
	for _, s := range t {
		if !s.streams() {
			return false
		}
	}
	return true
}

// durable is the least durable position of them: where all of them are durable.
func (t together) durable(ctx context.Context, n *node) (wal.LSN, error) {
	var least wal.LSN
	for i, s := range t {
		d, err := s.durable(ctx, n)
		if err != nil {
			return 0, err
		}
		if i == 0 || d < least {
			least = d
		}
	}
	return least, nil
}

func (t together) pids() map[string]int {
	out := map[string]int{}
	for _, s := range t {
		maps.Copy(out, s.pids())
	}
	return out
}

func (t together) backends(ctx context.Context, n *node) (map[string]int, error) {
	out := map[string]int{}
	for _, s := range t {
		b, err := s.backends(ctx, n)
		if err != nil {
			return nil, err
		}
		maps.Copy(out, b)
	}
	return out, nil
}

// profile and writeProfiles do nothing: the idle scenario profiles nothing.
func (t together) profile(*node)                                              {}
func (t together) writeProfiles(context.Context, *node, string, string) error { return nil }
