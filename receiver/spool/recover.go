package spool

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/tail/wal"
)

// Recover brings a spool to a clean state before a session writes it: leftovers of
// interrupted publishes are removed; each timeline's partial is settled at its durable
// end (the newest end slot that holds, see EndBlockSize), its page headers are checked
// and it is cut back to its first bad page (bytes that should never have been
// acknowledged); a partial of the old, unsized kind, for which nothing else vouches, is
// cut back to its last whole record whose CRC holds, and pre-sized; and a partial that
// is whole (a crash between its last write and its rename) is published. The caller
// holds LockWriter.
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
		did, err := recoverPartial(PartialPath(dir, p.Seg, stream.SegSize), p.Seg, stream, log)
		if err != nil {
			return Contents{}, fmt.Errorf("recover spool: %w", err)
		}
		changed = changed || did
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
	defer func() { _ = wlock.Close() }() // releases the lock; nothing is written to the lock file
	frozen, err := Frozen(dir)
	if err != nil {
		return Contents{}, err
	}
	if frozen {
		return Scan(dir, id.SegSize)
	}
	return Recover(dir, id.Stream(), log)
}

// recoverPartial settles one partial file; changed says whether it changed anything.
func recoverPartial(path string, seg wal.Segment, stream wal.Stream, log zerolog.Logger) (changed bool, err error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return false, err
	}
	defer func() {
		if f == nil { // given to durable.Rename, which closed it
			return
		}
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close %s: %w", path, cerr)
		}
	}()
	// A writer that died (its process, not the host) between an end slot and its
	// fdatasync leaves an end that the page cache holds and the disk may not: what
	// recovery settles on, and publishes, must be durable first.
	if err := fdatasync(f); err != nil {
		return false, err
	}
	st, err := readPartialState(f, stream.SegSize)
	if err != nil {
		return false, err
	}
	data := make([]byte, st.end)
	if _, err := f.ReadAt(data, 0); err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	start := seg.Start(stream.SegSize)
	good := st.end
	if err := stream.CheckPages(data, start, seg.TLI); err != nil {
		var pe *wal.PageError
		if !errors.As(err, &pe) {
			return false, err
		}
		good = uint64(pe.At - start)
		log.Warn().Str("file", path).Err(err).Uint64("kept_bytes", good).Msg("cutting a partial segment back to its last good page")
	}
	// Page headers carry no checksum and say nothing of the bytes between them: a block
	// that never reached the disk reads as zeros under an intact header. Records do
	// (CRC-32C, and each names the one before it: xlogreader.c, ValidXLogRecord), so
	// the bytes are walked as recovery will walk them.
	end, _, stop, err := wal.ValidEnd(stream, seg.TLI, wal.Bytes{Base: start, Data: data[:good]}, start, 0)
	if err != nil {
		return false, err
	}
	// The walk may end past the bytes: after a switch record, or when a record begun in
	// the segment before fills them.
	whole := min(uint64(end-start), good)
	switch {
	case st.legacy && good == stream.SegSize && errors.Is(stop.Err, io.EOF):
		// Whole by its size, and its records chain to its end, the last one running on
		// into the next segment as restore accepts a published segment's: a publish cut
		// short between its truncate and its rename. Publish syncs every byte before it
		// truncates, so they are on the disk; cutting the last record off would take
		// the spool back behind a position it acknowledged.
	case st.legacy && whole < good:
		// A file of the old kind says how much it holds by its size alone, and a publish
		// of an earlier walship, which truncated before it synced, could leave it whole by
		// its size with blocks that never landed, most likely the last ones. Nothing
		// vouches for its bytes but its records: it holds its whole records only, and the
		// sidecar sends the rest again (a record not yet whole cannot be checked until the
		// rest arrives).
		good = whole
		log.Warn().Str("file", path).Str("stop", stop.Reason).Uint64("kept_bytes", good).Msg("cutting a partial segment of the old kind back to its last whole record")
	case !st.legacy && !errors.Is(stop.Err, io.EOF):
		// A pre-sized partial's end slot vouches for its bytes: its hash is of what
		// reached the disk, and every byte before the slot's range was made durable by a
		// sync that completed. These records are the ones the sidecar sent, which no
		// crash changed: cutting them would only send them again, or lose them with the
		// primary. restore refuses them (or walship's reader does not know them).
		log.Warn().Str("file", path).Err(stop).Msg("the records of a partial segment do not check to its end; kept as received")
	}
	if st.fellBack {
		log.Warn().Str("file", path).Uint64("kept_bytes", good).Msg("the last sync of a partial segment did not complete; its end is where the sync before left it")
	}
	if good == stream.SegSize {
		if err := f.Truncate(int64(stream.SegSize)); err != nil {
			return false, err
		}
		g := f
		f = nil
		if err := durable.Rename(g, SegmentPath(filepath.Dir(path), seg, stream.SegSize)); err != nil {
			return false, err
		}
		log.Info().Str("file", path).Msg("published a whole partial segment left by a crash")
		return true, nil
	}
	if st.legacy {
		// Pre-size it: zeros from the good end to the end block, then the end block.
		if err := writeZeros(f, good, stream.SegSize+EndBlockSize); err != nil {
			return false, fmt.Errorf("pre-size %s: %w", path, err)
		}
		log.Info().Str("file", path).Uint64("bytes", good).Msg("pre-sized a partial segment written by an older walship")
	} else if !st.fellBack && good == st.end && st.certain == st.end {
		return false, nil
	}
	// Rewritten also when the end is durable (fdatasynced above) but its slot has no
	// newer one after it: readers that are not the writer would not count it.
	if err := writeEndBlock(f, stream.SegSize, data[:good], st.seq+1); err != nil {
		return false, err
	}
	return true, nil
}
