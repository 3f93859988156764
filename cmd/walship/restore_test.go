package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
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
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// restoreRun is the outcome of one walship restore.
type restoreRun struct {
	code     int
	signaled syscall.Signal
	stderr   string
}

func restoreCmd(t *testing.T, ctx context.Context, args ...string) restoreRun {
	t.Helper()
	cmd := exec.CommandContext(ctx, walshipBin, append([]string{"restore"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		require.NoError(t, err)
	}
	res := restoreRun{code: cmd.ProcessState.ExitCode(), stderr: stderr.String()}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		res.signaled = ws.Signal()
	}
	return res
}

// copySpool copies a spool's identity, published segments and partial to a new
// directory, so that a test can damage them without touching the receiver's. A file
// that goes while it copies (a publish) is left out.
func copySpool(t *testing.T, from string) string {
	t.Helper()
	to := t.TempDir()
	ents, err := os.ReadDir(from)
	require.NoError(t, err)
	for _, e := range ents {
		if e.Name()[0] == '.' || e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if os.IsNotExist(err) {
			continue // a partial published meanwhile, or the session record rewritten
		}
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(to, e.Name()), b, 0o644))
	}
	return to
}

func TestRestoreCommand(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE t AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 30000) g"))
	r.checkIdentical(ctx)
	_, c := spoolPosition(t, r.spool)
	require.GreaterOrEqual(t, len(c.Segments), 2)
	first, second := c.Segments[0].Name(1<<20), c.Segments[1].Name(1<<20)
	out := t.TempDir()
	target := filepath.Join(out, "RECOVERYXLOG")
	absent := func(t *testing.T) {
		_, err := os.Stat(target)
		require.ErrorIs(t, err, os.ErrNotExist, "nothing may reach %%p")
	}

	t.Run("published segment", func(t *testing.T) {
		res := restoreCmd(t, ctx, "--spool", r.spool, first, target)
		require.Equal(t, 0, res.code, res.stderr)
		got, err := os.ReadFile(target)
		require.NoError(t, err)
		want, err := os.ReadFile(filepath.Join(r.spool, first))
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got))
		require.NoError(t, os.Remove(target))
	})
	t.Run("partial by its name", func(t *testing.T) {
		name := c.Partials[1].Seg.Name(1<<20) + spool.PartialSuffix
		res := restoreCmd(t, ctx, "--spool", r.spool, name, target)
		require.Equal(t, 0, res.code, res.stderr)
		got, err := os.ReadFile(target)
		require.NoError(t, err)
		// The sidecar still streams: read the partial's bytes after the restore, which
		// holds what the restore got and perhaps more.
		want, err := spool.PartialBytes(filepath.Join(r.spool, name), 1<<20)
		require.NoError(t, err)
		require.GreaterOrEqual(t, len(got), int(c.Partials[1].Size))
		require.Less(t, len(got), 1<<20, "a partial is restored as its bytes up to its end, not its pre-sized file")
		require.True(t, bytes.HasPrefix(want, got), "the partial's bytes, as they are")
		require.NoError(t, os.Remove(target))
	})
	t.Run("history file not there", func(t *testing.T) {
		res := restoreCmd(t, ctx, "--spool", r.spool, "00000002.history", target)
		require.Equal(t, 1, res.code, res.stderr)
		absent(t)
	})
	t.Run("timeline 1's history file is never there", func(t *testing.T) {
		// A promotion asks for its parent timeline's history file.
		res := restoreCmd(t, ctx, "--spool", r.spool, "00000001.history", target)
		require.Equal(t, 1, res.code, res.stderr)
		absent(t)
	})
	t.Run("missing segment answers at once", func(t *testing.T) {
		res := restoreCmd(t, ctx, "--spool", r.spool, "0000000100000000000000FF", target)
		require.Equal(t, 1, res.code, res.stderr)
		absent(t)
	})
	t.Run("bad names", func(t *testing.T) {
		for _, name := range []string{"../" + first, first + "/x", "/etc/passwd", "foo", "0000000100000000000000GG", first + ".tmp"} {
			res := restoreCmd(t, ctx, "--spool", r.spool, name, target)
			require.Equal(t, 3, res.code, "%q: %s", name, res.stderr)
			require.Contains(t, res.stderr, "not a WAL file name", name)
			absent(t)
		}
	})
	t.Run("a standby of another major", func(t *testing.T) {
		ctl, err := os.ReadFile(filepath.Join(r.primary.Data, "global", "pg_control"))
		require.NoError(t, err)
		id, _, err := spool.ReadIdentity(r.spool)
		require.NoError(t, err)
		major := int(id.ServerVersion) / 10000
		other := major + 1
		if other > 18 {
			other = major - 1
		}
		for _, c := range []struct{ version, want string }{
			{strconv.Itoa(other), fmt.Sprintf("the standby is PostgreSQL %d, the spool holds the WAL of PostgreSQL %d", other, major)},
			{"12", "unsupported major version (walship knows 13 to 18)"},
		} {
			dir := t.TempDir()
			require.NoError(t, os.Mkdir(filepath.Join(dir, "global"), 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(dir, "global", "pg_control"), ctl, 0o644))
			require.NoError(t, os.WriteFile(filepath.Join(dir, "PG_VERSION"), []byte(c.version+"\n"), 0o644))
			res := restoreCmd(t, ctx, "--spool", r.spool, "--pgdata", dir, first, target)
			require.Equal(t, 3, res.code, res.stderr)
			require.Contains(t, res.stderr, c.want)
			absent(t)
		}
	})
	t.Run("usage errors", func(t *testing.T) {
		require.Equal(t, 2, restoreCmd(t, ctx, first, target).code, "no --spool")
		require.Equal(t, 2, restoreCmd(t, ctx, "--spool", r.spool, first).code, "no %p")
		require.Equal(t, 2, restoreCmd(t, ctx, "--spool", r.spool, "--cleanup", first, target).code, "--cleanup without %r")
		res := restoreCmd(t, ctx, "--spool", filepath.Join(out, "nope"), first, target)
		require.Equal(t, 3, res.code, "a spool that does not exist is an error, not 'not available'")
		absent(t)
	})
	t.Run("corrupt page header", func(t *testing.T) {
		spoolDir := copySpool(t, r.spool)
		p := filepath.Join(spoolDir, second)
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		binary.LittleEndian.PutUint64(b[5*8192+8:], 0) // xlp_pageaddr of the sixth page
		require.NoError(t, os.WriteFile(p, b, 0o644))
		res := restoreCmd(t, ctx, "--spool", spoolDir, second, target)
		require.Equal(t, 3, res.code, res.stderr)
		require.Contains(t, res.stderr, "corrupt")
		require.Contains(t, res.stderr, "xlp_pageaddr")
		absent(t)
	})
	t.Run("flipped bit inside a record", func(t *testing.T) {
		spoolDir := copySpool(t, r.spool)
		p := filepath.Join(spoolDir, second)
		b, rec, start := nthRecord(t, spoolDir, c.Segments[1], 50)
		b[int(rec.LSN-start)+5] ^= 0x02 // xl_xid: page headers cannot tell, the CRC can
		require.NoError(t, os.WriteFile(p, b, 0o644))
		res := restoreCmd(t, ctx, "--spool", spoolDir, second, target)
		require.Equal(t, 3, res.code, res.stderr)
		require.Contains(t, res.stderr, "record crc")
		absent(t)
	})
	t.Run("truncated segment", func(t *testing.T) {
		spoolDir := copySpool(t, r.spool)
		require.NoError(t, os.Truncate(filepath.Join(spoolDir, second), 1<<20-8192))
		res := restoreCmd(t, ctx, "--spool", spoolDir, second, target)
		require.Equal(t, 3, res.code, res.stderr)
		require.Contains(t, res.stderr, "holds 1040384 bytes, want 1048576")
		absent(t)
	})
	t.Run("spool of another cluster", func(t *testing.T) {
		other, err := lab.NewCluster(ctx, lab.Options{SegSizeMB: 1})
		require.NoError(t, err)
		defer func() { assert.NoError(t, other.Close(), "remove the other cluster's files") }()
		res := restoreCmd(t, ctx, "--spool", r.spool, "--pgdata", other.Data, first, target)
		require.Equal(t, 3, res.code, res.stderr)
		require.Contains(t, res.stderr, "another cluster")
		absent(t)
	})
	t.Run("wait ends on SIGTERM", func(t *testing.T) {
		p := startWaitingRestore(t, ctx, r.spool, "0000000100000000000000FF", target)
		require.True(t, p.Running(), "restore --wait returned before the segment existed: %v\n%s", p.Err(), p.Log())
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		require.NoError(t, p.Stop(sctx), "restore --wait did not end promptly on SIGTERM")
		var exit *exec.ExitError
		require.ErrorAs(t, p.Err(), &exit, "restore --wait exited 0 without the segment:\n%s", p.Log())
		ws := exit.Sys().(syscall.WaitStatus)
		require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGTERM, "it must die by SIGTERM, which PostgreSQL reads as a shutdown: %v\n%s", exit, p.Log())
		absent(t)
	})
	t.Run("wait returns when the segment is published", func(t *testing.T) {
		name := c.Partials[1].Seg.Name(1 << 20)
		// The segment is published only by the switch below, once the restore waits.
		p := startWaitingRestore(t, ctx, r.spool, name, target)
		_, err := os.Stat(filepath.Join(r.spool, name))
		require.ErrorIs(t, err, os.ErrNotExist, "the segment is still in progress when the restore starts waiting")
		require.NoError(t, r.primary.Exec(ctx, "INSERT INTO t SELECT g, 'y' FROM generate_series(1, 100) g"))
		require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
		select {
		case <-p.Done():
		case <-ctx.Done():
			t.Fatalf("restore --wait did not return once %s was published:\n%s", name, p.Log())
		}
		require.NoError(t, p.Err(), p.Log())
		got, err := os.ReadFile(target)
		require.NoError(t, err)
		want, err := os.ReadFile(filepath.Join(r.spool, name))
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got))
		require.NoError(t, os.Remove(target))
	})
	t.Run("promote refuses a server that is not in recovery", func(t *testing.T) {
		out, err := exec.CommandContext(ctx, walshipBin, "promote", "--spool", r.spool, "--dsn", r.primary.DSN()).CombinedOutput()
		require.Error(t, err)
		require.Contains(t, string(out), "not in recovery")
		for _, f := range []string{spool.FreezeFile, spool.TriggerFile} {
			_, err := os.Stat(filepath.Join(r.spool, f))
			require.ErrorIs(t, err, os.ErrNotExist, "a refused promotion leaves the spool as it was")
		}
		out, err = exec.CommandContext(ctx, walshipBin, "promote", "--spool", t.TempDir(), "--dsn", r.primary.DSN()).CombinedOutput()
		require.Error(t, err)
		require.Contains(t, string(out), "has received nothing yet")
	})
	t.Run("cleanup", func(t *testing.T) {
		spoolDir := copySpool(t, r.spool)
		require.NoError(t, os.WriteFile(filepath.Join(spoolDir, "00000002.history"), []byte("1\t0/1000000\tx\n"), 0o644))
		before, err := spool.Scan(spoolDir, 1<<20)
		require.NoError(t, err)
		res := restoreCmd(t, ctx, "--spool", spoolDir, "--cleanup", second, target, second)
		require.Equal(t, 0, res.code, res.stderr)
		after, err := spool.Scan(spoolDir, 1<<20)
		require.NoError(t, err)
		require.Equal(t, before.Segments[1:], after.Segments, "only segments older than %%r go")
		require.Equal(t, before.Partials, after.Partials, "the partial stays")
		require.Equal(t, []uint32{2}, after.Histories, "history files stay")
		require.NoError(t, os.Remove(target))
	})
}

// startWaitingRestore starts walship restore --wait for the file and target in args and
// returns once the restore has looked at the spool, found the file missing and begun to
// wait (its SIGTERM handler is set before that). Only its log says so.
func startWaitingRestore(t *testing.T, ctx context.Context, spoolDir string, args ...string) *lab.Proc {
	t.Helper()
	p, err := lab.StartProc("restore", filepath.Join(t.TempDir(), "restore.log"), walshipBin,
		append([]string{"restore", "--wait", "--log-level", "debug", "--spool", spoolDir}, args...)...)
	require.NoError(t, err)
	t.Cleanup(func() {
		if p.Running() {
			p.Kill()
		}
	})
	require.NoError(t, p.WaitLog(ctx, "waiting for the file to be published"), "restore --wait:\n%s", p.Log())
	return p
}

// nthRecord reads a published segment of a spool and returns its bytes, its n-th
// record (counting from 1) and the segment's start LSN.
func nthRecord(t *testing.T, spoolDir string, seg wal.Segment, n int) ([]byte, wal.Record, wal.LSN) {
	t.Helper()
	id, _, err := spool.ReadIdentity(spoolDir)
	require.NoError(t, err)
	b, err := os.ReadFile(filepath.Join(spoolDir, seg.Name(id.SegSize)))
	require.NoError(t, err)
	start := seg.Start(id.SegSize)
	rd := wal.NewReader(id.Stream(), seg.TLI, wal.Bytes{Base: start, Data: b}, start, 0)
	var rec wal.Record
	for i := 0; i < n; i++ {
		rec, err = rd.Next()
		require.NoError(t, err)
	}
	return b, rec, start
}

// TestVerify: a streamed spool verifies clean, file by file and as a whole; a flipped
// byte inside a record of a published segment is found, and the file and the offset
// of the record are named.
func TestVerify(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)
	require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE t AS SELECT g, repeat(md5(g::text), 5) AS pad FROM generate_series(1, 30000) g"))
	r.checkIdentical(ctx)
	r.sidecar.Kill()
	spoolDir := copySpool(t, r.spool)

	out, err := exec.CommandContext(ctx, walshipBin, "verify", "--spool", spoolDir).CombinedOutput()
	require.NoError(t, err, "%s", out)
	_, c := spoolPosition(t, spoolDir)
	require.Equal(t, len(c.Segments)+len(c.Partials), strings.Count(string(out), " ok: "), "%s", out)
	t.Logf("clean spool:\n%s", out)

	second := filepath.Join(spoolDir, c.Segments[1].Name(1<<20))
	out, err = exec.CommandContext(ctx, walshipBin, "verify", second).CombinedOutput()
	require.NoError(t, err, "a single published segment verifies on its own: %s", out)
	// The partial on its own: its bytes are its durable end, not its pre-sized file.
	p, ok := c.Partials[1]
	require.True(t, ok, "the spool has a partial")
	name := p.Seg.Name(1<<20) + spool.PartialSuffix
	out, err = exec.CommandContext(ctx, walshipBin, "verify", filepath.Join(spoolDir, name)).CombinedOutput()
	require.NoError(t, err, "the partial verifies on its own: %s", out)
	require.Contains(t, string(out), fmt.Sprintf("%s ok: %d bytes", name, p.Size), "%s", out)

	// Damage the 100th record of the second segment.
	b, rec, start := nthRecord(t, spoolDir, c.Segments[1], 100)
	off := int64(rec.LSN - start)
	b[off+4] ^= 0x01 // a bit of xl_xid: only the CRC can tell
	require.NoError(t, os.WriteFile(second, b, 0o644))

	for _, args := range [][]string{{"--spool", spoolDir}, {second}} {
		out, err = exec.CommandContext(ctx, walshipBin, append([]string{"verify"}, args...)...).CombinedOutput()
		require.Error(t, err, "verify %v must fail: %s", args, out)
		want := fmt.Sprintf("%s BAD at offset %d (%s): record crc", filepath.Base(second), off, rec.LSN)
		require.Contains(t, string(out), want, "verify %v", args)
		t.Logf("verify %v:\n%s", args, out)
	}
}
