package main

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"time"
)

type benchRun struct {
	kind    string
	round   int
	lagRun  bool // a run for the lag: its TPS and cost are not the shipper's alone
	tps     float64
	lags    []time.Duration // time until the shipper was durable past each sampled flush
	lagB    []int64         // bytes between flush and durable at each sample
	walMiBs float64         // the primary's WAL rate over the pgbench run
	usage                   // of the shipper's processes and backends over the run
}

var tpsRE = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)

// pgbenchRounds runs pgbench with each shipper and none, for TPS and the shippers' cost,
// then once more with walship and with pg_receivewal while the lag sampler runs: the
// sampler's queries would otherwise weigh on the TPS of the runs it watches alone. With
// --gomaxprocs2, walship runs a second time in the TPS runs with GOMAXPROCS=2; with
// --poll-variant, it runs a second time in the TPS and the lag runs with that --poll.
func pgbenchRounds(ctx context.Context, c config, r *results) error {
	type run struct {
		ship shipper
		lag  bool
	}
	for round := 1; round <= c.rounds; round++ {
		runs := []run{
			{noShipper{}, false},
			{&walship{label: walshipName}, false},
		}
		slow := func() *walship {
			return &walship{label: walshipSlow, sidecarArgs: []string{"--poll", c.pollVariant.String()}, tag: "slowpoll"}
		}
		if c.gomaxprocs2 {
			runs = append(runs, run{&walship{label: walshipProcs2, env: []string{"GOMAXPROCS=2"}, tag: "gomaxprocs2"}, false})
		}
		if c.pollVariant > 0 {
			runs = append(runs, run{slow(), false})
		}
		runs = append(runs, []run{
			{&pgReceivewal{}, false},
			{archiveCommand{label: archive60, timeout: "60"}, false},
			{&walship{label: walshipName}, true},
			{&pgReceivewal{}, true},
		}...)
		if c.pollVariant > 0 {
			runs = append(runs, run{slow(), true})
		}
		for _, rn := range runs {
			br, err := pgbenchRun(ctx, c, rn.ship, round, rn.lag)
			if err != nil {
				return fmt.Errorf("pgbench round %d, %s: %w", round, rn.ship.name(), err)
			}
			what := "tps"
			if rn.lag {
				what = fmt.Sprintf("lag p50 %.2f ms, p99 %.2f ms", ms(percentile(br.lags, 0.5)), ms(percentile(br.lags, 0.99)))
			}
			if len(br.cost) > 0 {
				what += fmt.Sprintf(", CPU %.3f cores", cores(br.cpu(), br.window))
			}
			if br.own.ok() {
				what += fmt.Sprintf(", %.0f fsyncs/s by its count", br.own.perSec())
			}
			if br.perf.ok() {
				what += fmt.Sprintf(", %.0f fsyncs/s by perf", br.perf.perSec())
			}
			fmt.Printf("  round %d  %-30s %8.0f tps  %6.1f MiB/s of WAL  (%s)\n", round, rn.ship.name(), br.tps, br.walMiBs, what)
			r.bench = append(r.bench, br)
		}
	}
	return nil
}

// pgbenchRun runs pgbench on new clusters with ship; with lag, the lag sampler watches
// the shipper throughout.
func pgbenchRun(ctx context.Context, c config, ship shipper, round int, lag bool) (benchRun, error) {
	ctx, cancel := context.WithTimeout(ctx, c.pgbenchFor+10*time.Minute)
	defer cancel()
	n, err := newNode(ctx, c, ship)
	if err != nil {
		return benchRun{}, err
	}
	defer n.close()
	if out, err := n.primary.Command(ctx, "pgbench", "-i", "-q", "-s", strconv.Itoa(c.scale), "postgres").CombinedOutput(); err != nil {
		return benchRun{}, fmt.Errorf("pgbench -i: %v\n%s", err, out)
	}
	if err := n.primary.Exec(ctx, "CHECKPOINT"); err != nil {
		return benchRun{}, err
	}
	// Each shipper's first TPS run is profiled where it can be (walship's can): the
	// primary's TPS is what the shipper's CPU costs.
	profile := round == 1 && !lag
	if profile {
		ship.profile(n)
	}
	if err := ship.start(ctx, n); err != nil {
		return benchRun{}, err
	}
	if ship.streams() {
		// A new copy starts with the segment being written: let the shipper have it
		// before the run, so that the lag measured is the steady state's.
		if err := n.waitCaughtUp(ctx, "the shipper to catch up"); err != nil {
			return benchRun{}, err
		}
	}
	// perf stat counts the receivers' fsyncs in the lag runs only: the TPS runs would
	// otherwise pay for its syscall tracepoints (see syncCount).
	perfWhy := "perf stat is attached in the lag runs only, lest its tracepoints weigh on the TPS"
	if lag {
		perfWhy = c.perfWhy
	}
	mt, err := beginMeter(ctx, n, ship, perfWhy, filepath.Join(n.dir, "perf-stat.txt"))
	if err != nil {
		return benchRun{}, err
	}
	defer mt.close()
	start, err := n.flush(ctx)
	if err != nil {
		return benchRun{}, err
	}
	sctx, stopSampling := context.WithCancel(ctx)
	defer stopSampling()
	type sampled struct {
		lags   []time.Duration
		behind []int64
	}
	samples := make(chan sampled, 1)
	if lag {
		go func() {
			lags, behind := sampleLag(sctx, n)
			samples <- sampled{lags, behind}
		}()
	} else {
		samples <- sampled{}
	}
	t0 := time.Now()
	out, err := n.primary.Command(ctx, "pgbench", "-c", "4", "-j", "2", "-T", strconv.Itoa(int(c.pgbenchFor.Seconds())), "postgres").CombinedOutput()
	elapsed := time.Since(t0)
	if lag && err == nil {
		// Sample until the shipper has what the run wrote.
		if werr := n.waitCaughtUp(ctx, "the shipper to catch up after the run"); werr != nil {
			return benchRun{}, werr
		}
	}
	stopSampling()
	ss := <-samples
	if err != nil {
		return benchRun{}, fmt.Errorf("pgbench: %v\n%s", err, out)
	}
	m := tpsRE.FindStringSubmatch(string(out))
	if m == nil {
		return benchRun{}, fmt.Errorf("pgbench printed no tps:\n%s", out)
	}
	br := benchRun{kind: ship.name(), round: round, lagRun: lag}
	br.tps, _ = strconv.ParseFloat(m[1], 64)
	end, err := n.flush(ctx)
	if err != nil {
		return benchRun{}, err
	}
	br.walMiBs = float64(end-start) / (1 << 20) / elapsed.Seconds()
	if br.usage, err = mt.end(ctx); err != nil {
		return benchRun{}, err
	}
	br.lags, br.lagB = ss.lags, ss.behind
	if profile {
		during := fmt.Sprintf("a pgbench run of %s at %.0f tps and %.1f MiB/s of WAL (the profile also covers its start)", c.pgbenchFor, br.tps, br.walMiBs)
		if err := ship.writeProfiles(ctx, n, "pgbench", during); err != nil {
			return benchRun{}, err
		}
	}
	return br, nil
}

// sampleLag measures the shipper's lag until ctx ends: every 10 ms it asks the primary
// for its flush position, notes the bytes the shipper's durable position is behind it,
// then reads the durable position every millisecond until it has passed the flush
// position, and takes the time from the asking to that read. The lag so measured errs
// long, never short: the position may have been flushed a little after the asking.
func sampleLag(ctx context.Context, n *node) (lags []time.Duration, behind []int64) {
	for ctx.Err() == nil {
		asked := time.Now()
		flush, err := n.flush(ctx)
		if err != nil {
			break
		}
		for first := true; ctx.Err() == nil; first = false {
			d, err := n.durable(ctx)
			if err != nil {
				return lags, behind
			}
			if first {
				behind = append(behind, max(int64(flush)-int64(d), 0))
			}
			if d >= flush {
				lags = append(lags, time.Since(asked))
				break
			}
			time.Sleep(time.Millisecond) // the reading's resolution
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Until(asked.Add(10 * time.Millisecond))):
		}
	}
	return lags, behind
}
