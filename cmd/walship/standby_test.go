package main

import (
	"context"
	"crypto/sha256"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

// standbyInit runs walship standby init into dir, with args added, and returns its
// output and error.
func (r *rig) standbyInit(ctx context.Context, dir string, args ...string) (string, error) {
	args = append([]string{"standby", "init", "--spool", r.spool, "--pgdata", dir, "--wait-wal", "2m"}, args...)
	out, err := exec.CommandContext(ctx, walshipBin, args...).CombinedOutput()
	return string(out), err
}

func mustQuery(t *testing.T, ctx context.Context, c *lab.Cluster, q string) string {
	t.Helper()
	s, err := c.QueryString(ctx, q)
	require.NoError(t, err, q)
	return s
}

// initOK runs walship standby init into dir, requires success, and returns the bytes
// the sidecar sent.
func (r *rig) initOK(ctx context.Context, dir string) (string, int64) {
	r.t.Helper()
	out, err := r.standbyInit(ctx, dir)
	require.NoError(r.t, err, "walship standby init:\n%s", out)
	r.t.Logf("walship standby init: %s", strings.TrimSpace(out))
	sent := lastField(r.sidecar.Log(), "sent_bytes=")
	n, err := strconv.ParseInt(sent, 10, 64)
	require.NoError(r.t, err, "the sidecar logs the bytes it sent")
	return out, n
}

// adoptStandby makes the copy in sb.Data a standby beside the primary on this host (its
// own port and socket directory) and starts it.
func adoptStandby(t *testing.T, ctx context.Context, sb *lab.Cluster) {
	t.Helper()
	require.NoError(t, sb.Adopt())
	require.NoError(t, sb.Configure(map[string]string{"archive_mode": "off", "wal_retrieve_retry_interval": "'100ms'"}))
	require.NoError(t, sb.Start(ctx))
}

// waitReplayed waits until the standby sb has replayed the WAL up to lsn.
func waitReplayed(t *testing.T, ctx context.Context, sb *lab.Cluster, lsn wal.LSN) {
	t.Helper()
	require.NoError(t, lab.Wait(ctx, 50*time.Millisecond, "standby replayed to "+lsn.String(), func() (bool, error) {
		s, err := sb.QueryString(ctx, "SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')::text")
		if err != nil {
			return false, nil // still starting
		}
		got, err := wal.ParseLSN(s)
		return got >= lsn, err
	}))
}

// emptyStandby is a cluster directory beside the primary with an empty data directory
// owned by the server's user, removed with the test.
func emptyStandby(t *testing.T, r *rig) *lab.Cluster {
	t.Helper()
	sb, err := r.primary.Empty()
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- standby log:\n%s", lastBytes(sb.Log(), 6000))
		}
		assert.NoError(t, sb.Close(), "stop the standby and remove its files")
	})
	require.NoError(t, os.Mkdir(sb.Data, 0o700))
	require.NoError(t, sb.Own(sb.Data))
	return sb
}

// tree maps every file under dir to a digest of its content (a link to its target).
func tree(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	m := map[string][32]byte{}
	require.NoError(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		var b []byte
		if d.Type()&fs.ModeSymlink != 0 {
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			b = []byte("link " + target)
		} else if b, err = os.ReadFile(p); err != nil {
			return err
		}
		m[rel] = sha256.Sum256(b)
		return nil
	}))
	return m
}

// TestStandbyInit makes a standby with walship standby init while the primary is
// under load, starts it, then crashes the primary and promotes the standby: nothing
// acknowledged is lost.
func TestStandbyInit(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	r := streamingRig(t, ctx, 1)
	// A tablespace, which the standby gets in a place of its own.
	primaryTS, standbyTS := filepath.Join(r.dir, "ts-primary"), filepath.Join(r.dir, "ts-standby")
	require.NoError(t, os.Mkdir(primaryTS, 0o700))
	require.NoError(t, r.primary.Own(primaryTS))
	require.NoError(t, r.primary.Exec(ctx, "CREATE TABLESPACE walship_ts LOCATION '"+primaryTS+"'"))
	require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE walship_in_ts TABLESPACE walship_ts AS SELECT generate_series(1, 5000) AS n"))
	load, err := lab.StartLoad(ctx, r.primary.DSN(), 2, 200)
	require.NoError(t, err)
	sb := emptyStandby(t, r)
	out, err := r.standbyInit(ctx, sb.Data, "--tablespace-mapping", primaryTS+"="+standbyTS)
	require.NoError(t, err, "walship standby init:\n%s", out)
	t.Logf("walship standby init: %s", strings.TrimSpace(out))
	require.NoError(t, load.Stop())
	require.Contains(t, out, "a fresh copy")
	require.Contains(t, out, "restore_command")
	link, err := os.Readlink(filepath.Join(sb.Data, "pg_tblspc", mustQuery(t, ctx, r.primary, "SELECT oid FROM pg_tablespace WHERE spcname = 'walship_ts'")))
	require.NoError(t, err)
	require.Equal(t, standbyTS, link)
	ents, err := os.ReadDir(standbyTS)
	require.NoError(t, err)
	require.Len(t, ents, 1, "the tablespace's version directory")

	auto, err := os.ReadFile(filepath.Join(sb.Data, "postgresql.auto.conf"))
	require.NoError(t, err)
	require.Contains(t, string(auto), "restore_command = '"+walshipBin+" restore --spool "+r.spool+" %f %p %r'")
	for _, name := range []string{"standby.signal", "backup_label", "PG_VERSION", "global/pg_control"} {
		_, err := os.Stat(filepath.Join(sb.Data, name))
		require.NoError(t, err, name)
	}
	for _, name := range []string{"postmaster.pid", "recovery.signal"} {
		_, err := os.Stat(filepath.Join(sb.Data, name))
		require.ErrorIs(t, err, fs.ErrNotExist, name)
	}
	_, err = os.Stat(sb.Data + ".walship-new")
	require.ErrorIs(t, err, fs.ErrNotExist, "the copy was built beside the data directory and moved into its place")
	st, err := os.Stat(sb.Data)
	require.NoError(t, err)
	require.Equal(t, fs.FileMode(0o700), st.Mode().Perm())

	adoptStandby(t, ctx, sb)
	require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
	flush := flushLSN(t, ctx, r.primary)
	r.waitSpoolAt(ctx, flush)
	waitReplayed(t, ctx, sb, flush-1)
	acked := load.Count()
	got, err := sb.QueryString(ctx, "SELECT count(*) FROM "+lab.LoadTable)
	require.NoError(t, err)
	n, _ := strconv.Atoi(got)
	require.GreaterOrEqual(t, n, acked, "every commit acknowledged during the copy is on the standby")
	require.Equal(t, "12502500", mustQuery(t, ctx, sb, "SELECT sum(n) FROM walship_in_ts"))

	lost, _ := crashAndPromote(t, ctx, r, sb, []string{"--dsn", sb.DSN()}, crash{})
	require.Zero(t, lost)
}

// TestStandbyInitRefresh runs standby init again into a directory holding an earlier
// copy: it sends less than a fresh copy and the result is a fresh copy's, which starts
// and has the primary's data.
func TestStandbyInitRefresh(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	r := streamingRig(t, ctx, 1)
	// Nothing but the test changes the primary's files between the copies compared.
	require.NoError(t, r.primary.Exec(ctx, "ALTER SYSTEM SET autovacuum = off"))
	require.NoError(t, r.primary.Exec(ctx, "SELECT pg_reload_conf()"))
	createLoadTable(t, ctx, r.primary)
	require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT 1, repeat('x', 500) FROM generate_series(1, 20000)"))

	sb := emptyStandby(t, r)
	_, first := r.initOK(ctx, sb.Data)
	before, err := os.Stat(sb.Data)
	require.NoError(t, err)

	require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT 2, 'changed' FROM generate_series(1, 2000)"))
	require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE walship_new_table AS SELECT generate_series(1, 1000) AS n"))
	out, second := r.initOK(ctx, sb.Data)
	require.Contains(t, out, "a refresh of the earlier copy")
	t.Logf("bytes sent: %d for the first copy, %d for the refresh", first, second)
	require.Less(t, second, first/2, "a refresh sends what changed")
	after, err := os.Stat(sb.Data)
	require.NoError(t, err)
	require.False(t, os.SameFile(before, after), "the refreshed copy took the directory's place whole")

	fresh := emptyStandby(t, r)
	_, third := r.initOK(ctx, fresh.Data)
	require.Greater(t, third, second)
	a, b := tree(t, sb.Data), tree(t, fresh.Data)
	for name := range b {
		_, ok := a[name]
		require.True(t, ok, "the refreshed copy lacks %s", name)
	}
	for name, sum := range a {
		other, ok := b[name]
		require.True(t, ok, "the refreshed copy has %s, which a fresh copy has not", name)
		switch name {
		case "backup_label", "global/pg_control":
			continue // each backup's own
		}
		require.Equal(t, other, sum, "%s differs from a fresh copy's", name)
	}

	adoptStandby(t, ctx, sb)
	require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
	flush := flushLSN(t, ctx, r.primary)
	r.waitSpoolAt(ctx, flush)
	waitReplayed(t, ctx, sb, flush-1)
	for _, q := range []string{"SELECT count(*) FROM " + lab.LoadTable, "SELECT sum(n) FROM walship_new_table"} {
		want, err := r.primary.QueryString(ctx, q)
		require.NoError(t, err)
		got, err := sb.QueryString(ctx, q)
		require.NoError(t, err)
		require.Equal(t, want, got, q)
	}
}

// TestStandbyInitRefusals: a running server's directory, another cluster's, and a
// directory that is no cluster are refused, each with its reason, and left as they were.
func TestStandbyInitRefusals(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)

	other, err := lab.NewCluster(ctx, lab.Options{SegSizeMB: 1})
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, other.Close(), "remove the other cluster's files") })
	stuff := filepath.Join(r.dir, "stuff")
	require.NoError(t, os.Mkdir(stuff, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(stuff, "notes.txt"), []byte("mine"), 0o600))

	for _, c := range []struct {
		name, dir, want string
	}{
		{"another cluster", other.Data, "holds cluster"},
		{"not a cluster", stuff, "neither empty nor a PostgreSQL data directory"},
	} {
		before := tree(t, c.dir)
		out, err := r.standbyInit(ctx, c.dir)
		require.Error(t, err, c.name)
		require.Equal(t, 1, err.(*exec.ExitError).ExitCode(), c.name)
		require.Contains(t, out, c.want, c.name)
		require.Equal(t, before, tree(t, c.dir), "%s: changed", c.name)
		_, err = os.Stat(c.dir + ".walship-new")
		require.ErrorIs(t, err, fs.ErrNotExist, c.name)
	}

	// A running server: the rig's own primary.
	out, err := r.standbyInit(ctx, r.primary.Data)
	require.Error(t, err)
	require.Contains(t, out, "a server is running in")
	pid, err := r.primary.PostmasterPID()
	require.NoError(t, err)
	require.NoError(t, syscall.Kill(pid, 0), "the primary still runs")
	_, err = os.Stat(r.primary.Data + ".walship-new")
	require.ErrorIs(t, err, fs.ErrNotExist)
	_, err = os.Stat(filepath.Join(r.primary.Data, "standby.signal"))
	require.ErrorIs(t, err, fs.ErrNotExist, "nothing was written into the running server's directory")

	// Without a receiver on the spool.
	require.NoError(t, r.receiver.Stop(ctx))
	dir := emptyStandby(t, r).Data
	out, err = r.standbyInit(ctx, dir)
	require.Error(t, err)
	require.Contains(t, out, "no receiver is running on spool")
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Empty(t, ents)

	// As root, into a directory that root owns: the server could not start from it.
	if os.Geteuid() == 0 {
		out, err = r.standbyInit(ctx, filepath.Join(r.dir, "rootowned"))
		require.Error(t, err)
		require.Contains(t, out, "PostgreSQL does not start as root")
		require.NoDirExists(t, filepath.Join(r.dir, "rootowned"))
	}
}

// TestStandbyInitPointInTime recovers a copy made by standby init to a point in time
// from the spool: the commits before it are there, the ones after are not.
func TestStandbyInitPointInTime(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	createLoadTable(t, ctx, r.primary)
	sb := emptyStandby(t, r)
	r.initOK(ctx, sb.Data)

	require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT 1, 'before' FROM generate_series(1, 1000)"))
	// A commit's time is taken before it returns: the next statement starts later.
	target := mustQuery(t, ctx, r.primary, "SELECT clock_timestamp()::text")
	require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT 2, 'after' FROM generate_series(1, 1000)"))
	require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))

	require.NoError(t, os.Remove(filepath.Join(sb.Data, "standby.signal")))
	require.NoError(t, sb.WriteFile("recovery.signal", nil))
	require.NoError(t, sb.Adopt())
	require.NoError(t, sb.Configure(map[string]string{"archive_mode": "off",
		"recovery_target_time": "'" + target + "'", "recovery_target_action": "'promote'"}))
	require.NoError(t, sb.Start(ctx))
	require.NoError(t, lab.Wait(ctx, 50*time.Millisecond, "recovery to "+target+" to end", func() (bool, error) {
		s, err := sb.QueryString(ctx, "SELECT pg_is_in_recovery()::text")
		return err == nil && s == "false", nil
	}))
	require.Equal(t, "1000", mustQuery(t, ctx, sb, "SELECT count(*) FROM "+lab.LoadTable+" WHERE client = 1"))
	require.Equal(t, "0", mustQuery(t, ctx, sb, "SELECT count(*) FROM "+lab.LoadTable+" WHERE client = 2"))
	require.Contains(t, sb.Log(), "recovery stopping before commit")
}

// TestStandbyInitFlags: usage errors say what is wrong, with exit status 2, and make
// nothing.
func TestStandbyInitFlags(t *testing.T) {
	dir := t.TempDir()
	pgdata := filepath.Join(dir, "pgdata")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"standby"}, "want 'walship standby init' or 'walship standby rejoin'"},
		{[]string{"standby", "create"}, "want 'walship standby init' or 'walship standby rejoin'"},
		{[]string{"standby", "rejoin", "--pgdata", pgdata}, "--spool is required"},
		{[]string{"standby", "rejoin", "--spool", dir}, "--pgdata is required"},
		{[]string{"standby", "init", "--pgdata", pgdata}, "--spool is required"},
		{[]string{"standby", "init", "--spool", dir}, "--pgdata is required"},
		{[]string{"standby", "init", "--spool", dir, "--pgdata", pgdata, "--tablespace-mapping", "/a"}, "want OLDDIR=NEWDIR, both absolute"},
		{[]string{"standby", "init", "--spool", dir, "--pgdata", pgdata, "--tablespace-mapping", "a=/b"}, "want OLDDIR=NEWDIR, both absolute"},
		{[]string{"standby", "init", "--spool", dir, "--pgdata", pgdata, "--wait-wal", "0s"}, "--wait-wal 0s: want a positive duration"},
	} {
		out, err := exec.Command(walshipBin, c.args...).CombinedOutput()
		var exit *exec.ExitError
		require.ErrorAs(t, err, &exit, "%v: %s", c.args, out)
		require.Equal(t, 2, exit.ExitCode(), "%v: %s", c.args, out)
		require.Contains(t, string(out), c.want, c.args)
		require.NoDirExists(t, pgdata)
	}
	// A spool that has taken no WAL: nothing to copy from yet.
	out, err := exec.Command(walshipBin, "standby", "init", "--spool", dir, "--pgdata", pgdata).CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "has taken no WAL yet")
	require.NoDirExists(t, pgdata)
	out = []byte(runOK(t, "standby", "init", "--help"))
	require.Contains(t, string(out), "-tablespace-mapping value")
}

// TestStandbyInitSessionLost: a base backup is tied to the sidecar's session, on the
// primary's own connection (the non-exclusive backup API ends with it). The sidecar
// killed in the middle of one, standby init fails and says why, the directory is left
// as it was (empty here), and run again once the sidecar is back it makes the copy:
// nothing is lost by a backup that does not survive its session, it is taken again.
// (What ended sessions during backups in CI, a switch record split across pages at the
// switch pg_backup_start forces, no longer does: TestSwitchPlacements.)
func TestStandbyInitSessionLost(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	createLoadTable(t, ctx, r.primary)
	// Enough to copy that the kill lands in the middle: tens of MB at a few MB/s here.
	require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT 1, repeat(md5(g::text), 30) FROM generate_series(1, 60000) g"))
	sb := emptyStandby(t, r)
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := r.standbyInit(ctx, sb.Data)
		done <- result{out, err}
	}()
	require.NoError(t, r.sidecar.WaitLog(ctx, "base backup"), "the backup starts")
	r.sidecar.Kill()
	res := <-done
	require.Error(t, res.err, "standby init must fail when the session ends: %s", res.out)
	t.Logf("standby init, the sidecar killed: %s", strings.TrimSpace(res.out))
	ents, err := os.ReadDir(sb.Data)
	require.NoError(t, err)
	require.Empty(t, ents, "the directory is left as it was")

	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	r.initOK(ctx, sb.Data)
	adoptStandby(t, ctx, sb)
	require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
	flush := flushLSN(t, ctx, r.primary)
	r.waitSpoolAt(ctx, flush)
	waitReplayed(t, ctx, sb, flush-1)
	want := mustQuery(t, ctx, r.primary, "SELECT count(*) FROM "+lab.LoadTable)
	require.Equal(t, want, mustQuery(t, ctx, sb, "SELECT count(*) FROM "+lab.LoadTable))
}
