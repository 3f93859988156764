package feeder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/archive"
	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

var (
	// ErrNotAvailable means the file is not in the spool (yet): restore_command's exit 1.
	ErrNotAvailable = errors.New("not available")
	// ErrCorrupt means a file of the spool or the archive must not be handed to recovery.
	ErrCorrupt = errors.New("corrupt file")
	// errNotInSpool is a file the spool lacks, which the archive may hold.
	errNotInSpool = fmt.Errorf("%w: not in the spool", ErrNotAvailable)
	// ErrStopRecovery wraps the error of a restore whose failure the server would take
	// for the end of the WAL (FailureEndsRecovery): restore_command must then exit above
	// 125, which stops the server, rather than let it promote itself without the WAL it
	// asked for.
	ErrStopRecovery = errors.New("the server must stop rather than end recovery")
	// errFromArchive marks a failure to get a good file from the archive: a waiting
	// restore tries again later, for the archive may answer then and the spool may
	// publish the file meanwhile.
	errFromArchive = errors.New("from the archive")
)

// FailureEndsRecovery says why a failing restore_command would end the recovery of the
// server in pgdata, or "" when it would not. In archive recovery (recovery.signal
// without standby.signal; with both, standby mode wins) the first failure is taken for the end of the WAL, and so it
// is in standby mode once a promotion has been asked for, which walship promote does
// after setting its trigger in the spool (xlogrecovery.c: WaitForWALToBecomeAvailable,
// CheckForStandbyTrigger). Any exit status from 1 to 125 counts as a failure there,
// not only 1 (restore.c: RestoreArchivedFile). pgdata "" is the working directory; a
// directory that is no data directory (no PG_VERSION) gives "": the command was run by
// hand.
func FailureEndsRecovery(pgdata, spoolDir string) string {
	if pgdata == "" {
		pgdata = "."
	}
	exists := func(name string) bool {
		_, err := os.Stat(filepath.Join(pgdata, name))
		return err == nil
	}
	switch {
	case !exists("PG_VERSION"):
		return ""
	case !exists("standby.signal") && exists("recovery.signal"):
		return "the server is in archive recovery (recovery.signal, no standby.signal), where a failed restore ends recovery and promotes it"
	case !exists("standby.signal"):
		return "" // not in recovery at all: run by hand in a data directory
	}
	if spoolDir == "" {
		return ""
	}
	if _, triggered, err := spool.ReadTrigger(spoolDir); err != nil || triggered {
		return "a promotion is under way, and a failed restore would end recovery without this file"
	}
	return ""
}

// DefaultWaitInterval is how often a waiting restore looks at the spool.
const DefaultWaitInterval = 50 * time.Millisecond

// RestoreConfig is one restore_command call.
type RestoreConfig struct {
	// Spool is the receiver's spool directory. Required.
	Spool string
	// File is %f, the name recovery asks for. Required.
	File string
	// Target is %p, where recovery wants it. Required.
	Target string
	// RestartFile is %r, the oldest file recovery still needs. Used by Cleanup.
	RestartFile string
	// Wait makes a missing segment wait until it is published or the promotion trigger
	// appears (archive recovery, the pg_standby way). Off: answer ErrNotAvailable at once
	// (standby mode, where the server retries).
	Wait bool
	// WaitInterval is how often a waiting restore looks again. Zero: DefaultWaitInterval.
	WaitInterval time.Duration
	// Cleanup removes published segments older than RestartFile, as pg_archivecleanup
	// would; never a partial, history file or anything of the promotion.
	Cleanup bool
	// PGData is the standby's data directory, for the check that the spool is its
	// cluster's. Empty: the working directory, which is the data directory when
	// PostgreSQL runs restore_command; the check is skipped if it holds no pg_control.
	PGData string
	// Live, in standby mode (not with Wait), hands recovery the segment the spool is
	// still receiving, zero-padded, each time it has grown: a hot standby then stays
	// milliseconds behind (restoreLive).
	Live bool
	// Archive, if set, is asked once for a segment or history file the spool lacks;
	// what it gives is checked as spool segments are.
	Archive *archive.Archive
	// Logger receives what was done. The zero value logs nothing.
	Logger zerolog.Logger
}

var (
	backupName = regexp.MustCompile(`^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$`)
)

// Restore answers one restore_command call: nil when the file was restored to Target,
// ErrNotAvailable when it is not there, another error when something is wrong. An
// error that would end the server's recovery (FailureEndsRecovery) wraps
// ErrStopRecovery.
func Restore(ctx context.Context, cfg RestoreConfig) error {
	err := restore(ctx, cfg)
	if err == nil || errors.Is(err, ErrNotAvailable) || ctx.Err() != nil {
		return err
	}
	if why := FailureEndsRecovery(cfg.PGData, cfg.Spool); why != "" {
		return fmt.Errorf("%w (%s): %w", ErrStopRecovery, why, err)
	}
	return err
}

func restore(ctx context.Context, cfg RestoreConfig) error {
	if cfg.Spool == "" || cfg.File == "" || cfg.Target == "" {
		return errors.New("restore: the spool, %f and %p are required")
	}
	if cfg.WaitInterval <= 0 {
		cfg.WaitInterval = DefaultWaitInterval
	}
	if info, err := os.Stat(cfg.Spool); err != nil || !info.IsDir() {
		if err == nil {
			err = errors.New("not a directory")
		}
		return fmt.Errorf("restore: spool %s: %w", cfg.Spool, err)
	}
	name := cfg.File
	if name == "00000001.history" {
		// Timeline 1 has none, but a promotion asks for its parent's history file to
		// copy into the new one: there is nothing to give.
		return fmt.Errorf("restore %s: timeline 1 has no history file: %w", name, ErrNotAvailable)
	}
	id, haveID, err := spool.ReadIdentity(cfg.Spool)
	if err != nil {
		return err
	}
	segSize := id.SegSize
	if !haveID {
		segSize = 16 << 20 // only to parse the name; an empty spool has nothing to give
	}
	seg, segErr := wal.ParseSegmentName(name, segSize)
	_, histErr := wal.ParseHistoryName(name)
	isPartial := strings.HasSuffix(name, spool.PartialSuffix)
	if isPartial {
		_, err := wal.ParseSegmentName(strings.TrimSuffix(name, spool.PartialSuffix), segSize)
		isPartial = err == nil
	}
	if segErr != nil && histErr != nil && !isPartial && !backupName.MatchString(name) {
		return fmt.Errorf("restore %q: %w: want a WAL segment, history, backup or partial file name", name, wal.ErrBadName)
	}
	if haveID {
		if err := checkCluster(cfg.PGData, id); err != nil {
			return err
		}
	}
	if cfg.Cleanup && cfg.RestartFile != "" && haveID {
		defer cleanup(ctx, cfg, segSize)
	}
	if segErr != nil {
		// History, backup and partial files: restored if present, at once either way.
		err := restoreAsIs(cfg, name, isPartial && haveID, segSize)
		if errors.Is(err, errNotInSpool) && cfg.Archive != nil && histErr == nil {
			return restoreFromArchive(ctx, cfg, id, haveID, nil)
		}
		return err
	}
	askArchive := cfg.Archive != nil
	var archiveAt time.Time // when to ask the archive again after it failed
	archivePause, archiveErr := time.Duration(0), ""
	for waited := false; ; waited = true {
		err := restoreSegment(ctx, cfg, id, seg, haveID)
		if askArchive && !time.Now().Before(archiveAt) && (errors.Is(err, errNotInSpool) || !haveID && errors.Is(err, ErrNotAvailable)) {
			// A segment the archive does not hold is not produced yet: the spool will
			// have it first, and a waiting restore asks the archive no more.
			err = restoreFromArchive(ctx, cfg, id, haveID, &seg)
			askArchive = false
			if cfg.Wait && errors.Is(err, errFromArchive) && !errors.Is(err, archive.ErrWrongCluster) {
				// An archive that cannot be reached, or gave damaged bytes, may do
				// better later, and the spool may publish the file meanwhile: ask again
				// after a growing pause, saying why each time the reason changes.
				if msg := err.Error(); msg != archiveErr {
					cfg.Logger.Warn().Err(err).Msg("waiting: the archive failed; looking in the spool meanwhile and asking the archive again later")
					archiveErr = msg
				}
				archivePause = min(max(2*archivePause, time.Second), 30*time.Second)
				archiveAt, askArchive = time.Now().Add(archivePause), true
				err = fmt.Errorf("restore %s: %w", cfg.File, ErrNotAvailable)
			}
			if !errors.Is(err, ErrNotAvailable) {
				return err
			}
		}
		if !errors.Is(err, ErrNotAvailable) || !cfg.Wait {
			return err
		}
		if !waited {
			cfg.Logger.Debug().Str("file", name).Msg("waiting for the file to be published or the promotion trigger")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(cfg.WaitInterval):
		}
		if !haveID {
			if id, haveID, err = spool.ReadIdentity(cfg.Spool); err != nil {
				return err
			}
		}
	}
}

func restoreSegment(ctx context.Context, cfg RestoreConfig, id spool.Identity, seg wal.Segment, haveID bool) error {
	if !haveID {
		return fmt.Errorf("restore %s: the spool is empty: %w", cfg.File, ErrNotAvailable)
	}
	trig, triggered, err := spool.ReadTrigger(cfg.Spool)
	if err != nil {
		return err
	}
	if triggered && seg.TLI == trig.TLI {
		frozen, err := wal.ParseSegmentName(trig.Segment, id.SegSize)
		if err != nil {
			return fmt.Errorf("promotion trigger: %w", err)
		}
		switch {
		case seg.No == frozen.No:
			return restorePartial(cfg, id, trig)
		case seg.No > frozen.No:
			return fmt.Errorf("restore %s: after the promotion's partial segment %s: %w", cfg.File, trig.Segment, ErrNotAvailable)
		}
	}
	path := filepath.Join(cfg.Spool, cfg.File)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) && cfg.Live && !cfg.Wait {
		if err := restoreLive(ctx, cfg, id, seg); !errors.Is(err, errNotInSpool) {
			return err
		}
		b, err = os.ReadFile(path) // published meanwhile?
	}
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("restore %s: %w yet", cfg.File, errNotInSpool)
	}
	if err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	if err := checkSegment(id, seg, b); err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	if err := durable.WriteFile(cfg.Target, b, 0o600); err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	cfg.Logger.Info().Str("file", cfg.File).Msg("restored")
	return nil
}

// checkSegment checks a whole segment before it goes to recovery: its size, and its
// records (checkRecords); what fails is ErrCorrupt.
func checkSegment(id spool.Identity, seg wal.Segment, b []byte) error {
	if uint64(len(b)) != id.SegSize {
		return fmt.Errorf("%w: it holds %d bytes, want %d", ErrCorrupt, len(b), id.SegSize)
	}
	if _, err := checkRecords(id, seg, b); err != nil {
		return fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return nil
}

// checkRecords walks a segment's records: every page header, xl_prev and CRC must hold
// up to the end of the bytes (the last record may run on past them, into the next
// segment or, in a partial segment, into bytes not received yet). It returns where the
// last whole record ends.
func checkRecords(id spool.Identity, seg wal.Segment, b []byte) (wal.LSN, error) {
	start := seg.Start(id.SegSize)
	end, _, stop, err := wal.ValidEnd(id.Stream(), seg.TLI, wal.Bytes{Base: start, Data: b}, start, 0)
	if err != nil {
		return 0, err
	}
	if !errors.Is(stop.Err, io.EOF) {
		return 0, stop
	}
	return end, nil
}

// restorePartial hands the frozen partial segment, zero-padded to the segment size.
func restorePartial(cfg RestoreConfig, id spool.Identity, trig spool.Trigger) error {
	if trig.Bytes == 0 {
		return fmt.Errorf("restore %s: the promotion froze no bytes of it: %w", cfg.File, ErrNotAvailable)
	}
	path := filepath.Join(cfg.Spool, trig.Segment+spool.PartialSuffix)
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("restore %s from the frozen partial: %w", cfg.File, err)
	}
	defer func() { _ = f.Close() }() // read only
	b := make([]byte, id.SegSize)
	if _, err := io.ReadFull(f, b[:trig.Bytes]); err != nil {
		return fmt.Errorf("restore %s: %w: frozen partial %s is shorter than the %d bytes frozen: %w", cfg.File, ErrCorrupt, path, trig.Bytes, err)
	}
	if got := spool.HashTail(b[:trig.Bytes]); got != trig.Hash {
		return fmt.Errorf("restore %s: %w: frozen partial %s changed since the promotion froze it (xxhash64 %s, want %s)", cfg.File, ErrCorrupt, path, got, trig.Hash)
	}
	seg, err := wal.ParseSegmentName(trig.Segment, id.SegSize)
	if err != nil {
		return fmt.Errorf("promotion trigger: %w", err)
	}
	if _, err := checkRecords(id, seg, b[:trig.Bytes]); err != nil {
		return fmt.Errorf("restore %s: %w: frozen partial %s: %w", cfg.File, ErrCorrupt, path, err)
	}
	if err := durable.WriteFile(cfg.Target, b, 0o600); err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	cfg.Logger.Info().Str("file", cfg.File).Uint64("bytes", trig.Bytes).Msg("restored the frozen partial segment, zero-padded")
	return nil
}

// restoreAsIs copies a history, backup or partial file; a partial is its bytes, up to
// its end.
func restoreAsIs(cfg RestoreConfig, name string, partial bool, segSize uint64) error {
	path := filepath.Join(cfg.Spool, name)
	var b []byte
	var err error
	if partial {
		b, err = spool.PartialBytes(path, segSize)
	} else {
		b, err = os.ReadFile(path)
	}
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("restore %s: %w", name, errNotInSpool)
	}
	if err != nil {
		return fmt.Errorf("restore %s: %w", name, err)
	}
	if err := durable.WriteFile(cfg.Target, b, 0o600); err != nil {
		return fmt.Errorf("restore %s: %w", name, err)
	}
	cfg.Logger.Info().Str("file", name).Msg("restored")
	return nil
}

// restoreFromArchive fetches cfg.File from the archive: a segment (seg not nil) is
// checked as a spool segment is (size, page headers, record chain and CRCs), a history
// file handed as it is. The archive must be the spool's cluster (or, for an empty
// spool, the standby's).
func restoreFromArchive(ctx context.Context, cfg RestoreConfig, id spool.Identity, haveID bool, seg *wal.Segment) error {
	aid, ok, err := cfg.Archive.Identity(ctx)
	switch {
	case err != nil:
		return fmt.Errorf("restore %s %w: %w", cfg.File, errFromArchive, err)
	case !ok:
		return fmt.Errorf("restore %s: the archive %s holds nothing yet: %w", cfg.File, cfg.Archive, ErrNotAvailable)
	case haveID && (aid.SysID != id.SysID || aid.SegSize != id.SegSize):
		return fmt.Errorf("restore %s: %w: system identifier %d; the spool's is %d", cfg.File, archive.ErrWrongCluster, aid.SysID, id.SysID)
	case !haveID:
		if err := checkCluster(cfg.PGData, aid); err != nil {
			return err
		}
	}
	b, err := cfg.Archive.Get(ctx, cfg.File)
	if errors.Is(err, archive.ErrNotFound) {
		return fmt.Errorf("restore %s: neither in the spool nor in the archive: %w", cfg.File, ErrNotAvailable)
	}
	if err != nil {
		return fmt.Errorf("restore %s %w: %w", cfg.File, errFromArchive, err)
	}
	if seg != nil {
		s := *seg
		if !haveID {
			// The name was parsed with a guessed segment size.
			if s, err = wal.ParseSegmentName(cfg.File, aid.SegSize); err != nil {
				return fmt.Errorf("restore %s: %w", cfg.File, err)
			}
		}
		if err := checkSegment(aid, s, b); err != nil {
			return fmt.Errorf("restore %s %w: %w", cfg.File, errFromArchive, err)
		}
	}
	if err := durable.WriteFile(cfg.Target, b, 0o600); err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	cfg.Logger.Info().Str("file", cfg.File).Stringer("archive", cfg.Archive).Msg("restored from the archive")
	return nil
}

// checkCluster refuses a spool of another cluster than the standby's. The system
// identifier is the first field of global/pg_control (pg_control.h: ControlFileData).
func checkCluster(pgdata string, id spool.Identity) error {
	explicit := pgdata != ""
	if !explicit {
		pgdata = "."
	}
	ctl, err := wal.ReadControl(pgdata)
	if err != nil {
		if !explicit && errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("read the standby's control file: %w", err)
	}
	if ctl.SysID != id.SysID {
		return fmt.Errorf("%w: the spool holds system identifier %d, this standby is %d", spool.ErrWrongCluster, id.SysID, ctl.SysID)
	}
	return checkMajor(pgdata, id)
}

// checkMajor checks that the data directory pgdata is of a PostgreSQL major walship
// supports, and of the spool's.
func checkMajor(pgdata string, id spool.Identity) error {
	b, err := os.ReadFile(filepath.Join(pgdata, "PG_VERSION"))
	if err != nil {
		return fmt.Errorf("read the standby's PG_VERSION: %w", err)
	}
	major, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("the standby's PG_VERSION holds %q", strings.TrimSpace(string(b)))
	}
	return sameMajor(major*10000, id)
}

// sameMajor checks a server's version (server_version_num) against walship's majors
// and the spool's.
func sameMajor(versionNum int, id spool.Identity) error {
	if _, err := wal.MagicFor(versionNum); err != nil {
		return fmt.Errorf("the standby is %w", err)
	}
	if id.ServerVersion != 0 && versionNum/10000 != int(id.ServerVersion)/10000 {
		return fmt.Errorf("%w: the standby is PostgreSQL %d, the spool holds the WAL of PostgreSQL %d", spool.ErrWrongCluster, versionNum/10000, id.ServerVersion/10000)
	}
	return nil
}

// cleanup removes the spool's published segments older than %r; with an archive, only
// those the archive holds (with the same checksum), so that none goes before it is
// uploaded. Names are compared without the timeline, as pg_archivecleanup does.
func cleanup(ctx context.Context, cfg RestoreConfig, segSize uint64) {
	if _, err := wal.ParseSegmentName(cfg.RestartFile, segSize); err != nil {
		cfg.Logger.Warn().Str("restart_file", cfg.RestartFile).Msg("cleanup skipped: %r is not a segment name")
		return
	}
	ents, err := os.ReadDir(cfg.Spool)
	if err != nil {
		cfg.Logger.Warn().Err(err).Msg("cleanup skipped")
		return
	}
	removed := 0
	for _, e := range ents {
		n := e.Name()
		if _, err := wal.ParseSegmentName(n, segSize); err != nil || n[8:] >= cfg.RestartFile[8:] {
			continue
		}
		// The receiver's archive uploader and relays may not have taken it yet.
		if why := spool.Held(cfg.Spool, n); why != "" {
			cfg.Logger.Debug().Str("file", n).Str("why", why).Msg("cleanup: kept")
			continue
		}
		if cfg.Archive != nil {
			b, err := os.ReadFile(filepath.Join(cfg.Spool, n))
			if err == nil {
				err = cfg.Archive.Holds(ctx, n, b)
			}
			if err != nil {
				cfg.Logger.Debug().Err(err).Str("file", n).Msg("cleanup: kept, not (yet) in the archive")
				continue
			}
		}
		if err := os.Remove(filepath.Join(cfg.Spool, n)); err != nil {
			cfg.Logger.Warn().Err(err).Str("file", n).Msg("cleanup: could not remove")
			continue
		}
		removed++
	}
	if removed > 0 {
		cfg.Logger.Info().Int("removed", removed).Str("older_than", cfg.RestartFile).Msg("cleaned the spool")
	}
}
