// Command compare runs walship beside what a user would pick instead, on the same
// machine in the same run: pg_receivewal --synchronous with a physical slot, and
// archive_command copying whole segments with archive_timeout = 60 s and = 5 s. It
// measures the loss window in crash trials, steady-state lag and primary TPS under
// pgbench, catch-up throughput from a backlog, and the shippers' own cost under load
// and idle: the CPU and memory of each of their processes and of the backends that work
// for them on the primary, and their receivers' fsyncs. It interleaves the shippers in
// each round so that machine drift hits them alike, prints markdown tables ending with
// the project's targets, writes them to --out/RESULTS.md and draws charts beside it.
//
//	go run ./bench/cmd/compare --walship bin/walship --out bench/results
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/walship/walship/tail"
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
	idleFor     time.Duration   // the idle scenario's measured window
	gomaxprocs2 bool            // run walshipProcs2 in the pgbench rounds too
	pollVariant time.Duration   // run walship with this --poll too in the pgbench rounds; 0: not
	perf        bool            // count the receivers' fsyncs with perf stat
	perfWhy     string          // why perf stat cannot count them; "" if it may try
}

// scenarios are the parts of a run, in their order, as --only names them.
var scenarios = []string{"crash", "pgbench", "catchup", "archive", "standby", "idle"}

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
	flag.DurationVar(&c.idleFor, "idle-time", 30*time.Second, "length of the idle scenario's measured window")
	flag.BoolVar(&c.gomaxprocs2, "gomaxprocs2", false, "also run walship with GOMAXPROCS=2 in the pgbench rounds' TPS runs (one more run a round)")
	flag.DurationVar(&c.pollVariant, "poll-variant", 5*time.Millisecond, "also run walship with this --poll in the pgbench rounds, TPS and lag runs (two more runs a round), to show what a slower poll trades; 0: don't")
	flag.BoolVar(&c.perf, "perf", true, "count the receivers' fsync calls with perf stat in the lag, catch-up and idle runs")
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

// cleanup reports a teardown step that failed: it changes no result, but a server or
// a directory it leaves behind may weigh on the rounds after it.
func cleanup(what string, err error) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "compare: %s: %v\n", what, err)
	}
}

func run(c config) error {
	bin, err := filepath.Abs(c.bin)
	if err != nil {
		return err
	}
	c.bin = bin
	c.perfWhy = perfAvailable(c.perf)
	if c.perfWhy != "" {
		step("the receivers' fsync calls are not counted with perf stat: %s", c.perfWhy)
	}
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
	if c.pollVariant > 0 {
		walshipSlow = fmt.Sprintf("walship --poll %s", c.pollVariant)
		pgbenchKinds = append(pgbenchKinds[:2:2], append([]string{walshipSlow}, pgbenchKinds[2:]...)...)
		costKinds = append(costKinds[:1:1], append([]string{walshipSlow}, costKinds[1:]...)...)
	}
	for _, sc := range []struct {
		name  string
		about string
		run   func(context.Context, config, *results) error
	}{
		{"crash", fmt.Sprintf("crash trials: %d rounds of %s", c.crashRounds, strings.Join(crashKinds, ", ")), crashTrials},
		{"pgbench", fmt.Sprintf("pgbench: %d rounds of %s with each shipper and none, then the lag runs", c.rounds, c.pgbenchFor), pgbenchRounds},
		{"catchup", fmt.Sprintf("catch-up: %d MiB of backlog, %d rounds", c.catchupMB, c.rounds), catchUp},
		{"archive", fmt.Sprintf("the catch-up with the archive: %d MiB of backlog, %d rounds", c.catchupMB, c.rounds), archiveUpload},
		{"standby", fmt.Sprintf("a hot standby under load: %d rounds of %s", c.rounds, strings.Join(standbyKinds, ", ")), standbyLag},
		{"idle", fmt.Sprintf("idle cost: walship and pg_receivewal side by side on an idle primary for %s", c.idleFor), idleCost},
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
