package tail

import (
	"errors"
	"fmt"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// The sidecar's decisions, apart from its I/O, as receiver.Rebuild is the receiver's:
// where a session starts, how a range is cut into frames, and where switch padding
// begins. Nothing here reads a file, the server or the clock; callers pass in what
// they read.

// maxChunk is the most WAL one Data frame carries.
const maxChunk = 256 << 10

// startAt decides where a session starts shipping, from the receiver's welcome: the
// source is on timeline tli, its WAL may be shipped up to end, and hist is tli's
// history (nil on timeline 1). empty is where a receiver with an empty spool starts,
// unless its welcome names a position (its spool's start mark) before end: then the
// segment holding it, or the segment where tli branched off if that is later, for older
// segments are on older timelines. lacking says that the spool misses WAL of its older
// timeline before the segment where tli branched off; shipping can go on, but recovery
// from that spool cannot cross it.
func startAt(w *transport.Welcome, tli uint32, end wal.LSN, segSize uint64, hist []wal.HistoryEntry, empty wal.LSN) (from wal.LSN, lacking bool, err error) {
	switch {
	case w.Empty && (w.LSN == 0 || w.LSN > end):
		// A start past the end is not this source's past: the caller warns, and the
		// spool starts as any other (walship standby rejoin then says what it lacks).
		return empty, false, nil
	case w.Empty:
		seg, _ := wal.SegmentOf(tli, w.LSN, segSize)
		from := seg.Start(segSize)
		if len(hist) > 0 {
			branch, _ := wal.SegmentOf(tli, hist[len(hist)-1].Switch, segSize)
			from = max(from, branch.Start(segSize))
		}
		return from, false, nil
	case w.TLI == tli:
		if w.LSN > end {
			return 0, false, fmt.Errorf("the receiver holds WAL up to %s on timeline %d, past this source's end %s: the spool is not this server's past", w.LSN, tli, end)
		}
		return w.LSN, false, nil
	case w.TLI > tli:
		return 0, false, fmt.Errorf("the receiver is on timeline %d, newer than this source's %d", w.TLI, tli)
	case len(hist) == 0:
		return 0, false, fmt.Errorf("the receiver is on timeline %d, older than this source's %d, and there is no history to cross from one to the other", w.TLI, tli)
	}
	// A newer timeline than the spool's: start with the segment where it branched off,
	// which the new timeline's first file holds whole.
	start, _ := wal.SegmentOf(tli, hist[len(hist)-1].Switch, segSize)
	return start.Start(segSize), w.LSN < start.Start(segSize), nil
}

// chunk is the part of a segment one Data frame carries: n bytes at offset off.
type chunk struct {
	seg wal.Segment
	off uint64
	n   uint64
}

// nextChunk returns the first chunk of [from, to), which must not be empty: within one
// segment, at most maxChunk bytes, and, unless it reaches the end of the range or of
// the segment, ending on a page boundary, so that no frame ends inside a page header.
func nextChunk(tli uint32, from, to wal.LSN, segSize, blockSize uint64) chunk {
	seg, off := wal.SegmentOf(tli, from, segSize)
	end := min(uint64(to-seg.Start(segSize)), segSize)
	n := min(end-off, maxChunk)
	if off+n < end {
		n = (off+n)/blockSize*blockSize - off
	}
	return chunk{seg: seg, off: off, n: n}
}

// switchPadding decides whether a page check failure at offset at of seg is the
// unwritten rest of a segment after an XLOG_SWITCH record: the pages from the failing
// one back to the last page that checks must all fail, and the valid WAL must end on
// that last good page with a switch record (wal.SwitchPadding, which also knows a
// switch whose header is split across two pages, or two segments). It returns the
// offset where the padding starts, which is before at when a shipment resumes inside
// the padding. src reads the WAL of seg and of the segment before it; a failed read
// means no padding.
func switchPadding(st wal.Stream, seg wal.Segment, err error, src wal.Source) (uint64, bool) {
	var pe *wal.PageError
	if !errors.As(err, &pe) {
		return 0, false
	}
	segSize, bs := st.SegSize, st.BlockSize
	at := uint64(pe.At - seg.Start(segSize))
	if pe.At < seg.Start(segSize) || at == 0 || at >= segSize || at%bs != 0 {
		return 0, false
	}
	b := make([]byte, bs)
	for p := at - bs; ; p -= bs {
		lsn := seg.Start(segSize) + wal.LSN(p)
		if n, _ := src.ReadAt(b, lsn); n != len(b) {
			return 0, false
		}
		if st.CheckPage(b, lsn, seg.TLI) == nil {
			pad, ok := wal.SwitchPadding(st, seg.TLI, src, lsn)
			if !ok {
				return 0, false
			}
			return uint64(pad - seg.Start(segSize)), true
		}
		if p == 0 {
			return 0, false
		}
	}
}
