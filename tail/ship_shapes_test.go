package tail

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/tail/wal/waltest"
	"github.com/walship/walship/transport"
)

// recorder keeps what a shipment sent: the bytes of every segment, and which were
// sent as padding.
type recorder struct {
	segSize uint64
	data    map[uint64][]byte
	padding map[uint64][]bool
	next    wal.LSN // where the next frame must start: shipments are in order
	t       *testing.T
}

func (r *recorder) Send(f transport.Frame) error {
	d, ok := f.(*transport.Data)
	require.True(r.t, ok, "a shipment sends Data frames only")
	at := wal.LSN(d.Seg*r.segSize) + wal.LSN(d.Offset)
	require.Equal(r.t, r.next, at, "frames follow each other without a gap or an overlap")
	r.next = at + wal.LSN(len(d.Payload))
	if r.data[d.Seg] == nil {
		r.data[d.Seg] = make([]byte, r.segSize)
		r.padding[d.Seg] = make([]bool, r.segSize)
	}
	copy(r.data[d.Seg][d.Offset:], d.Payload)
	for i := range d.Payload {
		r.padding[d.Seg][int(d.Offset)+i] = d.Padding
	}
	return nil
}

// TestShipSwitchShapes ships WAL from a primary's pg_wal across a switch record at
// every placement of a page's last 40 bytes, its header split across two pages or two
// segments at the last two, in one range and in steps whose ends fall inside the padding
// (a flush position stops there when the padding is longer than wal_buffers). Every
// byte arrives as the server wrote it, the padding after the switch is sent as padding,
// and no byte is read past the range's end.
func TestShipSwitchShapes(t *testing.T) {
	st := wal.Stream{SysID: 7, SegSize: mb, BlockSize: 8192, Magic: 0xD110}
	const bs = 8192
	for _, page := range []wal.LSN{mb + 3*bs, 2*mb - bs} {
		for off := wal.LSN(8152); off <= 8184; off += 8 {
			at := page + off
			t.Run(at.String(), func(t *testing.T) {
				b := waltest.New(st, 1, 1)
				b.Record(waltest.RmHeap, 0, 100)
				b.FillTo(at)
				b.Switch()
				// The page holding the switch's last byte, and where that byte ends; the
				// padding starts after the page.
				last, rawEnd := at/bs*bs, at+24
				if at%bs+24 > bs {
					last += bs
					rawEnd += wal.LSN(wal.HeaderSize(last, mb))
				}
				b.Record(waltest.RmHeap, 0, 300)
				end := b.Pos()

				dir := t.TempDir()
				for no := uint64(1); no*mb < uint64(end); no++ {
					seg := append([]byte(nil), b.Segment(no)...)
					if start := wal.LSN(no * mb); end < start+mb {
						// Past the flush position: stale bytes of a recycled segment,
						// which a shipment must never read.
						for i := end - start; i < mb; i++ {
							seg[i] = 0xA5
						}
					}
					name := wal.Segment{TLI: 1, No: no}.Name(mb)
					require.NoError(t, os.WriteFile(filepath.Join(dir, name), seg, 0o600))
				}
				for _, steps := range [][]wal.LSN{
					{end},
					{rawEnd, last + bs + 3*bs, end},
					{last + bs, last + 2*bs, end},
				} {
					rec := &recorder{segSize: mb, data: map[uint64][]byte{}, padding: map[uint64][]bool{}, next: mb, t: t}
					sh := &shipper{files: walFiles{dir: dir, segSize: mb}, stream: st, tli: 1, conn: rec}
					from := wal.LSN(mb)
					for _, to := range steps {
						to = min(to, end)
						if to <= from {
							continue
						}
						require.NoError(t, sh.ship(from, to), "ship [%s, %s) in steps %v", from, to, steps)
						from = to
					}
					sh.close()
					require.Equal(t, end, rec.next)
					padStart := last + bs
					padEnd := wal.LSN((uint64(last)/mb + 1) * mb)
					for no, got := range rec.data {
						want := b.Segment(no)
						start := wal.LSN(no * mb)
						n := min(uint64(end-start), mb)
						require.True(t, bytes.Equal(want[:n], got[:n]), "segment %d as the server wrote it", no)
						for i := uint64(0); i < n; i++ {
							lsn := start + wal.LSN(i)
							inPad := lsn >= padStart && lsn < padEnd
							require.Equal(t, inPad, rec.padding[no][i], "byte at %s sent as padding", lsn)
						}
					}
				}
			})
		}
	}
}
