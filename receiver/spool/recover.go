package spool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/tail/wal"
)

// Recover brings a spool to a clean state before a session writes it: leftovers of
// interrupted publishes are removed, a partial that is already whole (a crash between
// its last write and its rename) is published, and the page headers of each timeline's
// partial are checked; a partial is cut back to its first bad page, whose bytes were
// never fsynced and acked (a crash of the host can leave a file longer than its durable
// data). The caller holds LockWriter.
func Recover(dir string, stream wal.Stream, log zerolog.Logger) (Contents, error) {
	c, err := Scan(dir, stream.SegSize)
	if err != nil {
		return Contents{}, err
	}
	for _, t := range c.Temps {
		if err := os.Remove(filepath.Join(dir, t)); err != nil {
			return Contents{}, fmt.Errorf("recover spool: %w", err)
		}
		log.Info().Str("file", t).Msg("removed the leftover of an interrupted publish")
	}
	changed := len(c.Temps) > 0
	for _, p := range c.Partials {
		name := PartialPath(dir, p.Seg, stream.SegSize)
		data, err := os.ReadFile(name)
		if err != nil {
			return Contents{}, fmt.Errorf("recover spool: %w", err)
		}
		good := uint64(len(data))
		if err := stream.CheckPages(data, p.Seg.Start(stream.SegSize), p.Seg.TLI); err != nil {
			var pe *wal.PageError
			if !errors.As(err, &pe) {
				return Contents{}, err
			}
			good = uint64(pe.At - p.Seg.Start(stream.SegSize))
			log.Warn().Str("file", name).Err(err).Uint64("kept_bytes", good).Msg("cutting a partial segment back to its last good page")
			if err := os.Truncate(name, int64(good)); err != nil {
				return Contents{}, fmt.Errorf("recover spool: %w", err)
			}
			changed = true
		}
		if good == stream.SegSize {
			f, err := os.OpenFile(name, os.O_RDWR, 0)
			if err != nil {
				return Contents{}, fmt.Errorf("recover spool: %w", err)
			}
			if err := durable.Rename(f, SegmentPath(dir, p.Seg, stream.SegSize)); err != nil {
				return Contents{}, fmt.Errorf("recover spool: %w", err)
			}
			log.Info().Str("file", name).Msg("published a whole partial segment left by a crash")
			changed = true
		}
	}
	if !changed {
		return c, nil
	}
	if err := durable.SyncDir(dir); err != nil {
		return Contents{}, err
	}
	return Scan(dir, stream.SegSize)
}

// RecoverIdle runs Recover on a spool that no session writes: under the writer lock,
// and only if the spool is not frozen. A spool that a promotion is freezing or has
// frozen stays exactly as it is, and is only scanned.
func RecoverIdle(dir string, id Identity, log zerolog.Logger) (Contents, error) {
	wlock, err := LockWriter(dir)
	if errors.Is(err, ErrLocked) {
		return Scan(dir, id.SegSize)
	}
	if err != nil {
		return Contents{}, err
	}
	defer wlock.Close()
	frozen, err := Frozen(dir)
	if err != nil {
		return Contents{}, err
	}
	if frozen {
		return Scan(dir, id.SegSize)
	}
	return Recover(dir, id.Stream(), log)
}
