package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/feeder/standby"
)

const standbyUsage = `Usage:
  walship standby init --spool DIR --pgdata DIR [flags]    make a standby from a base backup over the link
  walship standby rejoin --spool DIR --pgdata DIR [flags]  make an old primary follow the new one, without one

Run 'walship standby init --help' or 'walship standby rejoin --help' for the flags.`

func runStandby(args []string) int {
	if len(args) > 0 {
		switch args[0] {
		case "init":
			return runStandbyInit(args[1:])
		case "rejoin":
			return runStandbyRejoin(args[1:])
		case "-h", "--help", "help":
			fmt.Println(standbyUsage)
			return exitOK
		}
	}
	fmt.Fprintln(stderr, "walship standby: want 'walship standby init' or 'walship standby rejoin'\n\n"+standbyUsage)
	return exitUsage
}

func runStandbyRejoin(args []string) int {
	fs := newFlags("standby rejoin", "--spool DIR --pgdata DIR [flags]", `
Make the old primary, stopped, a standby of the new primary without a new base backup:
after walship switchover its WAL ends exactly where the new timeline forked from it,
so it can replay the new timeline from there. Run it on the old primary's host, with
a receiver running on --spool beside it, as the server's user or root.

  1. an empty spool gets a start mark at the old primary's last checkpoint, so that the
     new primary's sidecar, when it connects, ships its timeline from the segment where
     it forked rather than from the segment being written: start that sidecar after
     this command (it waits for it, up to --wait);
  2. once the spool holds the new timeline's history file and WAL, it reads the old
     primary's pg_wal from its last checkpoint to the end of its valid records and
     checks that this end is at or before the fork;
  3. it writes restore_command (this walship binary, by its absolute path) and
     recovery_target_timeline = 'latest' in postgresql.auto.conf, and standby.signal.
     Then 'pg_ctl start -D DIR' starts the standby.

If the old primary's WAL goes past the fork (it crashed and the standby was promoted
without all of its WAL), it is refused and nothing changes: make the standby again
with walship standby init into the same directory (a refresh sends only the blocks
that differ), or with pg_rewind. A spool that was promoted from is refused too: a
rejoining standby needs a spool of its own.`)
	d := newDirFlags(fs, "the spool of the receiver beside the old primary, which the new primary's sidecar ships to",
		"the old primary's data directory", "wait", 2*time.Minute, "how long to wait for the new timeline to arrive in the spool")
	log, bin, rc := d.parse(fs, args)
	if rc >= 0 {
		return rc
	}
	pgdata := d.pgdata
	ctx, stop := signalContext()
	defer stop()
	rep, err := standby.Rejoin(ctx, standby.RejoinOptions{PGData: *pgdata, Spool: *d.spool, Walship: bin, Live: *d.live, Wait: *d.wait, Log: log})
	if err != nil {
		return fail("standby rejoin: %v", err)
	}
	fmt.Println(rep)
	fmt.Printf("start the standby with: pg_ctl start -D %s\n", *pgdata)
	return exitOK
}

// dirFlags are the flags standby init and rejoin share: --spool and --pgdata, both
// required, a wait, and the log flags.
type dirFlags struct {
	spool, pgdata *string
	live          *bool
	wait          *time.Duration
	waitName      string
	logger        func() (zerolog.Logger, error)
}

func newDirFlags(fs *flag.FlagSet, spoolHelp, pgdataHelp, waitName string, wait time.Duration, waitHelp string) *dirFlags {
	return &dirFlags{
		spool:    fs.String("spool", "", spoolHelp+" (required)"),
		pgdata:   fs.String("pgdata", "", pgdataHelp+" (required)"),
		live:     fs.Bool("live", false, "a hot standby close behind: restore_command hands it the segment being received (walship restore --live), and wal_retrieve_retry_interval = 200ms"),
		wait:     fs.Duration(waitName, wait, waitHelp),
		waitName: waitName,
		logger:   logFlags(fs),
	}
}

// parse parses args and checks the flags; rc is a non-negative exit status when the
// command should stop now. bin is this walship binary's path, for restore_command.
func (d *dirFlags) parse(fs *flag.FlagSet, args []string) (log zerolog.Logger, bin string, rc int) {
	if rc := parse(fs, args); rc >= 0 {
		return log, "", rc
	}
	switch {
	case *d.spool == "":
		return log, "", usageError(fs, "--spool is required")
	case *d.pgdata == "":
		return log, "", usageError(fs, "--pgdata is required")
	case *d.wait <= 0:
		return log, "", usageError(fs, "--%s %s: want a positive duration", d.waitName, *d.wait)
	}
	log, err := d.logger()
	if err != nil {
		return log, "", usageError(fs, "%v", err)
	}
	if bin, err = walshipPath(); err != nil {
		return log, "", fail("%v", err)
	}
	return log, bin, -1
}

// walshipPath is this walship binary's absolute path, for restore_command.
func walshipPath() (string, error) {
	bin, err := os.Executable()
	if err == nil {
		bin, err = filepath.EvalSymlinks(bin)
	}
	if err != nil {
		return "", fmt.Errorf("find this walship binary's path for restore_command: %w", err)
	}
	return bin, nil
}

// mapFlag collects OLD=NEW pairs.
type mapFlag map[string]string

func (m mapFlag) String() string { return "" }
func (m mapFlag) Set(v string) error {
	old, new, ok := strings.Cut(v, "=")
	if !ok || !filepath.IsAbs(old) || !filepath.IsAbs(new) {
		return fmt.Errorf("%q: want OLDDIR=NEWDIR, both absolute", v)
	}
	m[filepath.Clean(old)] = filepath.Clean(new)
	return nil
}

func runStandbyInit(args []string) int {
	fs := newFlags("standby init", "--spool DIR --pgdata DIR [flags]", `
Make a warm standby of the primary whose WAL the spool takes, over the walship link: no
replication connection and no pg_basebackup. Run it on the standby's host while the
receiver runs on --spool and the primary's sidecar is connected to it, as the
receiver's user or as root (it reaches the receiver through the spool's control
socket, .walship.sock).

The sidecar takes a base backup with the server's non-exclusive backup API on a
connection of its own (its role needs superuser, or EXECUTE on pg_backup_start and
pg_backup_stop, pg_start_backup and pg_stop_backup before PostgreSQL 15) and sends the
data directory's files and the tablespaces' over the link.

--pgdata must be absent, empty, or hold an earlier copy of the same cluster (a standby
that fell behind, an old primary): then only the blocks that differ are sent (the
files are compared in 1 MiB blocks by SHA-256), and the result is the same as a fresh
copy. A directory holding another cluster, or a running server's, is refused and left
as it was. The copy is written beside it (DIR.walship-new), fsynced, and takes DIR's
place only when whole and when the spool holds the backup's WAL; until then DIR is
unchanged, and an interrupted init leaves it so. As root, the files are given the owner
of DIR (or, where it does not exist, of the directory it is made in).

It writes the backup label (and tablespace map), standby.signal, and restore_command
in postgresql.auto.conf, running this walship binary by its absolute path. The port
and the rest of the configuration are the primary's: change them before the start
where the standby's host needs it. Then 'pg_ctl start -D DIR', run as the owner of
DIR, starts a warm standby.

Progress goes to standard error: a bar on a terminal, a line every 10 s otherwise.`)
	fast := fs.Bool("fast", true, "ask the primary for an immediate checkpoint at the backup's start; --fast=false waits for a spread one")
	maps := mapFlag{}
	fs.Var(maps, "tablespace-mapping", "OLDDIR=NEWDIR: put the tablespace at OLDDIR on the primary in NEWDIR here (repeatable); others keep their location")
	d := newDirFlags(fs, "the spool of the receiver the primary's sidecar is connected to", "the standby's data directory",
		"wait-wal", 5*time.Minute, "how long to wait, after the backup, for the spool to take its WAL")
	log, bin, rc := d.parse(fs, args)
	if rc >= 0 {
		return rc
	}
	spoolDir, pgdata, waitWAL := d.spool, d.pgdata, d.wait
	ctx, stop := signalContext()
	defer stop()
	p := newProgress(stderr, isTerminal(os.Stderr))
	res, err := standby.Init(ctx, standby.Options{Spool: *spoolDir, PGData: *pgdata, Walship: bin, Live: *d.live, Tablespaces: maps,
		Fast: *fast, WaitWAL: *waitWAL, Progress: p.update, Log: log})
	p.finish()
	if err != nil {
		return fail("standby init: %v", err)
	}
	kind := "a fresh copy"
	if res.Refresh {
		kind = "a refresh of the earlier copy"
	}
	fmt.Printf("standby init: %s in %s: %d files, %s; sent %s, %s already held\n", kind, *pgdata, res.Files,
		bytesIEC(res.Total), bytesIEC(res.Sent), bytesIEC(res.Same))
	fmt.Printf("backup WAL from %s to %s on timeline %d, held in the spool; wrote %s\n", res.Start, res.Stop, res.TLI, strings.Join(res.Config, ", "))
	fmt.Printf("start the standby with: pg_ctl start -D %s\n", *pgdata)
	return exitOK
}

// progress shows how far a copy has got: a bar redrawn on a terminal, a line every
// 10 s otherwise.
type progress struct {
	w     io.Writer
	tty   bool
	mu    sync.Mutex
	start time.Time
	last  time.Time
	done  int64
	total int64
	drawn bool
}

func newProgress(w io.Writer, tty bool) *progress {
	now := time.Now()
	return &progress{w: w, tty: tty, start: now, last: now}
}

func (p *progress) update(done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done, p.total = done, total
	every := 10 * time.Second
	if p.tty {
		every = 200 * time.Millisecond
	}
	if now := time.Now(); now.Sub(p.last) >= every {
		p.last = now
		p.draw()
	}
}

func (p *progress) draw() {
	el := time.Since(p.start).Seconds()
	rate := float64(p.done) / max(el, 1e-3)
	left := "?"
	if rate > 0 && p.total >= p.done {
		left = (time.Duration(float64(p.total-p.done)/rate) * time.Second).Truncate(time.Second).String()
	}
	pct := 100.0
	if p.total > 0 {
		pct = 100 * float64(p.done) / float64(p.total)
	}
	line := fmt.Sprintf("%s of %s (%.0f%%), %s/s, %s left", bytesIEC(p.done), bytesIEC(p.total), pct, bytesIEC(int64(rate)), left)
	if p.tty {
		const width = 30
		n := min(width, int(pct*width/100))
		fmt.Fprintf(p.w, "\r[%s%s] %s\x1b[K", strings.Repeat("#", n), strings.Repeat(".", width-n), line)
		p.drawn = true
		return
	}
	fmt.Fprintln(p.w, "standby init:", line)
}

func (p *progress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.total == 0 && !p.drawn {
		return
	}
	p.draw()
	if p.tty {
		fmt.Fprintln(p.w)
	}
}

// bytesIEC writes n bytes for people.
func bytesIEC(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
