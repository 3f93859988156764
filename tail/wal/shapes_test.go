package wal_test

import (
	"errors"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/tail/wal/waltest"
)

const (
	shapeSeg = 1 << 20
	shapeBS  = 8192
)

var shapeStream = wal.Stream{SysID: 7, SegSize: shapeSeg, BlockSize: shapeBS, Magic: 0xD110}

// readAll reads records from start (a page start, no predecessor known) until the
// valid WAL ends, and returns their starts and why it stopped.
func readAll(t *testing.T, src wal.Source, start wal.LSN) ([]wal.LSN, wal.LSN, *wal.EndError) {
	t.Helper()
	r := wal.NewReader(shapeStream, 1, src, start, 0)
	var starts []wal.LSN
	for {
		rec, err := r.Next()
		var end *wal.EndError
		if errors.As(err, &end) {
			return starts, r.Pos(), end
		}
		require.NoError(t, err)
		starts = append(starts, rec.LSN)
	}
}

// segmentAlone is segment no of b's WAL as a spool holds it: whole, or up to where the
// WAL written so far ends.
func segmentAlone(b *waltest.Builder, no uint64) wal.Bytes {
	start := wal.LSN(no * shapeSeg)
	seg := b.Segment(no)
	if end := b.Pos(); end < start+shapeSeg {
		seg = seg[:end-start]
	}
	return wal.Bytes{Base: start, Data: seg}
}

// switchPlacements are where an XLOG_SWITCH record starts in the tests: every MAXALIGNed
// offset of a page's last 40 bytes, on a page inside segment 1 (its fourth) and on the
// segment's last page, where a header split across pages continues on segment 2's
// first page and segment 2 is then all padding (xlog.c: ReserveXLogSwitch reserves up
// to the end of the segment the record ends in).
func switchPlacements() []wal.LSN {
	var out []wal.LSN
	for _, page := range []wal.LSN{shapeSeg + 3*shapeBS, 2*shapeSeg - shapeBS} {
		for off := wal.LSN(8152); off <= 8184; off += 8 {
			out = append(out, page+off)
		}
	}
	return out
}

// TestSplitSwitch: a switch record that starts in the last 16 bytes of a page has its
// header split across two pages. The reader follows it and skips its padding; each
// segment read alone, as restore and verify read them, checks; and SwitchPadding knows
// the page that holds the record's end, with and without the page before it.
func TestSplitSwitch(t *testing.T) {
	for _, at := range switchPlacements() {
		t.Run(at.String(), func(t *testing.T) {
			b := waltest.New(shapeStream, 1, 1)
			b.Record(waltest.RmHeap, 0, 100)
			b.FillTo(at)
			require.Equal(t, at, b.Switch())
			// The page that holds the record's last byte, and where that byte ends.
			last, rawEnd := at/shapeBS*shapeBS, at+24
			if at%shapeBS+24 > shapeBS {
				last += shapeBS
				rawEnd += wal.LSN(wal.HeaderSize(last, shapeSeg))
			}
			next := b.Pos()
			wantNext := wal.LSN((uint64(rawEnd-1)/shapeSeg + 1) * shapeSeg)
			require.Equal(t, wantNext+wal.LongHeaderSize, next, "the next record opens the segment after the switch's end")
			b.Record(waltest.RmHeap, 0, 300)
			b.Record(waltest.RmHeap, 0, 300)
			all := b.Bytes(b.Pos())
			src := wal.Bytes{Base: b.Base, Data: all}

			starts, end, stop := readAll(t, src, b.Base)
			require.ErrorIs(t, stop, io.EOF, "the valid WAL runs to the end of the bytes (stopped at %s: %s)", stop.At, stop.Reason)
			require.Contains(t, starts, at, "the switch record is read")
			require.Contains(t, starts, next, "the record after the switch is read")
			require.Equal(t, b.Pos(), end)

			// Each segment alone: the one after a switch split across segments holds
			// only the switch's tail and padding.
			for no := uint64(1); no*shapeSeg < uint64(b.Pos()); no++ {
				_, _, stop := readAll(t, segmentAlone(b, no), wal.LSN(no*shapeSeg))
				require.ErrorIs(t, stop, io.EOF, "segment %d alone: stopped at %s: %s", no, stop.At, stop.Reason)
			}

			pad, ok := wal.SwitchPadding(shapeStream, 1, src, last)
			require.True(t, ok, "padding after the page at %s", last)
			require.Equal(t, last+shapeBS, pad)

			// Without the page before it (a recycled segment, say), the page alone must do.
			hole := wal.Bytes{Base: last, Data: all[last-b.Base:]}
			pad, ok = wal.SwitchPadding(shapeStream, 1, hole, last)
			require.True(t, ok, "padding after the page at %s, read alone", last)
			require.Equal(t, last+shapeBS, pad)
		})
	}
}

// TestSplitRecordNotSwitch: a 24-byte record split across pages just as a switch can
// be, but of another rmgr, is no switch: the zeros after it are the end of written WAL,
// never padding to skip.
func TestSplitRecordNotSwitch(t *testing.T) {
	for _, off := range []wal.LSN{8176, 8184} {
		b := waltest.New(shapeStream, 1, 1)
		at := wal.LSN(shapeSeg+3*shapeBS) + off
		b.FillTo(at)
		b.Record(waltest.RmHeap, waltest.InfoSwitch, 0)
		all := b.Bytes(b.Pos() + 4*shapeBS)
		src := wal.Bytes{Base: b.Base, Data: all}
		_, end, stop := readAll(t, src, b.Base)
		require.ErrorIs(t, stop, wal.ErrInvalidRecord)
		require.Equal(t, b.Pos(), end, "the valid WAL ends after the split record")
		page := at/shapeBS*shapeBS + shapeBS
		_, ok := wal.SwitchPadding(shapeStream, 1, src, page)
		require.False(t, ok)
		_, ok = wal.SwitchPadding(shapeStream, 1, wal.Bytes{Base: page, Data: all[page-b.Base:]}, page)
		require.False(t, ok, "read alone")
		// Read from the page holding its tail, the zeros after it end the valid WAL.
		_, _, stop = readAll(t, wal.Bytes{Base: page, Data: all[page-b.Base:]}, page)
		require.ErrorIs(t, stop, wal.ErrInvalidRecord)
	}
}

// TestOverwriteContrecord: a primary that crashed in the middle of a record spanning
// pages, and restarted without a failover, abandons the record's missing part: the page
// where it was lost is written anew, flagged XLP_FIRST_IS_OVERWRITE_CONTRECORD, starting
// with an XLOG_OVERWRITE_CONTRECORD record whose xl_prev skips the abandoned record.
// Every reader goes on through it, as xlogreader.c does (XLogDecodeNextRecord restarts
// at the flagged page), whether it reads from the start or from any page on the way.
func TestOverwriteContrecord(t *testing.T) {
	for _, tc := range []struct {
		name string
		lost wal.LSN // the page where the abandoned record's bytes stop
	}{
		{"within a segment", shapeSeg + 6*shapeBS},
		{"at a segment's start", 2 * shapeSeg},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := waltest.New(shapeStream, 1, 1)
			for range 5 {
				b.Record(waltest.RmHeap, 0, 500)
			}
			before := b.Prev()
			abandoned := b.Record(waltest.RmHeap, 0, int(tc.lost-b.Pos())+20*shapeBS)
			b.Abandon(tc.lost, before)
			over := b.OverwriteRecord()
			require.Equal(t, tc.lost+wal.LSN(wal.HeaderSize(tc.lost, shapeSeg)), over)
			after := b.Record(waltest.RmHeap, 0, 200)
			all := b.Bytes(b.Pos())
			src := wal.Bytes{Base: b.Base, Data: all}

			starts, end, stop := readAll(t, src, b.Base)
			require.ErrorIs(t, stop, io.EOF, "stopped at %s: %s", stop.At, stop.Reason)
			require.Equal(t, b.Pos(), end)
			require.NotContains(t, starts, abandoned, "the abandoned record is not returned")
			require.Contains(t, starts, over)
			require.Contains(t, starts, after)

			// Following the chain from the record before the abandoned one.
			r := wal.NewReader(shapeStream, 1, src, abandoned, before)
			rec, err := r.Next()
			require.NoError(t, err)
			require.Equal(t, over, rec.LSN)
			require.Equal(t, before, rec.Prev)

			// From every page start on the way.
			for page := b.Base; page < tc.lost+shapeBS; page += shapeBS {
				_, end, stop := readAll(t, src, page)
				require.ErrorIs(t, stop, io.EOF, "from %s: stopped at %s: %s", page, stop.At, stop.Reason)
				require.Equal(t, b.Pos(), end)
			}
			// Each segment alone.
			for no := uint64(1); no*shapeSeg < uint64(b.Pos()); no++ {
				_, _, stop := readAll(t, segmentAlone(b, no), wal.LSN(no*shapeSeg))
				require.ErrorIs(t, stop, io.EOF, "segment %d alone: stopped at %s: %s", no, stop.At, stop.Reason)
			}
			// As the drain reads, from a last flush position inside the abandoned
			// record: back to where a record starts, then on to the end.
			for lsn := abandoned + 100; lsn < tc.lost; lsn += 3 * shapeBS {
				start, err := wal.RecordAtOrBefore(shapeStream, 1, src, lsn, 0)
				require.NoError(t, err)
				require.LessOrEqual(t, start, abandoned, "a record start at or before %s", lsn)
				end, _, stop, err := wal.ValidEnd(shapeStream, 1, src, start, 0)
				require.NoError(t, err)
				require.ErrorIs(t, stop, io.EOF)
				require.Equal(t, b.Pos(), end)
			}
		})
	}
}
