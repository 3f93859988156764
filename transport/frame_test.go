package transport

import (
	"bytes"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

var sampleFrames = map[string]Frame{
	"hello":   &Hello{Version: Version, SysID: 7311111111111111111, SegSize: 16 << 20, BlockSize: 8192, Magic: 0xD110, TLI: 2, ServerVersion: 150004},
	"welcome": &Welcome{Version: Version, TLI: 3, LSN: 0x16_B374D848},
	"empty":   &Welcome{Version: Version, Empty: true},
	"data":    NewData(1, 42, 8192, []byte("some wal bytes")),
	"no data": NewData(1, 42, 0, []byte{}),
	"padding": func() *Data { d := NewData(1, 42, 8192, make([]byte, 64)); d.Padding = true; return d }(),
	"file":    NewFile("00000002.history", []byte("1\t0/3000160\tno recovery target specified\n")),
	"ack":     &Ack{TLI: 1, LSN: 0x3000000},
	"end":     &End{TLI: 2, LSN: 0x5000a28},
	"refuse":  &Refuse{Fatal: true, Reason: "spool belongs to another cluster"},
}

func TestFrameRoundTrip(t *testing.T) {
	for name, f := range sampleFrames {
		t.Run(name, func(t *testing.T) {
			b := AppendFrame([]byte("prefix"), f)
			got, n, err := ParseFrame(b[len("prefix"):])
			require.NoError(t, err)
			require.Equal(t, len(b)-len("prefix"), n, "ParseFrame must consume the whole frame")
			require.Equal(t, f, got)
			// The stream reader reads the same.
			got, _, err = ReadFrame(bytes.NewReader(b[len("prefix"):]), nil)
			require.NoError(t, err)
			require.Equal(t, f, got)
			// Every truncation is refused with ErrMalformed, never a panic or a short frame.
			for i := 0; i < n; i++ {
				_, _, err := ParseFrame(b[len("prefix") : len("prefix")+i])
				require.ErrorIs(t, err, ErrMalformed, "truncated to %d of %d bytes", i, n)
			}
		})
	}
}

func TestFrameErrors(t *testing.T) {
	data := AppendFrame(nil, NewData(1, 2, 3, []byte("abc")))
	for name, tc := range map[string]struct {
		b    []byte
		want string
	}{
		"unknown kind":       {[]byte{99, 0, 0, 0, 0}, "unknown kind 99"},
		"huge body":          {[]byte{kindData, 0xFF, 0xFF, 0xFF, 0xFF}, "exceeds"},
		"bytes left over":    {append(AppendFrame(nil, &Ack{})[:1:1], append([]byte{13, 0, 0, 0}, make([]byte, 13)...)...), "left over"},
		"payload length lie": {func() []byte { b := append([]byte(nil), data...); b[5+17] = 4; return b }(), "too short"},
		"bad flag":           {func() []byte { b := AppendFrame(nil, &Welcome{}); b[7] = 2; return b }(), "flag"},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := ParseFrame(tc.b)
			require.ErrorIs(t, err, ErrMalformed)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestChecksum(t *testing.T) {
	d := NewData(1, 2, 0, []byte("payload"))
	require.NoError(t, d.CheckHash())
	d.Payload[0] ^= 1
	err := d.CheckHash()
	require.ErrorIs(t, err, ErrChecksum)
	require.ErrorContains(t, err, "segment 2 offset 0")
	f := NewFile("00000002.history", []byte("x"))
	require.NoError(t, f.CheckHash())
	f.Content = []byte("y")
	require.ErrorIs(t, f.CheckHash(), ErrChecksum)
}

func TestRetryable(t *testing.T) {
	require.True(t, Retryable(errors.New("connection reset")))
	require.True(t, Retryable(&RefusedError{Reason: "checksum"}))
	require.False(t, Retryable(&RefusedError{Fatal: true, Reason: "another cluster"}))
	require.False(t, Retryable(errors.Join(errors.New("x"), ErrVersion)))
}

// FuzzParseFrame: any input either fails with ErrMalformed or parses to a frame whose
// encoding parses back to the same frame.
func FuzzParseFrame(f *testing.F) {
	for _, fr := range sampleFrames {
		f.Add(AppendFrame(nil, fr))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, n, err := ParseFrame(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if n > len(b) {
			t.Fatalf("consumed %d of %d bytes", n, len(b))
		}
		again, m, err := ParseFrame(AppendFrame(nil, fr))
		if err != nil || m != n {
			t.Fatalf("re-encoding of %#v does not parse back: %v (%d vs %d bytes)", fr, err, m, n)
		}
		if !bytes.Equal(AppendFrame(nil, again), b[:n]) {
			t.Fatalf("encoding is not canonical for %#v", fr)
		}
	})
}
