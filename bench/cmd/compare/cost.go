package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/walship/walship/tail/wal"
)

// procCost is what one process took over a measured window.
type procCost struct {
	cpu    time.Duration
	peakKB int64
}

// procSample is one reading of a process's CPU time and peak memory.
type procSample struct {
	start    int64         // start time in clock ticks after boot: tells a reused pid
	statCPU  time.Duration // utime+stime of /proc/PID/stat: every thread that ever ran, in 10 ms ticks
	schedCPU time.Duration // the live threads' run time in /proc/PID/task/*/schedstat, in ns
	sched    bool          // schedCPU was read
	peakKB   int64         // VmHWM of /proc/PID/status
}

// statTick is the unit of /proc/PID/stat's times: USER_HZ, which Linux fixes at 100 for
// what it shows to user space whatever its own tick (proc(5)).
const statTick = 10 * time.Millisecond

// sample reads each process of pids, by name; a process that is gone is left out.
func sample(pids map[string]int) map[string]procSample {
	out := map[string]procSample{}
	for name, pid := range pids {
		if s, ok := readProc(pid); ok {
			out[name] = s
		}
	}
	return out
}

func readProc(pid int) (procSample, bool) {
	var s procSample
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, false
	}
	// The command name, in parentheses, may hold spaces: count the fields after it
	// (field 3, the state, is f[0]).
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	if len(f) < 20 {
		return s, false
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	s.statCPU = time.Duration(ut+st) * statTick
	s.start, _ = strconv.ParseInt(f[19], 10, 64)
	if tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid)); err == nil && len(tasks) > 0 {
		s.sched = true
		for _, t := range tasks {
			b, err := os.ReadFile(t)
			if err != nil {
				s.sched = false // a thread that ended as it was read, or no schedstats
				break
			}
			run, _, _ := strings.Cut(string(b), " ")
			ns, err := strconv.ParseInt(strings.TrimSpace(run), 10, 64)
			if err != nil {
				s.sched = false
				break
			}
			s.schedCPU += time.Duration(ns)
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "VmHWM:") {
				s.peakKB, _ = strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			}
		}
	}
	return s, true
}

// cpuOf picks between the two readings of a CPU time (or of a difference of two): the
// schedstat one is exact to the nanosecond, which the idle scenario needs (0.2 % of a
// core over 30 s is 60 ms, six of stat's ticks), but it loses a thread that has ended;
// stat's counts every thread but rounds utime and stime down to a tick each. Where the
// two agree within that rounding, schedstat's is taken, else stat's.
func cpuOf(stat, sched time.Duration, schedOK bool) time.Duration {
	if schedOK && (stat-sched).Abs() <= 2*statTick {
		return sched
	}
	return stat
}

// spent is the CPU time each process took between two samples, and its peak RSS at
// the second. gone names the processes of before that had ended (or whose pid was
// reused) by after: their CPU time in the window is unknown.
func spent(before, after map[string]procSample) (cost map[string]procCost, gone []string) {
	cost = map[string]procCost{}
	for name, b := range before {
		a, ok := after[name]
		if !ok || a.start != b.start {
			gone = append(gone, name)
			continue
		}
		cost[name] = procCost{cpu: cpuOf(a.statCPU-b.statCPU, a.schedCPU-b.schedCPU, a.sched && b.sched), peakKB: a.peakKB}
	}
	return cost, gone
}

// sinceStart is the CPU time each process took since it started, for processes that
// all started within the window measured.
func sinceStart(after map[string]procSample) map[string]procCost {
	cost := map[string]procCost{}
	for name, a := range after {
		cost[name] = procCost{cpu: cpuOf(a.statCPU, a.schedCPU, a.sched), peakKB: a.peakKB}
	}
	return cost
}

// usage is what a shipper's processes, its backends on the primary included, took over
// one measured window, beside the primary's WAL in that window.
type usage struct {
	window time.Duration
	walMiB float64             // the primary's WAL written in the window
	cost   map[string]procCost // by process
	gone   []string            // processes that ended in the window: their CPU is missing
	own    syncs               // the receiver's own count of its fsyncs
	perf   syncs               // perf stat's count of the receiving process's fsync calls
}

// cpu is the CPU time of all the shipper's processes.
func (u usage) cpu() time.Duration {
	var t time.Duration
	for _, pc := range u.cost {
		t += pc.cpu
	}
	return t
}

// cores is CPU seconds per second of the window: 1 is a whole core.
func cores(cpu, window time.Duration) float64 {
	if window <= 0 {
		return 0
	}
	return cpu.Seconds() / window.Seconds()
}

// msPerMiB is CPU milliseconds per MiB of the primary's WAL.
func msPerMiB(cpu time.Duration, mib float64) float64 {
	if mib <= 0 {
		return 0
	}
	return ms(cpu) / mib
}

// procs are the shipper's processes and its backends on the primary, by name.
func procs(ctx context.Context, n *node, ship shipper) (map[string]int, error) {
	backends, err := ship.backends(ctx, n)
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for name, pid := range ship.pids() {
		out[name] = pid
	}
	for name, pid := range backends {
		out[name] = pid
	}
	return out, nil
}

// A meter measures one shipper over a window of a run: begin it before the load, end
// it after.
type meter struct {
	n      *node
	ship   shipper
	procs  map[string]int
	before map[string]procSample
	own    uint64
	ownErr error
	perf   *syncCount // nil: perfWhy says why not
	// perfWhy says why perf stat does not count the receiving process's fsyncs.
	perfWhy string
	flush   wal.LSN
	began   time.Time
}

// beginMeter finds the shipper's processes and backends and reads them, with the
// receiver's own count of its fsyncs and the primary's flush position. Unless perfWhy
// says why not, it first attaches perf stat to the receiving process and switches its
// count on, writing perf's output to perfOut.
func beginMeter(ctx context.Context, n *node, ship shipper, perfWhy, perfOut string) (*meter, error) {
	ps, err := procs(ctx, n, ship)
	if err != nil {
		return nil, err
	}
	m := &meter{n: n, ship: ship, procs: ps, perfWhy: perfWhy}
	if m.perfWhy == "" {
		m.perf, m.perfWhy = attachPerf(ship, perfOut)
	}
	m.own, m.ownErr = ownFsyncs(ship)
	m.before = sample(ps)
	if m.flush, err = n.flush(ctx); err != nil {
		m.close()
		return nil, err
	}
	m.began = time.Now()
	return m, nil
}

// attachPerf starts perf stat on ship's receiving process and switches its count on.
func attachPerf(ship shipper, out string) (*syncCount, string) {
	rs, ok := ship.(receiving)
	if !ok || rs.receiverPID() == 0 {
		return nil, "no process of its own receives the WAL"
	}
	sc, err := startSyncCount(rs.receiverPID(), out)
	if err != nil {
		return nil, err.Error()
	}
	if err := sc.enable(); err != nil {
		sc.kill()
		return nil, err.Error()
	}
	return sc, ""
}

// ownFsyncs reads the receiver's own count of its fsyncs.
func ownFsyncs(ship shipper) (uint64, error) {
	sc, ok := ship.(selfCounting)
	if !ok {
		return 0, errNoOwnCount
	}
	return sc.fsyncs()
}

// end reads everything again and returns the usage over the window.
func (m *meter) end(ctx context.Context) (usage, error) {
	defer m.close()
	flush, err := m.n.flush(ctx)
	if err != nil {
		return usage{}, err
	}
	after := sample(m.procs)
	u := usage{window: time.Since(m.began), walMiB: float64(flush-m.flush) / (1 << 20)}
	u.cost, u.gone = spent(m.before, after)
	u.own = syncs{why: reason(m.ownErr)}
	if m.ownErr == nil {
		if now, err := ownFsyncs(m.ship); err != nil {
			u.own.why = reason(err)
		} else if now < m.own {
			u.own.why = "the receiver restarted in the window"
		} else {
			u.own = syncs{n: now - m.own, window: u.window}
		}
	}
	u.perf = syncs{why: m.perfWhy}
	if m.perf != nil {
		u.perf = m.perf.stop()
		m.perf = nil
	}
	for _, name := range u.gone {
		fmt.Printf("  note: %s ended during the run: its CPU time is not counted\n", name)
	}
	return u, nil
}

// close stops what the meter started, for a run that ends early.
func (m *meter) close() {
	if m.perf != nil {
		m.perf.kill()
	}
}

func reason(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
