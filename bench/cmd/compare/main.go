// Command compare runs walship beside what a user would pick instead, on the same
// machine in the same run: pg_receivewal --synchronous with a physical slot, and
// archive_command copying whole segments with archive_timeout = 60 s and = 5 s. It
// measures the loss window in crash trials, steady-state lag and primary TPS under
// pgbench, catch-up throughput from a backlog, and the shippers' own CPU and memory,
// interleaving the shippers in each round so that machine drift hits them alike. It
// prints a markdown table, writes it to --out/RESULTS.md and draws charts beside it.
//
//	go run ./bench/cmd/compare --walship bin/walship --out bench/results
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail"
	"github.com/walship/walship/tail/wal"
)

// The shippers compared.
const (
	walshipDrain = "walship (sidecar alive)"
	walshipLost  = "walship (host lost)"
	receivewal   = "pg_receivewal --synchronous"
	archive5     = "archive_timeout = 5s"
	archive60    = "archive_timeout = 60s"
	none         = "no shipper"
	walshipName  = "walship"
)

type config struct {
	bin         string
	out         string
	rounds      int
	crashRounds int
	pgbenchFor  time.Duration
	catchupMB   int
	scale       int
	poll        time.Duration   // walship tail's --poll
	only        map[string]bool // the scenarios to run; empty: all
}

// scenarios are the parts of a run, in their order, as --only names them.
var scenarios = []string{"crash", "pgbench", "catchup", "idle"}

func (c config) runs(scenario string) bool { return len(c.only) == 0 || c.only[scenario] }

func main() {
	var c config
	flag.StringVar(&c.bin, "walship", "bin/walship", "the walship binary")
	flag.StringVar(&c.out, "out", "bench/results", "where RESULTS.md and the charts go")
	flag.IntVar(&c.rounds, "rounds", 3, "rounds of the pgbench and catch-up scenarios")
	flag.IntVar(&c.crashRounds, "crash-rounds", 8, "crash trials of each shipper")
	flag.DurationVar(&c.pgbenchFor, "pgbench-time", 20*time.Second, "length of each pgbench run")
	flag.IntVar(&c.catchupMB, "catchup-mb", 2048, "size of the WAL backlog in the catch-up scenario, MiB")
	flag.IntVar(&c.scale, "scale", 20, "pgbench scale")
	flag.DurationVar(&c.poll, "poll", tail.DefaultPoll, "walship tail's --poll")
	only := flag.String("only", "", "run only these scenarios, comma-separated, of "+strings.Join(scenarios, ", ")+" (default: all)")
	flag.Parse()
	if *only != "" {
		c.only = map[string]bool{}
		for _, s := range strings.Split(*only, ",") {
			if !slices.Contains(scenarios, s) {
				fmt.Fprintf(os.Stderr, "compare: --only: no scenario %q; there are %s\n", s, strings.Join(scenarios, ", "))
				os.Exit(2)
			}
			c.only[s] = true
		}
	}
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "compare:", err)
		os.Exit(1)
	}
}

func run(c config) error {
	bin, err := filepath.Abs(c.bin)
	if err != nil {
		return err
	}
	c.bin = bin
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(c.out, 0o755); err != nil {
		return err
	}
	r := &results{started: time.Now()}
	r.version = "walship (version unknown)"
	if v, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
		r.version = "walship " + strings.TrimSpace(string(v))
	}
	if v, err := exec.Command("pg_config", "--version").Output(); err == nil {
		r.version += ", " + strings.TrimSpace(string(v))
	}
	if c.poll != tail.DefaultPoll {
		r.version += fmt.Sprintf(", walship tail --poll %s", c.poll)
	}
	for _, sc := range []struct {
		name  string
		about string
		run   func(context.Context, config, *results) error
	}{
		{"crash", fmt.Sprintf("crash trials: %d rounds of %s", c.crashRounds, strings.Join(crashKinds, ", ")), crashTrials},
		{"pgbench", fmt.Sprintf("pgbench: %d rounds of %s with each shipper and none, then the lag runs", c.rounds, c.pgbenchFor), pgbenchRounds},
		{"catchup", fmt.Sprintf("catch-up: %d MiB of backlog, %d rounds", c.catchupMB, c.rounds), catchUp},
		{"idle", "idle cost: walship with an idle primary for 10 s", idleCost},
	} {
		if !c.runs(sc.name) {
			continue
		}
		step("%s", sc.about)
		if err := sc.run(ctx, c, r); err != nil {
			return err
		}
	}
	md := r.markdown(c)
	fmt.Println()
	fmt.Print(md)
	if err := os.WriteFile(filepath.Join(c.out, "RESULTS.md"), []byte(md), 0o644); err != nil {
		return err
	}
	return r.charts(c.out)
}

func step(format string, a ...any) {
	fmt.Printf("%s ==> %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, a...))
}

// node is one primary with its shipper and, for the crash trials, its standby.
type node struct {
	c       config
	kind    string
	dir     string
	primary *lab.Cluster
	ws      *lab.Walship // walship kinds
	recv    *exec.Cmd    // pg_receivewal
	recvDir string
	archive string
	// sidecarArgs and receiverArgs are added to walship tail's and receive's flags.
	sidecarArgs, receiverArgs []string
	// pg is a connection to the primary kept for the many small queries of the lag
	// sampler and the waits: a connection each would fork a backend each.
	pgMu sync.Mutex
	pg   *pgx.Conn
}

// query runs a query returning one text value on the node's connection to the primary.
func (n *node) query(ctx context.Context, sql string) (string, error) {
	n.pgMu.Lock()
	defer n.pgMu.Unlock()
	if n.pg == nil {
		conn, err := n.primary.Connect(ctx)
		if err != nil {
			return "", err
		}
		n.pg = conn
	}
	var s string
	if err := n.pg.QueryRow(ctx, sql).Scan(&s); err != nil {
		n.pg.Close(context.Background())
		n.pg = nil
		return "", err
	}
	return s, nil
}

// flush is the primary's flush position.
func (n *node) flush(ctx context.Context) (wal.LSN, error) {
	s, err := n.query(ctx, "SELECT pg_current_wal_flush_lsn()::text")
	if err != nil {
		return 0, err
	}
	return wal.ParseLSN(s)
}

func archiveSettings(dir string, timeout string) map[string]string {
	return map[string]string{
		"archive_mode":    "on",
		"archive_command": fmt.Sprintf("'test ! -f %[1]s/%%f && cp %%p %[1]s/%%f'", dir),
		"archive_timeout": timeout,
	}
}

// newNode starts a primary (16 MB segments) for kind, its shipper not yet.
func newNode(ctx context.Context, c config, kind string, settings map[string]string) (*node, error) {
	dir, err := lab.MkdirShared("walship-compare-")
	if err != nil {
		return nil, err
	}
	n := &node{c: c, kind: kind, dir: dir, archive: filepath.Join(dir, "archive"), recvDir: filepath.Join(dir, "receivewal")}
	for _, d := range []string{n.archive, n.recvDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return nil, err
		}
	}
	conf := map[string]string{"max_wal_size": "4GB", "checkpoint_timeout": "15min"}
	switch kind {
	case archive5:
		conf = merge(conf, archiveSettings(n.archive, "5"))
	case archive60:
		conf = merge(conf, archiveSettings(n.archive, "60"))
	}
	n.primary, err = lab.NewCluster(ctx, lab.Options{Settings: merge(conf, settings)})
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	for _, d := range []string{n.archive, n.recvDir} {
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
	if n.ws != nil {
		n.ws.Kill()
	}
	n.stopReceivewal()
	if n.primary != nil {
		n.primary.Close()
	}
	os.RemoveAll(n.dir)
}

// startShipper starts the kind's shipper (archive shipping runs inside the server).
func (n *node) startShipper(ctx context.Context) error {
	switch n.kind {
	case walshipDrain, walshipLost, walshipName:
		var err error
		if n.ws == nil {
			if n.ws, err = lab.NewWalship(n.c.bin, n.dir); err != nil {
				return err
			}
		}
		if err := n.ws.StartReceiver(ctx, n.receiverArgs...); err != nil {
			return err
		}
		return n.ws.StartSidecar(ctx, n.primary, append([]string{"--poll", n.c.poll.String()}, n.sidecarArgs...)...)
	case receivewal:
		return n.startReceivewal(ctx)
	}
	return nil
}

// profile makes walship's sidecar and receiver write CPU profiles when they stop.
func (n *node) profile() {
	n.sidecarArgs = append(n.sidecarArgs, "--cpu-profile", filepath.Join(n.dir, "sidecar.pprof"))
	n.receiverArgs = append(n.receiverArgs, "--cpu-profile", filepath.Join(n.dir, "receiver.pprof"))
}

// writeProfiles stops walship's sidecar and receiver, which write their CPU profiles as
// they stop, and writes each profile's top functions to pprof-<scenario>-<process>.txt
// in the output directory.
func (n *node) writeProfiles(ctx context.Context, scenario, during string) error {
	for name, p := range map[string]*lab.Proc{"sidecar": n.ws.Sidecar, "receiver": n.ws.Receiver} {
		if err := p.Stop(ctx); err != nil {
			return err
		}
		text := fmt.Sprintf("# CPU profile of the walship %s during %s\n", name, during)
		for _, sort := range []string{"-flat", "-cum"} {
			out, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", sort, "-nodecount=30", n.c.bin, filepath.Join(n.dir, name+".pprof")).CombinedOutput()
			if err != nil {
				return fmt.Errorf("go tool pprof: %v\n%s", err, out)
			}
			text += fmt.Sprintf("\n# go tool pprof -top %s -nodecount=30\n\n%s", sort, out)
		}
		if err := os.WriteFile(filepath.Join(n.c.out, "pprof-"+scenario+"-"+name+".txt"), []byte(text), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func (n *node) stopShipper() {
	if n.ws != nil {
		n.ws.Kill()
	}
	n.stopReceivewal()
}

// startReceivewal runs pg_receivewal as the server's user (its files are 0600) with a
// physical slot and --synchronous, and waits until the server lists it streaming.
func (n *node) startReceivewal(ctx context.Context) error {
	dsn := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres", n.primary.Port)
	create := n.primary.Command(ctx, "pg_receivewal", "-d", dsn, "--slot", "receivewal", "--create-slot", "--if-not-exists")
	if out, err := create.CombinedOutput(); err != nil {
		return fmt.Errorf("pg_receivewal --create-slot: %v\n%s", err, out)
	}
	cmd := n.primary.Command(context.Background(), "pg_receivewal", "-d", dsn, "-D", n.recvDir, "--slot", "receivewal",
		"--synchronous", "--no-loop", "--no-password")
	log, err := os.OpenFile(filepath.Join(n.dir, "receivewal.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		log.Close()
		return err
	}
	go func() { cmd.Wait(); log.Close() }()
	n.recv = cmd
	return lab.Wait(ctx, 20*time.Millisecond, "pg_receivewal to stream", func() (bool, error) {
		s, err := n.primary.QueryString(ctx, "SELECT count(*)::text FROM pg_stat_replication WHERE state = 'streaming'")
		return err == nil && s == "1", nil
	})
}

func (n *node) stopReceivewal() {
	if n.recv != nil && n.recv.Process != nil {
		n.recv.Process.Kill()
		n.recv.Process.Wait()
		n.recv = nil
	}
}

// durable is where the shipper's copy of the WAL is durable.
func (n *node) durable(ctx context.Context) (wal.LSN, error) {
	switch n.kind {
	case receivewal:
		s, err := n.query(ctx, "SELECT coalesce((SELECT flush_lsn::text FROM pg_stat_replication LIMIT 1), '0/0')")
		if err != nil {
			return 0, err
		}
		return wal.ParseLSN(s)
	default:
		return n.ws.Durable()
	}
}

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

// pids are the shipper's processes, for their CPU time and memory.
func (n *node) pids() map[string]int {
	switch {
	case n.ws != nil && n.ws.Sidecar != nil:
		return map[string]int{"walship sidecar": n.ws.Sidecar.Pid(), "walship receiver": n.ws.Receiver.Pid()}
	case n.recv != nil:
		return map[string]int{"pg_receivewal": n.recv.Process.Pid}
	}
	return nil
}

// ---- crash trials ----

type trial struct {
	kind   string
	acked  int
	lost   int
	window time.Duration
}

var crashKinds = []string{walshipDrain, walshipLost, receivewal, archive5, archive60}

func crashTrials(ctx context.Context, c config, r *results) error {
	for round := 1; round <= c.crashRounds; round++ {
		for _, kind := range crashKinds {
			tr, err := crashTrial(ctx, c, kind)
			if err != nil {
				return fmt.Errorf("crash trial %d, %s: %w", round, kind, err)
			}
			fmt.Printf("  round %d  %-30s acked %6d  lost %6d  window %s\n", round, kind, tr.acked, tr.lost, tr.window.Round(time.Microsecond))
			r.trials = append(r.trials, tr)
		}
	}
	return nil
}

func crashTrial(ctx context.Context, c config, kind string) (trial, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	n, err := newNode(ctx, c, kind, nil)
	if err != nil {
		return trial{}, err
	}
	defer n.close()
	if err := n.startShipper(ctx); err != nil {
		return trial{}, err
	}
	var restore string
	switch kind {
	case walshipDrain, walshipLost:
		restore = fmt.Sprintf("%s restore --spool %s %%f %%p %%r", c.bin, n.ws.Spool)
	case receivewal:
		restore = fmt.Sprintf("cp %s/%%f %%p", n.recvDir)
	default:
		restore = fmt.Sprintf("cp %s/%%f %%p", n.archive)
	}
	sb, err := n.primary.Standby(ctx, restore)
	if err != nil {
		return trial{}, err
	}
	defer sb.Close()
	// The backup ends in the segment being written: finish it, so that the standby
	// can reach consistency from whole segments, and start it.
	if err := n.primary.Exec(ctx, "SELECT pg_switch_wal()"); err != nil {
		return trial{}, err
	}
	if err := sb.Start(ctx); err != nil {
		return trial{}, err
	}
	load, err := lab.StartLoad(ctx, n.primary.DSN(), 1, 100)
	if err != nil {
		return trial{}, err
	}
	time.Sleep(time.Duration(3000+rand.IntN(2000)) * time.Millisecond) // the crash moment is the trial's random input
	killAt := time.Now()
	if kind == walshipLost {
		n.ws.Sidecar.Kill()
	}
	if err := n.primary.Kill(); err != nil {
		load.Stop()
		return trial{}, err
	}
	load.Stop() // its error is expected: the server died
	acks := load.Acks()

	switch kind {
	case walshipDrain, walshipLost:
		out, err := exec.CommandContext(ctx, c.bin, "promote", "--spool", n.ws.Spool, "--dsn", sb.DSN(), "--timeout", "2m").CombinedOutput()
		if err != nil {
			return trial{}, fmt.Errorf("walship promote: %v\n%s", err, out)
		}
	case receivewal:
		// pg_receivewal ends when its server dies; its .partial (padded to the segment
		// size) is what a failover with it uses.
		if err := waitExit(ctx, n.recv); err != nil {
			return trial{}, err
		}
		parts, _ := filepath.Glob(filepath.Join(n.recvDir, "*.partial"))
		for _, p := range parts {
			if err := os.Rename(p, strings.TrimSuffix(p, ".partial")); err != nil {
				return trial{}, err
			}
		}
		fallthrough
	default:
		// Before it ends recovery, the standby restores every segment there is.
		if err := sb.Exec(ctx, "SELECT pg_promote(true, 120)"); err != nil {
			return trial{}, fmt.Errorf("pg_promote: %w", err)
		}
	}
	loss, err := lab.MeasureLoss(ctx, sb, acks, killAt)
	if err != nil {
		return trial{}, err
	}
	return trial{kind: kind, acked: len(acks), lost: len(loss.Lost), window: loss.Window}, nil
}

func waitExit(ctx context.Context, cmd *exec.Cmd) error {
	return lab.Wait(ctx, 20*time.Millisecond, "pg_receivewal to exit", func() (bool, error) {
		return cmd.ProcessState != nil || syscall.Kill(cmd.Process.Pid, 0) != nil, nil
	})
}

// ---- pgbench: primary TPS, lag, shipper cost under load ----

type benchRun struct {
	kind    string
	round   int
	lagRun  bool // a run for the lag: its TPS and cost are not the shipper's alone
	tps     float64
	lags    []time.Duration // time until the shipper was durable past each sampled flush
	lagB    []int64         // bytes between flush and durable at each sample
	cost    map[string]procCost
	walMiBs float64
}

type procCost struct {
	cpu    time.Duration
	peakKB int64
}

var tpsRE = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)

// pgbenchRounds runs pgbench with each shipper and none, for TPS and the shippers' cost,
// then once more with walship and with pg_receivewal while the lag sampler runs: the
// sampler's queries would otherwise weigh on the TPS of the runs it watches alone.
func pgbenchRounds(ctx context.Context, c config, r *results) error {
	type run struct {
		kind string
		lag  bool
	}
	runs := []run{{none, false}, {walshipName, false}, {receivewal, false}, {archive60, false}, {walshipName, true}, {receivewal, true}}
	for round := 1; round <= c.rounds; round++ {
		for _, rn := range runs {
			br, err := pgbenchRun(ctx, c, rn.kind, round, rn.lag)
			if err != nil {
				return fmt.Errorf("pgbench round %d, %s: %w", round, rn.kind, err)
			}
			what := "tps"
			if rn.lag {
				what = fmt.Sprintf("lag p50 %.2f ms, p99 %.2f ms", ms(percentile(br.lags, 0.5)), ms(percentile(br.lags, 0.99)))
			}
			fmt.Printf("  round %d  %-30s %8.0f tps  %6.1f MiB/s of WAL  (%s)\n", round, rn.kind, br.tps, br.walMiBs, what)
			r.bench = append(r.bench, br)
		}
	}
	return nil
}

// pgbenchRun runs pgbench on new clusters with the kind's shipper; with lag, the lag
// sampler watches the shipper throughout.
func pgbenchRun(ctx context.Context, c config, kind string, round int, lag bool) (benchRun, error) {
	ctx, cancel := context.WithTimeout(ctx, c.pgbenchFor+10*time.Minute)
	defer cancel()
	n, err := newNode(ctx, c, kind, nil)
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
	// walship's first TPS run is profiled: the primary's TPS is what its CPU costs.
	profile := round == 1 && kind == walshipName && !lag
	if profile {
		n.profile()
	}
	if err := n.startShipper(ctx); err != nil {
		return benchRun{}, err
	}
	if kind == walshipName || kind == receivewal {
		// A new copy starts with the segment being written: let the shipper have it
		// before the run, so that the lag measured is the steady state's.
		if err := n.waitCaughtUp(ctx, "the shipper to catch up"); err != nil {
			return benchRun{}, err
		}
	}
	before := costs(n.pids())
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
	br := benchRun{kind: kind, round: round, lagRun: lag, cost: map[string]procCost{}}
	br.tps, _ = strconv.ParseFloat(m[1], 64)
	end, err := n.flush(ctx)
	if err != nil {
		return benchRun{}, err
	}
	br.walMiBs = float64(end-start) / (1 << 20) / elapsed.Seconds()
	after := costs(n.pids())
	for name, a := range after {
		br.cost[name] = procCost{cpu: a.cpu - before[name].cpu, peakKB: a.peakKB}
	}
	br.lags, br.lagB = ss.lags, ss.behind
	if profile {
		during := fmt.Sprintf("a pgbench run of %s at %.0f tps and %.1f MiB/s of WAL (the profile also covers its start)", c.pgbenchFor, br.tps, br.walMiBs)
		if err := n.writeProfiles(ctx, "pgbench", during); err != nil {
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

// costs reads the CPU time and peak RSS of each process.
func costs(pids map[string]int) map[string]procCost {
	out := map[string]procCost{}
	for name, pid := range pids {
		var pc procCost
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
			if len(f) > 13 {
				ut, _ := strconv.ParseInt(f[11], 10, 64)
				st, _ := strconv.ParseInt(f[12], 10, 64)
				pc.cpu = time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ is 100
			}
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
			for _, line := range strings.Split(string(b), "\n") {
				if strings.HasPrefix(line, "VmHWM:") {
					pc.peakKB, _ = strconv.ParseInt(strings.Fields(line)[1], 10, 64)
				}
			}
		}
		out[name] = pc
	}
	return out
}

// ---- catch-up ----

type catchRun struct {
	kind  string
	mib   float64
	secs  float64
	ddMBs float64
}

func catchUp(ctx context.Context, c config, r *results) error {
	for round := 1; round <= c.rounds; round++ {
		for _, kind := range []string{walshipName, receivewal} {
			cr, err := catchUpRun(ctx, c, kind, round == 1)
			if err != nil {
				return fmt.Errorf("catch-up round %d, %s: %w", round, kind, err)
			}
			fmt.Printf("  round %d  %-30s %7.0f MiB in %5.1f s: %6.1f MiB/s (dd with fdatasync: %6.1f MB/s)\n",
				round, kind, cr.mib, cr.secs, cr.mib/cr.secs, cr.ddMBs)
			r.catchup = append(r.catchup, cr)
		}
	}
	return nil
}

func catchUpRun(ctx context.Context, c config, kind string, profile bool) (catchRun, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	n, err := newNode(ctx, c, kind, nil)
	if err != nil {
		return catchRun{}, err
	}
	defer n.close()
	profile = profile && n.kind == walshipName
	if profile {
		n.profile()
	}
	if err := n.startShipper(ctx); err != nil {
		return catchRun{}, err
	}
	// Stop the shipper once it holds the current segment (an empty spool would start
	// again at the segment being written and skip the backlog); the slot keeps the WAL
	// it has not taken. walship's sidecar stops too, so that the catch-up is timed from
	// a start, as pg_receivewal's is, not from its reconnection backoff.
	if err := n.waitCaughtUp(ctx, "the shipper to hold the current segment"); err != nil {
		return catchRun{}, err
	}
	n.stopShipper()
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
	t0 := time.Now()
	if err := n.startShipper(ctx); err != nil {
		return catchRun{}, err
	}
	if err := lab.Wait(ctx, 5*time.Millisecond, "the backlog to be durable", func() (bool, error) {
		d, err := n.durable(ctx)
		return err == nil && d >= end, nil
	}); err != nil {
		return catchRun{}, err
	}
	cr := catchRun{kind: kind, secs: time.Since(t0).Seconds(), mib: float64(end-start) / (1 << 20)}
	if profile {
		if err := n.writeProfiles(ctx, "catchup", fmt.Sprintf("a %.0f MiB catch-up (%.1f MiB/s)", cr.mib, cr.mib/cr.secs)); err != nil {
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
	defer os.Remove(f)
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

// ---- idle cost ----

func idleCost(ctx context.Context, c config, r *results) error {
	n, err := newNode(ctx, c, walshipName, nil)
	if err != nil {
		return err
	}
	defer n.close()
	if err := n.startShipper(ctx); err != nil {
		return err
	}
	before := costs(n.pids())
	time.Sleep(10 * time.Second) // the measured interval
	after := costs(n.pids())
	r.idle = map[string]procCost{}
	for name, a := range after {
		r.idle[name] = procCost{cpu: a.cpu - before[name].cpu, peakKB: a.peakKB}
	}
	r.idleFor = 10 * time.Second
	return nil
}

// ---- results ----

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
	base := map[int]float64{}
	for _, br := range r.bench {
		if br.kind == none {
			base[br.round] = br.tps
		}
	}
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
				share = append(share, cr.mib*(1<<20)/1e6/cr.secs/cr.ddMBs)
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
	base := map[int]float64{}
	for _, br := range r.bench {
		if br.kind == none {
			base[br.round] = br.tps
		}
	}
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
			share = append(share, cr.mib*(1<<20)/1e6/cr.secs/cr.ddMBs)
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
