package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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
	_ = load.Stop() // its errors are expected: the server stopped
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

// inodes reads the inode numbers of a data directory and of its PG_VERSION.
func inodes(t *testing.T, dir string) [2]uint64 {
	t.Helper()
	var out [2]uint64
	for i, p := range []string{dir, filepath.Join(dir, "PG_VERSION")} {
		st, err := os.Stat(p)
		require.NoError(t, err)
		out[i] = st.Sys().(*syscall.Stat_t).Ino
	}
	return out
}

// rejoin runs walship standby rejoin of the old primary's data directory pgdata on the
// rig's spool, its receiver running, and once it has set the spool's start mark, starts
// the rig's sidecar beside the new primary, as a DBA would. It returns rejoin's output
// and its error.
func (r *rig) rejoin(ctx context.Context, pgdata string, newPrimary *lab.Cluster) (string, error) {
	r.t.Helper()
	cmd := exec.CommandContext(ctx, walshipBin, "standby", "rejoin", "--spool", r.spool, "--pgdata", pgdata, "--wait", "2m")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(r.t, cmd.Start())
	require.NoError(r.t, lab.Wait(ctx, 10*time.Millisecond, "the start mark", func() (bool, error) {
		_, err := os.Stat(filepath.Join(r.spool, "walship.start"))
		return err == nil, nil
	}))
	r.startSidecar(ctx, newPrimary)
	err := cmd.Wait()
	return out.String(), err
}

// follow makes the old primary, stopped by a switchover, a standby of the new one: a
// sibling rig named name beside it (a receiver with an empty spool, then the new
// primary's sidecar, allowed to switch over), walship standby rejoin, the start, and a
// replay up to the new primary's flush position. It returns the sibling.
func (r *rig) follow(ctx context.Context, name string, old, newPrimary *lab.Cluster) *rig {
	t := r.t
	t.Helper()
	next := r.sibling(name)
	next.primary = newPrimary
	next.sidecarArgs = []string{"--allow-switchover"}
	next.startReceiver(ctx)
	out, err := next.rejoin(ctx, old.Data, newPrimary)
	require.NoError(t, err, "walship standby rejoin:\n%s", out)
	t.Logf("%s: %s", name, strings.TrimSpace(out))
	require.Contains(t, out, "so it follows without a new base backup")
	require.NoError(t, old.Start(ctx))
	next.waitStreaming(ctx)
	require.NoError(t, newPrimary.Exec(ctx, "SELECT pg_switch_wal()"))
	flush := flushLSN(t, ctx, newPrimary)
	next.waitSpoolAt(ctx, flush)
	waitReplayed(t, ctx, old, flush-1)
	return next
}

// TestSwitchoverAndBack swaps the roles three times with load between the swaps. After
// each swap the old primary rejoins as a standby of the new one, fed by a receiver and
// an empty spool beside it, without a base backup: its data directory is never
// replaced. Every acknowledged commit is on the final primary, and the timeline goes
// up by one per swap.
func TestSwitchoverAndBack(t *testing.T) {
	ctx := testContext(t, 8*time.Minute)
	cur := streamingRig(t, ctx, 1, "--allow-switchover")
	primary := cur.primary
	standby := emptyStandby(t, cur)
	cur.initOK(ctx, standby.Data)
	adoptStandby(t, ctx, standby)
	before := map[string][2]uint64{primary.Data: inodes(t, primary.Data), standby.Data: inodes(t, standby.Data)}

	var acks []lab.Ack
	for swap := 1; swap <= 3; swap++ {
		load, err := lab.StartLoad(ctx, primary.DSN(), 2, 100)
		require.NoError(t, err)
		require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "100 commits", func() (bool, error) { return load.Count() >= 100, nil }))
		out, err := exec.CommandContext(ctx, walshipBin, "switchover", "--spool", cur.spool, "--dsn", standby.DSN()).CombinedOutput()
		_ = load.Stop() // its errors are expected: the server stopped
		require.NoError(t, err, "swap %d: walship switchover:\n%s", swap, out)
		t.Logf("swap %d: %s", swap, strings.TrimSpace(string(out)))
		require.Contains(t, string(out), "promoted: timeline "+strconv.Itoa(swap+1))
		require.Contains(t, string(out), `its control file says "shut down"`)
		acks = append(acks, load.Acks()...)

		// The old primary rejoins: a receiver with an empty spool beside it, the start
		// mark, then the new primary's sidecar.
		require.NoError(t, cur.sidecar.Stop(ctx))
		require.NoError(t, cur.receiver.Stop(ctx))
		next := cur.follow(ctx, "swap"+strconv.Itoa(swap), primary, standby)
		primary, standby, cur = standby, primary, next
	}
	tli := mustQuery(t, ctx, primary, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
	require.Equal(t, "00000004", tli, "three swaps, three new timelines")
	loss, err := lab.MeasureLoss(ctx, primary, acks, time.Now())
	require.NoError(t, err)
	require.Empty(t, loss.Lost, "%d of %d acknowledged commits lost", len(loss.Lost), len(acks))
	t.Logf("%d commits acknowledged over three swaps, none lost", len(acks))
	for dir, ino := range before {
		require.Equal(t, ino, inodes(t, dir), "%s was never replaced", dir)
	}
	// The last old primary follows too.
	require.Equal(t, "true", mustQuery(t, ctx, standby, "SELECT pg_is_in_recovery()::text"))
}

// TestRejoinRefusedAfterCrash: the primary's host is lost (the sidecar first, then the
// server, with commits between), the standby is promoted without them, and the old
// primary's WAL goes past the fork: rejoin refuses and changes nothing, and the remedy
// it names, standby init into the same directory, makes it a standby again.
func TestRejoinRefusedAfterCrash(t *testing.T) {
	ctx := testContext(t, 5*time.Minute)
	r := streamingRig(t, ctx, 1)
	old := r.primary
	sb := emptyStandby(t, r)
	r.initOK(ctx, sb.Data)
	adoptStandby(t, ctx, sb)

	createLoadTable(t, ctx, old)
	r.waitSpoolAt(ctx, flushLSN(t, ctx, old))
	r.sidecar.Kill()
	require.NoError(t, old.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT 9, 'never shipped' FROM generate_series(1, 500)"))
	require.NoError(t, old.Kill())
	out, err := exec.CommandContext(ctx, walshipBin, "promote", "--spool", r.spool, "--dsn", sb.DSN(), "--timeout", "90s").CombinedOutput()
	require.NoError(t, err, "walship promote:\n%s", out)
	require.Contains(t, string(out), "no end-of-WAL mark")
	require.NoError(t, r.receiver.Stop(ctx))

	next := r.sibling("rejoin")
	next.primary = sb
	next.startReceiver(ctx)
	autoBefore, err := os.ReadFile(filepath.Join(old.Data, "postgresql.auto.conf"))
	require.NoError(t, err)
	rejoinOut, err := next.rejoin(ctx, old.Data, sb)
	t.Logf("walship standby rejoin: %s", strings.TrimSpace(rejoinOut))
	require.Error(t, err)
	require.Equal(t, 1, err.(*exec.ExitError).ExitCode())
	require.Contains(t, rejoinOut, "the old primary's WAL goes past the fork")
	require.Contains(t, rejoinOut, "walship standby init into the same directory")
	require.Contains(t, rejoinOut, "pg_rewind")
	_, err = os.Stat(filepath.Join(old.Data, "standby.signal"))
	require.ErrorIs(t, err, os.ErrNotExist, "nothing was written")
	autoAfter, err := os.ReadFile(filepath.Join(old.Data, "postgresql.auto.conf"))
	require.NoError(t, err)
	require.Equal(t, string(autoBefore), string(autoAfter), "nothing was written")

	// The remedy: a refresh of the old primary's directory from the new primary.
	next.waitStreaming(ctx)
	out2, sent := next.initOK(ctx, old.Data)
	require.Contains(t, out2, "a refresh of the earlier copy")
	t.Logf("the refresh sent %d bytes", sent)
	// A refresh copies the new primary's configuration too: give it this host's port.
	require.NoError(t, old.Adopt())
	require.NoError(t, old.Configure(map[string]string{"archive_mode": "off", "wal_retrieve_retry_interval": "'100ms'"}))
	require.NoError(t, old.Start(ctx))
	require.NoError(t, sb.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) VALUES (-3, 'after the refresh')"))
	require.NoError(t, sb.Exec(ctx, "SELECT pg_switch_wal()"))
	flush := flushLSN(t, ctx, sb)
	next.waitSpoolAt(ctx, flush)
	waitReplayed(t, ctx, old, flush-1)
	require.Equal(t, "0", mustQuery(t, ctx, old, "SELECT count(*) FROM "+lab.LoadTable+" WHERE client = 9"), "the commits the new primary never had are gone")
	require.Equal(t, "1", mustQuery(t, ctx, old, "SELECT count(*) FROM "+lab.LoadTable+" WHERE client = -3"))
}
