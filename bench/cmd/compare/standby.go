package main

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

// walshipLive is walship with the standby's restore in --live mode.
const walshipLive = "walship restore --live"

// standbyRun is one hot standby under load: its replay lag, sampled, and how long its
// promotion took once the primary was killed.
type standbyRun struct {
	kind      string
	lagBytes  []float64     // the primary's flush position less the standby's replay position, per sample
	staleness []stale       // per sample: how long ago the primary had flushed no more than the standby had replayed
	promote   time.Duration // from the failover's first step to the first write the standby took
	acked     int
	lost      int
}

// standbyShippers are new shippers for one round, in their order: walship feeding the
// standby the segment being received, walship with whole segments only, and
// pg_receivewal, whose standby restores whole segments from its directory.
func standbyShippers() []failoverShipper {
	return []failoverShipper{&walship{label: walshipLive, live: true}, &walship{label: walshipName}, &pgReceivewal{}}
}

var standbyKinds = shipperNames(standbyShippers())

// standbyFor is how long each standby runs under load while its lag is sampled: long
// enough for a 16 MB segment to fill at this load, so that a standby fed whole
// segments replays some within it.
const standbyFor = 30 * time.Second

// stale is one staleness figure; censored says the standby had replayed less than the
// primary had flushed at the first sample, so that the figure is a lower bound.
type stale struct {
	d        time.Duration
	censored bool
}

// staleQuantile is the q-quantile of figures, a censored one counting as longer than
// any other.
func staleQuantile(xs []stale, q float64) stale {
	if len(xs) == 0 {
		return stale{}
	}
	s := append([]stale(nil), xs...)
	sort.Slice(s, func(i, j int) bool {
		if s[i].censored != s[j].censored {
			return !s[i].censored
		}
		return s[i].d < s[j].d
	})
	i := int(q*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func (s stale) String() string {
	if s.censored {
		return fmt.Sprintf("> %.0f", ms(s.d))
	}
	return fmt.Sprintf("%.0f", ms(s.d))
}

// standbyLag runs, for each shipper in turn, a hot standby fed by it while the primary
// takes a steady load, then kills the primary and promotes the standby.
func standbyLag(ctx context.Context, c config, r *results) error {
	for round := 1; round <= c.rounds; round++ {
		for _, ship := range standbyShippers() {
			sr, err := standbyTrial(ctx, c, ship)
			if err != nil {
				return fmt.Errorf("standby round %d, %s: %w", round, ship.name(), err)
			}
			m := percentile(sr.lagBytes, 0.5)
			fmt.Printf("  round %d  %-30s replay lag median %9.0f bytes, staleness median %s ms, promoted in %s, lost %d of %d\n",
				round, ship.name(), m, staleQuantile(sr.staleness, 0.5), sr.promote.Round(time.Millisecond), sr.lost, sr.acked)
			r.standbys = append(r.standbys, sr)
		}
	}
	return nil
}

func standbyTrial(ctx context.Context, c config, ship failoverShipper) (standbyRun, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	n, err := newNode(ctx, c, ship)
	if err != nil {
		return standbyRun{}, err
	}
	defer n.close()
	if err := ship.start(ctx, n); err != nil {
		return standbyRun{}, err
	}
	sb, err := startStandby(ctx, n, ship)
	if err != nil {
		return standbyRun{}, err
	}
	defer func() { cleanup("remove the standby", sb.Close()) }()
	var conn *pgx.Conn
	if err := lab.Wait(ctx, 20*time.Millisecond, "the hot standby to accept connections", func() (bool, error) {
		conn, err = sb.Connect(ctx)
		return err == nil, nil
	}); err != nil {
		return standbyRun{}, err
	}
	defer func() { conn.Close(context.Background()) }()

	load, err := lab.StartLoad(ctx, n.primary.DSN(), 1, 100)
	if err != nil {
		return standbyRun{}, err
	}
	samples, err := sampleReplay(ctx, n, conn, standbyFor)
	if err != nil {
		_ = load.Stop() // the error returned is the one above
		return standbyRun{}, err
	}
	sr := standbyRun{kind: ship.name()}
	sr.lagBytes, sr.staleness = replayLag(samples)

	ship.crash()
	if err := n.primary.Kill(); err != nil {
		_ = load.Stop() // the error returned is the one above
		return standbyRun{}, err
	}
	killAt := time.Now()
	_ = load.Stop() // its error is expected: the server died
	acks := load.Acks()
	conn.Close(context.Background())
	start := time.Now()
	if err := ship.promote(ctx, n, sb); err != nil {
		return standbyRun{}, err
	}
	if err := lab.Wait(ctx, 5*time.Millisecond, "the promoted standby to take a write", func() (bool, error) {
		return sb.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) VALUES (-1, 'promoted')") == nil, nil
	}); err != nil {
		return standbyRun{}, err
	}
	sr.promote = time.Since(start)
	loss, err := lab.MeasureLoss(ctx, sb, acks, killAt)
	if err != nil {
		return standbyRun{}, err
	}
	sr.acked, sr.lost = len(acks), len(loss.Lost)
	return sr, nil
}

// startStandby makes a standby of n's primary fed by ship, and starts it.
func startStandby(ctx context.Context, n *node, ship failoverShipper) (*lab.Cluster, error) {
	if w, ok := ship.(*walship); ok && w.live {
		// The standby's user records its hand-outs in the spool.
		if err := n.primary.Own(w.ws.Spool); err != nil {
			return nil, err
		}
	}
	sb, err := n.primary.Standby(ctx, ship.restoreCommand(n))
	if err != nil {
		return nil, err
	}
	// The backup ends in the segment being written: finish it, so that the standby
	// can reach consistency from whole segments, and start it.
	err = n.primary.Exec(ctx, "SELECT pg_switch_wal()")
	if err == nil {
		err = sb.Start(ctx)
	}
	if err != nil {
		cleanup("remove the standby", sb.Close())
		return nil, err
	}
	return sb, nil
}

// replaySample is the primary's flush position and the standby's replay position read
// at one moment.
type replaySample struct {
	at              time.Time
	flush, replayed wal.LSN
}

// sampleReplay reads both positions every 50 ms for d.
func sampleReplay(ctx context.Context, n *node, standby *pgx.Conn, d time.Duration) ([]replaySample, error) {
	var out []replaySample
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		var s replaySample
		var err error
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); s.flush, err = n.flush(ctx) }()
		qerr := standby.QueryRow(ctx, "SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')").Scan(&s.replayed)
		wg.Wait()
		s.at = time.Now()
		if err != nil {
			return nil, err
		}
		if qerr != nil {
			return nil, qerr
		}
		out = append(out, s)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
	return out, nil
}

// replayLag turns samples into the replay lag in bytes and the staleness: at each
// sample, how long ago the primary had flushed no more than the standby has replayed
// (zero when the standby has all the primary had flushed).
func replayLag(samples []replaySample) (bytes []float64, staleness []stale) {
	for i, s := range samples {
		lag := 0.0
		if s.flush > s.replayed {
			lag = float64(s.flush - s.replayed)
		}
		bytes = append(bytes, lag)
		j := i
		for j >= 0 && samples[j].flush > s.replayed {
			j--
		}
		switch {
		case j < 0: // behind everything sampled: at least as old as the first sample
			staleness = append(staleness, stale{d: s.at.Sub(samples[0].at), censored: true})
		case j == i:
			staleness = append(staleness, stale{})
		default:
			staleness = append(staleness, stale{d: s.at.Sub(samples[j].at)})
		}
	}
	return bytes, staleness
}

func (r *results) standbySection(b *strings.Builder, c config) {
	if len(r.standbys) == 0 {
		return
	}
	fmt.Fprintf(b, "\n## A hot standby under load (%d rounds)\n\nEach shipper feeds a hot standby (`wal_retrieve_retry_interval = 100ms`) while one client commits 100-byte rows on the primary for %s; the primary's flush position and the standby's `pg_last_wal_replay_lsn()` are read together every 50 ms. Replay lag: the first less the second. Staleness: at each sample, how long ago the primary had flushed no more than the standby had replayed, to the 50 ms of the sampling (0 when the standby had everything; \"> N\" when the standby had less than the primary at the first sample, N ms before). Then the primary is killed (walship's sidecar lives and drains) and the standby promoted as a failover with that shipper would: `walship promote`; for pg_receivewal, its `.partial` renamed to a whole segment and `pg_promote()`. Promotion: from that first step to the first write the standby took. Lost: acknowledged commits missing after it.\n\n", c.rounds, standbyFor)
	b.WriteString("| standby fed by | replay lag p50, bytes | replay lag p99, bytes | staleness p50 | staleness p99 | promotion | lost |\n|---|---|---|---|---|---|---|\n")
	for _, kind := range standbyKinds {
		var p50, p99, prom, lost []float64
		var s50, s99 []stale
		for _, sr := range r.standbys {
			if sr.kind != kind {
				continue
			}
			p50 = append(p50, percentile(sr.lagBytes, 0.5))
			p99 = append(p99, percentile(sr.lagBytes, 0.99))
			s50 = append(s50, staleQuantile(sr.staleness, 0.5))
			s99 = append(s99, staleQuantile(sr.staleness, 0.99))
			prom = append(prom, ms(sr.promote))
			lost = append(lost, float64(sr.lost))
		}
		if len(p50) == 0 {
			continue
		}
		cell := func(xs []float64, format string) string {
			m, l, h := median(xs)
			return fmt.Sprintf(format+" ["+format+", "+format+"]", m, l, h)
		}
		staleCell := func(xs []stale) string {
			return fmt.Sprintf("%s [%s, %s]", staleQuantile(xs, 0.5), staleQuantile(xs, 0), staleQuantile(xs, 1))
		}
		fmt.Fprintf(b, "| %s | %s | %s | %s ms | %s ms | %s ms | %s |\n", kind, cell(p50, "%.0f"), cell(p99, "%.0f"),
			staleCell(s50), staleCell(s99), cell(prom, "%.0f"), cell(lost, "%.0f"))
	}
}
