package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver/spool"
)

// archiveRun is a catch-up of walship with --archive-url: how long the backlog took to
// be durable in the spool, and how long until the archive held every segment of it.
type archiveRun struct {
	mib                   float64
	catchSecs, uploadSecs float64
	plainMiB, plainSecs   float64       // walship's catch-up without the archive, in the same round
	receiver, plainRecv   time.Duration // the receiver's CPU: with the archive until it held the backlog, without until the spool did
	s3CPU                 time.Duration // the S3 server's CPU from its start until the archive held the backlog
}

// archiveUpload runs the catch-up with the receiver uploading to a local S3-compatible
// server (versitygw, its objects on the same disk as the spool): can the archive keep
// up with the spool?
func archiveUpload(ctx context.Context, c config, r *results) error {
	for round := 1; round <= c.rounds; round++ {
		plain, err := catchUpRun(ctx, c, &walship{label: walshipName}, false, nil)
		if err != nil {
			return fmt.Errorf("archive round %d, without the archive: %w", round, err)
		}
		fmt.Printf("  round %d  %-30s %7.0f MiB: durable in the spool at %6.1f MiB/s\n", round, walshipName, plain.mib, plain.mib/plain.secs)
		dir, err := os.MkdirTemp("", "walship-s3-")
		if err != nil {
			return err
		}
		defer func() { cleanup("remove the S3 server's directory", os.RemoveAll(dir)) }()
		s3, err := lab.StartS3(ctx, dir, "wal")
		if err != nil {
			return err
		}
		ship := &walship{label: walshipName + " --archive-url", env: s3.Env(), tag: "archive",
			receiverArgs: []string{"--archive-url", s3.URL("db1"), "--archive-path-style"}}
		var ar archiveRun
		s3Start, _ := readProc(s3.Pid())
		// The first round's walship is profiled (pprof-catchup-archive-*.txt).
		cr, err := catchUpRun(ctx, c, ship, round == 1, func(ctx context.Context, n *node, t0 time.Time) error {
			// Every segment the spool has published is then in the archive.
			id, _, err := spool.ReadIdentity(ship.ws.Spool)
			if err != nil {
				return err
			}
			held, err := spool.Scan(ship.ws.Spool, id.SegSize)
			if err != nil {
				return err
			}
			err = lab.Wait(ctx, 20*time.Millisecond, "the archive to hold the backlog", func() (bool, error) {
				for _, seg := range held.Segments {
					fi, err := os.Stat(s3.ObjectPath("db1/" + seg.Name(id.SegSize)))
					if err != nil || uint64(fi.Size()) != id.SegSize {
						return false, nil
					}
				}
				return true, nil
			})
			ar.uploadSecs = time.Since(t0).Seconds()
			if end, ok := readProc(s3.Pid()); ok && end.start == s3Start.start {
				ar.s3CPU = cpuOf(end.statCPU-s3Start.statCPU, end.schedCPU-s3Start.schedCPU, end.sched && s3Start.sched)
			}
			return err
		})
		s3.Kill()
		if err != nil {
			return fmt.Errorf("archive round %d: %w", round, err)
		}
		ar.mib, ar.catchSecs, ar.plainMiB, ar.plainSecs = cr.mib, cr.secs, plain.mib, plain.secs
		ar.receiver, ar.plainRecv = cr.cost["walship receiver"].cpu, plain.cost["walship receiver"].cpu
		fmt.Printf("  round %d  %-30s %7.0f MiB: durable in the spool at %6.1f MiB/s, in the archive at %6.1f MiB/s\n",
			round, ship.name(), ar.mib, ar.mib/ar.catchSecs, ar.mib/ar.uploadSecs)
		r.archive = append(r.archive, ar)
	}
	return nil
}

func (r *results) archiveSection(b *strings.Builder, c config) {
	if len(r.archive) == 0 {
		return
	}
	fmt.Fprintf(b, "\n## The archive beside the catch-up (%d rounds)\n\nThe catch-up above, with the receiver also uploading to an S3-compatible server (versitygw, posix backend, on this host and disk): from the start, how fast the backlog became durable in the spool, and how fast every segment of it was in the archive (each uploaded with its SHA-256 once published). An archive that keeps up has the second close to the first. Beside them, walship's catch-up without the archive, interleaved in the same rounds: what the uploads cost the catch-up.\n\n", c.rounds)
	b.WriteString("| | MiB/s, median [min, max] |\n|---|---|\n")
	var plainRate, spoolRate, archRate []float64
	for _, ar := range r.archive {
		plainRate = append(plainRate, ar.plainMiB/ar.plainSecs)
		spoolRate = append(spoolRate, ar.mib/ar.catchSecs)
		archRate = append(archRate, ar.mib/ar.uploadSecs)
	}
	m, l, h := median(plainRate)
	fmt.Fprintf(b, "| without the archive: durable in the spool | %.1f [%.1f, %.1f] |\n", m, l, h)
	m, l, h = median(spoolRate)
	fmt.Fprintf(b, "| with the archive: durable in the spool | %.1f [%.1f, %.1f] |\n", m, l, h)
	m, l, h = median(archRate)
	fmt.Fprintf(b, "| with the archive: whole in the archive | %.1f [%.1f, %.1f] |\n", m, l, h)

	b.WriteString("\nCPU, in ms per MiB of the backlog: the receiver's from its start until the backlog was durable in the spool (without the archive) or whole in the archive (with it), and the S3 server's from its start until the archive held the backlog (the few segments uploaded before the backlog was written count in it). The host has two cores, which the primary, the sidecar, the receiver and the S3 server share.\n\n| | ms/MiB, median [min, max] |\n|---|---|\n")
	var plainCPU, recvCPU, s3CPU []float64
	for _, ar := range r.archive {
		plainCPU = append(plainCPU, msPerMiB(ar.plainRecv, ar.plainMiB))
		recvCPU = append(recvCPU, msPerMiB(ar.receiver, ar.mib))
		s3CPU = append(s3CPU, msPerMiB(ar.s3CPU, ar.mib))
	}
	m, l, h = median(plainCPU)
	fmt.Fprintf(b, "| receiver, without the archive | %.2f [%.2f, %.2f] |\n", m, l, h)
	m, l, h = median(recvCPU)
	fmt.Fprintf(b, "| receiver, with the archive | %.2f [%.2f, %.2f] |\n", m, l, h)
	m, l, h = median(s3CPU)
	fmt.Fprintf(b, "| S3 server (versitygw) | %.2f [%.2f, %.2f] |\n", m, l, h)
}
