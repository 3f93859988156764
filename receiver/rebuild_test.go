package receiver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

var testStream = wal.Stream{SysID: 7311111111111111111, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110}

// refWAL is the primary's WAL of timeline tli from segment 0 on: n segments of pages
// with valid headers and pseudo-random record bytes.
func refWAL(n int, tli uint32) []byte {
	s := testStream
	b := make([]byte, n*int(s.SegSize))
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	for p := uint64(0); p < uint64(len(b)); p += s.BlockSize {
		h := b[p:]
		binary.LittleEndian.PutUint16(h[0:], s.Magic)
		binary.LittleEndian.PutUint16(h[2:], 0)
		binary.LittleEndian.PutUint32(h[4:], tli)
		binary.LittleEndian.PutUint64(h[8:], p)
		if p%s.SegSize == 0 {
			binary.LittleEndian.PutUint16(h[2:], wal.FlagLongHeader)
			binary.LittleEndian.PutUint64(h[24:], s.SysID)
			binary.LittleEndian.PutUint32(h[32:], uint32(s.SegSize))
			binary.LittleEndian.PutUint32(h[36:], uint32(s.BlockSize))
		}
	}
	return b
}

// memSpool carries out Rebuild steps in memory, following the contract in Rebuild's doc.
type memSpool struct {
	partial   map[wal.Segment][]byte
	published map[wal.Segment][]byte
}

func newMemSpool() *memSpool {
	return &memSpool{partial: map[wal.Segment][]byte{}, published: map[wal.Segment][]byte{}}
}

func (m *memSpool) do(st Step) error {
	if st.Open {
		if _, ok := m.partial[st.Seg]; !ok {
			m.partial[st.Seg] = nil
		}
	}
	f, ok := m.partial[st.Seg]
	if !ok {
		return fmt.Errorf("step for %s without an open partial", st.Seg)
	}
	if len(st.Held) > 0 && !bytes.Equal(f[st.HeldAt:st.HeldAt+uint64(len(st.Held))], st.Held) {
		return spool.ErrConflict
	}
	if st.WriteAt != uint64(len(f)) && len(st.Write) > 0 {
		return fmt.Errorf("write at %d, but the partial holds %d bytes", st.WriteAt, len(f))
	}
	f = append(f, st.Write...)
	m.partial[st.Seg] = f
	if st.Complete {
		m.published[st.Seg] = f
		delete(m.partial, st.Seg)
	}
	return nil
}

func (m *memSpool) offer(r *Rebuild, tli uint32, lsn wal.LSN, b []byte) error {
	seg, off := wal.SegmentOf(tli, lsn, testStream.SegSize)
	return m.offerPad(r, tli, seg.No, off, b, false)
}

func (m *memSpool) offerPad(r *Rebuild, tli uint32, segNo, off uint64, b []byte, padding bool) error {
	st, err := r.Offer(tli, segNo, off, b, padding)
	if err != nil {
		return err
	}
	if err := m.do(st); err != nil {
		return err
	}
	r.Commit(st)
	return nil
}

func TestRebuild(t *testing.T) {
	ref := refWAL(3, 1)
	seg := testStream.SegSize
	type op struct {
		from, to wal.LSN
		tli      uint32
		mutate   bool // flip a byte in the payload's last byte
		wantErr  error
	}
	for _, tc := range []struct {
		name    string
		ops     []op
		durable wal.LSN
	}{
		{"append in pieces", []op{{0, 100, 1, false, nil}, {100, 9000, 1, false, nil}, {9000, 20000, 1, false, nil}}, 20000},
		{"exact duplicate is harmless", []op{{0, 9000, 1, false, nil}, {0, 9000, 1, false, nil}}, 9000},
		{"overlap that extends", []op{{0, 9000, 1, false, nil}, {8000, 12000, 1, false, nil}}, 12000},
		{"overlap with other bytes", []op{{0, 9000, 1, false, nil}, {100, 8000, 1, true, spool.ErrConflict}}, 9000},
		{"gap", []op{{0, 9000, 1, false, nil}, {9001, 10000, 1, false, ErrGap}}, 9000},
		{"first frame mid-segment", []op{{100, 9000, 1, false, ErrGap}}, 0},
		{"crossing into the next segment", []op{{0, wal.LSN(seg), 1, false, nil}, {wal.LSN(seg), wal.LSN(seg) + 50, 1, false, nil}}, wal.LSN(seg) + 50},
		{"skipping a segment", []op{{0, wal.LSN(seg), 1, false, nil}, {wal.LSN(2 * seg), wal.LSN(2*seg) + 50, 1, false, ErrGap}}, wal.LSN(seg)},
		{"timeline without history", []op{{0, 100, 1, false, nil}, {0, 100, 2, false, ErrTimeline}}, 100},
		{"older timeline", []op{{0, 100, 1, false, nil}, {0, 100, 0, false, ErrTimeline}}, 100},
		{"stale page header", []op{{0, 8192, 1, false, nil}, {8192, 8192 + 100, 1, false, wal.ErrPage}}, 8192},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewRebuild(testStream, spool.Contents{})
			m := newMemSpool()
			for i, o := range tc.ops {
				b := append([]byte(nil), ref[o.from:o.to]...)
				if o.mutate {
					b[len(b)-1] ^= 1
				}
				if tc.name == "stale page header" && i == 1 {
					binary.LittleEndian.PutUint64(b[8:], 0) // the pageaddr of an old segment
				}
				tli := o.tli
				if tli == 0 {
					tli = 1 // "older timeline": the spool moved to 1, offer 1 after raising it
					r.tli = 2
				}
				err := m.offer(r, tli, o.from, b)
				if o.wantErr != nil {
					require.ErrorIs(t, err, o.wantErr, "op %d", i)
				} else {
					require.NoError(t, err, "op %d", i)
				}
				if tc.name == "older timeline" {
					r.tli = 1
				}
			}
			require.Equal(t, tc.durable, r.Durable().LSN)
			for s, f := range m.partial {
				start := uint64(s.Start(seg))
				require.Equal(t, ref[start:start+uint64(len(f))], f, "partial %s", s)
			}
			for s, f := range m.published {
				start := uint64(s.Start(seg))
				require.Equal(t, ref[start:start+seg], f, "published %s", s)
			}
		})
	}
}

// TestRebuildSegmentPastLSNSpace: a Data frame's segment number is 64 bits on the wire,
// and so is the LSN. A segment number past the last segment of the LSN space would wrap
// its start around: 2^44 1 MiB segments start at 2^64, which is LSN 0, so segment 0's
// pages would pass as its own. Such a frame is refused, and nothing is written.
func TestRebuildSegmentPastLSNSpace(t *testing.T) {
	ref := refWAL(1, 1)
	last := math.MaxUint64 / testStream.SegSize // the last segment of the LSN space
	for _, no := range []uint64{last + 1, math.MaxUint64} {
		r := NewRebuild(testStream, spool.Contents{})
		_, err := r.Offer(1, no, 0, ref[:8192], false)
		require.ErrorIs(t, err, transport.ErrMalformed, "segment %d", no)
		require.ErrorContains(t, err, "LSN space", "segment %d", no)
		require.True(t, r.Empty(), "nothing taken")
	}
	// The last segment itself is inside the LSN space: refused only because the pages
	// of segment 0 do not belong there.
	_, err := NewRebuild(testStream, spool.Contents{}).Offer(1, last, 0, ref[:8192], false)
	require.ErrorIs(t, err, wal.ErrPage)
	require.NotErrorIs(t, err, transport.ErrMalformed)
}

func TestRebuildSwitchPadding(t *testing.T) {
	seg := testStream.SegSize
	ref := refWAL(2, 1)
	pad := make([]byte, seg-3*8192)
	copy(pad, ref[5*8192:]) // stale pages: their headers are wrong for this position
	r := NewRebuild(testStream, spool.Contents{})
	m := newMemSpool()
	require.NoError(t, m.offer(r, 1, 0, ref[:3*8192]))
	require.ErrorIs(t, m.offerPad(r, 1, 0, 3*8192, pad[:8192], false), wal.ErrPage, "unmarked stale pages are refused")
	require.NoError(t, m.offerPad(r, 1, 0, 3*8192, pad[:8192], true))
	require.ErrorIs(t, m.offerPad(r, 1, 0, 4*8192, ref[4*8192:5*8192], false), ErrGap, "no WAL after padding began")
	require.NoError(t, m.offerPad(r, 1, 0, 4*8192, pad[8192:], true))
	require.Len(t, m.published, 1, "the padded segment is complete")
	require.NoError(t, m.offer(r, 1, wal.LSN(seg), ref[seg:seg+8192]), "the next segment is checked again")
	fresh := NewRebuild(testStream, spool.Contents{Segments: []wal.Segment{{TLI: 1, No: 0}}})
	require.ErrorIs(t, newMemSpool().offerPad(fresh, 1, 1, 0, ref[seg:seg+100], true), ErrGap, "a segment cannot start with padding")
}

func TestRebuildNewTimeline(t *testing.T) {
	r := NewRebuild(testStream, spool.Contents{})
	m := newMemSpool()
	ref1, ref2 := refWAL(2, 1), refWAL(2, 2)
	require.NoError(t, m.offer(r, 1, 0, ref1[:5000]))
	r.AddHistory(2)
	require.ErrorIs(t, m.offer(r, 2, 100, ref2[100:5000]), ErrGap, "a new timeline starts at a segment start")
	require.NoError(t, m.offer(r, 2, 0, ref2[:7000]))
	require.Equal(t, wal.Position{TLI: 2, LSN: 7000}, r.Durable())
	require.ErrorIs(t, m.offer(r, 1, 5000, ref1[5000:6000]), ErrTimeline, "the old timeline is closed")
	require.Len(t, m.partial, 2, "the old timeline's partial stays beside the new one")
}

func TestRebuildResumesFromSpool(t *testing.T) {
	seg := testStream.SegSize
	c := spool.Contents{
		Segments: []wal.Segment{{TLI: 1, No: 0}},
		Partials: map[uint32]spool.Partial{1: {Seg: wal.Segment{TLI: 1, No: 1}, Size: 9000}},
	}
	r := NewRebuild(testStream, c)
	require.Equal(t, wal.Position{TLI: 1, LSN: wal.LSN(seg + 9000)}, r.Durable())
	ref := refWAL(2, 1)
	st, err := r.Offer(1, 1, 9000, ref[seg+9000:seg+10000], false)
	require.NoError(t, err)
	require.False(t, st.Open, "the partial exists")
	require.Equal(t, uint64(9000), st.WriteAt)

	// Without a partial, the next segment starts fresh.
	r = NewRebuild(testStream, spool.Contents{Segments: []wal.Segment{{TLI: 1, No: 0}}, Partials: map[uint32]spool.Partial{}})
	require.Equal(t, wal.Position{TLI: 1, LSN: wal.LSN(seg)}, r.Durable())
	st, err = r.Offer(1, 1, 0, ref[seg:seg+100], false)
	require.NoError(t, err)
	require.True(t, st.Open)
}

// FuzzRebuild drives the rebuild with arbitrary frames cut from a reference WAL, some
// corrupted, and checks against the simplest model: the spool only ever holds a prefix
// of the reference of each timeline, every published segment equals the reference, and
// the durable position is the end of that prefix on the newest timeline.
//
// The reference is what a sidecar sends: timeline 1, whose segment 1 ends with switch
// padding from fuzzPadAt on (stale pages, sent as padding), and timeline 2, which
// branches off at the start of segment 2 and whose history file the sidecar may or may
// not have sent before its first frame.
func FuzzRebuild(f *testing.F) {
	f.Add([]byte{0, 0, 10, 0, 1, 0, 30, 0, 0, 0, 2, 0})
	f.Add([]byte{0, 0, 0xFF, 0xFF, 0, 0, 0xFF, 0xFF, 1, 0, 0xFF, 0xFF, 0, 1, 0xFF, 0xFF})
	// Through the padding of segment 1 into segment 2, then to timeline 2 with its history.
	f.Add([]byte{0, 0, 0xFF, 0xFF, 0, 0, 0xFF, 0xFF, 0, 0, 0xFF, 0xFF, 0, 0, 0xFF, 0xFF, 0, 0, 0xFF, 0x0F,
		0, 0, 1, 0xFF, 0, 0, 0xFF, 0x0F, 0, 0, 0xFF, 0x0F})
	// Timeline 2 before its history file.
	f.Add([]byte{1, 0, 0xFF, 0x0F, 0, 0, 0, 0xFF, 0, 0, 10, 0})
	seg := testStream.SegSize
	ref := map[uint32][]byte{1: refWAL(4, 1), 2: refWAL(4, 2)}
	copy(ref[1][seg+fuzzPadAt:2*seg], ref[1][5*8192:]) // stale pages: headers wrong for where they sit
	branch := 2 * seg
	f.Fuzz(func(t *testing.T, ops []byte) {
		r := NewRebuild(testStream, spool.Contents{})
		m := newMemSpool()
		tli := uint32(1) // the sidecar's timeline
		for len(ops) >= 4 {
			back := uint64(binary.LittleEndian.Uint16(ops[0:])) % 20000
			n := uint64(binary.LittleEndian.Uint16(ops[2:]))*16 + 1
			op := ops[:4]
			ops = ops[4:]
			if op[3] == 0xFF && op[2] < 2 && tli == 1 {
				// The primary was promoted: the sidecar moves to timeline 2, and sends its
				// history file first when op[2] says so.
				tli = 2
				if op[2] == 1 {
					r.AddHistory(2)
				}
				continue
			}
			// Each frame: a start near the durable position and a length, one flipped bit
			// maybe.
			from := uint64(r.Durable().LSN)
			if tli == 2 && r.Durable().TLI != 2 {
				from = branch
			}
			if back%3 == 0 {
				from += back // sometimes ahead: a gap
			} else {
				from -= min(from, back)
			}
			if from >= uint64(len(ref[tli])) || tli == 2 && from < branch {
				continue
			}
			segStart := from / seg * seg
			to := min(from+n, segStart+seg, uint64(len(ref[tli])))
			// The sidecar cuts a frame where the switch padding begins.
			padStart := seg + fuzzPadAt
			padding := tli == 1 && from >= padStart && from < 2*seg
			if tli == 1 && from < padStart && to > padStart {
				to = padStart
			}
			b := append([]byte(nil), ref[tli][from:to]...)
			before := r.Durable()
			// Corrupt only bytes the spool holds already: corruption of new bytes is the
			// frame hash's to catch, before the rebuild sees the frame.
			corrupt := n%7 == 0 && before.TLI == tli && from+uint64(len(b)/2) < uint64(before.LSN)
			if corrupt {
				b[len(b)/2] ^= 0x40
			}
			s, off := wal.SegmentOf(tli, wal.LSN(from), seg)
			err := m.offerPad(r, tli, s.No, off, b, padding)
			if err != nil && r.Durable() != before {
				t.Fatalf("a refused frame moved the position from %v to %v", before, r.Durable())
			}
			if err != nil && !errors.Is(err, ErrGap) && !errors.Is(err, spool.ErrConflict) && !errors.Is(err, wal.ErrPage) && !errors.Is(err, ErrTimeline) {
				t.Fatalf("unexpected error %v", err)
			}
			if err == nil && corrupt {
				t.Fatalf("a corrupted resend of held bytes was accepted")
			}
			if err == nil && tli == 2 && !r.histories[2] {
				t.Fatalf("a frame of timeline 2 was taken before its history file")
			}
		}
		// The model: everything held of a timeline is a prefix of its reference.
		held := map[uint32]uint64{}
		check := func(s wal.Segment, f []byte, what string) {
			start := uint64(s.Start(seg))
			if !bytes.Equal(ref[s.TLI][start:start+uint64(len(f))], f) {
				t.Fatalf("%s %s differs from the reference", what, s)
			}
			if s.TLI == 2 && start < branch {
				t.Fatalf("%s %s of timeline 2 before its branch point", what, s)
			}
			held[s.TLI] = max(held[s.TLI], start+uint64(len(f)))
		}
		for s, f := range m.published {
			if uint64(len(f)) != seg {
				t.Fatalf("published %s holds %d bytes", s, len(f))
			}
			check(s, f, "published")
		}
		for s, f := range m.partial {
			check(s, f, "partial")
		}
		d := r.Durable()
		if d.LSN != wal.LSN(held[d.TLI]) && !(len(held) == 0 && r.Empty()) {
			t.Fatalf("durable %v, but the spool holds %d bytes of timeline %d", d, held[d.TLI], d.TLI)
		}
		if len(held) == 2 && d.TLI != 2 {
			t.Fatalf("durable %v, but the spool holds WAL of timeline 2", d)
		}
	})
}

// fuzzPadAt is where switch padding begins in segment 1 of FuzzRebuild's reference.
const fuzzPadAt = 3 * 8192
