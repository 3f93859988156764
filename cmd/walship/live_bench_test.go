package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// BenchmarkLiveHandOut measures what one hand-out of walship restore --live costs the
// standby's host: the walship process PostgreSQL runs, checking a partial 16 MB segment
// of real WAL (1, 8 and 15 MiB of it received) and writing it zero-padded to %p,
// fsynced. Each op hands the same bytes to a standby whose record says it was handed
// fewer (the first op of each also asks the server binary for its archive_mode, once
// per postmaster as in use). Reported: the
// wall time per hand-out, the process's CPU (user + system) per hand-out, and that CPU
// as a share of a core at one and at five hand-outs a second (a busy primary, with
// wal_retrieve_retry_interval = 1s and 200ms).
//
//	go test ./cmd/walship -run '^$' -bench LiveHandOut -benchtime 20x
func BenchmarkLiveHandOut(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, err := lab.NewCluster(ctx, lab.Options{SegSizeMB: 16})
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		if err := c.Close(); err != nil {
			b.Errorf("stop the cluster and remove its files: %v", err)
		}
	}()
	if err := c.Start(ctx); err != nil {
		b.Fatal(err)
	}
	// Fill the segment being written to 15 MiB and more, then stop the server: its data
	// directory serves as the standby's (a real pg_control, standby.signal added).
	if err := c.Exec(ctx, "CREATE TABLE fill (pad text); ALTER TABLE fill ALTER pad SET STORAGE EXTERNAL"); err != nil {
		b.Fatal(err)
	}
	var flush wal.LSN
	var name string
	for {
		if err := c.Exec(ctx, "INSERT INTO fill SELECT repeat('w', 2000) FROM generate_series(1, 500)"); err != nil {
			b.Fatal(err)
		}
		conn, err := c.Connect(ctx)
		if err != nil {
			b.Fatal(err)
		}
		err = conn.QueryRow(ctx, "SELECT pg_current_wal_flush_lsn(), pg_walfile_name(pg_current_wal_flush_lsn())").Scan(&flush, &name)
		conn.Close(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if uint64(flush)%(16<<20) >= 15<<20+1<<19 {
			break
		}
	}
	version, err := c.QueryString(ctx, "SHOW server_version_num")
	if err != nil {
		b.Fatal(err)
	}
	if err := c.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(c.Data, "pg_wal", name))
	if err != nil {
		b.Fatal(err)
	}
	ctl, err := wal.ReadControl(c.Data)
	if err != nil {
		b.Fatal(err)
	}
	vnum, _ := strconv.Atoi(version)
	magic, err := wal.MagicFor(vnum)
	if err != nil {
		b.Fatal(err)
	}
	if err := c.WriteFile("standby.signal", nil); err != nil {
		b.Fatal(err)
	}
	id := spool.Identity{SysID: ctl.SysID, SegSize: 16 << 20, BlockSize: 8192, Magic: magic, ServerVersion: uint32(vnum)}
	seg, err := wal.ParseSegmentName(name, id.SegSize)
	if err != nil {
		b.Fatal(err)
	}
	out := b.TempDir()
	for _, mib := range []int{0, 1, 8, 15} {
		// 0 is the answer to a request that finds the 15 MiB partial not grown since the
		// last hand-out: what each retry costs while the primary is quiet.
		grown := mib > 0
		b.Run(map[bool]string{true: fmt.Sprintf("%dMiB", mib), false: "not-grown"}[grown], func(b *testing.B) {
			if !grown {
				mib = 15
			}
			dir := b.TempDir()
			if err := spool.Bind(dir, id); err != nil {
				b.Fatal(err)
			}
			w := spool.NewWriter(dir, id.SegSize)
			err := w.Use(seg, true)
			if err == nil {
				err = w.WriteAt(0, data[:mib<<20])
			}
			if err == nil {
				err = w.Sync()
			}
			if cerr := w.Close(); err == nil {
				err = cerr
			}
			w.Wait() // the spare made in the background, before b.TempDir removes dir
			if err != nil {
				b.Fatalf("write %d MiB into the partial of %s: %v", mib, name, err)
			}
			target := filepath.Join(out, "RECOVERYXLOG")
			handOut := func(want int) *exec.Cmd {
				cmd := exec.CommandContext(ctx, walshipBin, "restore", "--live", "--spool", dir, "--pgdata", c.Data, name, target)
				out, _ := cmd.CombinedOutput()
				if rc := cmd.ProcessState.ExitCode(); rc != want {
					b.Fatalf("walship restore --live: exit %d, want %d\n%s", rc, want, out)
				}
				return cmd
			}
			want := 0
			if grown {
				b.SetBytes(int64(mib) << 20)
			} else {
				handOut(0) // the one hand-out; every op after it finds nothing new
				want = 1
			}
			var cpu, sys time.Duration
			for b.Loop() {
				b.StopTimer()
				if grown {
					// As if the last hand-out had been shorter: what the standby's
					// archive_mode is stays known, as it does for a running postmaster.
					if rec, ok, err := spool.ReadLive(dir, c.Data); err != nil {
						b.Fatal(err)
					} else if ok {
						rec.Bytes = 0
						if err := spool.WriteLive(dir, rec); err != nil {
							b.Fatal(err)
						}
					}
				}
				if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
					b.Fatal(err)
				}
				b.StartTimer()
				cmd := handOut(want)
				cpu += cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
				sys += cmd.ProcessState.SystemTime()
			}
			perOp := cpu.Seconds() * 1000 / float64(b.N)
			b.ReportMetric(perOp, "cpu-ms/op")
			b.ReportMetric(sys.Seconds()*1000/float64(b.N), "sys-ms/op")
			b.ReportMetric(perOp/10, "core%@1/s")
			b.ReportMetric(perOp/2, "core%@5/s")
		})
	}
}
