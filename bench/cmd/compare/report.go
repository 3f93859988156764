package main

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/walship/walship/tail"
)

type results struct {
	started  time.Time
	version  string
	trials   []trial
	bench    []benchRun
	catchup  []catchRun
	archive  []archiveRun
	standbys []standbyRun
	idle     []idleRun
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

func percentile[T cmp.Ordered](xs []T, p float64) T {
	if len(xs) == 0 {
		var zero T
		return zero
	}
	s := slices.Clone(xs)
	slices.Sort(s)
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

// pgbenchKinds are the pgbench table's rows, in their order.
var pgbenchKinds = []string{none, walshipName, walshipProcs2, receivewal, archive60}

// costKinds are the shippers whose processes the cost table shows, in its order.
var costKinds = []string{walshipName, walshipProcs2, receivewal}

// runsOf are kind's pgbench runs: its TPS runs, or with lag its lag runs.
func (r *results) runsOf(kind string, lag bool) []benchRun {
	var out []benchRun
	for _, br := range r.bench {
		if br.kind == kind && br.lagRun == lag {
			out = append(out, br)
		}
	}
	return out
}

// ratios are kind's TPS ratios, one for each round that ran the primary alone too.
func (r *results) ratios(kind string) []float64 {
	base := r.baseTPS()
	var out []float64
	for _, br := range r.runsOf(kind, false) {
		if base[br.round] > 0 {
			out = append(out, br.tps/base[br.round])
		}
	}
	return out
}

// lagsOf pools the lag samples of kind's lag runs.
func (r *results) lagsOf(kind string) (lags []time.Duration, behind []float64) {
	for _, br := range r.runsOf(kind, true) {
		lags = append(lags, br.lags...)
		for _, x := range br.lagB {
			behind = append(behind, float64(x))
		}
	}
	return lags, behind
}

func (r *results) catchupOf(kind string) []catchRun {
	var out []catchRun
	for _, cr := range r.catchup {
		if cr.kind == kind {
			out = append(out, cr)
		}
	}
	return out
}

func (r *results) idleOf(kind string) []usage {
	var out []usage
	for _, ir := range r.idle {
		if ir.kind == kind {
			out = append(out, ir.usage)
		}
	}
	return out
}

func benchUsages(runs []benchRun) []usage {
	var out []usage
	for _, br := range runs {
		out = append(out, br.usage)
	}
	return out
}

func catchUsages(runs []catchRun) []usage {
	var out []usage
	for _, cr := range runs {
		out = append(out, cr.usage)
	}
	return out
}

// shipperCPU is the median over us of all the shipper's processes' CPU, in cores and in
// ms per MiB of WAL; ok is false when there is nothing to take it from.
func shipperCPU(us []usage) (coresMed, perMiBMed float64, ok bool) {
	var c, m []float64
	for _, u := range us {
		if len(u.cost) == 0 {
			continue
		}
		c = append(c, cores(u.cpu(), u.window))
		m = append(m, msPerMiB(u.cpu(), u.walMiB))
	}
	if len(c) == 0 {
		return 0, 0, false
	}
	coresMed, _, _ = median(c)
	perMiBMed, _, _ = median(m)
	return coresMed, perMiBMed, true
}

// incomplete says whether a process of the shipper ended within one of us, its CPU time
// then missing from the totals.
func incomplete(us []usage) bool {
	for _, u := range us {
		if len(u.gone) > 0 {
			return true
		}
	}
	return false
}

func (r *results) markdown(c config) string {
	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "# walship beside the alternatives\n\nRun %s on %s (%d CPUs), %s.\n", r.started.UTC().Format("2006-01-02 15:04 UTC"), host, nproc(), r.version)
	fmt.Fprintf(&b, "Reproduce: `make compare` (or `go run ./bench/cmd/compare --walship bin/walship --out bench/results`).\n")
	fmt.Fprintf(&b, "Medians with [min, max] over the rounds; shippers interleaved within each round.\n")
	r.crashSection(&b, c)
	r.pgbenchSection(&b, c)
	r.catchupSection(&b, c)
	r.archiveSection(&b, c)
	r.standbySection(&b, c)
	r.fsyncSection(&b, c)
	r.costSection(&b, c)
	b.WriteString(r.targets(c))
	b.WriteString("\nCharts: `loss-window.png` (the window of each crash trial, per shipper) and `throughput.png` (catch-up MiB/s and the dd reference).\n")
	return b.String()
}

func (r *results) crashSection(b *strings.Builder, c config) {
	if len(r.trials) == 0 {
		return
	}
	fmt.Fprintf(b, "\n## Crash trials (%d per shipper)\n\nOne connection commits single-row inserts; the primary's postmaster is killed 3 to 5 s in; the standby (base backup plus what the shipper received) is promoted. Lost: acknowledged commits missing on it. Window: kill time minus the acknowledgement of the newest commit it has (negative: a backend of the dead postmaster still committed after the kill).\n\n", c.crashRounds)
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
		fmt.Fprintf(b, "| %s | %.0f [%.0f, %.0f] | %d of %d | %.1f [%.1f, %.1f] | %.1f |\n", kind, lm, ll, lh, zero, len(lost), wm, wl, wh,
			float64(percentile(ws, 0.99))/float64(time.Millisecond))
	}
}

func (r *results) pgbenchSection(b *strings.Builder, c config) {
	if len(r.bench) == 0 {
		return
	}
	fmt.Fprintf(b, "\n## Under pgbench (scale %d, 4 clients, %s a run, %d rounds)\n\n", c.scale, c.pgbenchFor, c.rounds)
	b.WriteString("TPS ratio: the run's TPS over the same round's TPS with no shipper. WAL MiB/s: the primary's flush position's advance over the run. CPU: the shipper's processes and its backends on the primary together, over the TPS run (each process in the cost table below), in cores and in ms per MiB of the primary's WAL. Lag (separate runs, for the sampler's queries weigh on the primary): every 10 ms the primary's flush position is asked, and the shipper's durable position read every 1 ms until it has passed it; the time from the asking to that read (it errs long: the position may have been flushed after the asking), and the bytes the shipper was behind when asked. walship's durable position is read from the receiver's --metrics (it counts a byte once fsynced), pg_receivewal's from pg_stat_replication.flush_lsn (it reports after each fsync with --synchronous).")
	if len(r.runsOf(walshipProcs2, false)) > 0 {
		b.WriteString(" walship GOMAXPROCS=2: walship with GOMAXPROCS=2 in its sidecar's and receiver's environment, where they otherwise run on one processor; TPS runs only.")
	}
	if len(r.runsOf(walshipSlow, false)) > 0 {
		fmt.Fprintf(b, " %s: walship with that poll of the primary's flush position where its default is %s, to show what a slower poll trades; the targets judge the default.", walshipSlow, tail.DefaultPoll)
	}
	b.WriteString("\n\n| shipper | TPS | TPS ratio | WAL MiB/s | CPU, cores | CPU ms per MiB of WAL | lag p50 ms | lag p99 ms | lag max ms | bytes behind p99 |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, kind := range pgbenchKinds {
		runs := r.runsOf(kind, false)
		if len(runs) == 0 {
			continue
		}
		var tps, mibs []float64
		for _, br := range runs {
			tps = append(tps, br.tps)
			mibs = append(mibs, br.walMiBs)
		}
		tm, tl, th := median(tps)
		rm, rl, rh := median(r.ratios(kind))
		mm, _, _ := median(mibs)
		cpuCols := "| - | -"
		if cm, pm, ok := shipperCPU(benchUsages(runs)); ok {
			cpuCols = fmt.Sprintf("| %.3f | %.2f", cm, pm)
			if incomplete(benchUsages(runs)) {
				cpuCols += " (incomplete: see the cost table)"
			}
		}
		lagCols := "| - | - | - | -"
		if lags, behind := r.lagsOf(kind); len(lags) > 0 {
			sort.Float64s(behind)
			lagCols = fmt.Sprintf("| %.2f | %.2f | %.2f | %.0f", ms(percentile(lags, 0.5)), ms(percentile(lags, 0.99)), ms(percentile(lags, 1)),
				behind[min(len(behind)-1, int(0.99*float64(len(behind))))])
		}
		fmt.Fprintf(b, "| %s | %.0f [%.0f, %.0f] | %.3f [%.3f, %.3f] | %.1f %s %s |\n", kind, tm, tl, th, rm, rl, rh, mm, cpuCols, lagCols)
	}
}

func (r *results) catchupSection(b *strings.Builder, c config) {
	if len(r.catchup) == 0 {
		return
	}
	fmt.Fprintf(b, "\n## Catch-up from a %d MiB backlog (%d rounds)\n\nThe shipper stopped (walship's sidecar and receiver) while the backlog was written (the slot keeps it), then started; the time from the start until the backlog is durable at the receiver. Beside it, dd writing the same bytes with conv=fdatasync in the same place. CPU: all the shipper's processes and its backends on the primary, from the start, per MiB of the backlog.\n\n", c.catchupMB, c.rounds)
	b.WriteString("| shipper | MiB/s, median [min, max] | dd MB/s | share of dd | CPU ms per MiB of WAL |\n|---|---|---|---|---|\n")
	for _, kind := range []string{walshipName, receivewal} {
		runs := r.catchupOf(kind)
		if len(runs) == 0 {
			continue
		}
		var rate, dd, share []float64
		for _, cr := range runs {
			rate = append(rate, cr.mib/cr.secs)
			dd = append(dd, cr.ddMBs)
			share = append(share, cr.shareOfDD())
		}
		m, l, h := median(rate)
		dm, _, _ := median(dd)
		sm, _, _ := median(share)
		cpu := "-"
		if _, pm, ok := shipperCPU(catchUsages(runs)); ok {
			cpu = fmt.Sprintf("%.2f", pm)
		}
		fmt.Fprintf(b, "| %s | %.1f [%.1f, %.1f] | %.0f | %.2f | %s |\n", kind, m, l, h, dm, sm, cpu)
	}
}

// notes gathers why figures are missing, each reason once, with where it applies.
type notes struct {
	order  []string
	places map[string][]string
}

func (ns *notes) add(why, place string) {
	if why == "" {
		return
	}
	if ns.places == nil {
		ns.places = map[string][]string{}
	}
	if _, ok := ns.places[why]; !ok {
		ns.order = append(ns.order, why)
	}
	if !slices.Contains(ns.places[why], place) {
		ns.places[why] = append(ns.places[why], place)
	}
}

func (ns *notes) write(b *strings.Builder, intro string) {
	if len(ns.order) == 0 {
		return
	}
	fmt.Fprintf(b, "\n%s\n\n", intro)
	for _, why := range ns.order {
		fmt.Fprintf(b, "- %s: %s\n", strings.Join(ns.places[why], "; "), why)
	}
}

// syncCells are the fsyncs per second and per MiB of WAL, medians over us, of what pick
// takes from each; "-" where none was counted, the reason noted under place.
func syncCells(us []usage, pick func(usage) syncs, ns *notes, place string) (perSec, perMiB string) {
	var rate, per []float64
	for _, u := range us {
		s := pick(u)
		if !s.ok() {
			ns.add(s.why, place)
			continue
		}
		rate = append(rate, s.perSec())
		// Below a KiB of WAL (the idle window) a figure per MiB would mean nothing.
		if u.walMiB*(1<<20) >= 1024 {
			per = append(per, s.perSec()/(u.walMiB/u.window.Seconds()))
		}
	}
	perSec, perMiB = "-", "-"
	if len(rate) > 0 {
		m, _, _ := median(rate)
		perSec = figure(m)
	}
	if len(per) > 0 {
		m, _, _ := median(per)
		perMiB = figure(m)
	}
	return perSec, perMiB
}

// figure prints x with three significant digits or so, without an exponent: fsync
// rates run from a few an hour when idle to thousands a second.
func figure(x float64) string {
	switch {
	case x >= 100:
		return fmt.Sprintf("%.0f", x)
	case x >= 10:
		return fmt.Sprintf("%.1f", x)
	case x >= 1:
		return fmt.Sprintf("%.2f", x)
	default:
		return fmt.Sprintf("%.3f", x)
	}
}

func (r *results) fsyncSection(b *strings.Builder, c config) {
	rows := []struct {
		kind, during string
		us           []usage
	}{
		{walshipName, "pgbench, TPS runs", benchUsages(r.runsOf(walshipName, false))},
		{walshipProcs2, "pgbench, TPS runs", benchUsages(r.runsOf(walshipProcs2, false))},
		{walshipSlow, "pgbench, TPS runs", benchUsages(r.runsOf(walshipSlow, false))},
		{walshipName, "pgbench, lag runs", benchUsages(r.runsOf(walshipName, true))},
		{walshipSlow, "pgbench, lag runs", benchUsages(r.runsOf(walshipSlow, true))},
		{receivewal, "pgbench, lag runs", benchUsages(r.runsOf(receivewal, true))},
		{walshipName, "catch-up", catchUsages(r.catchupOf(walshipName))},
		{receivewal, "catch-up", catchUsages(r.catchupOf(receivewal))},
		{walshipName, "idle", r.idleOf(walshipName)},
		{receivewal, "idle", r.idleOf(receivewal)},
	}
	var table strings.Builder
	var ns notes
	for _, row := range rows {
		if len(row.us) == 0 {
			continue
		}
		var wal []float64
		for _, u := range row.us {
			wal = append(wal, u.walMiB/u.window.Seconds())
		}
		wm, _, _ := median(wal)
		place := row.kind + ", " + row.during
		ownRate, ownPer := syncCells(row.us, func(u usage) syncs { return u.own }, &ns, "own count of "+place)
		perfRate, perfPer := syncCells(row.us, func(u usage) syncs { return u.perf }, &ns, "perf stat of "+place)
		fmt.Fprintf(&table, "| %s | %s | %.2f | %s | %s | %s | %s |\n", row.kind, row.during, wm, ownRate, ownPer, perfRate, perfPer)
	}
	if table.Len() == 0 {
		return
	}
	b.WriteString("\n## The receivers' fsyncs\n\nFsyncs of the receiving process (walship's receiver, pg_receivewal) per second of the measured window and per MiB of the primary's WAL in it, counted two ways: by the receiver's own count (walship_receiver_fsyncs_total on walship's --metrics, each fsync of received WAL; pg_receivewal keeps none), and by `perf stat -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -p PID`, the kernel counting the process's system calls at their tracepoints without stopping it. perf is attached in the lag, catch-up and idle runs only, to every shipper alike, for an enabled syscall tracepoint slows every process's system calls a little, the primary's too; in the catch-up it attaches as the receiving process starts and misses its first tens of ms.\n\n")
	b.WriteString("| shipper | during | WAL MiB/s | fsyncs/s, own count | per MiB, own count | fsyncs/s, perf stat | per MiB, perf stat |\n|---|---|---|---|---|---|---|\n")
	b.WriteString(table.String())
	ns.write(b, "Not counted:")
}

func (r *results) costSection(b *strings.Builder, c config) {
	type scen struct{ pgbench, idle, catchup []usage }
	var table strings.Builder
	var ns notes
	idleWAL := -1.0
	var idleFor time.Duration
	for _, ir := range r.idle {
		idleWAL, idleFor = ir.walMiB*(1<<20), ir.window
	}
	for _, kind := range costKinds {
		sc := scen{benchUsages(r.runsOf(kind, false)), r.idleOf(kind), catchUsages(r.catchupOf(kind))}
		var names []string
		for _, us := range [][]usage{sc.pgbench, sc.idle, sc.catchup} {
			for _, u := range us {
				for name := range u.cost {
					if !slices.Contains(names, name) {
						names = append(names, name)
					}
				}
				for _, name := range u.gone {
					ns.add("it ended during a run: its CPU time there is missing, and so is the total's share of it", kind+": "+name)
				}
			}
		}
		if len(names) == 0 {
			continue
		}
		sort.Strings(names)
		// cell is the median over us of f over the runs that have the process (all of
		// them, for "").
		cell := func(us []usage, name, format string, f func(u usage, cpu time.Duration) float64) string {
			var xs []float64
			for _, u := range us {
				cpu := u.cpu()
				if name != "" {
					pc, ok := u.cost[name]
					if !ok {
						continue
					}
					cpu = pc.cpu
				} else if len(u.cost) == 0 {
					continue
				}
				xs = append(xs, f(u, cpu))
			}
			if len(xs) == 0 {
				return "-"
			}
			m, _, _ := median(xs)
			return fmt.Sprintf(format, m)
		}
		rss := func(us []usage, name string) string {
			peak := int64(-1)
			for _, u := range us {
				if pc, ok := u.cost[name]; ok {
					peak = max(peak, pc.peakKB)
				}
			}
			if peak < 0 || name == "" {
				return "-"
			}
			return fmt.Sprintf("%.1f", float64(peak)/1024)
		}
		coresOf := func(u usage, cpu time.Duration) float64 { return cores(cpu, u.window) }
		percentOf := func(u usage, cpu time.Duration) float64 { return 100 * cores(cpu, u.window) }
		perMiBOf := func(u usage, cpu time.Duration) float64 { return msPerMiB(cpu, u.walMiB) }
		for _, name := range append(names, "") {
			label := name
			if name == "" {
				label = "**all of it**"
			}
			fmt.Fprintf(&table, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", kind, label,
				cell(sc.pgbench, name, "%.3f", coresOf), cell(sc.pgbench, name, "%.2f", perMiBOf), rss(sc.pgbench, name),
				cell(sc.idle, name, "%.3f %%", percentOf), rss(sc.idle, name),
				cell(sc.catchup, name, "%.2f", perMiBOf))
		}
	}
	if table.Len() == 0 {
		return
	}
	b.WriteString("\n## Cost of each shipper's processes\n\nCPU time of each process over the measured window, as a fraction of a core (or a percentage) and in ms per MiB of the primary's WAL written in the window, and its peak RSS (VmHWM; a backend's counts the shared buffers it touched). CPU is utime+stime of /proc/PID/stat or, where the two agree within stat's 10 ms ticks, the exact sum of the threads' run times in /proc/PID/task/*/schedstat. The backends are found by application_name in pg_stat_activity: `walship tail` and `walship slot` (the sidecar's sessions), `pg_receivewal` (its walsender). Under pgbench: the TPS runs, medians over the rounds. Catch-up: from the shipper's start until the backlog is durable.")
	if idleWAL >= 0 {
		fmt.Fprintf(b, " Idle: walship and pg_receivewal side by side on one primary that no client writes to, caught up, after a CHECKPOINT and %s, over %s (the primary wrote %.0f bytes of WAL meanwhile).", idleSettle, idleFor.Round(time.Second), idleWAL)
	}
	b.WriteString("\n\n| shipper | process | pgbench: CPU, cores | pgbench: CPU ms per MiB of WAL | pgbench: peak RSS MiB | idle: CPU, % of a core | idle: peak RSS MiB | catch-up: CPU ms per MiB of WAL |\n|---|---|---|---|---|---|---|---|\n")
	b.WriteString(table.String())
	ns.write(b, "Incomplete:")
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

// targets says, target by target, whether walship met it in this run, with walship's
// figures beside pg_receivewal's where the target compares them.
func (r *results) targets(c config) string {
	var b strings.Builder
	b.WriteString("\n## Targets\n\nThe project's performance targets, each with this run's figures: walship's, and pg_receivewal --synchronous's where the target compares them (or for scale).\n\n| target | walship | pg_receivewal --synchronous | met |\n|---|---|---|---|\n")
	row := func(target, w, p string, ok bool) {
		verdict := "met"
		if !ok {
			verdict = "**no**"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", target, w, p, verdict)
	}
	notRun := func(target, why string) { fmt.Fprintf(&b, "| %s | %s | - | - |\n", target, why) }

	const t1 = "1. primary TPS ratio (with the shipper over with none, same round) at least pg_receivewal's and at least 0.95"
	wr, pr := r.ratios(walshipName), r.ratios(receivewal)
	if len(wr) > 0 && len(pr) > 0 {
		wm, _, _ := median(wr)
		pm, _, _ := median(pr)
		row(t1, fmt.Sprintf("%.3f", wm), fmt.Sprintf("%.3f", pm), wm >= pm && wm >= 0.95)
	} else {
		notRun(t1, "pgbench not run")
	}

	const t2 = "2. CPU of sidecar + receiver + backends at most pg_receivewal's + its walsender's at the same load (judged per MiB of WAL, under pgbench)"
	wu, pu := benchUsages(r.runsOf(walshipName, false)), benchUsages(r.runsOf(receivewal, false))
	wc, wm, wok := shipperCPU(wu)
	pc, pm, pok := shipperCPU(pu)
	switch {
	case !wok || !pok:
		notRun(t2, "pgbench not run")
	case incomplete(wu) || incomplete(pu):
		fmt.Fprintf(&b, "| %s | %.2f ms/MiB (%.3f cores) | %.2f ms/MiB (%.3f cores) | unknown: a process ended during a run |\n", t2, wm, wc, pm, pc)
	default:
		row(t2, fmt.Sprintf("%.2f ms/MiB (%.3f cores)", wm, wc), fmt.Sprintf("%.2f ms/MiB (%.3f cores)", pm, pc), wm <= pm)
	}

	const t3 = "3. idle (no writes on the primary): sidecar + receiver + backends under 0.2 % of a core"
	wi, pi := r.idleOf(walshipName), r.idleOf(receivewal)
	if wc, _, ok := shipperCPU(wi); ok {
		p := "-"
		if pc, _, ok := shipperCPU(pi); ok {
			p = fmt.Sprintf("%.3f %%", 100*pc)
		}
		if incomplete(wi) {
			fmt.Fprintf(&b, "| %s | %.3f %% | %s | unknown: a process ended during the window |\n", t3, 100*wc, p)
		} else {
			row(t3, fmt.Sprintf("%.3f %%", 100*wc), p, wc < 0.002)
		}
	} else {
		notRun(t3, "idle not run")
	}

	const t4 = "4. lag p50 and p99 (the primary's flush position to the receiver's durable one) at most pg_receivewal's"
	wl, _ := r.lagsOf(walshipName)
	pl, _ := r.lagsOf(receivewal)
	if len(wl) > 0 && len(pl) > 0 {
		w50, w99, p50, p99 := percentile(wl, 0.5), percentile(wl, 0.99), percentile(pl, 0.5), percentile(pl, 0.99)
		row(t4, fmt.Sprintf("p50 %.2f ms, p99 %.2f ms", ms(w50), ms(w99)), fmt.Sprintf("p50 %.2f ms, p99 %.2f ms", ms(p50), ms(p99)), w50 <= p50 && w99 <= p99)
	} else {
		notRun(t4, "pgbench not run")
	}

	t5 := fmt.Sprintf("5. catch-up from a %d MiB backlog at least 1.3 times pg_receivewal's", c.catchupMB)
	if c.catchupMB != 2048 {
		t5 += " (the target's backlog is 2048 MiB)"
	}
	const t5b = "5. ... and at least 80 % of dd conv=fdatasync"
	rate := map[string][]float64{}
	share := map[string][]float64{}
	for _, cr := range r.catchup {
		rate[cr.kind] = append(rate[cr.kind], cr.mib/cr.secs)
		share[cr.kind] = append(share[cr.kind], cr.shareOfDD())
	}
	if len(rate[walshipName]) > 0 && len(rate[receivewal]) > 0 {
		wm, _, _ := median(rate[walshipName])
		pm, _, _ := median(rate[receivewal])
		row(t5, fmt.Sprintf("%.1f MiB/s (%.2f times)", wm, wm/pm), fmt.Sprintf("%.1f MiB/s", pm), wm >= 1.3*pm)
		ws, _, _ := median(share[walshipName])
		ps, _, _ := median(share[receivewal])
		row(t5b, fmt.Sprintf("%.0f %%", 100*ws), fmt.Sprintf("%.0f %%", 100*ps), ws >= 0.8)
	} else {
		notRun(t5, "catch-up not run")
		notRun(t5b, "catch-up not run")
	}

	const t6 = "6. kept: zero acknowledged commits lost with the sidecar alive, in every crash trial"
	const t6b = "6. kept: host lost (the sidecar dies with the primary), loss window p99 at most 5 ms"
	lostSum := func(kind string) (float64, int) {
		lost, _ := r.trialsOf(kind)
		sum := 0.0
		for _, l := range lost {
			sum += l
		}
		return sum, len(lost)
	}
	ws, wn := lostSum(walshipDrain)
	ls, ln := lostSum(walshipLiveDrain) // the same guarantee, the standby fed --live
	ws, wn = ws+ls, wn+ln
	if wn > 0 {
		p := "-"
		if ps, pn := lostSum(receivewal); pn > 0 {
			p = fmt.Sprintf("%.0f lost in %d trials", ps, pn)
		}
		row(t6, fmt.Sprintf("%.0f lost in %d trials", ws, wn), p, ws == 0)
	} else {
		notRun(t6, "crash trials not run")
	}
	if _, window := r.trialsOf(walshipLost); len(window) > 0 {
		var ws []time.Duration
		for _, w := range window {
			ws = append(ws, time.Duration(w*float64(time.Millisecond)))
		}
		p99 := ms(percentile(ws, 0.99))
		row(t6b, fmt.Sprintf("%.1f ms", p99), "-", p99 <= 5)
	} else {
		notRun(t6b, "crash trials not run")
	}
	b.WriteString("\nTarget 7, the Go benchmarks, is not measured here. Where a target is missed, the CPU profiles of walship's first pgbench run (`pprof-pgbench-*.txt`, and `pprof-pgbench-<variant>-*.txt` for a variant) and first catch-up (`pprof-catchup-*.txt`) are beside this file; see also the notes in the README. Those profiled runs count in the medians, and profiling costs walship a little CPU.\n")
	return b.String()
}
