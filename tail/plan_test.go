package tail

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

const mb = 1 << 20

func TestStartAt(t *testing.T) {
	hist2 := []wal.HistoryEntry{{TLI: 1, Switch: 5*mb + 0x1234}}
	cases := []struct {
		name    string
		w       transport.Welcome
		tli     uint32
		end     wal.LSN
		hist    []wal.HistoryEntry
		want    wal.LSN
		lacking bool
		err     string
	}{
		{name: "empty spool starts where the source says", w: transport.Welcome{Empty: true}, tli: 1, end: 9*mb + 77, want: 9 * mb},
		{name: "empty spool with a start mark starts at its segment", w: transport.Welcome{Empty: true, LSN: 6*mb + 40}, tli: 1, end: 9*mb + 77, want: 6 * mb},
		{name: "empty spool's start before the branch starts at the branch segment", w: transport.Welcome{Empty: true, LSN: 2*mb + 40}, tli: 2, end: 9 * mb, hist: hist2, want: 5 * mb},
		{name: "empty spool's start past the branch", w: transport.Welcome{Empty: true, LSN: 7*mb + 40}, tli: 2, end: 9 * mb, hist: hist2, want: 7 * mb},
		{name: "empty spool's start past the source's end is not taken", w: transport.Welcome{Empty: true, LSN: 9*mb + 1}, tli: 1, end: 9*mb + 77, want: 9 * mb},
		{name: "same timeline resumes at the spool's end", w: transport.Welcome{TLI: 1, LSN: 3*mb + 5}, tli: 1, end: 9 * mb, want: 3*mb + 5},
		{name: "same timeline, spool at the end", w: transport.Welcome{TLI: 2, LSN: 9 * mb}, tli: 2, end: 9 * mb, hist: hist2, want: 9 * mb},
		{name: "spool ahead of the source", w: transport.Welcome{TLI: 1, LSN: 9*mb + 1}, tli: 1, end: 9 * mb, err: "past this source's end"},
		{name: "spool on a newer timeline", w: transport.Welcome{TLI: 3, LSN: mb}, tli: 2, end: 9 * mb, hist: hist2, err: "newer than this source's 2"},
		{name: "newer timeline starts at the branch segment", w: transport.Welcome{TLI: 1, LSN: 5*mb + 0x1234}, tli: 2, end: 9 * mb, hist: hist2, want: 5 * mb},
		{name: "newer timeline, spool past the branch", w: transport.Welcome{TLI: 1, LSN: 7 * mb}, tli: 2, end: 9 * mb, hist: hist2, want: 5 * mb},
		{name: "newer timeline, spool short of the branch segment", w: transport.Welcome{TLI: 1, LSN: 4 * mb}, tli: 2, end: 9 * mb, hist: hist2, want: 5 * mb, lacking: true},
		{name: "older spool timeline without history", w: transport.Welcome{TLI: 1, LSN: 4 * mb}, tli: 2, end: 9 * mb, err: "no history"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			from, lacking, err := startAt(&c.w, c.tli, c.end, mb, c.hist, 9*mb)
			if c.err != "" {
				require.ErrorContains(t, err, c.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, c.want, from, "got %s, want %s", from, c.want)
			require.Equal(t, c.lacking, lacking)
		})
	}
}

func TestNextChunk(t *testing.T) {
	cases := []struct {
		name     string
		from, to wal.LSN
		want     chunk
	}{
		{"small range", mb + 100, mb + 300, chunk{wal.Segment{TLI: 1, No: 1}, 100, 200}},
		{"long range cut at maxChunk on a page", mb + 100, 3 * mb, chunk{wal.Segment{TLI: 1, No: 1}, 100, maxChunk - 100}},
		{"aligned long range takes maxChunk", mb, 3 * mb, chunk{wal.Segment{TLI: 1, No: 1}, 0, maxChunk}},
		{"stops at the segment's end", 2*mb - 500, 2*mb + 500, chunk{wal.Segment{TLI: 1, No: 1}, mb - 500, 500}},
		{"reaches the end of the range mid-page", mb + 8192*3 + 17, mb + 8192*3 + 19, chunk{wal.Segment{TLI: 1, No: 1}, 8192*3 + 17, 2}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			require.Equal(t, c.want, nextChunk(1, c.from, c.to, mb, 8192))
		})
	}
}

// FuzzNextChunk cuts a range into chunks as the shipper does and checks them against
// what a frame may be: the chunks cover the range exactly, in order, each within one
// segment and at most maxChunk; a chunk that ends neither at the range's end nor at its
// segment's end ends on a page boundary, and is no more than a page short of maxChunk.
func FuzzNextChunk(f *testing.F) {
	f.Add(uint64(mb+100), uint32(3*mb), uint8(0), uint8(1))
	f.Add(uint64(0), uint32(1), uint8(3), uint8(0))
	f.Add(uint64(5*mb-1), uint32(2), uint8(1), uint8(2))
	f.Fuzz(func(t *testing.T, from uint64, length uint32, segExp, blockExp uint8) {
		segSize := uint64(mb) << (segExp % 4)
		bs := uint64(4096) << (blockExp % 4)
		from %= 1 << 40
		to := from + uint64(length)%(3*segSize) + 1
		pos := from
		for n := 0; pos < to; n++ {
			if n > 1000 {
				t.Fatalf("more than 1000 chunks for %d bytes", to-from)
			}
			c := nextChunk(1, wal.LSN(pos), wal.LSN(to), segSize, bs)
			start := c.seg.Start(segSize) + wal.LSN(c.off)
			end := uint64(start) + c.n
			segEnd := uint64(c.seg.Start(segSize)) + segSize
			switch {
			case uint64(start) != pos:
				t.Fatalf("chunk starts at %d, want %d", start, pos)
			case c.n == 0 || c.n > maxChunk:
				t.Fatalf("chunk of %d bytes", c.n)
			case end > to || end > segEnd:
				t.Fatalf("chunk [%d, %d) runs past the range's end %d or the segment's %d", start, end, to, segEnd)
			case end != to && end != segEnd && (end%bs != 0 || c.n+bs <= maxChunk && c.off+c.n+bs <= segSize && end+bs <= to):
				t.Fatalf("chunk [%d, %d) ends inside a page or short of maxChunk", start, end)
			}
			pos = end
		}
		if pos != to {
			t.Fatalf("chunks end at %d, want %d", pos, to)
		}
	})
}

// switchSegment is segment 7 of 1 MB segments around a real page of PostgreSQL 15.18
// (see tail/wal/testdata/README.md) that ends with an XLOG_SWITCH record at 0/72F688:
// the pages before it have headers as the server writes them, the pages after it are
// zeros, as pg_switch_wal() leaves them.
func switchSegment(t *testing.T) (wal.Stream, wal.Segment, map[uint64][]byte) {
	t.Helper()
	sw, err := os.ReadFile("wal/testdata/pg15-switch-page-0702E000.bin")
	require.NoError(t, err)
	st := wal.Stream{SysID: 7, SegSize: mb, BlockSize: 8192, Magic: 0xD110}
	seg := wal.Segment{TLI: 1, No: 7}
	pages := map[uint64][]byte{}
	for off := uint64(0); off < mb; off += 8192 {
		b := make([]byte, 8192)
		switch {
		case off == 0x2E000:
			b = sw
		case off < 0x2E000:
			info := uint16(0)
			if off == 0 {
				info = wal.FlagLongHeader
				binary.LittleEndian.PutUint64(b[24:], st.SysID)
				binary.LittleEndian.PutUint32(b[32:], uint32(st.SegSize))
				binary.LittleEndian.PutUint32(b[36:], uint32(st.BlockSize))
			}
			binary.LittleEndian.PutUint16(b[0:], st.Magic)
			binary.LittleEndian.PutUint16(b[2:], info)
			binary.LittleEndian.PutUint32(b[4:], 1)
			binary.LittleEndian.PutUint64(b[8:], uint64(seg.Start(mb))+off)
		}
		pages[off] = b
	}
	return st, seg, pages
}

// pageSource reads whole pages of one segment through read, as wal.Source.
type pageSource struct {
	seg  wal.Segment
	read func(off uint64) ([]byte, error)
}

func (p pageSource) ReadAt(b []byte, lsn wal.LSN) (int, error) {
	start := p.seg.Start(mb)
	if lsn < start || lsn >= start+mb {
		return 0, io.EOF
	}
	off := uint64(lsn - start)
	page, err := p.read(off / 8192 * 8192)
	if err != nil {
		return 0, err
	}
	n := copy(b, page[off%8192:])
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

func TestSwitchPadding(t *testing.T) {
	st, seg, pages := switchSegment(t)
	read := pageSource{seg, func(off uint64) ([]byte, error) {
		b, ok := pages[off]
		if !ok {
			return nil, fmt.Errorf("no page at %d", off)
		}
		return b, nil
	}}
	failAt := func(off uint64) error {
		lsn := seg.Start(mb) + wal.LSN(off)
		err := st.CheckPage(pages[off], lsn, 1)
		require.Error(t, err, "page at %#x must fail its check", off)
		return err
	}

	at, ok := switchPadding(st, seg, failAt(0x30000), read)
	require.True(t, ok, "the page after the switch record starts the padding")
	require.Equal(t, uint64(0x30000), at)

	at, ok = switchPadding(st, seg, failAt(0x36000), read)
	require.True(t, ok, "a shipment that resumes inside the padding finds where it began")
	require.Equal(t, uint64(0x30000), at)

	_, ok = switchPadding(st, seg, errors.New("read failed"), read)
	require.False(t, ok, "an error that is no page check failure is no padding")

	_, ok = switchPadding(st, seg, &wal.PageError{At: seg.Start(mb) + 100, Reason: "x"}, read)
	require.False(t, ok, "a failure inside a page is no padding")

	_, ok = switchPadding(st, seg, &wal.PageError{At: seg.Start(mb), Reason: "x"}, read)
	require.False(t, ok, "a segment cannot start with padding")

	_, ok = switchPadding(st, seg, failAt(0x36000), pageSource{seg, func(off uint64) ([]byte, error) {
		if off == 0x2E000 {
			return nil, errors.New("i/o error")
		}
		return read.read(off)
	}})
	require.False(t, ok, "a page that cannot be read is no padding")

	noSwitch := append([]byte(nil), pages[0x2E000]...)
	noSwitch[0x1688+17] = 10 // the switch record's rmid made Heap's
	pages[0x2E000] = noSwitch
	_, ok = switchPadding(st, seg, failAt(0x30000), read)
	require.False(t, ok, "zeros after a page that does not end with a switch are damage, not padding")
}

// TestSettled: a server whose inserted WAL is all flushed is settled, even when its
// insert position points past the header of the page the flush position starts.
func TestSettled(t *testing.T) {
	for _, c := range []struct {
		flush, insert wal.LSN
		want          bool
	}{
		{0x3000100, 0x3000100, true},
		{0x3000100, 0x3000200, false},
		{0x3002000, 0x3002000 + wal.ShortHeaderSize, true},      // the next page's header
		{0x3002000, 0x3002000 + wal.ShortHeaderSize + 8, false}, // and a record after it
		{0x3000000, 0x3000000 + wal.LongHeaderSize, true},       // a segment's first page
		{0x3000000, 0x3000000 + wal.LongHeaderSize + 8, false},
		{0x3000100, 0x3000100 + wal.ShortHeaderSize, false}, // not at a page boundary
	} {
		got := Positions{Flush: c.flush, Insert: c.insert}.Settled(16*mb, 8192)
		require.Equal(t, c.want, got, "flush %s, insert %s", c.flush, c.insert)
	}
}
