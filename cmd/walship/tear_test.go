package main

import (
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/tail/wal/waltest"
)

// TestRecordToTear: a segment that opens with the end of a large record continued from
// the one before. The first record that starts 4 kB into it follows a record of the
// segment before, which liveHandOuts cannot damage in this segment's bytes (it indexed
// before the bytes and panicked: "index out of range [18446744073709550332]", seen in
// a run of make test). recordToTear must pick a record whose predecessor is here.
func TestRecordToTear(t *testing.T) {
	st := wal.Stream{SysID: 7, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110}
	b := waltest.New(st, 1, 4)
	b.FillTo(wal.LSN(5<<20) - 1000)
	b.Record(waltest.RmHeap, 0, 10000) // runs 9 kB into segment 5
	for range 40 {
		b.Record(waltest.RmHeap, 0, 200)
	}
	b.Switch()
	dir := t.TempDir()
	require.NoError(t, spool.Bind(dir, spool.Identity{SysID: st.SysID, SegSize: st.SegSize, BlockSize: st.BlockSize, Magic: st.Magic, ServerVersion: 150000}))
	seg := wal.Segment{TLI: 1, No: 5}
	require.NoError(t, os.WriteFile(spool.SegmentPath(dir, seg, st.SegSize), b.Segment(5), 0o600))

	got, data, rec := recordToTear(t, dir)
	require.Equal(t, seg, got)
	require.GreaterOrEqual(t, rec.Prev, seg.Start(st.SegSize), "the record before it is in the segment")
	require.Less(t, uint64(rec.Prev-seg.Start(st.SegSize))+4, uint64(len(data)))
}
