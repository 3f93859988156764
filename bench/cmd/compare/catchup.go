package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

type catchRun struct {
	kind  string
	mib   float64
	secs  float64
	ddMBs float64
	usage // of the shipper's processes and backends from its start to the backlog durable
}

// shareOfDD is the run's throughput over the dd reference's, both in MB/s.
func (cr catchRun) shareOfDD() float64 { return cr.mib * (1 << 20) / 1e6 / cr.secs / cr.ddMBs }

func catchUp(ctx context.Context, c config, r *results) error {
	for round := 1; round <= c.rounds; round++ {
		for _, ship := range []shipper{&walship{label: walshipName}, &pgReceivewal{}} {
			cr, err := catchUpRun(ctx, c, ship, round == 1, nil)
			if err != nil {
				return fmt.Errorf("catch-up round %d, %s: %w", round, ship.name(), err)
			}
			what := fmt.Sprintf("CPU %.1f ms per MiB", msPerMiB(cr.cpu(), cr.mib))
			if cr.own.ok() {
				what += fmt.Sprintf(", %.0f fsyncs/s by its count", cr.own.perSec())
			}
			if cr.perf.ok() {
				what += fmt.Sprintf(", %.0f fsyncs/s by perf", cr.perf.perSec())
			}
			fmt.Printf("  round %d  %-30s %7.0f MiB in %5.1f s: %6.1f MiB/s (dd with fdatasync: %6.1f MB/s; %s)\n",
				round, ship.name(), cr.mib, cr.secs, cr.mib/cr.secs, cr.ddMBs, what)
			r.catchup = append(r.catchup, cr)
		}
	}
	return nil
}

// catchUpRun times ship taking a backlog of c.catchupMB MiB; with profile, the
// shipper's processes are profiled where they can be (walship's). then, if not nil,
// runs once the backlog is durable, with the time the shipper was started.
func catchUpRun(ctx context.Context, c config, ship shipper, profile bool, then func(ctx context.Context, n *node, t0 time.Time) error) (catchRun, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	n, err := newNode(ctx, c, ship)
	if err != nil {
		return catchRun{}, err
	}
	defer n.close()
	if profile {
		ship.profile(n)
	}
	if err := ship.start(ctx, n); err != nil {
		return catchRun{}, err
	}
	// Stop the shipper once it holds the current segment (an empty spool would start
	// again at the segment being written and skip the backlog); the slot keeps the WAL
	// it has not taken. walship's sidecar stops too, so that the catch-up is timed from
	// a start, as pg_receivewal's is, not from its reconnection backoff.
	if err := n.waitCaughtUp(ctx, "the shipper to hold the current segment"); err != nil {
		return catchRun{}, err
	}
	ship.stop()
	if err := n.primary.Exec(ctx, "CREATE TABLE backlog (id int, pad text); ALTER TABLE backlog ALTER pad SET STORAGE EXTERNAL"); err != nil {
		return catchRun{}, err
	}
	start, err := n.flush(ctx)
	if err != nil {
		return catchRun{}, err
	}
	target := start + wal.LSN(c.catchupMB)<<20
	for {
		flush, err := n.flush(ctx)
		if err != nil {
			return catchRun{}, err
		}
		if flush >= target {
			break
		}
		if err := n.primary.Exec(ctx, "INSERT INTO backlog SELECT g, repeat('w', 8000) FROM generate_series(1, 8000) g"); err != nil {
			return catchRun{}, err
		}
	}
	end, err := n.flush(ctx)
	if err != nil {
		return catchRun{}, err
	}
	// perf stat counts the receiving process's fsyncs from as soon as it is spawned; it
	// attaches in the background, so that the catch-up does not wait for it.
	perf := syncs{why: c.perfWhy}
	var pending *pendingCount
	if rs, ok := ship.(receiving); ok && c.perfWhy == "" {
		pending = newPendingCount(filepath.Join(n.dir, "perf-stat.txt"))
		rs.onSpawn(pending.attach)
		defer pending.stop() // if the run ends early
	}
	t0 := time.Now()
	if err := ship.start(ctx, n); err != nil {
		return catchRun{}, err
	}
	if err := lab.Wait(ctx, 5*time.Millisecond, "the backlog to be durable", func() (bool, error) {
		d, err := n.durable(ctx)
		return err == nil && d >= end, nil
	}); err != nil {
		return catchRun{}, err
	}
	took := time.Since(t0)
	cr := catchRun{kind: ship.name(), secs: took.Seconds(), mib: float64(end-start) / (1 << 20)}
	if then != nil {
		if err := then(ctx, n, t0); err != nil {
			return catchRun{}, err
		}
	}
	// The shipper's processes, and its backends on the primary, all started at t0 or
	// after: their whole CPU time is the catch-up's. So is the receiver's count of its
	// fsyncs, which starts at 0 with it.
	ps, err := procs(ctx, n, ship)
	if err != nil {
		return catchRun{}, err
	}
	cr.usage = usage{window: took, walMiB: cr.mib, cost: sinceStart(sample(ps))}
	if k, err := ownFsyncs(ship); err != nil {
		cr.own = syncs{why: err.Error()}
	} else {
		cr.own = syncs{n: k, window: took}
	}
	if pending != nil {
		perf = pending.stop() // before the profiles stop the receiver
	}
	cr.perf = perf
	if profile {
		if err := ship.writeProfiles(ctx, n, "catchup", fmt.Sprintf("a %.0f MiB catch-up (%.1f MiB/s)", cr.mib, cr.mib/cr.secs)); err != nil {
			return catchRun{}, err
		}
	}
	cr.ddMBs, err = ddReference(ctx, n.dir, int(cr.mib))
	return cr, err
}

var ddRE = regexp.MustCompile(`copied, ([0-9.]+) s`)

// ddReference writes mib MiB with dd and conv=fdatasync where the spools live: the
// machine's own limit for the same bytes, in MB/s.
func ddReference(ctx context.Context, dir string, mib int) (float64, error) {
	f := filepath.Join(dir, "dd.tmp")
	defer func() { cleanup("remove dd's file", os.Remove(f)) }()
	out, err := exec.CommandContext(ctx, "dd", "if=/dev/zero", "of="+f, "bs=1M", fmt.Sprintf("count=%d", mib), "conv=fdatasync").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("dd: %v\n%s", err, out)
	}
	m := ddRE.FindStringSubmatch(string(out))
	if m == nil {
		return 0, fmt.Errorf("dd printed no time:\n%s", out)
	}
	secs, _ := strconv.ParseFloat(m[1], 64)
	return float64(mib) * (1 << 20) / 1e6 / secs, nil
}
