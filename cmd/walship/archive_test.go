package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/feeder/standby"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// archivedSegments returns the segments of the bucket's prefix, by name.
func archivedSegments(t *testing.T, s3 *lab.S3, prefix string) map[string][]byte {
	t.Helper()
	ents, err := os.ReadDir(s3.ObjectPath(prefix))
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	out := map[string][]byte{}
	for _, e := range ents {
		if _, err := wal.ParseSegmentName(e.Name(), 1<<20); err != nil || !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s3.ObjectPath(prefix), e.Name()))
		require.NoError(t, err)
		out[e.Name()] = b
	}
	return out
}

// archiveRig is a streaming rig with the load table whose receiver uploads to a real
// S3-compatible server, which the AWS SDK's standard chain points at; url is the
// archive's. The receiver gets receiverArgs besides the archive's.
func archiveRig(t *testing.T, ctx context.Context, receiverArgs ...string) (r *rig, s3 *lab.S3, url string) {
	t.Helper()
	r = newRig(t, ctx, 1)
	s3, err := lab.StartS3(ctx, r.dir, "walship")
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(r.dir, "versitygw.log"))
			t.Logf("--- versitygw.log:\n%s", lastBytes(string(b), 3000))
		}
		s3.Kill()
	})
	for _, kv := range s3.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	url = s3.URL("db1")
	r.receiverArgs = append([]string{"--archive-url", url, "--archive-path-style"}, receiverArgs...)
	r.startReceiver(ctx)
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	createLoadTable(t, ctx, r.primary)
	return r, s3, url
}

// waitArchived waits until the bucket holds every segment the spool has published,
// each byte-identical to the primary's archived copy, and returns the bucket's
// segments and the names of those published.
func waitArchived(t *testing.T, ctx context.Context, r *rig, s3 *lab.S3, what string) (objs map[string][]byte, published []string) {
	t.Helper()
	require.NoError(t, lab.Wait(ctx, 50*time.Millisecond, what, func() (bool, error) {
		_, c := spoolPosition(t, r.spool)
		objs, published = archivedSegments(t, s3, "db1"), published[:0]
		for _, seg := range c.Segments {
			if _, ok := objs[seg.Name(1<<20)]; !ok {
				return false, nil
			}
			published = append(published, seg.Name(1<<20))
		}
		// The primary's archive_command, which the bucket is compared with, may copy a
		// segment after the receiver has uploaded it.
		for name := range objs {
			if _, err := os.Stat(filepath.Join(r.archive, name)); err != nil {
				return false, nil
			}
		}
		return len(published) > 0, nil
	}))
	for name, b := range objs {
		want, err := os.ReadFile(filepath.Join(r.archive, name))
		require.NoError(t, err, "the primary archived %s", name)
		require.True(t, bytes.Equal(want, b), "%s in the bucket differs from the primary's", name)
	}
	return objs, published
}

// waitAlertLine waits until file holds an alert with the given prefix
// ("condition|level|message") and returns it.
func waitAlertLine(t *testing.T, ctx context.Context, file, prefix string) string {
	t.Helper()
	var line string
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "alert "+prefix, func() (bool, error) {
		for _, l := range alertLines(t, file) {
			if strings.HasPrefix(l, prefix) {
				line = l
				return true, nil
			}
		}
		return false, nil
	}))
	return line
}

// waitArchiveState waits until walship status shows the uploads' state meeting cond.
func waitArchiveState(t *testing.T, ctx context.Context, r *rig, what string, cond func(a *spool.ArchiveState) bool) *spool.ArchiveState {
	t.Helper()
	var a *spool.ArchiveState
	require.NoError(t, lab.Wait(ctx, 50*time.Millisecond, "walship status to show "+what, func() (bool, error) {
		a = status(t, "--spool", r.spool).Archive
		return a != nil && cond(a), nil
	}), "%+v", a)
	return a
}

// TestArchiveUpload: the receiver uploads every published segment to a real
// S3-compatible server, byte-identical to what the primary's archive_command archived;
// the server killed and started again loses nothing; an object with other bytes is
// refused and stays; restore fetches what the spool lacks, and refuses a damaged one.
// walship status, walship check and the alert command tell each of these states.
func TestArchiveUpload(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	alerts := filepath.Join(t.TempDir(), "alerts")
	r, s3, url := archiveRig(t, ctx, "--alert-command", recordingCommand(alerts, 0), "--alert-after", "300ms")
	fillSegments(t, ctx, r.primary, 3)
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))
	first, published := waitArchived(t, ctx, r, s3, "the bucket to hold the published segments")
	a := waitArchiveState(t, ctx, r, "nothing pending", func(a *spool.ArchiveState) bool { return a.Pending == 0 && a.Newest != "" })
	require.Equal(t, url, a.URL)
	require.GreaterOrEqual(t, a.Newest, published[len(published)-1], "%+v", a)
	require.GreaterOrEqual(t, a.Through, published[len(published)-1], "every segment uploaded: cleanup may remove them (%+v)", a)
	require.Empty(t, a.FailingSince)
	rc, line := check(t, "--spool", r.spool, "--free-warn", "0", "--free-crit", "0")
	require.Equal(t, 0, rc, line)
	require.Contains(t, line, " archive_pending_files=0;;;0")

	// The server killed under load and started again: nothing lost, nothing differs.
	s3.Kill()
	fillSegments(t, ctx, r.primary, 3)
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))
	require.NoError(t, r.receiver.WaitLog(ctx, "archive: upload failed"))
	a = waitArchiveState(t, ctx, r, "uploads failing", func(a *spool.ArchiveState) bool { return a.FailingSince != "" })
	require.Contains(t, a.LastError, "connect")
	require.Positive(t, a.Pending)
	_, c := spoolPosition(t, r.spool)
	newest := c.Segments[len(c.Segments)-1].Name(1 << 20)
	require.Less(t, a.Through, newest, "cleanup keeps the segments not uploaded (%+v)", a)
	require.NotEmpty(t, spool.Held(r.spool, newest))
	line = waitAlertLine(t, ctx, alerts, "archive|critical|")
	require.Contains(t, line, "uploads to the archive "+url+" have failed for ")
	rc, line = check(t, "--spool", r.spool, "--free-warn", "0", "--free-crit", "0", "--archive-failing-crit", "1ns")
	require.Equal(t, 2, rc, line)
	require.Contains(t, line, "uploads to the archive have failed for ")
	require.NoError(t, s3.Start(ctx))
	second, _ := waitArchived(t, ctx, r, s3, "the bucket to catch up after the server's restart")
	require.Greater(t, len(second), len(first))
	waitAlertLine(t, ctx, alerts, "archive|ok|uploads to the archive "+url+" succeed")
	waitArchiveState(t, ctx, r, "uploads succeeding again", func(a *spool.ArchiveState) bool { return a.FailingSince == "" && a.Pending == 0 })

	// An object with other bytes under the name of the segment being written: the
	// receiver refuses to overwrite it, and it stays.
	pos, _ := spoolPosition(t, r.spool)
	cur, _ := wal.SegmentOf(pos.TLI, pos.LSN, 1<<20)
	next := cur.Name(1 << 20)
	bogus := bytes.Repeat([]byte("not WAL "), 1<<17)
	require.NoError(t, os.WriteFile(s3.ObjectPath("db1/"+next), bogus, 0o644))
	fillSegments(t, ctx, r.primary, 1)
	require.NoError(t, r.receiver.WaitLog(ctx, "archive: refused to overwrite an object that holds other bytes"))
	b, err := os.ReadFile(s3.ObjectPath("db1/" + next))
	require.NoError(t, err)
	require.Equal(t, bogus, b, "the object stays as it was")
	m, err := lab.Metrics(r.recvMetrics)
	require.NoError(t, err)
	require.Positive(t, m["walship_archive_uploaded_files_total"])
	require.Positive(t, m["walship_archive_failures_total"])
	require.EqualValues(t, 1, m["walship_archive_refused_files"])
	a = waitArchiveState(t, ctx, r, "the refused segment", func(a *spool.ArchiveState) bool { return len(a.Refused) > 0 })
	require.Equal(t, []string{next}, a.Refused)
	line = waitAlertLine(t, ctx, alerts, "archive conflict|critical|")
	require.Contains(t, line, "holds other bytes than the spool under 1 name(s), "+next+" the last")
	rc, line = check(t, "--spool", r.spool, "--free-warn", "0", "--free-crit", "0")
	require.Equal(t, 2, rc, line)
	require.Contains(t, line, "the archive holds other bytes than the spool for 1 file(s), "+next)
	require.Contains(t, runOK(t, "status", "--spool", r.spool), "1 refused for holding other bytes: "+next)

	// Restore from the archive what the spool lacks, checked; a damaged object is refused.
	var name string
	for n := range first {
		name = n
		break
	}
	lacking := copySpool(t, r.spool)
	require.NoError(t, os.Remove(filepath.Join(lacking, name)))
	out := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	restore := func() ([]byte, error) {
		return exec.CommandContext(ctx, walshipBin, "restore", "--spool", lacking, "--archive-url", url, "--archive-path-style", "--pgdata", r.primary.Data, name, out).CombinedOutput()
	}
	log, err := restore()
	require.NoError(t, err, "%s", log)
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	require.Equal(t, first[name], got)
	require.Contains(t, string(log), "restored from the archive")
	require.NoError(t, os.Remove(out))

	path := s3.ObjectPath("db1/" + name)
	damaged := append([]byte(nil), first[name]...)
	damaged[5000] ^= 0xff
	require.NoError(t, os.WriteFile(path, damaged, 0o644))
	log, err = restore()
	require.Error(t, err)
	require.Equal(t, 3, err.(*exec.ExitError).ExitCode(), "%s", log)
	require.Contains(t, strings.ToLower(string(log)), "checksum")
	_, err = os.Stat(out)
	require.True(t, os.IsNotExist(err), "nothing reaches %%p")

	// --cleanup with an archive removes only what the archive holds: next stays, for
	// the archive holds other bytes under its name.
	nextSeg, err := wal.ParseSegmentName(next, 1<<20)
	require.NoError(t, err)
	after := wal.Segment{TLI: 1, No: nextSeg.No + 1}.Name(1 << 20)
	_, c = spoolPosition(t, lacking)
	log, err = exec.CommandContext(ctx, walshipBin, "restore", "--cleanup", "--spool", lacking, "--archive-url", url, "--archive-path-style", "--pgdata", r.primary.Data,
		c.Segments[0].Name(1<<20), filepath.Join(t.TempDir(), "RECOVERYXLOG"), after).CombinedOutput()
	require.NoError(t, err, "%s", log)
	_, c = spoolPosition(t, lacking)
	var keptNames []string
	for _, seg := range c.Segments {
		if seg.No < nextSeg.No+1 {
			keptNames = append(keptNames, seg.Name(1<<20))
		}
	}
	require.Equal(t, []string{next}, keptNames, "only the segment the archive does not hold stays")

	// A segment neither holds: not available (1).
	lsn := flushLSN(t, ctx, r.primary)
	ahead, _ := wal.SegmentOf(1, lsn+64<<20, 1<<20)
	later := ahead.Name(1 << 20)
	_, err = exec.CommandContext(ctx, walshipBin, "restore", "--spool", lacking, "--archive-url", url, "--archive-path-style", "--pgdata", r.primary.Data, later, out).CombinedOutput()
	require.Error(t, err)
	require.Equal(t, 1, err.(*exec.ExitError).ExitCode())

	// verify: the damaged object and the one that is not WAL, each on a line of its
	// own; then a gap.
	archiveCmd := func(args ...string) (string, int) {
		out, err := exec.CommandContext(ctx, walshipBin, append(append([]string{"archive"}, args...), "--archive-url", url, "--archive-path-style")...).CombinedOutput()
		if err != nil {
			var ee *exec.ExitError
			require.ErrorAs(t, err, &ee, "%s", out)
			return string(out), ee.ExitCode()
		}
		return string(out), 0
	}
	report, rc := archiveCmd("verify")
	require.Equal(t, 1, rc, report)
	require.Regexp(t, "(?mi)^"+name+": .*checksum", report)
	require.Regexp(t, "(?m)^"+next+": ", report)
	require.Contains(t, report, "2 problems")
	require.NoError(t, os.WriteFile(path, first[name], 0o644)) // repaired: its bytes again
	segs := archivedSegments(t, s3, "db1")
	var names []string
	for n := range segs {
		names = append(names, n)
	}
	sort.Strings(names)
	require.GreaterOrEqual(t, len(names), 5)
	require.NoError(t, os.Remove(s3.ObjectPath("db1/"+names[2])))
	report, rc = archiveCmd("verify")
	require.Equal(t, 1, rc, report)
	require.Contains(t, report, "gap on timeline 1: 1 segments missing after "+names[1]+", before "+names[3])

	// expire: a dry run removes nothing; --before removes the older segments only.
	report, rc = archiveCmd("expire", "--before", names[3], "--dry-run")
	require.Equal(t, 0, rc, report)
	require.Contains(t, report, "would remove "+names[0]+"\nwould remove "+names[1]+"\n")
	require.Len(t, archivedSegments(t, s3, "db1"), len(names)-1)
	report, rc = archiveCmd("expire", "--before", names[3])
	require.Equal(t, 0, rc, report)
	require.Contains(t, report, "removed 2 segments")
	left := archivedSegments(t, s3, "db1")
	require.Len(t, left, len(names)-3)
	require.NotContains(t, left, names[0])
	require.Contains(t, left, names[3])
	_, err = os.Stat(s3.ObjectPath("db1/walship.json"))
	require.NoError(t, err, "the identity stays")
	report, rc = archiveCmd("expire", "--keep", "0")
	require.Equal(t, 2, rc, report)
	require.Contains(t, report, "give one of --keep, --before and --older-than")

	// A segment taken from the spool before its upload (the archive's server down, and
	// the file removed by hand): the uploader says the archive lacks it, for good, and
	// walship check is CRITICAL.
	s3.Kill()
	fillSegments(t, ctx, r.primary, 2)
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))
	waitArchiveState(t, ctx, r, "uploads failing", func(a *spool.ArchiveState) bool { return a.FailingSince != "" && a.Pending > 0 })
	_, c = spoolPosition(t, r.spool)
	require.GreaterOrEqual(t, len(c.Segments), 3)
	gone := c.Segments[len(c.Segments)-2].Name(1 << 20) // one of the two written while the server was down
	require.NoError(t, os.Remove(filepath.Join(r.spool, gone)))
	require.NoError(t, s3.Start(ctx))
	a = waitArchiveState(t, ctx, r, "the missing segment", func(a *spool.ArchiveState) bool { return len(a.Missing) > 0 })
	require.Equal(t, []string{gone}, a.Missing)
	rc, line = check(t, "--spool", r.spool, "--free-warn", "0", "--free-crit", "0")
	require.Equal(t, 2, rc, line)
	require.Contains(t, line, "left the spool before they were uploaded, "+gone+" the last")
	require.Contains(t, runOK(t, "status", "--spool", r.spool), "1 missing, gone from the spool before upload: "+gone)
	line = waitAlertLine(t, ctx, alerts, "archive gap|critical|")
	require.Contains(t, line, "1 segment(s) left the spool before they were uploaded")

	// A receiver started again without an archive: status shows none.
	require.NoError(t, r.receiver.Stop(ctx))
	require.Nil(t, status(t, "--spool", r.spool).Archive, "no receiver runs: no archive state is shown")
	_, err = os.Stat(filepath.Join(r.spool, spool.ArchiveFile))
	require.NoError(t, err, "the stopped receiver's state stays until the next starts")
	r.receiverArgs = nil
	r.startReceiver(ctx)
	require.Nil(t, status(t, "--spool", r.spool).Archive)
	_, err = os.Stat(filepath.Join(r.spool, spool.ArchiveFile))
	require.True(t, os.IsNotExist(err), "%v", err)
}

// TestArchiveCatchUp: a standby made from a base backup whose WAL the spool no longer
// holds (cleaned up) catches up from the archive, through restore_command.
func TestArchiveCatchUp(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	r, s3, url := archiveRig(t, ctx)

	// The base backup, not started yet; then more WAL, all of it in the archive.
	sb := emptyStandby(t, r)
	r.initOK(ctx, sb.Data)
	require.NoError(t, sb.Adopt())
	fillSegments(t, ctx, r.primary, 4)
	flush := flushLSN(t, ctx, r.primary)
	r.waitSpoolAt(ctx, flush)
	_, published := waitArchived(t, ctx, r, s3, "the archive to hold the published segments")
	// The spool loses every published segment, as a cleanup after an older standby
	// would leave it.
	for _, name := range published {
		require.NoError(t, os.Remove(filepath.Join(r.spool, name)))
	}

	// restore_command carries the archive's settings (the server's environment does
	// not have them).
	restore := fmt.Sprintf("env %s %s restore --spool %s --archive-url %s --archive-path-style %%f %%p %%r", strings.Join(s3.Env(), " "), walshipBin, r.spool, url)
	auto := filepath.Join(sb.Data, "postgresql.auto.conf")
	b, err := os.ReadFile(auto)
	require.NoError(t, err)
	require.NoError(t, sb.WriteFile("postgresql.auto.conf", []byte(standby.AutoConf(string(b), "the test's restore_command", restore))))
	require.NoError(t, sb.Configure(map[string]string{"archive_mode": "off", "wal_retrieve_retry_interval": "'100ms'"}))
	require.NoError(t, sb.Start(ctx))
	// Up to the segment being written, which no archive holds yet.
	cur, _ := wal.SegmentOf(1, flush, 1<<20)
	waitReplayed(t, ctx, sb, cur.Start(1<<20))
	require.Contains(t, sb.Log(), "restored from the archive", "the standby's WAL came from the archive")
	want, err := r.primary.QueryString(ctx, "SELECT count(*) FROM "+lab.LoadTable)
	require.NoError(t, err)
	require.Equal(t, want, mustQuery(t, ctx, sb, "SELECT count(*) FROM "+lab.LoadTable))
}
