package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/walship/walship/feeder"
	"github.com/walship/walship/tail"
)

// restore_command exit statuses: PostgreSQL reads 1 as "not available", anything
// above 125 or a death by a signal other than SIGTERM as fatal. Errors get their own
// small code so that the server log tells them from a missing file.
const (
	exitRestoreNotAvailable = 1
	exitRestoreError        = 3
	// exitRestoreStop is any error where a failure would end the server's recovery
	// (feeder.FailureEndsRecovery): PostgreSQL takes an exit status above 125 as fatal
	// and stops, where 1 to 125 would be the end of the WAL and a promotion.
	exitRestoreStop = 200
)

func runRestore(args []string) int {
	var spoolDir, pgdata *string
	rc := restore(args, &spoolDir, &pgdata)
	if rc == exitOK || rc == exitRestoreNotAvailable || listing != nil {
		return rc
	}
	// A usage error or any other: never one the server would take for the end of WAL.
	dir, data := "", ""
	if spoolDir != nil {
		dir, data = *spoolDir, *pgdata
	}
	if rc != exitRestoreStop {
		if why := feeder.FailureEndsRecovery(data, dir); why != "" {
			fmt.Fprintf(stderr, "walship restore: exiting with %d, which stops the server: %s\n", exitRestoreStop, why)
			return exitRestoreStop
		}
	}
	return rc
}

func restore(args []string, spoolDir, pgdataDir **string) int {
	fs := newFlags("restore", "--spool DIR [--live | --wait] [--cleanup] %f %p [%r]", `
The restore_command of a standby fed by walship:

  restore_command = 'walship restore --spool /var/lib/walship/spool %f %p %r'

Copies a published segment or history file from the spool to %p, after checking its
size and page headers; nothing short or half-written ever reaches %p. After 'walship
promote' it hands the frozen partial segment, zero-padded, and answers "not available"
for any later segment, so that recovery ends after the last byte received.

Exit status: 0 restored; 1 not available (yet); 3 an error (bad file name, a corrupt
or short segment, a spool of another cluster, an unreadable file); 2 a usage error.
Where the server would take a failure for the end of the WAL and promote itself
without it (archive recovery, which is no standby.signal in the data directory, or
standby mode once walship promote has set its trigger), every error exits 200
instead: PostgreSQL stops on an exit status above 125, with walship's reason in its
log, and nothing is lost; start it again once the cause is put right. With --wait, an
archive that cannot be reached (or gives a damaged object) is no error: restore keeps
waiting for the spool, says why, and asks the archive again after a growing pause.

Standby mode (standby.signal): leave --wait off; a missing segment answers 1 at once
and the server retries every wal_retrieve_retry_interval. Archive recovery
(recovery.signal only, the pg_standby way): add --wait, so that a missing segment waits
until it is published or the promotion trigger appears, and set recovery_prefetch = off
(PostgreSQL 15 and later): the prefetcher reads ahead of replay, and while the restore
waits it would hold back the replay of records the standby already has.

A hot standby milliseconds behind: in standby mode, add --live. When recovery asks
for the segment the spool is still receiving, it gets the bytes received so far,
checked (page headers, record chain and CRCs), zero-padded: recovery replays them,
stops at the zeros (logging "invalid record length ... got 0" at LOG level), asks again
after wal_retrieve_retry_interval and goes on from where it stopped. A record torn at
the end is not replayed until it is whole. The partial is copied again only once it
has grown (the spool keeps a record per standby in walship.live/), so a quiet primary
costs nothing and a busy one one copy of the bytes per retry. The retry interval is
the standby's staleness: set wal_retrieve_retry_interval = 200ms (the default, 5s, is
slow). --live hands nothing outside standby mode (no standby.signal: in archive
recovery a partial would end recovery early), nor to a standby whose configuration
sets archive_mode = always (it would archive the zero-padded partial as a whole
segment; asked of the standby's server binary, postgres -C, once per postmaster); it
then serves whole segments only and logs why, once. walship promote works as
without it: recovery still gets the frozen partial last.

With --archive-url, a segment or history file the spool lacks is fetched from the
archive (see walship receive --archive-url) the first time it is asked for, and checked
as a spool segment is (size, page headers, record chain and CRCs; the archive's
SHA-256): a standby made from an older base backup catches up from it. --cleanup then
removes only the spool segments the archive holds with the same checksum.`)
	spool := fs.String("spool", "", "the receiver's spool directory (required)")
	wait := fs.Bool("wait", false, "wait for a missing segment (archive recovery) instead of answering 1 at once")
	live := fs.Bool("live", false, "standby mode: hand recovery the segment being received, zero-padded, each time it has grown (see above)")
	clean := fs.Bool("cleanup", false, "remove published spool segments older than %r, as pg_archivecleanup does")
	pgdata := fs.String("pgdata", "", "the standby's data directory, for the cluster check and its recovery mode (default: the working directory, as PostgreSQL runs restore_command)")
	*spoolDir, *pgdataDir = spool, pgdata
	openArchive := archiveFlags(fs, "fetch a segment or history file the spool lacks (once per call) from")
	logger := logFlags(fs)
	if rc := parseWithArgs(fs, args); rc >= 0 {
		return rc
	}
	if *spool == "" {
		return usageError(fs, "--spool is required")
	}
	if fs.NArg() < 2 || fs.NArg() > 3 {
		return usageError(fs, "want %%f %%p and optionally %%r, got %d arguments", fs.NArg())
	}
	if *clean && fs.NArg() < 3 {
		return usageError(fs, "--cleanup needs %%r")
	}
	if *live && *wait {
		return usageError(fs, "--live is for standby mode, --wait for archive recovery: give one")
	}
	log, err := logger()
	if err != nil {
		return usageError(fs, "%v", err)
	}
	cfg := feeder.RestoreConfig{Spool: *spool, File: fs.Arg(0), Target: fs.Arg(1), RestartFile: fs.Arg(2), Wait: *wait, Live: *live, Cleanup: *clean, PGData: *pgdata, Logger: log}
	if cfg.Archive, err = openArchive(context.Background()); err != nil {
		return usageError(fs, "%v", err)
	}

	// SIGTERM comes when the server shuts down: stop waiting and die by the same
	// signal, which PostgreSQL takes as a shutdown rather than as "not available"
	// (in archive recovery, "not available" would end recovery).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	err = feeder.Restore(ctx, cfg)
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, feeder.ErrNotAvailable):
		log.Debug().Err(err).Msg("not available")
		return exitRestoreNotAvailable
	case errors.Is(err, feeder.ErrStopRecovery):
		fmt.Fprintf(stderr, "walship restore: %v\n", err)
		return exitRestoreStop
	case ctx.Err() != nil:
		stop()
		signal.Reset(syscall.SIGTERM)
		// If the signal cannot be sent, the error exit below still says the restore failed.
		_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
		time.Sleep(time.Second)
		return exitRestoreError
	}
	fmt.Fprintf(stderr, "walship restore: %v\n", err)
	return exitRestoreError
}

func runPromote(args []string) int {
	fs := newFlags("promote", "--spool DIR [--pgdata DIR | --dsn DSN] [--timeout DURATION] [--force | --drain-wait DURATION]", `
Fail over to the standby with everything the spool holds, the partial tail included:

  0. if a sidecar is connected, wait for it to drain: once the primary's server is gone
     (stopped, or killed and all its processes exited) the sidecar sends every valid
     record left in pg_wal and an end-of-WAL mark. A sidecar that is still streaming
     means a running primary: promote then gives up at --timeout and changes nothing.
     With no sidecar connected while the receiver runs, it waits up to --drain-wait
     (15s) after the receiver's last session ended: a sidecar that lost its session
     (the receiver restarted, the network failed) reconnects and drains the WAL only
     the dead primary's pg_wal holds. Then, or at once with --force (the primary's
     host is lost), or when no receiver runs, it goes on with what the spool holds and
     says so;
  1. freeze the spool: the receiver stops writing it (running or dead, now or later);
  2. set the trigger, so that the next restore of the in-progress segment gets the
     frozen partial, zero-padded;
  3. promote the server: pg_promote() in standby mode; in archive recovery the waiting
     'walship restore --wait' sees the trigger;
  4. wait until the server accepts writes, and print the timeline it chose, where
     recovery ended and how much of it came from the partial segment.

Running it twice is harmless. If the standby cannot be promoted, it says why and
leaves the spool as it was.`)
	force := fs.Bool("force", false, "go on at once without a sidecar's drain when none is connected: for a primary whose host is lost")
	drainWait := fs.Duration("drain-wait", feeder.DefaultDrainWait, "with a receiver running and no sidecar connected, how long after its last session ended to wait for a sidecar to connect and drain")
	cfg, rc := standbyFlags(fs, args, time.Minute)
	if rc >= 0 {
		return rc
	}
	if *drainWait <= 0 {
		return usageError(fs, "--drain-wait %s: want a positive duration", *drainWait)
	}
	cfg.Force, cfg.DrainWait = *force, *drainWait
	ctx, stop := signalContext()
	defer stop()
	rep, err := feeder.Promote(ctx, cfg)
	if err != nil {
		return fail("%v", err)
	}
	fmt.Println(rep)
	return exitOK
}

func runVerify(args []string) int {
	fs := newFlags("verify", "--spool DIR | FILE...", `
Check WAL as recovery would read it: every page header (version, position, cluster),
every record's length, xl_prev chain and CRC-32C, across pages and segments. With
--spool, every published segment and partial of the spool, in order, with the chain
followed from one file to the next; with files, each file on its own.

Prints one line per file, "ok" or "BAD at offset N (LSN): reason". Exit status: 0 when
every file is ok, 1 when any is not or a file cannot be read, 2 a usage error.`)
	spool := fs.String("spool", "", "the spool directory to check")
	if rc := parseWithArgs(fs, args); rc >= 0 {
		return rc
	}
	if (*spool == "") == (fs.NArg() == 0) {
		return usageError(fs, "give either --spool DIR or one or more files")
	}
	var vs []feeder.Verdict
	var err error
	if *spool != "" {
		vs, err = feeder.VerifySpool(*spool)
	} else {
		vs, err = feeder.VerifyFiles(fs.Args())
	}
	bad := 0
	for _, v := range vs {
		fmt.Println(v)
		if !v.OK {
			bad++
		}
	}
	if err != nil {
		return fail("%v", err)
	}
	if bad > 0 {
		fmt.Fprintf(stderr, "walship verify: %d of %d files failed\n", bad, len(vs))
		return exitError
	}
	return exitOK
}

func runSwitchover(args []string) int {
	fs := newFlags("switchover", "--spool DIR [--dsn DSN | --pgdata DIR] [--timeout DURATION]", `
Swap the roles of the primary and the standby, losing nothing: a planned failover for
maintenance. Run it on the standby's host, where the receiver runs on --spool, as the
receiver's user or root. The primary's sidecar must have been started with
--allow-switchover; it is asked over the authenticated link:

  1. check that the standby runs, is in recovery and is the spool's cluster;
  2. the sidecar stops the primary with a fast shutdown (as pg_ctl stop -m fast): the
     server writes a shutdown checkpoint and exits;
  3. the sidecar drains what the server flushed last, the shutdown checkpoint
     included, and sends the end-of-WAL mark;
  4. the standby is promoted with all of it (as walship promote does), and the new
     timeline and where it forked are printed.

The old primary's WAL then ends where the new timeline forks: it can follow the new
primary as a standby without a new base backup. If the sidecar refuses or cannot stop
the primary, nothing changes; if the primary stopped but no end-of-WAL mark came, the
standby is not promoted and the command says so (do not run walship promote then:
start the primary again and retry).

Before it, make sure nothing restarts the old primary on its own (a service manager's
restart policy): a primary started again after the swap would take writes beside the
new one. --timeout bounds the whole swap, the shutdown checkpoint included.`)
	cfg, rc := standbyFlags(fs, args, 5*time.Minute)
	if rc >= 0 {
		return rc
	}
	ctx, stop := signalContext()
	defer stop()
	rep, err := feeder.Switchover(ctx, cfg)
	if err != nil {
		return fail("%v", err)
	}
	fmt.Println(rep)
	return exitOK
}

// standbyFlags adds the flags that name a standby and its spool (promote, switchover),
// parses args and checks them; rc is a non-negative exit status when the command
// should stop now.
func standbyFlags(fs *flag.FlagSet, args []string, timeout time.Duration) (cfg feeder.PromoteConfig, rc int) {
	spoolDir := fs.String("spool", "", "the standby's spool directory (required)")
	dsn := fs.String("dsn", "", "connection string of the standby")
	pgdata := fs.String("pgdata", "", "the standby's data directory (default: its data_directory setting)")
	limit := fs.Duration("timeout", timeout, "give up after this long (0: off)")
	logger := logFlags(fs)
	if rc := parse(fs, args); rc >= 0 {
		return cfg, rc
	}
	switch {
	case *spoolDir == "":
		return cfg, usageError(fs, "--spool is required")
	case *dsn == "" && *pgdata == "":
		return cfg, usageError(fs, "give --dsn or --pgdata")
	case *limit <= 0:
		return cfg, usageError(fs, "--timeout %s: want a positive duration", *limit)
	}
	log, err := logger()
	if err != nil {
		return cfg, usageError(fs, "%v", err)
	}
	return feeder.PromoteConfig{Spool: *spoolDir, DSN: *dsn, PGData: *pgdata, Timeout: *limit, Logger: log}, -1
}

func runStatus(args []string) int {
	fs := newFlags("status", "--spool DIR [--dsn PRIMARY_DSN] [--json]", `
Show a spool's state, on the standby's host: the cluster (system identifier, major),
the timeline and durable position, when it last took WAL, the partial segment and its
bytes, the oldest and newest published segments, the free space of its file system,
whether its receiver runs and a sidecar is connected (since when, or since when none
is), and its marks: end-of-WAL (the primary's server gone and drained), frozen,
promoted. With a receiver that uploads to an archive (receive --archive-url), how the
uploads stand. The standbys walship restore --live has handed the segment being
received: what each got last, and how far it can replay. With --dsn, the primary's flush
position, how far the spool is behind it in bytes and in seconds, and what the
replication slot --slot holds back on the primary. With --standby-dsn, how far the
standby has replayed, how far that is behind the primary (or, without --dsn, the
spool), and when the last transaction it replayed committed.

The lag in seconds is 0 when the spool holds all the primary has flushed, and else the
time since the spool last took WAL: how long it has stood behind. While WAL flows, that
is the time since the last write, a few milliseconds.

A table by default; --json prints one object whose field names stay stable:
spool, system_identifier, postgresql_major, wal_segment_size, timeline, durable_lsn,
last_wal_at, partial_segment, partial_bytes, oldest_segment, newest_segment, segments,
free_bytes, total_bytes, receiver_running, sidecar_connected, sidecar_peer,
sidecar_since, no_sidecar_since, frozen, promoted, end_of_wal, primary_flush_lsn,
lag_bytes, lag_seconds, slot, slot_retained_bytes, and archive: an object of url,
newest (the file last uploaded), uploaded_at, pending (files the archive lacks),
refused (names it holds with other bytes), failing_since and last_error; live: a list
of objects of pgdata, postmaster, segment, bytes, replayable (an LSN) and handed_at;
standby_replay_lsn, standby_replay_behind_bytes, standby_last_replayed_commit_at,
standby_error (the standby could not be read: down, or promoted).
Fields that do not apply are left out. It reads the spool only, as any user that can
read it.`)
	spoolDir := fs.String("spool", "", "the spool directory (required)")
	dsn := fs.String("dsn", "", "connection string of the primary, for the lag and the slot")
	slot := fs.String("slot", tail.DefaultSlot, "with --dsn: the sidecar's replication slot, to show what it holds back")
	standbyDSN := fs.String("standby-dsn", "", "connection string of the standby (a hot standby), for how far it has replayed")
	asJSON := fs.Bool("json", false, "print JSON")
	if rc := parse(fs, args); rc >= 0 {
		return rc
	}
	if *spoolDir == "" {
		return usageError(fs, "--spool is required")
	}
	ctx, stop := signalContext()
	defer stop()
	st, err := feeder.ReadStatus(ctx, feeder.StatusConfig{Spool: *spoolDir, DSN: *dsn, Slot: *slot, StandbyDSN: *standbyDSN})
	if err != nil {
		return fail("%v", err)
	}
	if *asJSON {
		b, err := json.MarshalIndent(st, "", "  ")
		if err != nil {
			return fail("%v", err)
		}
		fmt.Println(string(b))
		return exitOK
	}
	fmt.Print(st)
	return exitOK
}

func runCheck(args []string) int {
	fs := newFlags("check", "--spool DIR [--dsn PRIMARY_DSN] [thresholds]", `
Check a spool for a monitoring system, as a Nagios or Icinga plugin: one line, the
verdict and why, then performance data after a '|'; the exit status is the verdict:
0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

CRITICAL: no receiver runs on the spool; it is frozen or promoted from (a failover
happened); the primary's server is gone (the sidecar drained it); the receiver's
archive (receive --archive-url) holds other bytes than the spool under a name.
WARNING: the spool holds no WAL yet. And each threshold below, at its warning and its
critical value (0 turns one off): how long the receiver has had no sidecar, the free
space of the spool's file system, how long uploads to the archive have failed, and
with --dsn (a connection to the primary) how far the spool is behind in bytes and in
time (see walship status) and how much WAL the sidecar's replication slot holds back
on the primary. UNKNOWN: the spool or the primary cannot be read.

Sizes take a unit (kB, MB, GB, TB, powers of 1024); free space may also be a
percentage of the file system (10%).`)
	spoolDir := fs.String("spool", "", "the spool directory (required)")
	dsn := fs.String("dsn", "", "connection string of the primary, for the lag and the slot")
	slot := fs.String("slot", tail.DefaultSlot, "with --dsn: the sidecar's replication slot")
	var th feeder.Thresholds
	th.LagBytes = feeder.Limit[int64]{Warn: 16 << 20, Crit: 128 << 20}
	th.Lag = feeder.Limit[time.Duration]{Warn: 10 * time.Second, Crit: time.Minute}
	th.NoSidecar = feeder.Limit[time.Duration]{Warn: 30 * time.Second, Crit: 5 * time.Minute}
	th.SlotBytes = feeder.Limit[int64]{Warn: tail.DefaultSlotWarn, Crit: 8 << 30}
	th.Free.Warn, th.Free.Crit = feeder.Space{Percent: 20}, feeder.Space{Percent: 10}
	th.ArchiveFailing = feeder.Limit[time.Duration]{Warn: time.Minute, Crit: 10 * time.Minute}
	bytesVar(fs, &th.LagBytes.Warn, "lag-bytes-warn", "with --dsn: WARNING when the spool is this far behind the primary")
	bytesVar(fs, &th.LagBytes.Crit, "lag-bytes-crit", "with --dsn: CRITICAL when it is this far behind")
	fs.DurationVar(&th.Lag.Warn, "lag-warn", th.Lag.Warn, "with --dsn: WARNING when the spool has been behind the primary this long (0: off)")
	fs.DurationVar(&th.Lag.Crit, "lag-crit", th.Lag.Crit, "with --dsn: CRITICAL when it has been behind this long (0: off)")
	fs.DurationVar(&th.NoSidecar.Warn, "no-sidecar-warn", th.NoSidecar.Warn, "WARNING when the receiver has had no sidecar this long (0: off)")
	fs.DurationVar(&th.NoSidecar.Crit, "no-sidecar-crit", th.NoSidecar.Crit, "CRITICAL when it has had none this long (0: off)")
	bytesVar(fs, &th.SlotBytes.Warn, "slot-warn", "with --dsn: WARNING when the slot holds back this much WAL on the primary")
	bytesVar(fs, &th.SlotBytes.Crit, "slot-crit", "with --dsn: CRITICAL when it holds back this much")
	spaceVar(fs, &th.Free.Warn, "free-warn", "WARNING when the spool's file system has less free space")
	spaceVar(fs, &th.Free.Crit, "free-crit", "CRITICAL when it has less")
	fs.DurationVar(&th.ArchiveFailing.Warn, "archive-failing-warn", th.ArchiveFailing.Warn, "WARNING when uploads to the receiver's archive have failed this long (0: off)")
	fs.DurationVar(&th.ArchiveFailing.Crit, "archive-failing-crit", th.ArchiveFailing.Crit, "CRITICAL when they have failed this long (0: off)")
	if rc := parse(fs, args); rc >= 0 {
		if rc == exitUsage {
			return int(feeder.Unknown) // a plugin's usage error is UNKNOWN
		}
		return rc
	}
	if *spoolDir == "" {
		usageError(fs, "--spool is required")
		return int(feeder.Unknown)
	}
	ctx, stop := signalContext()
	defer stop()
	st, err := feeder.ReadStatus(ctx, feeder.StatusConfig{Spool: *spoolDir, DSN: *dsn, Slot: *slot})
	if err != nil {
		fmt.Println(redact(feeder.CheckResult{Level: feeder.Unknown, Message: err.Error()}.Line()))
		return int(feeder.Unknown)
	}
	v := feeder.Check(st, th, time.Now())
	fmt.Println(redact(v.Line()))
	return int(v.Level)
}

// bytesVar adds a size flag (a number of bytes, or with a unit: 16MB) whose default
// is *p.
func bytesVar(fs *flag.FlagSet, p *int64, name, usage string) {
	fs.Func(name, fmt.Sprintf("%s (default %s; 0: off)", usage, sizeText(*p)), func(v string) error {
		n, err := feeder.ParseBytes(v)
		if err != nil {
			return err
		}
		*p = n
		return nil
	})
}

// spaceVar adds a free-space flag: a size, or a percentage of the file system.
func spaceVar(fs *flag.FlagSet, p *feeder.Space, name, usage string) {
	fs.Func(name, fmt.Sprintf("%s (default %s; 0: off)", usage, p), func(v string) error {
		s, err := feeder.ParseSpace(v)
		if err != nil {
			return err
		}
		*p = s
		return nil
	})
}

func sizeText(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%dGB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMB", n>>20)
	}
	return fmt.Sprint(n)
}
