package spool

import (
	"bytes"
	"fmt"
	"os"
	"sync/atomic"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/tail/wal"
)

// Writer writes received WAL into a spool, one segment at a time, always into the
// segment's partial file: bytes become visible under the segment's own name only once
// the segment is whole and fsynced (Publish). Its caller holds LockWriter.
type Writer struct {
	dir     string
	segSize uint64
	f       *os.File
	seg     wal.Segment
	dirty   bool // written since the last Sync
	// Syncs counts the fsyncs of written WAL (Sync and Publish), for the metrics; the
	// caller may point it at a counter of its own.
	Syncs *atomic.Uint64
}

// NewWriter returns a Writer for the spool dir of segSize-byte segments.
func NewWriter(dir string, segSize uint64) *Writer {
	return &Writer{dir: dir, segSize: segSize, Syncs: new(atomic.Uint64)}
}

// Use makes seg's partial file the one written, syncing the one before. create says
// the file is new: its name is made durable at once, so that it survives a crash before
// the first acknowledgement.
func (w *Writer) Use(seg wal.Segment, create bool) error {
	if !create && w.f != nil && w.seg == seg {
		return nil
	}
	if err := w.Sync(); err != nil {
		return err
	}
	w.Close()
	f, err := os.OpenFile(PartialPath(w.dir, seg, w.segSize), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("open partial segment: %w", err)
	}
	if create {
		if err := durable.SyncDir(w.dir); err != nil {
			f.Close()
			return err
		}
	}
	w.f, w.seg = f, seg
	return nil
}

// Check compares held with the bytes the partial holds at offset at: a resend must
// match what is there, and a difference is ErrConflict.
func (w *Writer) Check(at uint64, held []byte) error {
	have := make([]byte, len(held))
	if _, err := w.f.ReadAt(have, int64(at)); err != nil {
		return fmt.Errorf("read %s at %d: %w", w.f.Name(), at, err)
	}
	if !bytes.Equal(have, held) {
		return fmt.Errorf("segment %s at offset %d (%d bytes): %w", w.seg.Name(w.segSize), at, len(held), ErrConflict)
	}
	return nil
}

// WriteAt writes b at offset at of the partial. A failed write is cut back, so that the
// file holds only bytes the caller knows of.
func (w *Writer) WriteAt(at uint64, b []byte) error {
	if _, err := w.f.WriteAt(b, int64(at)); err != nil {
		w.f.Truncate(int64(at))
		return fmt.Errorf("write segment %s at offset %d: %w", w.seg.Name(w.segSize), at, err)
	}
	w.dirty = true
	return nil
}

// Publish fsyncs the whole partial and renames it to the segment's own name.
func (w *Writer) Publish() error {
	f := w.f
	w.f, w.dirty = nil, false
	w.Syncs.Add(1)
	return durable.Rename(f, SegmentPath(w.dir, w.seg, w.segSize))
}

// Dirty says whether bytes were written since the last Sync.
func (w *Writer) Dirty() bool { return w.dirty }

// Sync makes everything written so far durable.
func (w *Writer) Sync() error {
	if !w.dirty {
		return nil
	}
	w.Syncs.Add(1)
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", w.f.Name(), err)
	}
	w.dirty = false
	return nil
}

// Close closes the partial being written, without syncing it.
func (w *Writer) Close() {
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
}
