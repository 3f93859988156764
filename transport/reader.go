package transport

import (
	"fmt"
	"io"
)

// Reader reads a stream of frames through one buffer that it reuses, and parses them
// with a Decoder: a receiver in its steady state reads and parses frames without an
// allocation and without copying a payload. Next hands out the frames already whole in
// the buffer; Fill reads more from the stream. A frame, and every byte slice in it, is
// valid until the next call of either.
type Reader struct {
	src  io.Reader
	buf  []byte
	r, w int // buf[r:w] is read and not yet handed out
	dec  Decoder
}

// Sizes of a Reader's buffer: it starts small, for a sidecar reads only acks, and grows
// once to hold the largest frame twice over when a frame does not fit, so that one
// Fill can take many frames at once.
const (
	minReadBuf = 64 << 10
	maxReadBuf = 2 * (maxBody + frameHeaderSize)
)

// NewReader returns a Reader of src.
func NewReader(src io.Reader) *Reader {
	return &Reader{src: src, buf: make([]byte, minReadBuf)}
}

// Next returns the next frame whole in the buffer, without reading from the stream; ok
// is false when none is (a frame may be partly there). A malformed frame is an error,
// and so is every call after it.
func (r *Reader) Next() (f Frame, ok bool, err error) {
	b := r.buf[r.r:r.w]
	if len(b) < frameHeaderSize || len(b) < frameHeaderSize+int(le.Uint32(b[1:])) && le.Uint32(b[1:]) <= maxBody {
		return nil, false, nil
	}
	f, n, err := r.dec.Parse(b)
	if err != nil {
		return nil, false, err
	}
	r.r += n
	return f, true, nil
}

// Fill reads from the stream once, at least one byte, after moving a partial frame to
// the front of the buffer.
func (r *Reader) Fill() error {
	if r.r == r.w {
		r.r, r.w = 0, 0
	}
	switch need := r.pending(); {
	case need > len(r.buf):
		// Only a frame bigger than the buffer makes it grow; Next refuses one bigger
		// than any frame may be.
		nb := make([]byte, maxReadBuf)
		r.w = copy(nb, r.buf[r.r:r.w])
		r.buf, r.r = nb, 0
	case r.r+need > len(r.buf) || len(r.buf)-r.w < len(r.buf)/4:
		// Move the partial frame to the front when it would not fit where it is, or
		// when little room is left to read into.
		r.w = copy(r.buf, r.buf[r.r:r.w])
		r.r = 0
	}
	if r.w == len(r.buf) {
		return fmt.Errorf("%w: frame longer than the read buffer", ErrMalformed)
	}
	n, err := r.src.Read(r.buf[r.w:])
	r.w += n
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// pending is the size of the frame that starts at r.r, as far as its header tells;
// a frame whose header has not arrived counts as a header.
func (r *Reader) pending() int {
	if r.w-r.r < frameHeaderSize {
		return frameHeaderSize
	}
	return frameHeaderSize + int(min(le.Uint32(r.buf[r.r+1:]), maxBody))
}

// Read returns the next frame, reading from the stream until one is whole.
func (r *Reader) Read() (Frame, error) {
	for {
		f, ok, err := r.Next()
		if ok || err != nil {
			return f, err
		}
		if err := r.Fill(); err != nil {
			return nil, err
		}
	}
}
