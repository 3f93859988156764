package transport

import (
	"testing"
)

// BenchmarkFrameRoundTrip encodes a 256 kB data frame (the sidecar's chunk size),
// parses it back and checks its hash: the per-byte cost of the wire format.
func BenchmarkFrameRoundTrip(b *testing.B) {
	payload := make([]byte, 256<<10)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	buf := make([]byte, 0, len(payload)+64)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendFrame(buf[:0], NewData(1, 42, 8192, payload))
		f, _, err := ParseFrame(buf)
		if err != nil {
			b.Fatal(err)
		}
		if err := f.(*Data).CheckHash(); err != nil {
			b.Fatal(err)
		}
	}
}
