package feeder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// PromoteConfig configures a promotion.
type PromoteConfig struct {
	// Spool is the standby's spool. Required.
	Spool string
	// DSN reaches the standby. Empty: built from PGData's postmaster.pid (its socket
	// directory and port, user postgres).
	DSN string
	// PGData is the standby's data directory. Empty: the server's data_directory.
	PGData string
	// Timeout bounds the whole promotion. Zero means one minute.
	Timeout time.Duration
	// DrainWait is how long, at most, to wait for a sidecar to connect and drain when
	// none is connected although a receiver runs: a sidecar reconnecting (the receiver
	// restarted, the network came back) may still hold the primary's last WAL.
	// Counted from the end of the receiver's last session. Zero means
	// DefaultDrainWait.
	DrainWait time.Duration
	// Force goes on without waiting for a sidecar that is not connected: for a primary
	// whose host is known to be lost.
	Force bool
	// Logger receives progress. The zero value logs nothing.
	Logger zerolog.Logger
}

// Report says what a promotion did.
type Report struct {
	TLI          uint32  // the timeline the server chose
	End          wal.LSN // where recovery ended: the switch point in the new history file
	Segment      string  // the frozen partial segment, "" if there was none
	FrozenBytes  uint64  // how many bytes of it the spool held at the freeze
	FromPartial  uint64  // how many of them recovery used
	AlreadyDone  bool    // a previous run had promoted it
	StandbyMode  bool    // standby.signal (pg_promote) rather than archive recovery
	PartialStart wal.LSN // the LSN of the partial segment's first byte
	Drained      bool    // the sidecar had recorded its end-of-WAL mark
	DrainEnd     string  // where the mark says the primary's WAL ends
	// NoDrain says why there was no end-of-WAL mark to wait for.
	NoDrain string
}

// DefaultDrainWait is PromoteConfig.DrainWait's default: three times the sidecar's
// longest pause between two attempts to reach its receiver (tail: maxBackoff).
const DefaultDrainWait = 15 * time.Second

func (r Report) String() string {
	var b strings.Builder
	if r.AlreadyDone {
		b.WriteString("already promoted; ")
	}
	fmt.Fprintf(&b, "promoted: timeline %d, recovery ended at %s", r.TLI, r.End)
	if r.Drained {
		fmt.Fprintf(&b, "; the sidecar drained the primary's WAL to %s", r.DrainEnd)
	} else if !r.AlreadyDone {
		why := r.NoDrain
		if why == "" {
			why = "no sidecar was connected"
		}
		fmt.Fprintf(&b, "; no end-of-WAL mark (%s), so the spool's WAL as it was: what the primary flushed after %s, if anything, is not on this server", why, r.End)
	}
	if r.Segment != "" {
		fmt.Fprintf(&b, "; %d of the %d bytes of the partial segment %s came from the spool's tail", r.FromPartial, r.FrozenBytes, r.Segment)
	}
	return b.String()
}

// Promote freezes the spool, sets the trigger and promotes the standby. See the
// package documentation for the steps. Running it again after a success reports the
// same promotion and changes nothing.
func Promote(ctx context.Context, cfg PromoteConfig) (Report, error) {
	if cfg.Spool == "" {
		return Report{}, errors.New("promote: no spool")
	}
	if cfg.DSN == "" && cfg.PGData == "" {
		return Report{}, errors.New("promote: give the standby's --dsn or --pgdata")
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	log := cfg.Logger
	id, ok, err := spool.ReadIdentity(cfg.Spool)
	if err != nil {
		return Report{}, err
	}
	if !ok {
		return Report{}, fmt.Errorf("promote: spool %s has received nothing yet", cfg.Spool)
	}
	dsn := cfg.DSN
	if dsn == "" {
		if dsn, err = dsnFromPGData(cfg.PGData); err != nil {
			return Report{}, err
		}
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return Report{}, fmt.Errorf("promote: connect to the standby: %w", err)
	}
	defer func() { conn.Close(context.Background()) }()
	var sysid uint64
	var inRecovery bool
	var dataDir string
	var versionNum int
	err = conn.QueryRow(ctx, `SELECT (SELECT system_identifier FROM pg_control_system()), pg_is_in_recovery(),
		current_setting('data_directory'), current_setting('server_version_num')::int`).Scan(&sysid, &inRecovery, &dataDir, &versionNum)
	if err != nil {
		return Report{}, fmt.Errorf("promote: read the standby's state: %w", err)
	}
	if err := sameMajor(versionNum, id); err != nil {
		return Report{}, fmt.Errorf("promote: %w", err)
	}
	if cfg.PGData == "" {
		cfg.PGData = dataDir
	}
	if sysid != id.SysID {
		return Report{}, fmt.Errorf("promote: %w: spool %s holds system identifier %d, the standby is %d", spool.ErrWrongCluster, cfg.Spool, id.SysID, sysid)
	}
	_, err = os.Stat(filepath.Join(cfg.PGData, "standby.signal"))
	rep := Report{StandbyMode: err == nil}

	trig, triggered, err := spool.ReadTrigger(cfg.Spool)
	if err != nil {
		return Report{}, err
	}
	if !triggered {
		if !inRecovery {
			return Report{}, errors.New("promote: the server is not in recovery and this spool was never promoted: nothing to do")
		}
		if cfg.DrainWait == 0 {
			cfg.DrainWait = DefaultDrainWait
		}
		if rep.Drained, rep.DrainEnd, rep.NoDrain, err = awaitDrain(ctx, cfg.Spool, cfg.DrainWait, cfg.Force, log); err != nil {
			return Report{}, err
		}
		if trig, err = freeze(ctx, cfg.Spool, id, log, func(ctx context.Context, trig spool.Trigger) error {
			if !rep.StandbyMode {
				return nil // in archive recovery the waiting restore_command sees the trigger itself
			}
			// PostgreSQL ends recovery as soon as it sees the promotion after a failed
			// restore_command, or on waking from the wait between two: it may never ask
			// for the frozen segment again. So the server is told to promote only once
			// it has replayed the frozen tail, which its next restore hands it.
			end, err := frozenEnd(cfg.Spool, id, trig)
			if err != nil {
				return err
			}
			log.Info().Stringer("end", end).Msg("waiting for the standby to replay the frozen tail")
			// A reload wakes the startup process from its wait between two restores
			// (wal_retrieve_retry_interval, 5 s by default), so that it asks at once.
			if _, err := conn.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
				log.Debug().Err(err).Msg("pg_reload_conf() failed; the standby asks again at its next retry")
			}
			if err := waitFor(ctx, 20*time.Millisecond, func() (bool, error) {
				var replayed wal.LSN
				if err := conn.QueryRow(ctx, "SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')").Scan(&replayed); err != nil {
					return false, err
				}
				return replayed >= end, nil
			}); err != nil {
				return fmt.Errorf("the standby has not replayed the spool's WAL to %s: %w", end, err)
			}
			if _, err := conn.Exec(ctx, "SELECT pg_promote(false)"); err != nil {
				return fmt.Errorf("pg_promote(): %w", err)
			}
			return nil
		}); err != nil {
			return Report{}, err
		}
	} else {
		rep.AlreadyDone = !inRecovery
		if inRecovery && rep.StandbyMode {
			// An earlier run froze the spool; asking again is harmless.
			if _, err := conn.Exec(ctx, "SELECT pg_promote(false)"); err != nil {
				return Report{}, fmt.Errorf("promote: pg_promote(): %w", err)
			}
		}
	}
	rep.Segment, rep.FrozenBytes = trig.Segment, trig.Bytes
	if trig.Segment != "" {
		seg, err := wal.ParseSegmentName(trig.Segment, id.SegSize)
		if err != nil {
			return Report{}, fmt.Errorf("promotion trigger: %w", err)
		}
		rep.PartialStart = seg.Start(id.SegSize)
	}

	// Wait for the end of recovery. In archive recovery the server may refuse
	// connections until then, so reconnect as needed.
	err = waitPromoted(ctx, dsn)
	if err != nil {
		return rep, fmt.Errorf("promote: the server did not finish recovery within %s: %w (the spool stays frozen; the server may still be promoting)", cfg.Timeout, err)
	}
	return report(ctx, dsn, cfg.PGData, rep)
}

// awaitDrain waits, while a sidecar's session is writing the spool, for the sidecar to
// record its end-of-WAL mark (it drains the primary's pg_wal once the server is gone)
// or for the session to end. A session holds the writer lock; a mark left by a session
// that has ended counts too.
//
// Without a session, a sidecar may still hold WAL that only the dead primary's pg_wal
// has: one whose session was lost (the receiver restarted, the network failed) drains
// once it reaches the receiver again. So, while a receiver runs, it waits up to wait
// after the receiver's last session ended for one to start; force skips that wait. It
// returns why it went on without a mark, for the report.
func awaitDrain(ctx context.Context, dir string, wait time.Duration, force bool, log zerolog.Logger) (drained bool, end, noDrain string, err error) {
	waiting, idle := false, false
	started := time.Now()
	err = waitFor(ctx, 10*time.Millisecond, func() (bool, error) {
		m, ok, err := spool.ReadEnd(dir)
		if err != nil || ok {
			drained, end = ok, m.Position.String()
			return true, err
		}
		lock, err := spool.LockWriter(dir)
		if errors.Is(err, spool.ErrLocked) {
			if !waiting {
				log.Info().Msg("a sidecar is connected; waiting for it to drain the primary's WAL and mark its end " +
					"(a sidecar lost with its host shows once the receiver's session times out, within 10s)")
				waiting = true
			}
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if err := lock.Close(); err != nil {
			return false, err
		}
		running, err := spool.ReceiverRunning(dir)
		switch {
		case err != nil:
			return false, err
		case force:
			noDrain = "--force: no sidecar was waited for"
			return true, nil
		case !running:
			noDrain = "no receiver runs on the spool, so no sidecar can drain into it"
			return true, nil
		}
		// Since when the receiver has had no session: a sidecar reconnecting is
		// given wait from then.
		since := started
		if s, ok, err := spool.ReadSession(dir); err == nil && ok && !s.Connected {
			if t, err := time.Parse(time.RFC3339Nano, s.Since); err == nil && t.Before(since) {
				since = t
			}
		}
		if time.Since(since) >= wait {
			noDrain = fmt.Sprintf("no sidecar connected within %s", wait)
			return true, nil
		}
		if !idle {
			log.Warn().Dur("for", wait-time.Since(since)).Msg("no sidecar is connected; waiting for one to connect and drain the primary's WAL " +
				"(give --force if the primary's host is lost)")
			idle = true
		}
		return false, nil
	})
	if errors.Is(err, context.DeadlineExceeded) {
		return false, "", "", fmt.Errorf("promote: a sidecar is still streaming into %s and sent no end-of-WAL mark: "+
			"is the primary still running? Stop it first; the sidecar then drains its WAL and promote goes on (nothing was changed)", dir)
	}
	return drained, end, noDrain, err
}

// freeze stops the receivers, writes the trigger and runs start, the request to the
// server to promote. If any step fails, the spool is unfrozen again: a promotion that
// did not start leaves the standby as it was.
func freeze(ctx context.Context, dir string, id spool.Identity, log zerolog.Logger, start func(context.Context, spool.Trigger) error) (trig spool.Trigger, err error) {
	if err := spool.Freeze(dir); err != nil {
		return spool.Trigger{}, err
	}
	defer func() {
		if err == nil {
			return
		}
		if uerr := spool.Unfreeze(dir); uerr != nil {
			log.Error().Err(uerr).Msgf("could not undo the freeze; remove %s and %s from the spool by hand", spool.TriggerFile, spool.FreezeFile)
			err = fmt.Errorf("%w (undoing the freeze failed too: %w)", err, uerr)
			return
		}
		err = fmt.Errorf("%w (the spool was unfrozen)", err)
	}()
	var lock *os.File
	err = waitFor(ctx, 10*time.Millisecond, func() (bool, error) {
		var err error
		lock, err = spool.LockWriter(dir)
		if errors.Is(err, spool.ErrLocked) {
			return false, nil
		}
		return err == nil, err
	})
	if err != nil {
		return spool.Trigger{}, fmt.Errorf("promote: freeze the spool: wait for the receiver to stop writing: %w", err)
	}
	defer func() { _ = lock.Close() }() // releases the lock; nothing is written to the lock file
	if trig, err = frozenTail(dir, id, log); err != nil {
		return spool.Trigger{}, fmt.Errorf("promote: %w", err)
	}
	if err := spool.WriteTrigger(dir, trig); err != nil {
		return spool.Trigger{}, fmt.Errorf("promote: %w", err)
	}
	log.Info().Str("segment", trig.Segment).Uint64("bytes", trig.Bytes).Msg("spool frozen; trigger set")
	if err := start(ctx, trig); err != nil {
		return spool.Trigger{}, fmt.Errorf("promote: %w", err)
	}
	return trig, nil
}

// frozenTail decides what recovery gets of a frozen spool: its newest timeline's
// partial, only as far as its pages check (a host crash can leave a partial longer than
// what was fsynced), or, without a partial, nothing of the segment after its end.
func frozenTail(dir string, id spool.Identity, log zerolog.Logger) (spool.Trigger, error) {
	c, err := spool.Scan(dir, id.SegSize)
	if err != nil {
		return spool.Trigger{}, err
	}
	pos, _ := c.Position(id.SegSize)
	p, ok := c.Partials[pos.TLI]
	if !ok {
		next, _ := wal.SegmentOf(pos.TLI, pos.LSN, id.SegSize)
		return spool.Trigger{TLI: pos.TLI, Segment: next.Name(id.SegSize)}, nil
	}
	path := spool.PartialPath(dir, p.Seg, id.SegSize)
	b, err := spool.PartialBytes(path, id.SegSize)
	if err != nil {
		return spool.Trigger{}, err
	}
	// A receiver that died between its end slot and its fdatasync leaves an end that
	// may not be durable: make what recovery will get durable before the trigger
	// names it.
	if err := spool.SyncPartial(path); err != nil {
		return spool.Trigger{}, err
	}
	if err := id.Stream().CheckPages(b, p.Seg.Start(id.SegSize), p.Seg.TLI); err != nil {
		var pe *wal.PageError
		if !errors.As(err, &pe) {
			return spool.Trigger{}, err
		}
		b = b[:pe.At-p.Seg.Start(id.SegSize)]
		log.Warn().Err(err).Int("kept_bytes", len(b)).Msg("the partial segment ends with pages that do not check; recovery gets the bytes before them")
	}
	return spool.Trigger{TLI: pos.TLI, Segment: p.Seg.Name(id.SegSize), Bytes: uint64(len(b)), Hash: spool.HashTail(b)}, nil
}

func waitPromoted(ctx context.Context, dsn string) error {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	return waitFor(ctx, 20*time.Millisecond, func() (bool, error) {
		if conn == nil {
			c, err := pgx.Connect(ctx, dsn)
			if err != nil {
				return false, nil // not accepting connections yet
			}
			conn = c
		}
		var rec bool
		if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&rec); err != nil {
			conn.Close(context.Background())
			conn = nil
			return false, nil
		}
		return !rec, nil
	})
}

// report reads the new timeline and where recovery ended.
func report(ctx context.Context, dsn, pgdata string, rep Report) (Report, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return rep, fmt.Errorf("promote: connect to the promoted server: %w", err)
	}
	defer conn.Close(context.Background())
	var file string
	if err := conn.QueryRow(ctx, "SELECT pg_walfile_name(pg_current_wal_lsn())").Scan(&file); err != nil {
		return rep, fmt.Errorf("promote: read the new timeline: %w", err)
	}
	tli, err := strconv.ParseUint(file[:8], 16, 32)
	if err != nil {
		return rep, fmt.Errorf("promote: timeline of %q: %w", file, err)
	}
	rep.TLI = uint32(tli)
	b, err := os.ReadFile(filepath.Join(pgdata, "pg_wal", wal.HistoryName(rep.TLI)))
	if err != nil {
		return rep, fmt.Errorf("promote: read the new timeline's history: %w", err)
	}
	hist, err := wal.ParseHistory(b)
	if err != nil {
		return rep, fmt.Errorf("promote: %s: %w", wal.HistoryName(rep.TLI), err)
	}
	rep.End = hist[len(hist)-1].Switch
	if rep.Segment != "" && rep.End > rep.PartialStart {
		rep.FromPartial = min(uint64(rep.End-rep.PartialStart), rep.FrozenBytes)
	}
	return rep, nil
}

// dsnFromPGData builds a DSN from postmaster.pid: line 4 is the port, line 5 the
// socket directory (pidfile.h).
func dsnFromPGData(pgdata string) (string, error) {
	b, err := os.ReadFile(filepath.Join(pgdata, "postmaster.pid"))
	if err != nil {
		return "", fmt.Errorf("promote: is the standby running? %w", err)
	}
	lines := strings.Split(string(b), "\n")
	if len(lines) < 5 {
		return "", fmt.Errorf("promote: %s: too few lines", filepath.Join(pgdata, "postmaster.pid"))
	}
	port, sock := strings.TrimSpace(lines[3]), strings.TrimSpace(lines[4])
	if sock == "" {
		sock = "127.0.0.1"
	}
	return fmt.Sprintf("host=%s port=%s user=postgres dbname=postgres", sock, port), nil
}

func waitFor(ctx context.Context, every time.Duration, cond func() (bool, error)) error {
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(every):
		}
	}
}

// frozenEnd is where recovery of the frozen spool ends: after the last whole record of
// the frozen partial (what restore hands recovery), or at the start of the frozen
// segment when the promotion froze none of it.
func frozenEnd(dir string, id spool.Identity, trig spool.Trigger) (wal.LSN, error) {
	seg, err := wal.ParseSegmentName(trig.Segment, id.SegSize)
	if err != nil {
		return 0, fmt.Errorf("promotion trigger: %w", err)
	}
	start := seg.Start(id.SegSize)
	if trig.Bytes == 0 {
		return start, nil
	}
	f, err := os.Open(filepath.Join(dir, trig.Segment+spool.PartialSuffix))
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }() // read only
	b := make([]byte, trig.Bytes)
	if _, err := io.ReadFull(f, b); err != nil {
		return 0, fmt.Errorf("frozen partial %s: %w", trig.Segment, err)
	}
	end, _, _, err := wal.ValidEnd(id.Stream(), seg.TLI, wal.Bytes{Base: start, Data: b}, start, 0)
	if err != nil {
		return 0, fmt.Errorf("frozen partial %s: %w", trig.Segment, err)
	}
	return end, nil
}
