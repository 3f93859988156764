package main

import (
	"encoding/json"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/feeder"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// status runs walship status --json with args and parses it.
func status(t *testing.T, args ...string) feeder.Status {
	t.Helper()
	out := runOK(t, append([]string{"status", "--json"}, args...)...)
	var st feeder.Status
	require.NoError(t, json.Unmarshal([]byte(out), &st), out)
	return st
}

// TestStatus reads a spool's state while it streams, with the primary's lag, after its
// receiver stopped, and after a promotion from it.
func TestStatus(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	createLoadTable(t, ctx, r.primary)
	fillSegments(t, ctx, r.primary, 2)
	flush := flushLSN(t, ctx, r.primary)
	r.waitSpoolAt(ctx, flush)
	id, _, err := spool.ReadIdentity(r.spool)
	require.NoError(t, err)
	pos, c := spoolPosition(t, r.spool)

	st := status(t, "--spool", r.spool, "--dsn", r.primary.DSN())
	require.Equal(t, id.SysID, st.SystemID)
	require.Equal(t, int(id.ServerVersion)/10000, st.Major)
	require.Equal(t, id.SegSize, st.SegmentBytes)
	require.Equal(t, uint32(1), st.Timeline)
	got, err := wal.ParseLSN(st.Durable)
	require.NoError(t, err)
	require.GreaterOrEqual(t, got, pos.LSN)
	require.Equal(t, len(c.Segments) > 0, st.Segments > 0)
	require.Equal(t, c.Segments[0].Name(id.SegSize), st.OldestSegment)
	require.True(t, st.ReceiverRunning)
	require.True(t, st.SidecarConnected)
	require.NotEmpty(t, st.SidecarPeer)
	require.NotZero(t, st.FreeBytes)
	require.False(t, st.Frozen || st.Promoted)
	require.NotEmpty(t, st.PrimaryFlush)
	require.NotNil(t, st.LagBytes)
	primaryFlush, err := wal.ParseLSN(st.PrimaryFlush)
	require.NoError(t, err)
	require.Equal(t, uint64(max(primaryFlush, got)-got), *st.LagBytes)
	table := runOK(t, "status", "--spool", r.spool)
	require.Contains(t, table, "system identifier "+strconv.FormatUint(id.SysID, 10))
	require.Contains(t, table, "connected from")

	// The sidecar gone: the receiver runs, no sidecar.
	r.sidecar.Stop(ctx)
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the receiver to see the sidecar gone", func() (bool, error) {
		return !status(t, "--spool", r.spool).SidecarConnected, nil
	}))
	st = status(t, "--spool", r.spool)
	require.True(t, st.ReceiverRunning)

	// The receiver stopped: neither.
	r.receiver.Stop(ctx)
	st = status(t, "--spool", r.spool)
	require.False(t, st.ReceiverRunning)
	require.False(t, st.SidecarConnected)
	require.Equal(t, id.SysID, st.SystemID, "the spool's facts stay readable")

	// Promoted from: frozen and promoted. The standby is made while the pair runs.
	r.startReceiver(ctx)
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	sb := r.standby(ctx, false)
	require.NoError(t, r.primary.Kill())
	out, err := exec.CommandContext(ctx, walshipBin, "promote", "--spool", r.spool, "--dsn", sb.DSN()).CombinedOutput()
	require.NoError(t, err, "%s", out)
	// The primary was killed with its flush position at a segment's start (after
	// fillSegments' switch) and nothing after it: the drain marks the end there.
	require.Contains(t, string(out), "the sidecar drained the primary's WAL to")
	st = status(t, "--spool", r.spool)
	require.True(t, st.Frozen)
	require.True(t, st.Promoted)
	require.NotEmpty(t, st.EndOfWAL, "the drain's mark")
	require.Contains(t, runOK(t, "status", "--spool", r.spool), "promoted from")

	// A bad spool: a clear error, exit 1.
	out, err = exec.Command(walshipBin, "status", "--spool", r.dir+"/nope").CombinedOutput()
	require.Error(t, err)
	require.Equal(t, 1, err.(*exec.ExitError).ExitCode())
	require.Contains(t, string(out), "no such file or directory")
}
