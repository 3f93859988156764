// Command demo runs walship end to end on this machine and compares it with plain
// archive shipping, in a temporary directory that it removes afterwards. It is what
// `make demo` runs:
//
//  1. a primary with archive_command copying whole segments and archive_timeout = 60s;
//  2. walship: a receiver and a sidecar, and standby A fed by walship restore;
//  3. standby B fed by the same primary's archive, the classic warm standby;
//  4. a load client committing single-row inserts, with a once-a-second readout of how
//     far behind the spool is;
//  5. kill -9 of the primary's postmaster; walship promote for A, pg_promote() for B;
//  6. side by side: the commits acknowledged, and what each standby recovered.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/walship/walship/bench/lab"
)

func main() {
	bin := flag.String("walship", "bin/walship", "the walship binary to run")
	seconds := flag.Int("seconds", 10, "how long the load runs before the primary is killed")
	keep := flag.Bool("keep", false, "keep the temporary directory (spool, logs)")
	flag.Parse()
	if err := run(*bin, time.Duration(*seconds)*time.Second, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// cleanup reports a teardown step that failed: the demo's result stands, but something
// may be left behind.
func cleanup(what string, err error) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %s: %v\n", what, err)
	}
}

type demo struct {
	bin, dir, archive string
	primary           *lab.Cluster
	ws                *lab.Walship
}

func run(bin string, dur time.Duration, keep bool) error {
	bin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, dur+5*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "walship-demo-")
	if err != nil {
		return err
	}
	if keep {
		fmt.Printf("keeping %s\n", dir)
	} else {
		defer func() { cleanup("remove "+dir, os.RemoveAll(dir)) }()
	}
	if err := os.Chmod(dir, 0o755); err != nil { // the servers run as postgres when this runs as root
		return err
	}
	d := &demo{bin: bin, dir: dir, archive: filepath.Join(dir, "archive")}
	if err := os.Mkdir(d.archive, 0o755); err != nil {
		return err
	}

	step("primary: PostgreSQL with 16 MB segments, archive_command copying whole segments, archive_timeout = 60s")
	d.primary, err = lab.NewCluster(ctx, lab.Options{Settings: map[string]string{
		"archive_mode":    "on",
		"archive_command": fmt.Sprintf("'test ! -f %[1]s/%%f && cp %%p %[1]s/%%f'", d.archive),
		"archive_timeout": "60",
	}})
	if err != nil {
		return err
	}
	defer func() { cleanup("remove the primary", d.primary.Close()) }()
	if err := d.primary.Own(d.archive); err != nil {
		return err
	}
	if err := d.primary.Start(ctx); err != nil {
		return err
	}
	step("walship certs; walship receive --spool ...; walship tail --dsn ... --to ...")
	if d.ws, err = lab.NewWalship(bin, dir); err != nil {
		return err
	}
	defer d.ws.Kill()
	if err := d.ws.StartReceiver(ctx); err != nil {
		return err
	}
	if err := d.ws.StartSidecar(ctx, d.primary); err != nil {
		return err
	}

	step("standby A: walship standby init --spool ... --pgdata ... (a base backup over the link), restore_command = 'walship restore --spool ... %f %p %r'")
	a, err := d.ws.StandbyInit(ctx, d.primary, fmt.Sprintf("%s restore --spool %s %%f %%p %%r", bin, d.ws.Spool))
	if err != nil {
		return err
	}
	defer func() { cleanup("remove standby A", a.Close()) }()
	step("standby B: the same kind of copy, restore_command = 'cp <archive>/%f %p' (plain archive shipping)")
	b, err := d.ws.StandbyInit(ctx, d.primary, fmt.Sprintf("cp %s/%%f %%p", d.archive))
	if err != nil {
		return err
	}
	defer func() { cleanup("remove standby B", b.Close()) }()
	// Both backups end in the segment being written; publish and archive it, so that
	// both standbys can reach consistency, then start them.
	if err := d.primary.Exec(ctx, "SELECT pg_switch_wal()"); err != nil {
		return err
	}
	for _, sb := range []*lab.Cluster{a, b} {
		if err := sb.Start(ctx); err != nil {
			return err
		}
	}

	step(fmt.Sprintf("load: one connection committing single-row inserts for %s", dur))
	load, err := lab.StartLoad(ctx, d.primary.DSN(), 1, 100)
	if err != nil {
		return err
	}
	fmt.Printf("\n%8s  %10s  %14s  %14s  %12s\n", "time", "commits", "primary flush", "spool durable", "spool behind")
	start := time.Now()
	for time.Since(start) < dur {
		select {
		case <-ctx.Done():
			_ = load.Stop() // the error returned is the one above
			return ctx.Err()
		case <-time.After(time.Second):
		}
		flush, err := d.primary.FlushLSN(ctx)
		if err != nil {
			_ = load.Stop() // the error returned is the one above
			return err
		}
		pos, err := d.ws.Durable()
		if err != nil {
			_ = load.Stop() // the error returned is the one above
			return err
		}
		fmt.Printf("%7.0fs  %10d  %14s  %14s  %10d B\n", time.Since(start).Seconds(), load.Count(), flush, pos, max(int64(flush)-int64(pos), 0))
	}

	step("kill -9 of the primary's postmaster")
	killAt := time.Now()
	if err := d.primary.Kill(); err != nil {
		return err
	}
	_ = load.Stop() // its error is expected: the server died
	acks := load.Acks()

	step("walship promote --spool ... on standby A")
	out, err := exec.CommandContext(ctx, bin, "promote", "--spool", d.ws.Spool, "--dsn", a.DSN()).CombinedOutput()
	if err != nil {
		return fmt.Errorf("walship promote: %v\n%s", err, out)
	}
	fmt.Print(indent(string(out)))
	step("pg_promote() on standby B")
	if err := promoteArchive(ctx, b); err != nil {
		return err
	}

	la, err := lab.MeasureLoss(ctx, a, acks, killAt)
	if err != nil {
		return err
	}
	lb, err := lab.MeasureLoss(ctx, b, acks, killAt)
	if err != nil {
		return err
	}
	fmt.Printf("\nThe primary died after %d acknowledged commits. What each standby came up with:\n\n", len(acks))
	fmt.Printf("  %-44s %10s %10s %10s\n", "standby", "recovered", "lost", "window")
	fmt.Printf("  %-44s %10d %10d %10s\n", "A: walship (record-based, with the partial)", la.Recovered, len(la.Lost), la.Window.Round(time.Millisecond))
	fmt.Printf("  %-44s %10d %10d %10s\n", "B: archive_command, archive_timeout = 60s", lb.Recovered, len(lb.Lost), lb.Window.Round(time.Millisecond))
	fmt.Println("\n  window: the kill time minus the acknowledgement of the newest commit the standby has")
	fmt.Println("  (with none recovered, minus the first acknowledgement).")
	fmt.Println("  Archive shipping waits for a full 16 MB segment or archive_timeout; walship ships every flush.")
	return nil
}

// promoteArchive promotes the archive-fed standby; before it ends recovery it restores
// every segment the archive holds.
func promoteArchive(ctx context.Context, sb *lab.Cluster) error {
	if err := sb.Exec(ctx, "SELECT pg_promote(true, 60)"); err != nil {
		return fmt.Errorf("pg_promote() on standby B: %w", err)
	}
	return nil
}

func step(s string) { fmt.Println("==>", s) }

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}
