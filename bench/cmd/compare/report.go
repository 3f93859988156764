package main

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"
)

type results struct {
	started time.Time
	version string
	trials  []trial
	bench   []benchRun
	catchup []catchRun
	idle    map[string]procCost
	idleFor time.Duration
}

func median(xs []float64) (med, lo, hi float64) {
	if len(xs) == 0 {
		return 0, 0, 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		med = s[len(s)/2]
	} else {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return med, s[0], s[len(s)-1]
}

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// baseTPS is the TPS with no shipper, by round: what the TPS ratios divide by.
func (r *results) baseTPS() map[int]float64 {
	base := map[int]float64{}
	for _, br := range r.bench {
		if br.kind == none {
			base[br.round] = br.tps
		}
	}
	return base
}

func (r *results) trialsOf(kind string) (lost, window []float64) {
	for _, t := range r.trials {
		if t.kind == kind {
			lost = append(lost, float64(t.lost))
			window = append(window, float64(t.window)/float64(time.Millisecond))
		}
	}
	return lost, window
}

func (r *results) markdown(c config) string {
	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "# walship beside the alternatives\n\nRun %s on %s (%d CPUs), %s.\n", r.started.UTC().Format("2006-01-02 15:04 UTC"), host, nproc(), r.version)
	fmt.Fprintf(&b, "Reproduce: `make compare` (or `go run ./bench/cmd/compare --walship bin/walship --out bench/results`).\n")
	fmt.Fprintf(&b, "Medians with [min, max] over the rounds; shippers interleaved within each round.\n\n")

	fmt.Fprintf(&b, "## Crash trials (%d per shipper)\n\nOne connection commits single-row inserts; the primary's postmaster is killed 3 to 5 s in; the standby (base backup plus what the shipper received) is promoted. Lost: acknowledged commits missing on it. Window: kill time minus the acknowledgement of the newest commit it has (negative: a backend of the dead postmaster still committed after the kill).\n\n", c.crashRounds)
	b.WriteString("| shipper | lost, median [min, max] | trials losing nothing | window ms, median [min, max] | window p99 ms |\n|---|---|---|---|---|\n")
	for _, kind := range crashKinds {
		lost, window := r.trialsOf(kind)
		if len(lost) == 0 {
			continue
		}
		lm, ll, lh := median(lost)
		wm, wl, wh := median(window)
		zero := 0
		var ws []time.Duration
		for i, l := range lost {
			if l == 0 {
				zero++
			}
			ws = append(ws, time.Duration(window[i]*float64(time.Millisecond)))
		}
		fmt.Fprintf(&b, "| %s | %.0f [%.0f, %.0f] | %d of %d | %.1f [%.1f, %.1f] | %.1f |\n", kind, lm, ll, lh, zero, len(lost), wm, wl, wh,
			float64(percentile(ws, 0.99))/float64(time.Millisecond))
	}

	fmt.Fprintf(&b, "\n## Under pgbench (scale %d, 4 clients, %s a run, %d rounds)\n\nTPS ratio: the run's TPS over the same round's TPS with no shipper. Lag (separate runs, for the sampler's queries weigh on the primary): every 10 ms the primary's flush position is asked, and the shipper's durable position read every 1 ms until it has passed it; the time from the asking to that read (it errs long: the position may have been flushed after the asking), and the bytes the shipper was behind when asked. walship's durable position is read from the receiver's --metrics (it counts a byte once fsynced), pg_receivewal's from pg_stat_replication.flush_lsn (it reports after each fsync with --synchronous).\n\n", c.scale, c.pgbenchFor, c.rounds)
	b.WriteString("| shipper | TPS | TPS ratio | WAL MiB/s | lag p50 ms | lag p99 ms | lag max ms | bytes behind p99 |\n|---|---|---|---|---|---|---|---|\n")
	base := r.baseTPS()
	for _, kind := range []string{none, walshipName, receivewal, archive60} {
		var tps, ratio, mibs []float64
		var lags []time.Duration
		var lagB []float64
		for _, br := range r.bench {
			if br.kind != kind {
				continue
			}
			if br.lagRun {
				lags = append(lags, br.lags...)
				for _, x := range br.lagB {
					lagB = append(lagB, float64(x))
				}
				continue
			}
			tps = append(tps, br.tps)
			mibs = append(mibs, br.walMiBs)
			if base[br.round] > 0 {
				ratio = append(ratio, br.tps/base[br.round])
			}
		}
		if len(tps) == 0 {
			continue
		}
		tm, tl, th := median(tps)
		rm, rl, rh := median(ratio)
		mm, _, _ := median(mibs)
		lagCols := "| - | - | - | -"
		if len(lags) > 0 {
			sort.Float64s(lagB)
			lagCols = fmt.Sprintf("| %.2f | %.2f | %.2f | %.0f", ms(percentile(lags, 0.5)), ms(percentile(lags, 0.99)), ms(percentile(lags, 1)),
				lagB[min(len(lagB)-1, int(0.99*float64(len(lagB))))])
		}
		fmt.Fprintf(&b, "| %s | %.0f [%.0f, %.0f] | %.3f [%.3f, %.3f] | %.1f %s |\n", kind, tm, tl, th, rm, rl, rh, mm, lagCols)
	}

	fmt.Fprintf(&b, "\n## Catch-up from a %d MiB backlog (%d rounds)\n\nThe shipper stopped (walship's sidecar and receiver) while the backlog was written (the slot keeps it), then started; the time from the start until the backlog is durable at the receiver. Beside it, dd writing the same bytes with conv=fdatasync in the same place.\n\n", c.catchupMB, c.rounds)
	b.WriteString("| shipper | MiB/s, median [min, max] | dd MB/s | share of dd |\n|---|---|---|---|\n")
	for _, kind := range []string{walshipName, receivewal} {
		var rate, dd, share []float64
		for _, cr := range r.catchup {
			if cr.kind == kind {
				rate = append(rate, cr.mib/cr.secs)
				dd = append(dd, cr.ddMBs)
				share = append(share, cr.shareOfDD())
			}
		}
		if len(rate) == 0 {
			continue
		}
		m, l, h := median(rate)
		dm, _, _ := median(dd)
		sm, _, _ := median(share)
		fmt.Fprintf(&b, "| %s | %.1f [%.1f, %.1f] | %.0f | %.2f |\n", kind, m, l, h, dm, sm)
	}

	b.WriteString("\n## Cost of the shipper itself\n\nCPU seconds per second of the run (1.0 is a whole core) and peak RSS.\n\n| process | idle CPU | idle peak RSS MiB | CPU under pgbench | peak RSS under pgbench MiB |\n|---|---|---|---|---|\n")
	loadCost := map[string][]float64{}
	loadRSS := map[string]float64{}
	for _, br := range r.bench {
		if br.lagRun {
			continue
		}
		for name, pc := range br.cost {
			loadCost[name] = append(loadCost[name], pc.cpu.Seconds()/c.pgbenchFor.Seconds())
			loadRSS[name] = max(loadRSS[name], float64(pc.peakKB)/1024)
		}
	}
	var names []string
	for name := range loadCost {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		idle, idleRSS := "-", "-"
		if pc, ok := r.idle[name]; ok {
			idle = fmt.Sprintf("%.4f", pc.cpu.Seconds()/r.idleFor.Seconds())
			idleRSS = fmt.Sprintf("%.1f", float64(pc.peakKB)/1024)
		}
		m, _, _ := median(loadCost[name])
		fmt.Fprintf(&b, "| %s | %s | %s | %.3f | %.1f |\n", name, idle, idleRSS, m, loadRSS[name])
	}
	b.WriteString(r.targets(c))
	b.WriteString("\nCharts: `loss-window.png` (the window of each crash trial, per shipper) and `throughput.png` (catch-up MiB/s and the dd reference).\n")
	return b.String()
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func nproc() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "processor\t:")
}

var errNoData = errors.New("no data to chart")

// targets says, target by target, whether walship met it in this run.
func (r *results) targets(c config) string {
	var b strings.Builder
	b.WriteString("\n## Targets\n\n| target | this run | met |\n|---|---|---|\n")
	row := func(target, got string, ok bool) {
		verdict := "yes"
		if !ok {
			verdict = "**no**"
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", target, got, verdict)
	}
	lost, _ := r.trialsOf(walshipDrain)
	sum := 0.0
	for _, l := range lost {
		sum += l
	}
	row("zero acknowledged commits lost with the sidecar alive, every trial", fmt.Sprintf("%.0f lost in %d trials", sum, len(lost)), len(lost) > 0 && sum == 0)
	_, window := r.trialsOf(walshipLost)
	var ws []time.Duration
	for _, w := range window {
		ws = append(ws, time.Duration(w*float64(time.Millisecond)))
	}
	p99 := ms(percentile(ws, 0.99))
	row("host lost: window p99 of a few ms (at most 5)", fmt.Sprintf("%.1f ms", p99), len(ws) > 0 && p99 <= 5)
	base := r.baseTPS()
	var ratio []float64
	for _, br := range r.bench {
		if br.kind == walshipName && !br.lagRun && base[br.round] > 0 {
			ratio = append(ratio, br.tps/base[br.round])
		}
	}
	rm, _, _ := median(ratio)
	row("primary TPS ratio at least 0.97", fmt.Sprintf("%.3f", rm), len(ratio) > 0 && rm >= 0.97)
	rate := map[string][]float64{}
	var share []float64
	for _, cr := range r.catchup {
		rate[cr.kind] = append(rate[cr.kind], cr.mib/cr.secs)
		if cr.kind == walshipName {
			share = append(share, cr.shareOfDD())
		}
	}
	wm, _, _ := median(rate[walshipName])
	pm, _, _ := median(rate[receivewal])
	row("catch-up at least 1.3 times pg_receivewal's", fmt.Sprintf("%.2f times", wm/max(pm, 1e-9)), pm > 0 && wm >= 1.3*pm)
	sm, _, _ := median(share)
	row("catch-up at least 80 percent of the dd reference", fmt.Sprintf("%.0f percent", 100*sm), len(share) > 0 && sm >= 0.8)
	if pc, ok := r.idle["walship sidecar"]; ok {
		u := pc.cpu.Seconds() / r.idleFor.Seconds()
		row("idle sidecar under 1 percent of a core", fmt.Sprintf("%.2f percent", 100*u), u < 0.01)
	}
	b.WriteString("\nWhere a target is missed, the CPU profiles of walship's first pgbench run (`pprof-pgbench-*.txt`) and first catch-up (`pprof-catchup-*.txt`) are beside this file; see also the notes in the README.\n")
	return b.String()
}
