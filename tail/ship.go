package tail

import (
	"fmt"
	"io"
	"os"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// segmentFiles opens the files a shipper reads segments from.
type segmentFiles interface {
	open(seg wal.Segment) (*os.File, error)
	// String names the directory, for messages.
	String() string
}

// sender sends frames: a session's *transport.Conn.
type sender interface {
	Send(transport.Frame) error
}

// shipper reads byte ranges of segments and sends them.
type shipper struct {
	files  segmentFiles
	stream wal.Stream
	tli    uint32
	conn   sender
	f      *os.File
	seg    wal.Segment
	padAt  uint64 // where switch padding begins in seg; 0 for none found
	buf    []byte
	d      transport.Data // the frame being sent, kept from one chunk to the next
}

// ship sends [from, to). It never reads a byte at or past to, the end position: beyond
// a primary's flush position a recycled segment holds stale pages of an older one.
func (s *shipper) ship(from, to wal.LSN) error {
	segSize := s.stream.SegSize
	for from < to {
		c := nextChunk(s.tli, from, to, segSize, s.stream.BlockSize)
		if err := s.open(c.seg); err != nil {
			return err
		}
		if cap(s.buf) < int(c.n) {
			s.buf = make([]byte, maxChunk)
		}
		b := s.buf[:c.n]
		if _, err := s.f.ReadAt(b, int64(c.off)); err != nil {
			return fmt.Errorf("read segment %s at %d: %w", c.seg.Name(segSize), c.off, err)
		}
		padding := s.padAt != 0 && c.off >= s.padAt
		if !padding {
			lsn := c.seg.Start(segSize) + wal.LSN(c.off)
			if err := s.stream.CheckPages(b, lsn, s.tli); err != nil {
				// Switch padding may end the range: a spool's durable end can stop
				// inside it, and so can a primary's flush position when the padding is
				// longer than wal_buffers (xlog.c: CopyXLogRecordToWAL zeroes it a page
				// at a time, and XLogWrite flushes what fills the buffers).
				padAt, ok := switchPadding(s.stream, c.seg, err, segmentSource{s})
				if !ok {
					return fmt.Errorf("segment %s in %s: %w", c.seg.Name(segSize), s.files, err)
				}
				s.padAt = padAt
				if padAt <= c.off {
					continue // the whole chunk is padding: read it again as such
				}
				b = b[:padAt-c.off]
			}
		}
		s.d.Set(s.tli, c.seg.No, uint32(c.off), b, padding)
		if err := s.conn.Send(&s.d); err != nil {
			return err
		}
		from = c.seg.Start(segSize) + wal.LSN(c.off) + wal.LSN(len(b))
	}
	return nil
}

// segmentSource reads WAL for the switch padding check: from the open segment, or
// from another one opened for the read (the segment before, where a switch record
// split across two segments begins). The check reads only pages before the failing one,
// so never past the range's end.
type segmentSource struct{ s *shipper }

func (src segmentSource) ReadAt(p []byte, lsn wal.LSN) (int, error) {
	segSize := src.s.stream.SegSize
	seg, off := wal.SegmentOf(src.s.tli, lsn, segSize)
	f := src.s.f
	if f == nil || seg != src.s.seg {
		other, err := src.s.files.open(seg)
		if err != nil {
			return 0, err
		}
		defer func() { _ = other.Close() }() // read only
		f = other
	}
	n := min(uint64(len(p)), segSize-off)
	got, err := f.ReadAt(p[:n], int64(off))
	if err == nil && uint64(got) < uint64(len(p)) {
		err = io.EOF
	}
	return got, err
}

func (s *shipper) open(seg wal.Segment) error {
	if s.f != nil && s.seg == seg {
		return nil
	}
	s.close()
	f, err := s.files.open(seg)
	if err != nil {
		return err
	}
	s.f, s.seg, s.padAt = f, seg, 0
	return nil
}

func (s *shipper) close() {
	if s.f != nil {
		_ = s.f.Close() // read only: a segment of pg_wal, of the archive or of a spool
		s.f = nil
	}
}
