package standby

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// RejoinOptions configures Rejoin.
type RejoinOptions struct {
	// PGData is the old primary's data directory, its server stopped.
	PGData string
	// Spool is the spool of a receiver beside it, which the new primary's sidecar
	// ships to.
	Spool string
	// Walship is the absolute path of the walship binary that restore_command runs.
	Walship string
	// Live: as Options.Live.
	Live bool
	// Wait bounds the wait for the spool to hold the new timeline.
	Wait time.Duration
	Log  zerolog.Logger
}

// RejoinReport says what Rejoin found and did.
type RejoinReport struct {
	State    string  // the old primary's control file state
	OldTLI   uint32  // its timeline
	End      wal.LSN // where its valid WAL ends
	NewTLI   uint32  // the new primary's timeline, from the spool's newest history file
	Fork     wal.LSN // where NewTLI's history left OldTLI
	SpoolRun wal.LSN // where the spool's WAL of NewTLI starts
	Config   []string
}

func (r RejoinReport) String() string {
	return fmt.Sprintf("standby rejoin: the old primary (%s) has WAL to %s on timeline %d; timeline %d forked from it at %s, so it follows without a new base backup\n"+
		"the spool holds timeline %d from %s; wrote %v", r.State, r.End, r.OldTLI, r.NewTLI, r.Fork, r.NewTLI, r.SpoolRun, r.Config)
}

// ErrPastFork means that an old primary's WAL goes past the point where the new
// primary's timeline forked from it: it cannot follow the new primary as it is.
var ErrPastFork = errors.New("the old primary's WAL goes past the fork")

// Rejoin makes a stopped old primary a standby of the new primary without a new base
// backup, when its WAL ends at or before the point where the new timeline forked (as it
// does after walship switchover). The spool must hold no WAL yet, or the new timeline
// from the segment of that point: an empty spool is given a start mark at the old
// primary's last checkpoint, so that the new primary's sidecar, when it connects, ships
// from there. Rejoin waits for the new timeline's history file and WAL to arrive, reads
// the old primary's pg_wal from its last checkpoint to the end of its valid records, and
// compares. Only then does it write restore_command, recovery_target_timeline = 'latest'
// and standby.signal; a refusal changes nothing in the data directory.
func Rejoin(ctx context.Context, o RejoinOptions) (RejoinReport, error) {
	var rep RejoinReport
	dir, err := filepath.Abs(o.PGData)
	if err != nil {
		return rep, err
	}
	unlock, err := lockBeside(dir)
	if err != nil {
		return rep, err
	}
	defer unlock()
	if pid, ok := runningServer(dir); ok {
		return rep, fmt.Errorf("a server is running in %s (postmaster.pid names PID %d): stop it first (pg_ctl stop -m fast)", dir, pid)
	}
	ctl, err := wal.ReadControl(dir)
	if err != nil {
		return rep, fmt.Errorf("%s: %w", dir, err)
	}
	rep.State, rep.OldTLI = ctl.State.String(), ctl.TLI
	switch {
	case ctl.State != wal.DBShutdowned && ctl.State != wal.DBInProduction:
		return rep, fmt.Errorf("%s is %s: rejoin takes an old primary, stopped or crashed; make this one a standby with walship standby init into the same directory (a refresh)", dir, ctl.State)
	case ctl.MinRecoveryTLI != 0 && ctl.MinRecoveryTLI != ctl.TLI:
		// Promoted, and stopped before its first checkpoint on the new timeline: its
		// WAL runs on past the checkpoint on another timeline than the one read here.
		return rep, fmt.Errorf("%s's WAL goes on from its last checkpoint on timeline %d to timeline %d: make it a standby with walship standby init into the same directory (a refresh)", dir, ctl.TLI, ctl.MinRecoveryTLI)
	}
	if _, ok, err := spool.ReadTrigger(o.Spool); err != nil || ok {
		if err == nil {
			err = fmt.Errorf("spool %s was promoted from (%s is there): a rejoining standby needs a spool of its own; empty it, or give another", o.Spool, spool.TriggerFile)
		}
		return rep, err
	}
	if err := markStart(o.Spool, ctl); err != nil {
		return rep, err
	}
	wait := o.Wait
	if wait == 0 {
		wait = 2 * time.Minute
	}
	var id spool.Identity
	var hist []wal.HistoryEntry
	logged := false
	err = waitFor(ctx, wait, func() (bool, error) {
		var ok bool
		var err error
		if id, ok, err = spool.ReadIdentity(o.Spool); err != nil || !ok {
			return false, err
		}
		if id.SysID != ctl.SysID {
			return false, fmt.Errorf("spool %s takes cluster %d, but %s is cluster %d", o.Spool, id.SysID, dir, ctl.SysID)
		}
		c, err := spool.Scan(o.Spool, id.SegSize)
		if err != nil {
			return false, err
		}
		pos, ok := c.Position(id.SegSize)
		if !ok || pos.TLI <= ctl.TLI || !c.HasHistory(pos.TLI) {
			if !logged {
				o.Log.Info().Uint32("timeline", ctl.TLI).Msg("waiting for the new primary's sidecar to ship its timeline into the spool")
				logged = true
			}
			return false, nil
		}
		b, err := os.ReadFile(filepath.Join(o.Spool, wal.HistoryName(pos.TLI)))
		if err != nil {
			return false, err
		}
		if hist, err = wal.ParseHistory(b); err != nil {
			return false, err
		}
		rep.NewTLI = pos.TLI
		rep.SpoolRun = c.OldestRun(pos.TLI, pos.LSN, id.SegSize)
		return true, nil
	})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return rep, fmt.Errorf("the spool %s holds no WAL of a timeline newer than %d after %s: is a sidecar beside the new primary shipping to its receiver? See its log and the receiver's", o.Spool, ctl.TLI, wait)
		}
		return rep, err
	}
	if len(hist) == 0 || hist[len(hist)-1].TLI != ctl.TLI {
		for _, h := range hist {
			if h.TLI == ctl.TLI {
				return rep, fmt.Errorf("timeline %d of the spool branched from timeline %d more than one switch ago: rejoin follows one switch only; make %s a standby with walship standby init into the same directory (a refresh)", rep.NewTLI, ctl.TLI, dir)
			}
		}
		return rep, fmt.Errorf("timeline %d of the spool does not descend from timeline %d of %s: it is another history", rep.NewTLI, ctl.TLI, dir)
	}
	rep.Fork = hist[len(hist)-1].Switch
	if rep.End, err = walEnd(dir, id.Stream(), ctl); err != nil {
		return rep, err
	}
	// Recovery of the old primary would go at least this far.
	rep.End = max(rep.End, ctl.MinRecovery)
	if rep.End > rep.Fork {
		return rep, fmt.Errorf("%w: %s has WAL to %s on timeline %d, past %s, where timeline %d forked from it (it was not stopped cleanly before the failover), so it cannot follow the new primary as it is: "+
			"make it a standby again with walship standby init into the same directory (a refresh: only the blocks that differ are sent), or with pg_rewind where the server's binaries have it; nothing was changed in it",
			ErrPastFork, dir, rep.End, ctl.TLI, rep.Fork, rep.NewTLI)
	}
	forkSeg, _ := wal.SegmentOf(rep.NewTLI, rep.Fork, id.SegSize)
	if rep.End < forkSeg.Start(id.SegSize) {
		// Its own pg_wal ends before the segment where the spool's WAL begins.
		return rep, fmt.Errorf("%s has WAL only to %s on timeline %d, and the spool's timeline %d begins with segment %s, at %s: the WAL between is in neither; make it a standby with walship standby init into the same directory (a refresh); nothing was changed in it",
			dir, rep.End, ctl.TLI, rep.NewTLI, forkSeg.Name(id.SegSize), forkSeg.Start(id.SegSize))
	}
	if rep.SpoolRun > forkSeg.Start(id.SegSize) {
		return rep, fmt.Errorf("the spool holds timeline %d only from %s, after segment %s, which holds the fork at %s: stop its receiver, empty the spool, start the receiver again, run walship standby rejoin, and only then start the new primary's sidecar",
			rep.NewTLI, rep.SpoolRun, forkSeg.Name(id.SegSize), rep.Fork)
	}
	if rep.Config, err = configureStandby(dir, o); err != nil {
		return rep, err
	}
	return rep, nil
}

// markStart gives a spool that holds no WAL a start mark at the old primary's last
// checkpoint, in place of any mark from before.
func markStart(dir string, ctl wal.Control) error {
	id, ok, err := spool.ReadIdentity(dir)
	if err != nil {
		return err
	}
	if ok {
		c, err := spool.Scan(dir, id.SegSize)
		if err != nil {
			return err
		}
		if _, has := c.Position(id.SegSize); has {
			return nil
		}
	}
	if m, ok, err := spool.ReadStart(dir); err != nil || ok && m.LSN == ctl.CheckPoint {
		return err
	}
	if err := durable.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return spool.WriteStart(dir, ctl.CheckPoint)
}

// walEnd reads the data directory's pg_wal from its last checkpoint on, as crash
// recovery would, and returns where its valid records end.
func walEnd(dir string, st wal.Stream, ctl wal.Control) (wal.LSN, error) {
	pgwal := filepath.Join(dir, "pg_wal")
	src := &wal.Files{SegSize: st.SegSize, Locate: func(no uint64) (string, int64, bool) {
		return filepath.Join(pgwal, wal.Segment{TLI: ctl.TLI, No: no}.Name(st.SegSize)), int64(st.SegSize), true
	}}
	defer src.Close()
	r := wal.NewReader(st, ctl.TLI, src, ctl.CheckPoint, 0)
	var stop *wal.EndError
	for {
		_, err := r.Next()
		if errors.As(err, &stop) {
			return r.Pos(), nil
		}
		if err != nil {
			return 0, fmt.Errorf("read %s from its last checkpoint at %s: %w", pgwal, ctl.CheckPoint, err)
		}
	}
}

// configureStandby writes what makes the data directory dir a standby fed from the
// spool and following the newest timeline, durably, owned as the directory is.
func configureStandby(dir string, o RejoinOptions) ([]string, error) {
	autoPath := filepath.Join(dir, "postgresql.auto.conf")
	auto, err := os.ReadFile(autoPath)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	content := AutoConf(string(auto), "walship standby rejoin: recovery takes the new primary's WAL from the spool",
		RestoreCommand(o.Walship, o.Spool, o.Live), append([]string{"recovery_target_timeline", "latest"}, LiveSettings(o.Live)...)...)
	owner, err := ownerFor(dir)
	if err != nil {
		return nil, err
	}
	if err := durable.WriteFile(autoPath, []byte(content), 0o600); err != nil {
		return nil, err
	}
	if err := owner.apply(autoPath); err != nil {
		return nil, err
	}
	for _, name := range []string{"recovery.signal"} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	signal := filepath.Join(dir, "standby.signal")
	if err := durable.WriteFile(signal, nil, 0o600); err != nil {
		return nil, err
	}
	if err := owner.apply(signal); err != nil {
		return nil, err
	}
	return []string{"restore_command and recovery_target_timeline = 'latest' in postgresql.auto.conf", "standby.signal"}, nil
}

// waitFor checks cond every 100 ms until it holds or fails, for at most within.
func waitFor(ctx context.Context, within time.Duration, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := cond()
		if ok || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}
