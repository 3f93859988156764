package receiver

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// TestSessionCounts runs a session over loopback QUIC, as a sidecar would: a segment
// and a half of WAL, then a frame with a wrong hash. The counters the metrics read must
// agree with what was sent, and every fsync counted must have been timed.
func TestSessionCounts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()
	tlsDir := filepath.Join(dir, "tls")
	require.NoError(t, transport.GenerateCerts(tlsDir, transport.CertOptions{}))
	srv, err := transport.ServerTLS(tlsDir)
	require.NoError(t, err)
	var timed atomic.Uint64
	r, err := New(Config{Listen: "127.0.0.1:0", Spool: filepath.Join(dir, "spool"), TLS: srv,
		ObserveFsync: func(time.Duration) { timed.Add(1) }})
	require.NoError(t, err)
	run := make(chan error, 1)
	go func() { run <- r.Run(ctx) }()
	defer func() {
		cancel()
		require.NoError(t, <-run)
	}()

	cli, err := transport.ClientTLS(tlsDir, "127.0.0.1")
	require.NoError(t, err)
	c, err := transport.Dial(ctx, r.Addr().String(), cli)
	require.NoError(t, err)
	defer c.Close("")
	st := testStream
	hello := &transport.Hello{Version: transport.Version, SysID: st.SysID, SegSize: uint32(st.SegSize), BlockSize: uint32(st.BlockSize),
		Magic: st.Magic, TLI: 1, ServerVersion: 150004}
	w, err := transport.Handshake(ctx, c, hello)
	require.NoError(t, err)
	require.True(t, w.Empty, "a new spool")

	ref := refWAL(2, 1)
	const chunk = 256 << 10
	sent := 3 * int(st.SegSize) / 2
	frames := 0
	for off := 0; off < sent; off += chunk {
		seg, at := uint64(off)/st.SegSize, uint64(off)%st.SegSize
		require.NoError(t, c.Send(transport.NewData(1, seg, uint32(at), ref[off:off+chunk])))
		frames++
	}
	rd := c.Reader()
	for {
		f, err := rd.Read()
		require.NoError(t, err)
		if a, ok := f.(*transport.Ack); ok && a.LSN == wal.LSN(sent) {
			break
		}
	}
	require.Equal(t, uint64(sent), r.Received(), "bytes written")
	require.Equal(t, uint64(frames), r.Frames(), "frames read")
	require.GreaterOrEqual(t, r.Fsyncs(), uint64(2), "a publish and a sync at least")
	require.Equal(t, r.Fsyncs(), timed.Load(), "every fsync counted is timed")
	require.Equal(t, uint64(1), r.Sessions())

	// The stream is quiet now: the receiver settles its last sync, so that the spool's
	// readers that are not the writer (walship status, check, standby init) count all
	// that was acknowledged.
	require.Eventually(t, func() bool {
		c, err := spool.Scan(filepath.Join(dir, "spool"), st.SegSize)
		pos, _ := c.Position(st.SegSize)
		return err == nil && pos.LSN == wal.LSN(sent)
	}, 10*time.Second, 10*time.Millisecond, "the spool's readers count what was acknowledged")

	bad := transport.NewData(1, 1, uint32(sent)-uint32(st.SegSize), ref[sent:sent+chunk])
	bad.Hash ^= 1
	require.NoError(t, c.Send(bad))
	for {
		f, err := rd.Read()
		require.NoError(t, err)
		if _, ok := f.(*transport.Refuse); ok {
			break
		}
	}
	for _, why := range RefusalReasons() {
		want := uint64(0)
		if why == RefusedChecksum {
			want = 1
		}
		require.Equal(t, want, r.Refusals(why), "refusals for %s", why)
	}
	require.Equal(t, uint64(sent), r.Received(), "a refused frame writes nothing")
	require.Equal(t, uint64(frames+1), r.Frames(), "the refused frame was read")
}
