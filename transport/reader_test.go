package transport

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/stretchr/testify/require"
)

// stream is the encoding of frames one after the other, as a session carries them.
func stream(frames ...Frame) []byte {
	var b []byte
	for _, f := range frames {
		b = AppendFrame(b, f)
	}
	return b
}

// TestReader reads the same frames whatever pieces the stream arrives in: whole, a
// byte at a time, halves; and a large data frame makes the buffer grow once.
func TestReader(t *testing.T) {
	big := make([]byte, MaxPayload)
	for i := range big {
		big[i] = byte(i * 13)
	}
	frames := []Frame{
		&Ack{TLI: 1, LSN: 0x3000000},
		NewData(1, 42, 8192, []byte("some wal bytes")),
		NewData(1, 42, 0, big),
		&End{TLI: 2, LSN: 0x5000a28},
		NewFile("00000002.history", []byte("1\t0/3000160\tno recovery target specified\n")),
		NewData(1, 43, 0, big[:256<<10]),
		&Refuse{Fatal: true, Reason: "spool belongs to another cluster"},
	}
	b := stream(frames...)
	for name, src := range map[string]func() io.Reader{
		"whole":      func() io.Reader { return bytes.NewReader(b) },
		"byte-wise":  func() io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) },
		"half reads": func() io.Reader { return iotest.HalfReader(bytes.NewReader(b)) },
	} {
		t.Run(name, func(t *testing.T) {
			rd := NewReader(src())
			for i, want := range frames {
				got, err := rd.Read()
				require.NoError(t, err, "frame %d", i)
				require.Equal(t, want, got, "frame %d", i)
			}
			_, err := rd.Read()
			require.ErrorIs(t, err, io.EOF)
		})
	}
}

func TestReaderMalformed(t *testing.T) {
	good := stream(&Ack{TLI: 1, LSN: 7})
	for name, b := range map[string][]byte{
		"unknown kind": append(append([]byte(nil), good...), 99, 0, 0, 0, 0),
		"huge body":    append(append([]byte(nil), good...), kindData, 0xFF, 0xFF, 0xFF, 0xFF),
	} {
		t.Run(name, func(t *testing.T) {
			rd := NewReader(bytes.NewReader(b))
			f, err := rd.Read()
			require.NoError(t, err, "the good frame before the bad one")
			require.Equal(t, &Ack{TLI: 1, LSN: 7}, f)
			_, err = rd.Read()
			require.ErrorIs(t, err, ErrMalformed)
		})
	}
	// A stream that ends inside a frame is not a frame.
	rd := NewReader(bytes.NewReader(good[:len(good)-1]))
	_, err := rd.Read()
	require.True(t, errors.Is(err, io.EOF), "got %v", err)
}

// TestReaderAllocs: in a session's steady state (data frames, acks, end marks) reading
// and parsing costs no allocation.
func TestReaderAllocs(t *testing.T) {
	payload := make([]byte, 256<<10)
	one := stream(NewData(1, 42, 8192, payload), &Ack{TLI: 1, LSN: 9}, &End{TLI: 1, LSN: 9})
	src := &loop{b: one}
	rd := NewReader(src)
	for range 3 { // the buffer grows to its full size once
		_, err := rd.Read()
		require.NoError(t, err)
	}
	allocs := testing.AllocsPerRun(100, func() {
		for range 3 {
			if _, err := rd.Read(); err != nil {
				t.Fatal(err)
			}
		}
	})
	require.Zero(t, allocs, "allocations per data frame, ack and end mark")
}

// loop is a stream that repeats b forever, in reads of at most 64 kB.
type loop struct {
	b   []byte
	off int
}

func (l *loop) Read(p []byte) (int, error) {
	n := copy(p[:min(len(p), 64<<10)], l.b[l.off:])
	l.off = (l.off + n) % len(l.b)
	return n, nil
}

// BenchmarkReaderData reads and parses 256 kB data frames through a Reader and checks
// their hashes, as the receiver does: the per-byte cost of receiving.
func BenchmarkReaderData(b *testing.B) {
	payload := make([]byte, 256<<10)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	rd := NewReader(&loop{b: stream(NewData(1, 42, 8192, payload))})
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		f, err := rd.Read()
		if err != nil {
			b.Fatal(err)
		}
		if err := f.(*Data).CheckHash(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEncodeData builds and encodes a 256 kB data frame into a reused buffer, as
// the sidecar does for each chunk it sends.
func BenchmarkEncodeData(b *testing.B) {
	payload := make([]byte, 256<<10)
	buf := make([]byte, 0, len(payload)+64)
	var d Data
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		d.Set(1, 42, 8192, payload, false)
		buf = AppendFrame(buf[:0], &d)
	}
}
