package receiver

import (
	"testing"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// BenchmarkRebuild offers a segment in 256 kB frames to the rebuild state machine (page
// checks included, no I/O): its cost per byte received.
func BenchmarkRebuild(b *testing.B) {
	ref := refWAL(1, 1)
	const chunk = 256 << 10
	b.SetBytes(int64(len(ref)))
	b.ReportAllocs()
	for b.Loop() {
		r := NewRebuild(testStream, spool.Contents{})
		for off := 0; off < len(ref); off += chunk {
			st, err := r.Offer(1, 0, uint64(off), ref[off:off+chunk], false)
			if err != nil {
				b.Fatal(err)
			}
			r.Commit(st)
		}
		if r.Durable().LSN != wal.LSN(len(ref)) {
			b.Fatal("segment not complete")
		}
	}
}
