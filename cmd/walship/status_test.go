package main

import (
	"encoding/json"
	"os/exec"
	"strconv"
	"strings"
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

// check runs walship check with args and returns its exit status and its one line.
func check(t *testing.T, args ...string) (int, string) {
	t.Helper()
	out, err := exec.Command(walshipBin, append([]string{"check"}, args...)...).Output()
	rc := 0
	if err != nil {
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
		rc = ee.ExitCode()
	}
	line := strings.TrimSuffix(string(out), "\n")
	require.NotContains(t, line, "\n", "one line")
	return rc, line
}

// TestStatus reads a spool's state, and walship check judges it, while it streams, with
// the primary's lag, with the sidecar gone, after its receiver stopped, and after a
// promotion from it.
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
	require.NotNil(t, st.LagSeconds)
	if *st.LagBytes == 0 {
		require.Zero(t, *st.LagSeconds)
	}
	last, err := time.Parse(time.RFC3339Nano, st.LastWAL)
	require.NoError(t, err, "last_wal_at")
	require.WithinDuration(t, time.Now(), last, time.Minute)
	require.Equal(t, "walship", st.Slot, "the sidecar's slot")
	require.NotNil(t, st.SlotRetained)
	table := runOK(t, "status", "--spool", r.spool, "--dsn", r.primary.DSN())
	require.Contains(t, table, "system identifier "+strconv.FormatUint(id.SysID, 10))
	require.Contains(t, table, "connected from")
	require.Contains(t, table, "walship holds back")

	// Streaming and caught up: OK, with performance data.
	rc, line := check(t, "--spool", r.spool, "--dsn", r.primary.DSN(), "--free-warn", "0", "--free-crit", "0")
	require.Equal(t, 0, rc, line)
	require.Regexp(t, `^WALSHIP OK - durable to \S+ on timeline 1, sidecar connected since \S+, .* \| lag_bytes=\d+B;16777216;134217728;0 lag_seconds=[0-9.]+s;10;60;0 slot_retained_bytes=\d+B;1073741824;8589934592;0 free_bytes=\d+B;;;0;\d+$`, line)
	// The free space below a threshold of the whole file system: CRITICAL.
	rc, line = check(t, "--spool", r.spool, "--free-crit", "100%")
	require.Equal(t, 2, rc, line)
	require.Contains(t, line, "free on the spool's file system (below 100%)")

	// The sidecar gone: the receiver runs, no sidecar.
	require.NoError(t, r.sidecar.Stop(ctx))
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the receiver to see the sidecar gone", func() (bool, error) {
		return !status(t, "--spool", r.spool).SidecarConnected, nil
	}))
	st = status(t, "--spool", r.spool)
	require.True(t, st.ReceiverRunning)
	gone, err := time.Parse(time.RFC3339Nano, st.NoSidecarSince)
	require.NoError(t, err, "no_sidecar_since")
	require.WithinDuration(t, time.Now(), gone, time.Minute)
	rc, line = check(t, "--spool", r.spool, "--free-warn", "0", "--free-crit", "0")
	require.Equal(t, 0, rc, "under the thresholds: %s", line)
	require.Contains(t, line, "no sidecar connected for")
	rc, line = check(t, "--spool", r.spool, "--no-sidecar-warn", "1ns", "--free-warn", "0", "--free-crit", "0")
	require.Equal(t, 1, rc, line)
	require.Regexp(t, `^WALSHIP WARNING - no sidecar connected for \S+ \| no_sidecar_seconds=[0-9.]+s;0.000000001;300;0 `, line)
	rc, line = check(t, "--spool", r.spool, "--no-sidecar-crit", "1ns")
	require.Equal(t, 2, rc, line)

	// WAL the spool lacks: behind in bytes and in time.
	require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT 1, repeat('x', 100) FROM generate_series(1, 1000)"))
	st = status(t, "--spool", r.spool, "--dsn", r.primary.DSN())
	require.NotNil(t, st.LagBytes)
	require.NotZero(t, *st.LagBytes)
	require.Positive(t, *st.LagSeconds, "behind since the spool last took WAL")
	rc, line = check(t, "--spool", r.spool, "--dsn", r.primary.DSN(), "--lag-bytes-warn", "1", "--no-sidecar-warn", "0", "--no-sidecar-crit", "0", "--free-warn", "0", "--free-crit", "0")
	require.Equal(t, 1, rc, line)
	require.Contains(t, line, "behind the primary")
	rc, line = check(t, "--spool", r.spool, "--dsn", r.primary.DSN(), "--lag-crit", "1ns", "--no-sidecar-warn", "0", "--no-sidecar-crit", "0")
	require.Equal(t, 2, rc, line)
	require.Contains(t, line, "behind the primary for")

	// The primary unreachable: UNKNOWN, and its password never shown.
	rc, line = check(t, "--spool", r.spool, "--dsn", "host=127.0.0.1 port=1 user=walship password=NotToBeSeen42 connect_timeout=5")
	require.Equal(t, 3, rc, line)
	require.Contains(t, line, "WALSHIP UNKNOWN - status: connect to the primary")
	require.NotContains(t, line, "NotToBeSeen42")

	// The receiver stopped: neither.
	require.NoError(t, r.receiver.Stop(ctx))
	st = status(t, "--spool", r.spool)
	require.False(t, st.ReceiverRunning)
	require.False(t, st.SidecarConnected)
	require.Empty(t, st.NoSidecarSince, "said only while a receiver runs")
	require.Equal(t, id.SysID, st.SystemID, "the spool's facts stay readable")
	rc, line = check(t, "--spool", r.spool)
	require.Equal(t, 2, rc, line)
	require.Contains(t, line, "WALSHIP CRITICAL - no receiver runs on the spool")

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
	rc, line = check(t, "--spool", r.spool)
	require.Equal(t, 2, rc, line)
	require.Contains(t, line, "promoted from: the spool takes no more WAL")
	require.Contains(t, line, "the primary's server is gone")

	// A bad spool: a clear error, exit 1.
	out, err = exec.Command(walshipBin, "status", "--spool", r.dir+"/nope").CombinedOutput()
	require.Error(t, err)
	require.Equal(t, 1, err.(*exec.ExitError).ExitCode())
	require.Contains(t, string(out), "no such file or directory")
	rc, line = check(t, "--spool", r.dir+"/nope")
	require.Equal(t, 3, rc, line)
	require.Contains(t, line, "WALSHIP UNKNOWN - status of spool")
	rc, _ = check(t, "--spool", r.spool, "--lag-warn", "soon")
	require.Equal(t, 3, rc, "a usage error is UNKNOWN")
}
