package receiver

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/transport"
)

func TestCheckHello(t *testing.T) {
	good := &transport.Hello{Version: transport.Version, SysID: 7, SegSize: 16 << 20, BlockSize: 8192, Magic: 0xD110, TLI: 1, ServerVersion: 150018}
	id, err := checkHello(good)
	require.NoError(t, err)
	require.Equal(t, spool.Identity{SysID: 7, SegSize: 16 << 20, BlockSize: 8192, Magic: 0xD110, ServerVersion: 150018}, id)

	bad := map[string]struct {
		f    transport.Frame
		want error
		text string
	}{
		"not a hello":            {&transport.Ack{TLI: 1}, transport.ErrMalformed, "not a hello"},
		"zero system identifier": {&transport.Hello{Version: transport.Version, SegSize: 16 << 20, BlockSize: 8192, Magic: 0xD110}, nil, "system identifier is zero"},
		"older version":          {&transport.Hello{Version: transport.Version - 1}, transport.ErrVersion, "sidecar speaks version"},
		"odd segments":           {&transport.Hello{Version: transport.Version, SysID: 7, SegSize: 3 << 20, BlockSize: 8192, Magic: 0xD110}, nil, "segment size"},
		"unknown magic":          {&transport.Hello{Version: transport.Version, SysID: 7, SegSize: 16 << 20, BlockSize: 8192, Magic: 0xBEEF}, nil, "magic"},
	}
	for name, c := range bad {
		t.Run(name, func(t *testing.T) {
			_, err := checkHello(c.f)
			require.Error(t, err)
			if c.want != nil {
				require.ErrorIs(t, err, c.want)
			}
			require.ErrorContains(t, err, c.text)
		})
	}
}

// FuzzHandshake feeds arbitrary bytes to the receiver's side of the handshake: the frame
// decoder, then the hello checks. Nothing panics; whatever is accepted is a hello of
// this version describing a valid WAL stream, and it encodes back to the same bytes.
func FuzzHandshake(f *testing.F) {
	f.Add(transport.AppendFrame(nil, &transport.Hello{Version: transport.Version, SysID: 7, SegSize: 16 << 20, BlockSize: 8192, Magic: 0xD110, TLI: 1, ServerVersion: 150018}))
	f.Add(transport.AppendFrame(nil, &transport.Hello{Version: transport.Version, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD118}))
	f.Add(transport.AppendFrame(nil, &transport.End{TLI: 1, LSN: 0x1000000}))
	f.Add([]byte{1, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, n, err := transport.ParseFrame(b)
		if err != nil {
			if !errors.Is(err, transport.ErrMalformed) {
				t.Fatalf("decode error that is not ErrMalformed: %v", err)
			}
			return
		}
		id, err := checkHello(fr)
		if err != nil {
			return
		}
		h := fr.(*transport.Hello)
		if h.Version != transport.Version {
			t.Fatalf("accepted version %d", h.Version)
		}
		if err := id.Stream().Validate(); err != nil {
			t.Fatalf("accepted an invalid stream: %v", err)
		}
		if got := transport.AppendFrame(nil, h); string(got) != string(b[:n]) {
			t.Fatalf("accepted hello does not encode back to its bytes")
		}
	})
}
