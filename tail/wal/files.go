package wal

import (
	"errors"
	"io"
	"os"
)

// Files is a Source over a timeline's WAL kept in one file per segment: Locate names
// the file of segment number no and how many of its bytes count (a partial segment
// counts fewer than SegSize); ok false means the segment is not there. The last file
// read stays open until Close.
type Files struct {
	SegSize uint64
	Locate  func(no uint64) (path string, size int64, ok bool)

	f    *os.File
	no   uint64
	size int64
}

// ReadAt implements Source.
func (s *Files) ReadAt(p []byte, lsn LSN) (int, error) {
	n := 0
	for n < len(p) {
		seg, off := SegmentOf(0, lsn+LSN(n), s.SegSize)
		if err := s.open(seg.No); err != nil {
			return n, err
		}
		if int64(off) >= s.size {
			return n, io.EOF
		}
		want := min(len(p)-n, int(s.size-int64(off)))
		m, err := s.f.ReadAt(p[n:n+want], int64(off))
		n += m
		if err != nil && !errors.Is(err, io.EOF) {
			return n, err
		}
		if m < want {
			return n, io.EOF
		}
	}
	return n, nil
}

func (s *Files) open(no uint64) error {
	if s.f != nil && s.no == no {
		return nil
	}
	s.Close()
	path, size, ok := s.Locate(no)
	if !ok {
		return io.EOF
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return io.EOF
	}
	if err != nil {
		return err
	}
	s.f, s.no, s.size = f, no, size
	return nil
}

// Close closes the file last read.
func (s *Files) Close() error {
	if s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f = nil
	return err
}
