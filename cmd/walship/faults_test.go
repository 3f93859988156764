package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// snapshot maps every file of a directory to a digest of its content, leaving
// out the receiver's record of its current session, which comes and goes with
// the sidecar's connections and holds no WAL.
func snapshot(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	m := map[string][32]byte{}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue // the receiver's control socket
		}
		if strings.Contains(e.Name(), spool.SessionFile) {
			continue // and its temporary file while being written
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		m[e.Name()] = sha256.Sum256(b)
	}
	return m
}

// waitSpoolGrows waits until the spool's position is n bytes past where it is now.
func (r *rig) waitSpoolGrows(ctx context.Context, n uint64) {
	r.t.Helper()
	from, _ := spoolPosition(r.t, r.spool)
	r.waitSpoolAt(ctx, from.LSN+wal.LSN(n))
}

// lastField returns the value after the last occurrence of key in a log, up to a
// space or a quote.
func lastField(log, key string) string {
	i := strings.LastIndex(log, key)
	if i < 0 {
		return ""
	}
	v := log[i+len(key):]
	if j := strings.IndexAny(v, " \"\n"); j >= 0 {
		v = v[:j]
	}
	return v
}

// TestRestarts kills the receiver, then the sidecar, with SIGKILL under load: after
// each restart the stream resumes where the spool ends, with no gap and nothing sent
// again from a segment's start.
func TestRestarts(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	load, err := lab.StartLoad(ctx, r.primary.DSN(), 2, 400)
	require.NoError(t, err)
	// Only for a test that fails on the way: the test checks the load's error where it
	// stops it.
	defer func() { _ = load.Stop() }()
	r.waitSpoolGrows(ctx, 3<<20)

	r.receiver.Kill()
	// The primary goes on while the receiver is down.
	before := flushLSN(t, ctx, r.primary)
	require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "primary to write 2 MB more", func() (bool, error) {
		return flushLSN(t, ctx, r.primary) > before+2<<20, nil
	}))
	r.startReceiver(ctx)
	r.waitSpoolGrows(ctx, 3<<20)

	sessions := strings.Count(r.receiver.Log(), "sidecar session started")
	r.sidecar.Kill()
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	// The receiver's welcome names the spool's durable end (frames of the killed
	// sidecar still buffered may land until the new session replaces the old one); the
	// restarted sidecar must start exactly there, not at a segment's start. Only the
	// logs tell where a session started, and the receiver logs its welcome after sending
	// it: wait for its line.
	require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "the receiver to log the new session", func() (bool, error) {
		return strings.Count(r.receiver.Log(), "sidecar session started") > sessions, nil
	}))
	welcome := lastField(r.receiver.Log(), `position="`)
	require.NotEmpty(t, welcome)
	require.Equal(t, welcome, lastField(r.sidecar.Log(), "from="), "the restarted sidecar must resume at the spool's end")
	r.waitSpoolGrows(ctx, 3<<20)

	require.NoError(t, load.Stop())
	n := r.checkIdentical(ctx)
	t.Logf("%d inserts, %d segments identical after a receiver and a sidecar SIGKILL", load.Count(), n)
}

// TestSwitchBoundary leaves the flush position exactly on a segment boundary with
// pg_switch_wal(), with 1 MB and with the default 16 MB segments.
func TestSwitchBoundary(t *testing.T) {
	for _, segMB := range []int{1, 16} {
		t.Run(strings.Repeat("x", 0)+map[int]string{1: "1MB", 16: "16MB"}[segMB], func(t *testing.T) {
			ctx := testContext(t, 3*time.Minute)
			r := streamingRig(t, ctx, segMB)
			require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE t AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g"))
			require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
			flush := flushLSN(t, ctx, r.primary)
			segSize := uint64(segMB) << 20
			require.Zero(t, uint64(flush)%segSize, "after pg_switch_wal() the flush position %s should sit on a segment boundary", flush)
			r.checkIdentical(ctx)
			_, c := spoolPosition(t, r.spool)
			require.Empty(t, c.Partials, "nothing past the boundary was flushed, so there is no partial")
			last := c.Segments[len(c.Segments)-1]
			require.Equal(t, uint64(flush)/segSize-1, last.No, "the switched segment is the last one published")

			// And it goes on into the next segment.
			require.NoError(t, r.primary.Exec(ctx, "INSERT INTO t SELECT g, 'after' FROM generate_series(1, 100) g"))
			r.checkIdentical(ctx)
			_, c = spoolPosition(t, r.spool)
			require.Len(t, c.Partials, 1, "the next segment is in progress")
		})
	}
}

// TestRefusals: peers without a certificate or with one of another CA never reach the
// spool; a frame with a wrong hash and a sidecar of another cluster are refused with a
// clear reason, and the spool does not change.
func TestRefusals(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g"))
	r.checkIdentical(ctx)
	r.sidecar.Kill()
	before := snapshot(t, r.spool)
	id, _, err := spool.ReadIdentity(r.spool)
	require.NoError(t, err)
	hello := helloFor(id)

	good, err := transport.ClientTLS(r.tlsDir, "127.0.0.1")
	require.NoError(t, err)
	noCert := good.Clone()
	noCert.Certificates = nil
	otherDir := filepath.Join(r.dir, "other-ca")
	runOK(t, "certs", "--dir", otherDir)
	otherCA, err := transport.ClientTLS(otherDir, "127.0.0.1")
	require.NoError(t, err)
	otherCA.RootCAs = good.RootCAs // trusts the receiver, but its own certificate is of another CA
	for name, conf := range map[string]*tls.Config{"no certificate": noCert, "certificate of another CA": otherCA} {
		t.Run(name, func(t *testing.T) {
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			c, err := transport.Dial(dctx, r.addr, conf)
			if err == nil {
				// TLS 1.3 lets the client finish before the server checks its certificate;
				// the refusal then arrives on the first exchange.
				_, err = transport.Handshake(dctx, c, hello)
				c.Close("")
			}
			require.Error(t, err, "the receiver must refuse a peer with %s", name)
			require.NoError(t, dctx.Err(), "the refusal must come at once, not by a timeout")
			t.Logf("refused as expected: %v", err)
		})
	}
	// Another CA's client also may not learn anything: the receiver never logged a session.
	require.Equal(t, 0, strings.Count(r.receiver.Log(), "sidecar session started")-1, "only the real sidecar's session may have started")

	t.Run("frame with a wrong hash", func(t *testing.T) {
		c, err := transport.Dial(ctx, r.addr, good)
		require.NoError(t, err)
		defer c.Close("")
		w, err := transport.Handshake(ctx, c, hello)
		require.NoError(t, err)
		seg, off := wal.SegmentOf(w.TLI, w.LSN, id.SegSize)
		d := transport.NewData(w.TLI, seg.No, uint32(off), make([]byte, 100))
		d.Hash ^= 1
		require.NoError(t, c.Send(d))
		f, err := c.Recv()
		require.NoError(t, err)
		refuse, ok := f.(*transport.Refuse)
		require.True(t, ok, "got %T, want a refusal", f)
		require.Contains(t, refuse.Reason, "checksum mismatch")
		require.False(t, refuse.Fatal, "a damaged frame is worth a retry")
	})
	require.Equal(t, before, snapshot(t, r.spool), "a refused frame must not change the spool")

	// An end-of-WAL mark must sit exactly where the spool's WAL ends; one that does not
	// is refused and recorded nowhere. One that does is recorded, echoed, and removed by
	// the next session, whose sidecar found the server up again.
	endAt := func(c *transport.Conn, e *transport.End) transport.Frame {
		require.NoError(t, c.Send(e))
		f, err := c.Recv()
		require.NoError(t, err)
		return f
	}
	t.Run("sidecar of another protocol version", func(t *testing.T) {
		c, err := transport.Dial(ctx, r.addr, good)
		require.NoError(t, err)
		defer c.Close("")
		old := *hello
		old.Version = transport.Version - 1
		_, err = transport.Handshake(ctx, c, &old)
		var refused *transport.RefusedError
		require.ErrorAs(t, err, &refused)
		require.True(t, refused.Fatal, "another version is not worth a retry")
		require.Contains(t, refused.Reason, fmt.Sprintf("protocol version mismatch: sidecar speaks version %d, receiver %d", transport.Version-1, transport.Version))
	})
	require.Equal(t, before, snapshot(t, r.spool), "a refused version must not change the spool")
	t.Run("end-of-WAL mark in the wrong place", func(t *testing.T) {
		c, err := transport.Dial(ctx, r.addr, good)
		require.NoError(t, err)
		defer c.Close("")
		w, err := transport.Handshake(ctx, c, hello)
		require.NoError(t, err)
		f := endAt(c, &transport.End{TLI: w.TLI, LSN: w.LSN + 8})
		refuse, ok := f.(*transport.Refuse)
		require.True(t, ok, "got %T, want a refusal", f)
		require.Contains(t, refuse.Reason, "end-of-WAL mark at "+(w.LSN+8).String())
		require.NoFileExists(t, filepath.Join(r.spool, spool.EndFile))
	})
	require.Equal(t, before, snapshot(t, r.spool), "a refused mark must not change the spool")
	t.Run("end-of-WAL mark recorded, then cleared by the next session", func(t *testing.T) {
		c, err := transport.Dial(ctx, r.addr, good)
		require.NoError(t, err)
		w, err := transport.Handshake(ctx, c, hello)
		require.NoError(t, err)
		f := endAt(c, &transport.End{TLI: w.TLI, LSN: w.LSN})
		require.Equal(t, &transport.End{TLI: w.TLI, LSN: w.LSN}, f, "the receiver echoes a recorded mark")
		c.Close("")
		m, ok, err := spool.ReadEnd(r.spool)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, spool.EndMark{Position: wal.Position{TLI: w.TLI, LSN: w.LSN}, At: m.At}, m)

		c2, err := transport.Dial(ctx, r.addr, good)
		require.NoError(t, err)
		defer c2.Close("")
		_, err = transport.Handshake(ctx, c2, hello)
		require.NoError(t, err)
		require.NoFileExists(t, filepath.Join(r.spool, spool.EndFile))
	})
	require.Equal(t, before, snapshot(t, r.spool), "marks must not change the spool's WAL")

	t.Run("sidecar of another cluster", func(t *testing.T) {
		other, err := lab.NewCluster(ctx, lab.Options{SegSizeMB: 1})
		require.NoError(t, err)
		defer func() { assert.NoError(t, other.Close(), "stop the other cluster and remove its files") }()
		require.NoError(t, other.Start(ctx))
		p := r.startSidecar(ctx, other)
		select {
		case <-p.Done():
		case <-ctx.Done():
			t.Fatal("the sidecar of another cluster kept running")
		}
		require.Error(t, p.Err(), "the sidecar must exit with an error")
		require.Contains(t, p.Log(), "spool belongs to another cluster")
		// The receiver logs the refusal once it is sent: perhaps after the sidecar exits.
		require.NoError(t, r.receiver.WaitLog(ctx, "spool belongs to another cluster"))
	})
	require.Equal(t, before, snapshot(t, r.spool), "a refused cluster must not change the spool")

	// The receiver counted each refusal under its reason.
	m, err := lab.Metrics(r.recvMetrics)
	require.NoError(t, err)
	for why, want := range map[string]uint64{"cluster": 1, "version": 1, "checksum": 1, "page": 0, "order": 1, "frozen": 0, "other": 0} {
		name := fmt.Sprintf("walship_receiver_refusals_total{reason=%q}", why)
		require.Contains(t, m, name)
		require.Equal(t, want, m[name], "%s: got %d, want %d", name, m[name], want)
	}
}
