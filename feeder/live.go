package feeder

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// restoreLive answers, in standby mode, recovery's request for the segment the spool
// is still receiving: its durable bytes, checked, zero-padded to a segment. Recovery
// replays to the zeros, asks again after wal_retrieve_retry_interval, and goes on
// from where it stopped; a record torn at the end is not replayed until it is whole.
// The partial is handed again only once it has grown (a quiet primary costs nothing):
// otherwise the answer is ErrNotAvailable, and recovery reads what it was handed last,
// which it keeps in its pg_wal. A spool without the partial is errNotInSpool.
//
// It hands nothing outside standby mode: in archive recovery the end of a partial
// would be the end of recovery, a promotion at a point the primary has gone past.
// And nothing while the standby's pg_wal/archive_status holds a .ready file: with
// archive_mode = always the standby archives what it is handed, and a zero-padded
// partial must not reach an archive under a whole segment's name.
func restoreLive(cfg RestoreConfig, id spool.Identity, seg wal.Segment) error {
	pgdata, err := filepath.Abs(cmp.Or(cfg.PGData, "."))
	if err != nil {
		return err
	}
	if why := liveRefusal(pgdata); why != "" {
		cfg.Logger.Warn().Str("file", cfg.File).Msg("live: not handing the partial segment: " + why)
		return fmt.Errorf("restore %s: %w yet", cfg.File, errNotInSpool)
	}
	path := spool.PartialPath(cfg.Spool, seg, id.SegSize)
	held, err := spool.PartialEnd(path, id.SegSize)
	if err != nil {
		// Gone, or being published as the segment: restoreSegment looks again.
		return fmt.Errorf("restore %s: %w yet (%w)", cfg.File, errNotInSpool, err)
	}
	postmaster := postmasterOf(pgdata)
	last, ok, err := spool.ReadLive(cfg.Spool, pgdata)
	if err != nil {
		return err
	}
	if ok && last.Postmaster == postmaster && last.Segment == cfg.File && last.Bytes >= held {
		return fmt.Errorf("restore %s: the partial segment has not grown past the %d bytes handed last: %w", cfg.File, last.Bytes, ErrNotAvailable)
	}
	b, err := spool.PartialBytes(path, id.SegSize)
	if err != nil {
		return fmt.Errorf("restore %s: %w yet (%w)", cfg.File, errNotInSpool, err)
	}
	end, err := checkRecords(id, seg, b)
	if err != nil {
		return fmt.Errorf("restore %s: %w: the partial segment: %w", cfg.File, ErrCorrupt, err)
	}
	if err := durable.WritePadded(cfg.Target, b, int64(id.SegSize), 0o600); err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	// Recorded after the hand-out: lost, the next call hands the same bytes again.
	rec := spool.LiveState{PGData: pgdata, Postmaster: postmaster, Segment: cfg.File, Bytes: uint64(len(b)), End: end.String()}
	if err := spool.WriteLive(cfg.Spool, rec); err != nil {
		cfg.Logger.Warn().Err(err).Msg("live: cannot record the hand-out; the next request gets the partial again")
	}
	cfg.Logger.Info().Str("file", cfg.File).Int("bytes", len(b)).Stringer("replayable", end).Msg("restored the partial segment being received, zero-padded")
	return nil
}

// liveRefusal says why the standby in pgdata must not be handed a partial segment, or
// "" if it may.
func liveRefusal(pgdata string) string {
	if _, err := os.Stat(filepath.Join(pgdata, "standby.signal")); err != nil {
		return "the server is not in standby mode (no standby.signal in " + pgdata + "): in archive recovery a partial segment would end recovery early"
	}
	ents, err := os.ReadDir(filepath.Join(pgdata, "pg_wal", "archive_status"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "cannot read its pg_wal/archive_status: " + err.Error()
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".ready") {
			return "its pg_wal/archive_status holds " + e.Name() + ": with archive_mode = always the standby would archive the zero-padded partial as a whole segment"
		}
	}
	return ""
}

// postmasterOf identifies the standby's running postmaster: the process id and start
// time on the first and third lines of its postmaster.pid, "" if it cannot be read.
func postmasterOf(pgdata string) string {
	b, err := os.ReadFile(filepath.Join(pgdata, "postmaster.pid"))
	if err != nil {
		return ""
	}
	lines := strings.SplitN(string(b), "\n", 4)
	if len(lines) < 3 {
		return ""
	}
	return lines[0] + " " + lines[2]
}
