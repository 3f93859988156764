package tail

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// segmentBytes is a whole segment of pages with headers as the server writes them.
func segmentBytes(st wal.Stream, seg wal.Segment) []byte {
	b := make([]byte, st.SegSize)
	for off := uint64(0); off < st.SegSize; off += st.BlockSize {
		h := b[off:]
		binary.LittleEndian.PutUint16(h[0:], st.Magic)
		binary.LittleEndian.PutUint32(h[4:], seg.TLI)
		binary.LittleEndian.PutUint64(h[8:], uint64(seg.Start(st.SegSize))+off)
		if off == 0 {
			binary.LittleEndian.PutUint16(h[2:], wal.FlagLongHeader)
			binary.LittleEndian.PutUint64(h[24:], st.SysID)
			binary.LittleEndian.PutUint32(h[32:], uint32(st.SegSize))
			binary.LittleEndian.PutUint32(h[36:], uint32(st.BlockSize))
		}
	}
	return b
}

// encoder stands in for the session's connection: it encodes each frame into one
// reused buffer, as transport.Conn.Send does before the QUIC stream takes the bytes.
type encoder struct {
	buf    []byte
	frames int
}

func (e *encoder) Send(f transport.Frame) error {
	e.buf = transport.AppendFrame(e.buf[:0], f)
	e.frames++
	return nil
}

// BenchmarkShip reads a 16 MB segment from pg_wal in the sidecar's chunks, checks their
// page headers, encodes their frames and counts them for the metrics: the sidecar's cost
// per byte shipped, short of QUIC. In steady state it allocates nothing per chunk.
func BenchmarkShip(b *testing.B) {
	dir := b.TempDir()
	st := wal.Stream{SysID: 7311111111111111111, SegSize: 16 * mb, BlockSize: 8192, Magic: 0xD110}
	seg := wal.Segment{TLI: 1, No: 3}
	if err := os.WriteFile(filepath.Join(dir, seg.Name(st.SegSize)), segmentBytes(st, seg), 0o600); err != nil {
		b.Fatal(err)
	}
	enc := &encoder{}
	sh := &shipper{files: walFiles{dir: dir, segSize: st.SegSize}, stream: st, tli: 1, conn: counting{enc, &Tailer{}}}
	defer sh.close()
	from, to := seg.Start(st.SegSize), seg.Start(st.SegSize)+wal.LSN(st.SegSize)
	if err := sh.ship(from, to); err != nil { // opens the file, sizes the buffers
		b.Fatal(err)
	}
	b.SetBytes(int64(st.SegSize))
	b.ReportAllocs()
	for b.Loop() {
		if err := sh.ship(from, to); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(enc.frames)/float64(b.N+1), "frames/op")
}
