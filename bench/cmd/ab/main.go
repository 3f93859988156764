// Command ab compares two walship configurations side by side under one load: two
// sidecar and receiver pairs, A and B, ship the same primary's WAL at the same time
// while pgbench runs, and each process's CPU is read over the same window, per MiB of
// the primary's WAL. Run at once on the same WAL, the two see the same load, which
// separate runs on a small shared host do not (pgbench's TPS and the disk vary by tens of
// percent from one run to the next), so a difference of a few percent shows. The pairs
// compete for the same cores, as any two processes on a small host do, alike for both.
//
// It measures walship against walship (two builds, or two sets of flags); make compare
// measures walship against the alternatives. The backends of the two sidecars on the
// primary are not counted: they share an application_name.
//
//	go run ./bench/cmd/ab -a bin/walship -b /tmp/walship-old
//	go run ./bench/cmd/ab -a bin/walship -b bin/walship -b-args '--poll 5ms'
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/walship/walship/bench/lab"
)

func main() {
	binA := flag.String("a", "bin/walship", "walship binary of configuration A")
	binB := flag.String("b", "bin/walship", "walship binary of configuration B")
	argsA := flag.String("a-args", "", "extra flags of A's walship tail")
	argsB := flag.String("b-args", "", "extra flags of B's walship tail")
	rounds := flag.Int("rounds", 3, "measured pgbench runs")
	runFor := flag.Duration("for", 10*time.Second, "measured window of each run")
	scale := flag.Int("scale", 20, "pgbench scale")
	flag.Parse()
	if err := run(*binA, *binB, *argsA, *argsB, *rounds, *runFor, *scale); err != nil {
		fmt.Fprintln(os.Stderr, "ab:", err)
		os.Exit(1)
	}
}

// cleanup reports a teardown step that failed: the comparison stands, but something
// may be left behind.
func cleanup(what string, err error) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "ab: %s: %v\n", what, err)
	}
}

func run(binA, binB, argsA, argsB string, rounds int, runFor time.Duration, scale int) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rounds)*(runFor+time.Minute)+5*time.Minute)
	defer cancel()
	c, err := lab.NewCluster(ctx, lab.Options{Settings: map[string]string{"max_wal_size": "4GB", "checkpoint_timeout": "15min"}})
	if err != nil {
		return err
	}
	defer func() { cleanup("remove the primary", c.Close()) }()
	if err := c.Start(ctx); err != nil {
		return err
	}
	var pairs []*lab.Walship
	defer func() {
		for _, w := range pairs {
			w.Kill()
			cleanup("remove "+w.Dir, os.RemoveAll(w.Dir))
		}
	}()
	for _, cfg := range []struct{ bin, args string }{{binA, argsA}, {binB, argsB}} {
		dir, err := lab.MkdirShared("walship-ab-")
		if err != nil {
			return err
		}
		w, err := lab.NewWalship(cfg.bin, dir)
		if err != nil {
			cleanup("remove "+dir, os.RemoveAll(dir))
			return err
		}
		pairs = append(pairs, w)
		if err := w.StartReceiver(ctx); err != nil {
			return err
		}
		if err := w.StartSidecar(ctx, c, strings.Fields(cfg.args)...); err != nil {
			return err
		}
	}
	if out, err := c.Command(ctx, "pgbench", "-i", "-q", "-s", strconv.Itoa(scale), "postgres").CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i: %v\n%s", err, out)
	}
	fmt.Printf("A: %s %s\nB: %s %s\n", binA, argsA, binB, argsB)
	names := []string{"A sidecar", "A receiver", "B sidecar", "B receiver"}
	var perMiB [4][]float64
	for r := 1; r <= rounds; r++ {
		if err := c.Exec(ctx, "CHECKPOINT"); err != nil {
			return err
		}
		// pgbench runs a little longer than the window, which starts once it is going.
		pb := c.Command(ctx, "pgbench", "-c", "4", "-j", "2", "-T", strconv.Itoa(int(runFor.Seconds())+3), "postgres")
		if err := pb.Start(); err != nil {
			return err
		}
		time.Sleep(2 * time.Second)
		from, err := c.FlushLSN(ctx)
		if err != nil {
			return err
		}
		before := cpus(pairs)
		time.Sleep(runFor)
		to, err := c.FlushLSN(ctx)
		if err != nil {
			return err
		}
		after := cpus(pairs)
		if err := pb.Wait(); err != nil {
			return fmt.Errorf("pgbench: %w", err)
		}
		mib := float64(to-from) / (1 << 20)
		fmt.Printf("run %d: %.1f MiB/s of WAL; CPU ms per MiB:", r, mib/runFor.Seconds())
		for i := range names {
			v := float64(after[i]-before[i]) / float64(time.Millisecond) / mib
			perMiB[i] = append(perMiB[i], v)
			fmt.Printf("  %s %.2f", names[i], v)
		}
		fmt.Println()
	}
	fmt.Println("median CPU ms per MiB of WAL [min, max]:")
	for i, name := range names {
		m, lo, hi := median(perMiB[i])
		fmt.Printf("  %-10s %6.2f [%.2f, %.2f]\n", name, m, lo, hi)
	}
	for p, name := range []string{"A", "B"} {
		var sum []float64
		for r := range perMiB[0] {
			sum = append(sum, perMiB[2*p][r]+perMiB[2*p+1][r])
		}
		m, lo, hi := median(sum)
		fmt.Printf("  %-10s %6.2f [%.2f, %.2f]  (sidecar + receiver)\n", name, m, lo, hi)
	}
	return nil
}

// cpus is the CPU time each process of the pairs has used, sidecar then receiver, from
// the run times of its threads in /proc/PID/task/*/schedstat.
func cpus(pairs []*lab.Walship) []time.Duration {
	var out []time.Duration
	for _, w := range pairs {
		for _, p := range []*lab.Proc{w.Sidecar, w.Receiver} {
			var total time.Duration
			tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", p.Pid()))
			for _, t := range tasks {
				b, err := os.ReadFile(t)
				if err != nil {
					continue // the thread ended meanwhile
				}
				if f := strings.Fields(string(b)); len(f) > 0 {
					n, _ := strconv.ParseInt(f[0], 10, 64)
					total += time.Duration(n)
				}
			}
			out = append(out, total)
		}
	}
	return out
}

func median(v []float64) (m, lo, hi float64) {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2], s[0], s[len(s)-1]
}
