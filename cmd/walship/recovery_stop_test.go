package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/tail/wal/waltest"
)

// recoveryDirs are directories as restore_command finds its working directory: a data
// directory in archive recovery (recovery.signal), one in standby mode
// (standby.signal), and one that is no data directory (a restore run by hand). Only
// the files restore looks at are there: PG_VERSION and the signal files; with no
// global/pg_control in the working directory the cluster check is skipped, as it is
// for a restore run by hand.
func recoveryDirs(t *testing.T) (archiveRecovery, standbyMode, byHand string) {
	t.Helper()
	mk := func(files ...string) string {
		d := t.TempDir()
		for _, f := range files {
			require.NoError(t, os.WriteFile(filepath.Join(d, f), []byte("15\n"), 0o600))
		}
		return d
	}
	return mk("PG_VERSION", "recovery.signal"), mk("PG_VERSION", "standby.signal"), mk()
}

// shapeSpool is a spool bound to a made-up cluster holding segments 1 and 2 of
// timeline 1, whole and valid (tail/wal/waltest), and the bytes of segment 3.
func shapeSpool(t *testing.T) (dir string, seg3 []byte) {
	t.Helper()
	st := wal.Stream{SysID: 7, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110}
	b := waltest.New(st, 1, 1)
	for b.Pos() < 3<<20+100000 {
		b.Record(waltest.RmHeap, 0, 3000)
	}
	b.Switch()
	dir = t.TempDir()
	require.NoError(t, spool.Bind(dir, spool.Identity{SysID: st.SysID, SegSize: st.SegSize, BlockSize: st.BlockSize, Magic: st.Magic, ServerVersion: 150000}))
	for no := uint64(1); no <= 2; no++ {
		require.NoError(t, os.WriteFile(spool.SegmentPath(dir, wal.Segment{TLI: 1, No: no}, st.SegSize), b.Segment(no), 0o600))
	}
	return dir, b.Segment(3)
}

// TestRestoreErrorsNeverEndRecovery: in archive recovery, and in standby mode once a
// promotion is under way, the server takes any exit status from 1 to 125 for the end
// of the WAL and promotes itself. There, every error of walship restore (an unreadable
// segment, a bad flag) exits 200, which stops the server; "not there" still exits 1.
// In standby mode before a promotion, and outside a data directory, errors exit 3 as
// before, and the server retries. Before this, every error exited 3: a segment made
// unreadable made a standby in archive recovery promote itself while its primary ran.
func TestRestoreErrorsNeverEndRecovery(t *testing.T) {
	ctx := testContext(t, time.Minute)
	archiveRec, standbyMode, byHand := recoveryDirs(t)
	dir, _ := shapeSpool(t)
	// Segment 2 is unreadable: a directory where the file should be (the tests run as
	// root, for whom chmod 000 hides nothing).
	bad := wal.Segment{TLI: 1, No: 2}.Name(1 << 20)
	require.NoError(t, os.Remove(filepath.Join(dir, bad)))
	require.NoError(t, os.Mkdir(filepath.Join(dir, bad), 0o700))
	triggered := copySpool(t, dir)
	require.NoError(t, os.Mkdir(filepath.Join(triggered, bad), 0o700))
	require.NoError(t, spool.WriteTrigger(triggered, spool.Trigger{TLI: 1, Segment: wal.Segment{TLI: 1, No: 3}.Name(1 << 20)}))

	for _, tc := range []struct {
		name, pgdata, spool string
		wait                bool
		code                int
		says                string
	}{
		{"archive recovery", archiveRec, dir, false, 200, "archive recovery"},
		{"archive recovery, waiting", archiveRec, dir, true, 200, "archive recovery"},
		{"standby mode", standbyMode, dir, false, 3, "is a directory"},
		{"standby mode, promoting", standbyMode, triggered, false, 200, "a promotion is under way"},
		{"by hand", byHand, dir, false, 3, "is a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			target := filepath.Join(t.TempDir(), "RECOVERYXLOG")
			args := []string{"restore", "--spool", tc.spool}
			if tc.wait {
				args = append(args, "--wait")
			}
			res := restoreIn(t, ctx, tc.pgdata, append(args, bad, target)...)
			require.Equal(t, tc.code, res.code, res.stderr)
			require.Contains(t, res.stderr, tc.says)
			require.Contains(t, res.stderr, bad, "the file is named")
			_, err := os.Stat(target)
			require.ErrorIs(t, err, os.ErrNotExist, "nothing reaches %%p")
		})
	}

	// "Not there" is the end of the WAL in archive recovery, as it must be.
	target := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	res := restoreIn(t, ctx, archiveRec, "restore", "--spool", dir, wal.Segment{TLI: 1, No: 9}.Name(1<<20), target)
	require.Equal(t, 1, res.code, res.stderr)

	// A usage error, run where PostgreSQL runs it (the data directory), flags unread.
	for _, tc := range []struct {
		cwd  string
		code int
	}{{archiveRec, 200}, {standbyMode, 2}, {byHand, 2}} {
		res := restoreIn(t, ctx, tc.cwd, "restore", "--spool", dir, "--no-such-flag", bad, target)
		require.Equal(t, tc.code, res.code, "in %s: %s", tc.cwd, res.stderr)
		require.Contains(t, res.stderr, "-no-such-flag")
	}
}

// restoreIn runs walship with args in the working directory dir, as PostgreSQL runs
// restore_command in its data directory.
func restoreIn(t *testing.T, ctx context.Context, dir string, args ...string) restoreRun {
	t.Helper()
	cmd := exec.CommandContext(ctx, walshipBin, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		require.NoError(t, err)
	}
	return restoreRun{code: cmd.ProcessState.ExitCode(), stderr: stderr.String()}
}

// lockedBuffer collects a process's output while it runs.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRestoreWaitsOutArchiveFailures: a waiting restore in archive recovery whose
// archive cannot be reached (nothing listens at its endpoint) keeps waiting, says why,
// and restores the segment once the spool publishes it. Before, it exited 3 at once,
// and the server promoted itself.
func TestRestoreWaitsOutArchiveFailures(t *testing.T) {
	ctx := testContext(t, time.Minute)
	archiveRec, _, _ := recoveryDirs(t)
	dir, seg3 := shapeSpool(t)
	port, err := lab.FreePort()
	require.NoError(t, err)
	name := wal.Segment{TLI: 1, No: 3}.Name(1 << 20)
	target := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	cmd := exec.CommandContext(ctx, walshipBin, "restore", "--wait", "--spool", dir,
		"--archive-url", "s3://walship/test", "--archive-endpoint", "http://127.0.0.1:"+strconv.Itoa(port), "--archive-path-style",
		name, target)
	cmd.Dir = archiveRec
	cmd.Env = append(os.Environ(), "AWS_ACCESS_KEY_ID=walship", "AWS_SECRET_ACCESS_KEY=walship-secret", "AWS_EC2_METADATA_DISABLED=true")
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // it may have exited already
		if err := <-done; err != nil {
			t.Logf("restore ended: %v", err) // killed, or exited as the test checked
		}
	})
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "restore to say the archive failed", func() (bool, error) {
		select {
		case err := <-done:
			done <- err
			return false, err
		default:
		}
		return strings.Contains(out.String(), "the archive failed"), nil
	}), "output: %s", out.String())
	require.NotContains(t, out.String(), "walship-secret")

	// The receiver publishes it: temporary name, then rename, as spool publishes do.
	tmp := filepath.Join(dir, ".tmp-"+name)
	require.NoError(t, os.WriteFile(tmp, seg3, 0o600))
	require.NoError(t, os.Rename(tmp, filepath.Join(dir, name)))
	select {
	case err := <-done:
		done <- err
		require.NoError(t, err, "output: %s", out.String())
	case <-ctx.Done():
		t.Fatalf("restore did not end once the segment was published: %s", out.String())
	}
	got, err := os.ReadFile(target)
	require.NoError(t, err)
	require.True(t, bytes.Equal(seg3, got), "the published segment reached %%p")
}

// TestArchiveRecoveryStopsOnError: a standby in archive recovery, fed by walship
// restore --wait, meets a segment it cannot read (a directory where the receiver would
// publish it). The server stops with walship's reason in its log instead of promoting
// itself while its primary runs; once the spool is put right and the server started
// again, it goes on in recovery. Before, restore exited 3 and the standby promoted
// itself (reproduced with a segment made unreadable by chmod 000).
func TestArchiveRecoveryStopsOnError(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	sb := r.standby(ctx, true)
	require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g"))
	// The receiver stopped, the segment in progress cannot be published; the waiting
	// restore looks for it every 50 ms and finds a directory.
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))
	require.NoError(t, r.receiver.Stop(ctx))
	_, c := spoolPosition(t, r.spool)
	p, ok := c.Partials[1]
	require.True(t, ok, "the spool has a segment in progress")
	next := filepath.Join(r.spool, p.Seg.Name(1<<20))
	require.NoError(t, os.Mkdir(next, 0o700))

	require.NoError(t, lab.Wait(ctx, 50*time.Millisecond, "the standby's server to stop", func() (bool, error) {
		pid, err := sb.PostmasterPID()
		return err != nil || syscall.Kill(pid, 0) != nil, nil
	}), "standby log:\n%s", sb.Log())
	log := sb.Log()
	require.Contains(t, log, "exit code 200", "the server says restore_command failed fatally")
	require.Contains(t, log, "archive recovery", "walship's reason is in the server's log")
	require.NotContains(t, log, "selected new timeline ID", "the standby did not promote itself")
	ctl, err := wal.ReadControl(sb.Data)
	require.NoError(t, err)
	require.Equal(t, uint32(1), ctl.TLI, "still on the primary's timeline")

	// Put right, it goes on in recovery and replays what the primary wrote.
	require.NoError(t, os.Remove(next))
	r.startReceiver(ctx)
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))
	require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))
	require.NoError(t, sb.Start(ctx))
	require.NoError(t, lab.Wait(ctx, 50*time.Millisecond, "the restarted standby to replay the table", func() (bool, error) {
		n, err := sb.QueryString(ctx, "SELECT count(*) FROM t")
		return err == nil && n == "1000", nil
	}), "standby log:\n%s", sb.Log())
	require.Equal(t, "true", mustQuery(t, ctx, sb, "SELECT pg_is_in_recovery()::text"), "still a standby")
}

// TestCleanupKeepsWhatConsumersNeed: restore --cleanup removes a published segment
// older than %r only once the receiver's archive uploader has taken it (every segment
// through ArchiveState.Through, none the archive refused) and each relay's receiver
// has it (RelayHolds). Before, it removed every segment older than %r: the uploader
// then skipped what was gone, leaving a gap in the archive for good, and a relay whose
// receiver was behind failed for ever.
func TestCleanupKeepsWhatConsumersNeed(t *testing.T) {
	ctx := testContext(t, time.Minute)
	_, standbyMode, _ := recoveryDirs(t)
	name := func(no uint64) string { return wal.Segment{TLI: 1, No: no}.Name(1 << 20) }
	st := wal.Stream{SysID: 7, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110}
	b := waltest.New(st, 1, 1)
	for b.Pos() < 6<<20+100000 {
		b.Record(waltest.RmHeap, 0, 3000)
	}
	b.Switch()
	setup := func() string {
		dir := t.TempDir()
		require.NoError(t, spool.Bind(dir, spool.Identity{SysID: st.SysID, SegSize: st.SegSize, BlockSize: st.BlockSize, Magic: st.Magic, ServerVersion: 150000}))
		for no := uint64(1); no <= 6; no++ {
			require.NoError(t, os.WriteFile(filepath.Join(dir, name(no)), b.Segment(no), 0o600))
		}
		return dir
	}
	left := func(dir string) []string {
		var out []string
		for no := uint64(1); no <= 6; no++ {
			if _, err := os.Stat(filepath.Join(dir, name(no))); err == nil {
				out = append(out, name(no))
			}
		}
		return out
	}
	cleanup := func(dir string) {
		target := filepath.Join(t.TempDir(), "RECOVERYXLOG")
		res := restoreIn(t, ctx, standbyMode, "restore", "--cleanup", "--spool", dir, name(6), target, name(6))
		require.Equal(t, 0, res.code, res.stderr)
	}

	// No consumer: everything before %r goes.
	dir := setup()
	cleanup(dir)
	require.Equal(t, []string{name(6)}, left(dir))

	// The uploader has taken segments 1 to 3, and the archive refused 2.
	dir = setup()
	require.NoError(t, spool.WriteArchiveState(dir, spool.ArchiveState{URL: "s3://b/p", Through: name(3), Refused: []string{name(2)}}))
	cleanup(dir)
	require.Equal(t, []string{name(2), name(4), name(5), name(6)}, left(dir))

	// An uploader that has taken nothing yet holds everything.
	dir = setup()
	require.NoError(t, spool.WriteArchiveState(dir, spool.ArchiveState{URL: "s3://b/p"}))
	cleanup(dir)
	require.Len(t, left(dir), 6)

	// Two relays: one whose receiver needs segment 4 on, one not heard from yet.
	dir = setup()
	require.NoError(t, spool.WriteRelayHolds(dir, spool.RelayHolds{Needs: map[string]string{"a:1": name(4)}}))
	cleanup(dir)
	require.Equal(t, []string{name(4), name(5), name(6)}, left(dir))
	require.NoError(t, spool.WriteRelayHolds(dir, spool.RelayHolds{Needs: map[string]string{"a:1": name(5), "b:1": ""}}))
	cleanup(dir)
	require.Equal(t, []string{name(4), name(5), name(6)}, left(dir))

	// A record that cannot be read keeps everything.
	dir = setup()
	require.NoError(t, os.WriteFile(filepath.Join(dir, spool.RelaysFile), []byte("{"), 0o600))
	cleanup(dir)
	require.Len(t, left(dir), 6)
}
