package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

// TestSwitchover swaps the roles under load: the sidecar stops the primary cleanly, the
// standby (made by standby init) is promoted with everything, and the old primary's
// WAL ends where the new timeline forks.
func TestSwitchover(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	r := streamingRig(t, ctx, 1, "--allow-switchover")
	sb := emptyStandby(t, r)
	r.initOK(ctx, sb.Data)
	adoptStandby(t, ctx, sb)

	load, err := lab.StartLoad(ctx, r.primary.DSN(), 2, 100)
	require.NoError(t, err)
	require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "200 commits", func() (bool, error) { return load.Count() >= 200, nil }))
	out, err := exec.CommandContext(ctx, walshipBin, "switchover", "--spool", r.spool, "--dsn", sb.DSN()).CombinedOutput()
	stopped := time.Now()
	require.NoError(t, err, "walship switchover:\n%s", out)
	load.Stop() // its errors are expected: the server stopped
	t.Logf("walship switchover: %s", strings.TrimSpace(string(out)))
	require.Contains(t, string(out), `its control file says "shut down"`)
	require.Contains(t, string(out), "promoted: timeline 2")
	require.Contains(t, string(out), "the sidecar drained the primary's WAL to")

	acks := load.Acks()
	loss, err := lab.MeasureLoss(ctx, sb, acks, stopped)
	require.NoError(t, err)
	require.Empty(t, loss.Lost, "%d of %d acknowledged commits lost", len(loss.Lost), len(acks))
	t.Logf("%d commits acknowledged, none lost", len(acks))
	require.NoError(t, sb.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) VALUES (-1, 'on the new primary')"))

	// The old primary stopped cleanly, and its last checkpoint is before the fork.
	require.Contains(t, r.primary.Log(), "database system is shut down")
	ctl, err := wal.ReadControl(r.primary.Data)
	require.NoError(t, err)
	require.Equal(t, wal.DBShutdowned, ctl.State)
	hist, err := os.ReadFile(filepath.Join(sb.Data, "pg_wal", wal.HistoryName(2)))
	require.NoError(t, err)
	entries, err := wal.ParseHistory(hist)
	require.NoError(t, err)
	require.Len(t, entries, 1)
	require.Less(t, ctl.CheckPoint, entries[0].Switch, "the old primary's shutdown checkpoint is on the shared history")
}

// TestSwitchoverRefused: a sidecar started without --allow-switchover refuses, and the
// primary and the standby are as they were.
func TestSwitchoverRefused(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	sb := emptyStandby(t, r)
	r.initOK(ctx, sb.Data)
	adoptStandby(t, ctx, sb)

	out, err := exec.CommandContext(ctx, walshipBin, "switchover", "--spool", r.spool, "--dsn", sb.DSN()).CombinedOutput()
	require.Error(t, err)
	require.Equal(t, 1, err.(*exec.ExitError).ExitCode())
	require.Contains(t, string(out), "not started with --allow-switchover")
	pid, err := r.primary.PostmasterPID()
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(pid, 0), "the primary still runs")
	require.Equal(t, "true", mustQuery(t, ctx, sb, "SELECT pg_is_in_recovery()::text"), "the standby is still one")
	_, err = os.Stat(filepath.Join(r.spool, "walship.freeze"))
	require.ErrorIs(t, err, os.ErrNotExist, "the spool was not frozen")

	// Asked of the primary itself: not a standby.
	out, err = exec.CommandContext(ctx, walshipBin, "switchover", "--spool", r.spool, "--dsn", r.primary.DSN()).CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "not in recovery")
}
