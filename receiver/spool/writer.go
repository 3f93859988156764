package spool

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/tail/wal"
)

// Writer writes received WAL into a spool, one segment at a time, always into the
// segment's pre-sized partial file (see EndBlockSize): bytes become visible under the
// segment's own name only once the segment is whole and fsynced (Publish). Its caller
// holds LockWriter and has run Recover.
//
// A failed fdatasync poisons it (see fail): every later call returns the error, and the
// caller replaces it once Recover has settled the partial at what is durable.
type Writer struct {
	dir     string
	segSize uint64
	f       *os.File
	seg     wal.Segment
	end     uint64         // bytes of seg written, from offset 0
	synced  uint64         // bytes of seg durable: the end the last slot written says
	seq     uint64         // the sequence number of the last slot written
	digest  *xxhash.Digest // of the bytes from synced to end
	// Syncs counts the fsyncs of written WAL (Sync, Publish and Settle), for the
	// metrics; the caller may point it at a counter of its own.
	Syncs *atomic.Uint64

	spare   sync.WaitGroup // the goroutine making the next spare
	slotBuf []byte
	// syncs counts the syncs of the segment being written; bulk says that the last
	// segment published averaged bulkSync bytes or more a sync: a stream so fast (a
	// catch-up) that writing zeros ahead would cost more bandwidth than cheaper syncs save.
	syncs uint64
	bulk  bool
	// settled says that readers that are not the writer count synced (see Settle).
	settled bool
	// datasync fdatasyncs the partial: fdatasync, unless a test injects failures.
	datasync func(*os.File) error
	err      error // set once an fdatasync failed, and returned by every call since
}

const bulkSync = 256 << 10

// NewWriter returns a Writer for the spool dir of segSize-byte segments.
func NewWriter(dir string, segSize uint64) *Writer {
	return &Writer{dir: dir, segSize: segSize, Syncs: new(atomic.Uint64), digest: xxhash.New(), slotBuf: make([]byte, slotSize), datasync: fdatasync}
}

// Use makes seg's partial file the one written, syncing the one before. create says
// the file is new: it is made (pre-sized) and its name made durable at once, so that it
// survives a crash before the first acknowledgement; a spare for the segment after it
// is made in the background, unless the stream is a bulk one (see bulk).
func (w *Writer) Use(seg wal.Segment, create bool) error {
	if w.err != nil {
		return w.err
	}
	if !create && w.f != nil && w.seg == seg {
		return nil
	}
	// The partial left (the old timeline's, at a timeline switch) gets no later sync:
	// settled now, its end counts for every reader.
	if err := w.Sync(); err != nil {
		return err
	}
	if err := w.Settle(); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	path := PartialPath(w.dir, seg, w.segSize)
	var f *os.File
	var err error
	if _, statErr := os.Lstat(path); create && os.IsNotExist(statErr) {
		w.spare.Wait() // a spare half made is nearer than a new one
		f, err = createPartial(w.dir, path, w.segSize, !w.bulk)
		if !w.bulk {
			w.spare.Add(1)
			go func() {
				defer w.spare.Done()
				// Best effort: without a spare, the next partial is made when needed, and
				// its error, if the cause lasts, is returned by the Use that makes it.
				_ = makeSpare(w.dir, w.segSize)
			}()
		}
	} else {
		f, err = os.OpenFile(path, os.O_RDWR, 0)
	}
	if err != nil {
		return fmt.Errorf("open partial segment: %w", err)
	}
	st, err := readPartialState(f, w.segSize)
	if err == nil && (st.legacy || st.fellBack) {
		err = fmt.Errorf("partial segment %s has not been recovered", path)
	}
	if err != nil {
		_ = f.Close() // nothing was written through it
		return err
	}
	w.f, w.seg, w.end, w.synced, w.seq, w.syncs = f, seg, st.end, st.end, st.seq, 0
	w.settled = st.certain == st.end
	w.digest.Reset()
	return nil
}

// Check compares held with the bytes the partial holds at offset at: a resend must
// match what is there, and a difference is ErrConflict.
func (w *Writer) Check(at uint64, held []byte) error {
	if w.err != nil {
		return w.err
	}
	if at+uint64(len(held)) > w.end {
		return fmt.Errorf("segment %s: check of %d bytes at offset %d past the %d held", w.seg.Name(w.segSize), len(held), at, w.end)
	}
	have := make([]byte, len(held))
	if _, err := w.f.ReadAt(have, int64(at)); err != nil {
		return fmt.Errorf("read %s at %d: %w", w.f.Name(), at, err)
	}
	if !bytes.Equal(have, held) {
		return fmt.Errorf("segment %s at offset %d (%d bytes): %w", w.seg.Name(w.segSize), at, len(held), ErrConflict)
	}
	return nil
}

// WriteAt writes b at offset at of the partial, which must be where the bytes written
// so far end: a segment is written from its start, in order.
func (w *Writer) WriteAt(at uint64, b []byte) error {
	if w.err != nil {
		return w.err
	}
	if at != w.end || at+uint64(len(b)) > w.segSize {
		return fmt.Errorf("write segment %s at offset %d (%d bytes): the partial holds %d bytes", w.seg.Name(w.segSize), at, len(b), w.end)
	}
	if _, err := w.f.WriteAt(b, int64(at)); err != nil {
		// What reached the file past the end is no part of it: the end stays.
		return fmt.Errorf("write segment %s at offset %d: %w", w.seg.Name(w.segSize), at, err)
	}
	w.digest.Write(b)
	w.end += uint64(len(b))
	return nil
}

// Publish makes the whole partial durable, cuts its end block off, fsyncs it and
// renames it to the segment's own name.
//
// The sync comes before the truncate: the new size may reach the disk before the bytes
// do (any fsync on the file system may commit it), and a file cut to the segment's size
// reads as an old-style partial, whole by its size, whatever its blocks hold. Synced
// first, the bytes are durable while the end slot still says how many are held; a crash
// after leaves the partial with that slot, or cut to the segment's size with every byte
// on the disk (Recover, which cannot tell it from an old-style partial, keeps its whole
// records), or the segment published.
func (w *Writer) Publish() error {
	if w.err != nil {
		return w.err
	}
	if w.end != w.segSize {
		return fmt.Errorf("publish segment %s: only %d of %d bytes written", w.seg.Name(w.segSize), w.end, w.segSize)
	}
	bulk := w.segSize/(w.syncs+1) >= bulkSync // the +1 is this publish's sync
	if err := w.Sync(); err != nil {
		return fmt.Errorf("publish segment %s: %w", w.seg.Name(w.segSize), err)
	}
	f := w.f
	w.f = nil
	w.bulk = bulk
	// From here on, a failure leaves the segment a partial that this writer no longer
	// holds: a new partial after it would be a second one on the timeline.
	if err := f.Truncate(int64(w.segSize)); err != nil {
		_ = f.Close() // the truncate's error is the one returned; the partial stays unpublished
		w.err = fmt.Errorf("publish segment %s: %w", w.seg.Name(w.segSize), err)
		return w.err
	}
	w.Syncs.Add(1)
	if err := durable.Rename(f, SegmentPath(w.dir, w.seg, w.segSize)); err != nil {
		w.err = err
		return err
	}
	return nil
}

// Dirty says whether bytes were written since the last Sync.
func (w *Writer) Dirty() bool { return w.f != nil && w.end != w.synced }

// Sync makes everything written so far durable: it writes the next end slot and
// fdatasyncs the partial, which carries the bytes and the slot to the disk together.
func (w *Writer) Sync() error {
	if w.err != nil {
		return w.err
	}
	if !w.Dirty() {
		return nil
	}
	s := endSlot{seq: w.seq + 1, prev: w.synced, end: w.end, hash: w.digest.Sum64()}
	s.encode(w.slotBuf)
	if _, err := w.f.WriteAt(w.slotBuf, int64(w.segSize+(s.seq%2)*slotSize)); err != nil {
		return fmt.Errorf("write the end block of %s: %w", w.f.Name(), err)
	}
	w.Syncs.Add(1)
	if err := w.datasync(w.f); err != nil {
		return w.fail(err)
	}
	w.seq, w.synced, w.settled = s.seq, s.end, false
	w.syncs++
	w.digest.Reset()
	return nil
}

// Settle makes the end that the last Sync made durable count for readers that are not
// the writer (Scan: walship status, check, standby init). They count a slot's end only
// once a newer slot follows it, for the writer writes one only after the sync before it
// succeeded (see EndBlockSize); so the last sync before a stream goes quiet would stay
// uncounted until the next. Settle writes a slot that claims no more bytes and
// fdatasyncs it: an overwrite of the end block, the cheapest sync there is. It does
// nothing when there is nothing to settle, or when bytes are written and not synced
// (Sync comes first). Called for every sync it would double them: the receiver calls it
// once its stream has been quiet a while, and as a session ends.
func (w *Writer) Settle() error {
	if w.err != nil {
		return w.err
	}
	if w.f == nil || w.settled || w.Dirty() {
		return nil
	}
	s := endSlot{seq: w.seq + 1, prev: w.synced, end: w.synced, hash: xxhash.Sum64(nil)}
	s.encode(w.slotBuf)
	if _, err := w.f.WriteAt(w.slotBuf, int64(w.segSize+(s.seq%2)*slotSize)); err != nil {
		return fmt.Errorf("write the end block of %s: %w", w.f.Name(), err)
	}
	w.Syncs.Add(1)
	if err := w.datasync(w.f); err != nil {
		return w.fail(err)
	}
	w.seq, w.settled = s.seq, true
	return nil
}

// fail poisons the writer after a failed fdatasync and returns the error that every
// later call returns. PostgreSQL PANICs on a failed fsync since 2018 (data_sync_retry,
// after "fsyncgate"): Linux may mark the pages it could not write clean, dropping them,
// and reports the error once, so a retried fdatasync can succeed with the bytes lost.
// So nothing written since the last good sync is held. The end slot that claimed those
// bytes is replaced, in the page cache, by one that claims only what that sync made
// durable: the claim still hashes right against the cached pages, and a reader or
// Recover in this boot would count them. (After a reboot, a claim that reached the disk
// is checked against what did.) The replacement is not synced here: Recover fdatasyncs
// the partial before it relies on it, and until then the disk holds the last good slot,
// untouched, beside it.
func (w *Writer) fail(err error) error {
	name := w.f.Name()
	w.err = fmt.Errorf("%w: nothing written to %s since its last good sync is held; the partial must be recovered", err, name)
	s := endSlot{seq: w.seq + 1, prev: w.synced, end: w.synced, hash: xxhash.Sum64(nil)}
	s.encode(w.slotBuf)
	if _, werr := w.f.WriteAt(w.slotBuf, int64(w.segSize+(s.seq%2)*slotSize)); werr != nil {
		w.err = errors.Join(w.err, fmt.Errorf("withdraw the end slot of %s: %w", name, werr))
	}
	return w.err
}

// Close closes the partial being written, without syncing it: what was not synced is
// not durable whatever Close says, but an error of the close (a write-back that failed,
// on some file systems) is returned for the caller to act on or report.
func (w *Writer) Close() error {
	if w.f == nil {
		return nil
	}
	f := w.f
	w.f = nil
	if err := f.Close(); err != nil {
		return fmt.Errorf("close partial segment %s: %w", w.seg.Name(w.segSize), err)
	}
	return nil
}

// Wait waits for the spare being made in the background, if any.
func (w *Writer) Wait() { w.spare.Wait() }
