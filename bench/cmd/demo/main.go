// Command demo runs walship end to end on this machine: a primary under load, a
// receiver and a sidecar, in a temporary directory that it removes afterwards. It is
// what `make demo` runs.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver"
	"github.com/walship/walship/tail/wal"
)

func main() {
	bin := flag.String("walship", "bin/walship", "the walship binary to run")
	seconds := flag.Int("seconds", 10, "how long to run the load")
	clients := flag.Int("clients", 4, "load connections committing single-row inserts")
	keep := flag.Bool("keep", false, "keep the temporary directory (for a look at the spool and logs)")
	flag.Parse()
	if err := run(*bin, time.Duration(*seconds)*time.Second, *clients, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(bin string, dur time.Duration, clients int, keep bool) error {
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
	os.Chmod(dir, 0o755)
	if keep {
		fmt.Printf("keeping %s\n", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	step("starting a primary (PostgreSQL, 16 MB segments) in a temporary directory")
	primary, err := lab.NewCluster(ctx, lab.Options{})
	if err != nil {
		return err
	}
	defer primary.Close()
	if err := primary.Start(ctx); err != nil {
		return err
	}
	tlsDir, spool := filepath.Join(dir, "tls"), filepath.Join(dir, "spool")
	step("walship certs --dir " + tlsDir)
	if out, err := exec.Command(bin, "certs", "--dir", tlsDir).CombinedOutput(); err != nil {
		return fmt.Errorf("walship certs: %v\n%s", err, out)
	}
	port, err := lab.FreeUDPPort()
	if err != nil {
		return err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	step("walship receive --listen " + addr + " --spool " + spool)
	recv, err := lab.StartProc("receiver", filepath.Join(dir, "receiver.log"), bin, "receive", "--listen", addr, "--spool", spool, "--tls-dir", tlsDir)
	if err != nil {
		return err
	}
	defer recv.Kill()
	if err := recv.WaitLog(ctx, "receiver ready"); err != nil {
		return err
	}
	step("walship tail --dsn '" + primary.DSN() + "' --to " + addr)
	side, err := lab.StartProc("sidecar", filepath.Join(dir, "sidecar.log"), bin, "tail", "--dsn", primary.DSN(), "--to", addr, "--tls-dir", tlsDir)
	if err != nil {
		return err
	}
	defer side.Kill()
	if err := side.WaitLog(ctx, "streaming"); err != nil {
		return err
	}
	step(fmt.Sprintf("load: %d connections committing single-row inserts for %s", clients, dur))
	load, err := lab.StartLoad(ctx, primary.DSN(), clients, 200)
	if err != nil {
		return err
	}
	fmt.Printf("\n%8s  %10s  %14s  %14s  %12s\n", "time", "commits", "primary flush", "spool durable", "spool behind")
	start := time.Now()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for time.Since(start) < dur {
		select {
		case <-ctx.Done():
			load.Stop()
			return ctx.Err()
		case <-tick.C:
		}
		flush, pos, err := positions(ctx, primary, spool)
		if err != nil {
			load.Stop()
			return err
		}
		fmt.Printf("%7.0fs  %10d  %14s  %14s  %10d B\n", time.Since(start).Seconds(), load.Count(), flush, pos, max(int64(flush)-int64(pos), 0))
	}
	if err := load.Stop(); err != nil {
		return fmt.Errorf("load: %w", err)
	}
	// Once the load stops, the spool catches up with the primary's flush position.
	var flush, pos wal.LSN
	err = lab.Wait(ctx, 5*time.Millisecond, "the spool to catch up", func() (bool, error) {
		flush, pos, err = positions(ctx, primary, spool)
		return err == nil && pos >= flush, err
	})
	if err != nil {
		return err
	}
	fmt.Printf("\nload stopped after %d commits; the spool holds the primary's WAL up to its flush position %s\n", load.Count(), flush)
	ents, _ := os.ReadDir(spool)
	fmt.Printf("spool %s:\n", spool)
	for _, e := range ents {
		if info, err := e.Info(); err == nil && e.Name()[0] != '.' {
			fmt.Printf("  %-34s %9d bytes\n", e.Name(), info.Size())
		}
	}
	return nil
}

func step(s string) { fmt.Println("==>", s) }

// positions reads the primary's flush position and the spool's durable end.
func positions(ctx context.Context, primary *lab.Cluster, spool string) (flush, pos wal.LSN, err error) {
	s, err := primary.QueryString(ctx, "SELECT pg_current_wal_flush_lsn()::text")
	if err != nil {
		return 0, 0, err
	}
	if flush, err = wal.ParseLSN(s); err != nil {
		return 0, 0, err
	}
	id, ok, err := receiver.ReadIdentity(spool)
	if err != nil || !ok {
		return flush, 0, err
	}
	c, err := receiver.Scan(spool, id.SegSize)
	if err != nil {
		return flush, 0, err
	}
	p, _ := c.Position(id.SegSize)
	return flush, p.LSN, nil
}
