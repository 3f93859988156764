package spool

import (
	"bytes"
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
type Writer struct {
	dir     string
	segSize uint64
	f       *os.File
	seg     wal.Segment
	end     uint64         // bytes of seg written, from offset 0
	synced  uint64         // bytes of seg durable: the end the last slot written says
	seq     uint64         // the sequence number of the last slot written
	digest  *xxhash.Digest // of the bytes from synced to end
	// Syncs counts the fsyncs of written WAL (Sync and Publish), for the metrics; the
	// caller may point it at a counter of its own.
	Syncs *atomic.Uint64

	spare   sync.WaitGroup // the goroutine making the next spare
	slotBuf []byte
	// syncs counts the syncs of the segment being written; bulk says that the last
	// segment published averaged bulkSync bytes or more a sync: a stream so fast (a
	// catch-up) that writing zeros ahead would cost more bandwidth than cheaper syncs save.
	syncs uint64
	bulk  bool
}

const bulkSync = 256 << 10

// NewWriter returns a Writer for the spool dir of segSize-byte segments.
func NewWriter(dir string, segSize uint64) *Writer {
	return &Writer{dir: dir, segSize: segSize, Syncs: new(atomic.Uint64), digest: xxhash.New(), slotBuf: make([]byte, slotSize)}
}

// Use makes seg's partial file the one written, syncing the one before. create says
// the file is new: it is made (pre-sized) and its name made durable at once, so that it
// survives a crash before the first acknowledgement; a spare for the segment after it
// is made in the background, unless the stream is a bulk one (see bulk).
func (w *Writer) Use(seg wal.Segment, create bool) error {
	if !create && w.f != nil && w.seg == seg {
		return nil
	}
	if err := w.Sync(); err != nil {
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
	w.digest.Reset()
	return nil
}

// Check compares held with the bytes the partial holds at offset at: a resend must
// match what is there, and a difference is ErrConflict.
func (w *Writer) Check(at uint64, held []byte) error {
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

// Publish cuts the end block off the whole partial, fsyncs it and renames it to the
// segment's own name.
func (w *Writer) Publish() error {
	if w.end != w.segSize {
		return fmt.Errorf("publish segment %s: only %d of %d bytes written", w.seg.Name(w.segSize), w.end, w.segSize)
	}
	f := w.f
	w.f = nil
	w.bulk = w.segSize/(w.syncs+1) >= bulkSync
	if err := f.Truncate(int64(w.segSize)); err != nil {
		_ = f.Close() // the truncate's error is the one returned; the partial stays unpublished
		return fmt.Errorf("publish segment %s: %w", w.seg.Name(w.segSize), err)
	}
	w.Syncs.Add(1)
	return durable.Rename(f, SegmentPath(w.dir, w.seg, w.segSize))
}

// Dirty says whether bytes were written since the last Sync.
func (w *Writer) Dirty() bool { return w.f != nil && w.end != w.synced }

// Sync makes everything written so far durable: it writes the next end slot and
// fdatasyncs the partial, which carries the bytes and the slot to the disk together.
func (w *Writer) Sync() error {
	if !w.Dirty() {
		return nil
	}
	s := endSlot{seq: w.seq + 1, prev: w.synced, end: w.end, hash: w.digest.Sum64()}
	s.encode(w.slotBuf)
	if _, err := w.f.WriteAt(w.slotBuf, int64(w.segSize+(s.seq%2)*slotSize)); err != nil {
		return fmt.Errorf("write the end block of %s: %w", w.f.Name(), err)
	}
	w.Syncs.Add(1)
	if err := fdatasync(w.f); err != nil {
		return err
	}
	w.seq, w.synced = s.seq, s.end
	w.syncs++
	w.digest.Reset()
	return nil
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
