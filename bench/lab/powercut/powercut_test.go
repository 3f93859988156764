package powercut_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/walship/walship/bench/lab/powercut"
	"github.com/walship/walship/receiver/durable"
)

const page = powercut.PageSize

// mounted says whether dir is a mount point, from /proc/self/mountinfo.
func mounted(t *testing.T, dir string) bool {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	require.NoError(t, err)
	defer func() { _ = f.Close() }() // read only
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Field 5 is the mount point (octal escapes aside; test directories have none).
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && fields[4] == dir {
			return true
		}
	}
	require.NoError(t, sc.Err())
	return false
}

// mount mounts a power-cut file system for the test and checks, when the test ends,
// that no mount is left.
func mount(t *testing.T) *powercut.FS {
	t.Helper()
	pc := powercut.Mount(t, "")
	dir := pc.Dir()
	require.True(t, mounted(t, dir), "%s is not in /proc/self/mountinfo", dir)
	t.Cleanup(func() {
		if err := pc.Close(); err != nil {
			t.Error(err)
		}
		if mounted(t, dir) {
			t.Errorf("%s is still mounted after Close", dir)
		}
	})
	return pc
}

func syncDir(t *testing.T, dir string) {
	t.Helper()
	require.NoError(t, durable.SyncDir(dir))
}

// put writes data to path (created or truncated), fsyncs it if sync says so, and
// closes it.
func put(t *testing.T, path string, data []byte, sync bool) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	require.NoError(t, err)
	_, err = f.Write(data)
	require.NoError(t, err)
	if sync {
		require.NoError(t, f.Sync())
	}
	require.NoError(t, f.Close())
}

// content reads path, or says it is missing.
func content(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "<missing>"
	}
	require.NoError(t, err)
	return string(b)
}

func TestCutAllKeepsExactlyWhatWasSynced(t *testing.T) {
	pc := mount(t)
	dir := pc.Dir()
	at := func(name string) string { return filepath.Join(dir, name) }

	// The durable starting point.
	put(t, at("synced"), []byte(strings.Repeat("a", 3*page)), true)
	put(t, at("overwritten"), []byte(strings.Repeat("a", 3*page)), true)
	put(t, at("renamed-away"), []byte("r"), true)
	put(t, at("unlinked"), []byte("u"), true)
	put(t, at("unlinked-durably"), []byte("d"), true)
	put(t, at("truncated"), []byte(strings.Repeat("t", 2*page)), true)
	put(t, at("replaced"), []byte("old"), true)
	require.NoError(t, os.Mkdir(at("sub"), 0o755))
	syncDir(t, dir)
	syncDir(t, at("sub"))

	// Overwrite the middle page of "synced" and extend it, without a sync; then
	// overwrite its first byte through a second handle and fdatasync that: a sync
	// writes back the whole file, whoever wrote it.
	f, err := os.OpenFile(at("synced"), os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte(strings.Repeat("b", page+page)), page)
	require.NoError(t, err)
	require.NoError(t, f.Close()) // close makes nothing durable
	g, err := os.OpenFile(at("synced"), os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = g.WriteAt([]byte("c"), 0)
	require.NoError(t, err)
	require.NoError(t, unix.Fdatasync(int(g.Fd())))
	require.NoError(t, g.Close())
	wantSynced := "c" + strings.Repeat("a", page-1) + strings.Repeat("b", 2*page)
	require.Equal(t, wantSynced, content(t, at("synced")), "readers see the cache")
	f, err = os.OpenFile(at("overwritten"), os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte(strings.Repeat("b", page)), page+10)
	require.NoError(t, err)
	require.NoError(t, f.Close())

	// A new file whose data is synced but whose name is not.
	put(t, at("new-unsynced-name"), []byte("n"), true)
	// A new file whose name is synced but whose data is not.
	put(t, at("new-unsynced-data"), []byte("x"), false)
	// A published file: temp, write, fsync, rename, fsync the directory.
	require.NoError(t, durable.WriteFile(at("published"), []byte("p"), 0o644))
	// A rename and an unlink, made durable by the directory fsync below.
	require.NoError(t, os.Rename(at("renamed-away"), at("renamed-to")))
	require.NoError(t, os.Remove(at("unlinked")))
	// A rename that replaces a file.
	put(t, at("replacement"), []byte("new"), true)
	require.NoError(t, os.Rename(at("replacement"), at("replaced")))
	// A truncation, not synced.
	require.NoError(t, os.Truncate(at("truncated"), 10))
	// A file in a subdirectory whose directory is not synced, in a directory whose is.
	put(t, at("sub/inner"), []byte("i"), true)
	syncDir(t, dir)
	put(t, at("new-unsynced-data"), []byte("xy"), false) // rewritten after the directory fsync: still volatile
	require.NoError(t, os.Remove(at("unlinked-durably")))
	syncDir(t, dir)
	// After the last directory fsync: volatile again.
	require.NoError(t, os.Rename(at("published"), at("published-moved")))

	rep, err := pc.Cut(powercut.All)
	require.NoError(t, err)
	t.Logf("cut: %+v", rep)

	for name, want := range map[string]string{
		"synced":            wantSynced,
		"overwritten":       strings.Repeat("a", 3*page),
		"new-unsynced-name": "n", // its name was synced by the directory fsync after it
		"new-unsynced-data": "",
		"published":         "p",
		"published-moved":   "<missing>",
		"renamed-away":      "<missing>",
		"renamed-to":        "r",
		"unlinked":          "<missing>",
		"unlinked-durably":  "<missing>",
		"replaced":          "new",
		"replacement":       "<missing>",
		"truncated":         strings.Repeat("t", 2*page),
		"sub/inner":         "<missing>", // sub itself was not fsynced after the create
	} {
		require.Equal(t, want, content(t, at(name)), "%s after the cut", name)
	}
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, []string{"synced", "overwritten", "new-unsynced-name", "new-unsynced-data", "published", "renamed-to", "replaced", "truncated", "sub"}, names)
	require.Equal(t, int64(1), pc.Stats().Cuts)
}

func TestCutAllUndoesUnsyncedNamespaceChanges(t *testing.T) {
	pc := mount(t)
	dir := pc.Dir()
	at := func(name string) string { return filepath.Join(dir, name) }
	put(t, at("a"), []byte("A"), true)
	put(t, at("b"), []byte("B"), true)
	require.NoError(t, os.Mkdir(at("d"), 0o755))
	put(t, at("d/x"), []byte("X"), true)
	syncDir(t, at("d"))
	syncDir(t, dir)

	require.NoError(t, os.Rename(at("a"), at("b"))) // replaces b
	require.NoError(t, os.Remove(at("d/x")))
	require.NoError(t, os.Remove(at("d")))
	require.NoError(t, os.Mkdir(at("e"), 0o700))
	put(t, at("e/y"), []byte("Y"), true)
	syncDir(t, at("e"))
	require.NoError(t, os.Symlink("b", at("link")))
	require.NoError(t, unix.Renameat2(unix.AT_FDCWD, at("b"), unix.AT_FDCWD, at("e"), unix.RENAME_EXCHANGE))
	require.Equal(t, "A", content(t, at("e")))

	rep, err := pc.Cut(powercut.All)
	require.NoError(t, err)
	require.Equal(t, 0, rep.OpsKept)
	require.Equal(t, "A", content(t, at("a")))
	require.Equal(t, "B", content(t, at("b")))
	require.Equal(t, "X", content(t, at("d/x")))
	for _, gone := range []string{"e", "link"} {
		_, err := os.Lstat(at(gone))
		require.ErrorIs(t, err, fs.ErrNotExist, gone)
	}
}

func TestCutRandomTearsWholePages(t *testing.T) {
	pc := mount(t)
	path := filepath.Join(pc.Dir(), "f")
	const pages = 64
	old, new := bytes.Repeat([]byte{'o'}, pages*page), bytes.Repeat([]byte{'n'}, pages*page)
	put(t, path, old, true)
	syncDir(t, pc.Dir())
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt(new, 0)
	require.NoError(t, err)
	require.NoError(t, f.Close())

	rep, err := pc.Cut(powercut.Random(42))
	require.NoError(t, err)
	require.Equal(t, pages, rep.PagesKept+rep.PagesDropped)
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Len(t, got, len(old))
	news := 0
	for lo := 0; lo < len(got); lo += page {
		switch p := got[lo : lo+page]; {
		case bytes.Equal(p, new[:page]):
			news++
		case !bytes.Equal(p, old[:page]):
			t.Fatalf("page at %d mixes old and new content", lo)
		}
	}
	require.Equal(t, rep.PagesKept, news)
	require.NotZero(t, news, "a random cut kept no page of 64")
	require.NotEqual(t, pages, news, "a random cut kept all 64 pages")
}

// TestCutRandomKeepsAPrefixOfTheNamespaceChanges: namespace changes survive up to a
// random point of the order they were made in, as a journalling file system commits
// them (seed 1 draws a point strictly inside).
func TestCutRandomKeepsAPrefixOfTheNamespaceChanges(t *testing.T) {
	pc := mount(t)
	const files = 20
	for i := range files {
		put(t, filepath.Join(pc.Dir(), fmt.Sprintf("f%02d", i)), []byte("x"), true)
	}
	rep, err := pc.Cut(powercut.Random(1))
	require.NoError(t, err)
	require.Equal(t, files, rep.OpsKept+rep.OpsUndone)
	require.NotZero(t, rep.OpsKept, "a random cut kept no creation of 20")
	require.NotZero(t, rep.OpsUndone, "a random cut kept all 20 creations")
	ents, err := os.ReadDir(pc.Dir())
	require.NoError(t, err)
	require.Len(t, ents, rep.OpsKept)
	for i, e := range ents {
		require.Equal(t, fmt.Sprintf("f%02d", i), e.Name(), "survivors are not the first %d creations", rep.OpsKept)
		require.Equal(t, "x", content(t, filepath.Join(pc.Dir(), e.Name())))
	}
}

func TestFailNextSync(t *testing.T) {
	pc := mount(t)
	dir := pc.Dir()
	path := filepath.Join(dir, "f")
	put(t, path, []byte("old."), true)
	syncDir(t, dir)

	pc.FailNextSync("f", 0)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, f.Close()) })
	_, err = f.WriteAt([]byte("new"), 0)
	require.NoError(t, err)
	err = f.Sync()
	require.ErrorIs(t, err, syscall.EIO)
	require.Equal(t, "new.", content(t, path), "the cache still holds the lost page")
	// A retry succeeds and makes nothing durable: the page is lost (fsyncgate).
	require.NoError(t, f.Sync())
	require.Equal(t, int64(1), pc.Stats().FailedSyncs)

	// A rule for another file leaves this one alone; a directory fsync can fail too.
	pc.FailNextSync("other", syscall.ENOSPC)
	put(t, filepath.Join(dir, "h"), []byte("h"), true)
	syncDir(t, dir)
	put(t, filepath.Join(dir, "g"), []byte("g"), true)
	pc.FailNextSync("", syscall.ENOSPC)
	require.ErrorIs(t, durable.SyncDir(dir), syscall.ENOSPC)

	_, err = pc.Cut(powercut.All)
	require.NoError(t, err)
	require.Equal(t, "old.", content(t, path))
	require.Equal(t, "h", content(t, filepath.Join(dir, "h")))
	require.Equal(t, "<missing>", content(t, filepath.Join(dir, "g")), "a failed directory fsync made g durable")
}

func TestHooksFireAtTheirMoment(t *testing.T) {
	pc := mount(t)
	dir := pc.Dir()
	path := filepath.Join(dir, "seg.partial")
	backing := filepath.Join(pc.Backing(), "seg.partial")
	put(t, path, nil, true)
	syncDir(t, dir)

	// Hooks run on the FUSE server's goroutines: the kernel orders them before the
	// call's return, but the race detector cannot see that.
	var mu sync.Mutex
	var seen []string
	record := func(ev powercut.Event) error {
		_, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", ev.Pid))
		assert.NoError(t, err, "event pid %d is not a thread of this process", ev.Pid)
		b, err := os.ReadFile(backing)
		assert.NoError(t, err)
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, fmt.Sprintf("%s %v %s datasync=%v durable=%q", ev.When, ev.Op, ev.Path, ev.Datasync, b))
		return nil
	}
	pc.On(powercut.OpFsync, "*.partial", powercut.Before, record)
	remove := pc.On(powercut.OpFsync, "*.partial", powercut.After, record)
	pc.On(powercut.OpFsync, "other", powercut.Before, func(powercut.Event) error {
		t.Error("a hook for another path fired")
		return nil
	})

	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, f.Close()) })
	_, err = f.WriteAt([]byte("wal"), 0)
	require.NoError(t, err)
	require.NoError(t, unix.Fdatasync(int(f.Fd())))
	remove()
	_, err = f.WriteAt([]byte("!"), 3)
	require.NoError(t, err)
	require.NoError(t, f.Sync())
	mu.Lock()
	got := slices.Clone(seen)
	mu.Unlock()
	require.Equal(t, []string{
		`before fsync seg.partial datasync=true durable=""`,
		`after fsync seg.partial datasync=true durable="wal"`,
		`before fsync seg.partial datasync=false durable="wal"`,
	}, got)

	// A Before hook that fails the call: the rename does not happen.
	pc.On(powercut.OpRename, "seg", powercut.Before, func(ev powercut.Event) error {
		assert.Equal(t, "seg.partial", ev.Path)
		return syscall.EIO
	})
	require.ErrorIs(t, os.Rename(path, filepath.Join(dir, "seg")), syscall.EIO)
	require.Equal(t, "wal!", content(t, path))
	require.Equal(t, "<missing>", content(t, filepath.Join(dir, "seg")))
}

// TestHookKillsBetweenTruncateAndRename runs a child process that publishes a file
// the way the receiver publishes a segment (truncate, fsync, rename, fsync the
// directory) and kills it right after its truncate: the rename never happens, and a
// cut takes the file back to its last synced state.
func TestHookKillsBetweenTruncateAndRename(t *testing.T) {
	pc := mount(t)
	dir := pc.Dir()
	partial := filepath.Join(dir, "seg.partial")
	put(t, partial, bytes.Repeat([]byte{'w'}, 2*page), true)
	syncDir(t, dir)

	var killed atomic.Int32
	pc.On(powercut.OpTruncate, "seg.partial", powercut.After, func(ev powercut.Event) error {
		assert.Equal(t, int64(page), ev.Off)
		killed.Store(int32(ev.Pid))
		return syscall.Kill(int(ev.Pid), syscall.SIGKILL)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperPublish$")
	cmd.Env = append(os.Environ(), "POWERCUT_HELPER_DIR="+dir)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit, "the helper was not killed: %s", out)
	require.Equal(t, syscall.SIGKILL, exit.Sys().(syscall.WaitStatus).Signal(), "%s", out)
	require.NotZero(t, killed.Load())
	require.Equal(t, "<missing>", content(t, filepath.Join(dir, "seg")))
	require.Len(t, content(t, partial), page, "readers see the truncation")

	_, err = pc.Cut(powercut.All)
	require.NoError(t, err)
	require.Equal(t, strings.Repeat("w", 2*page), content(t, partial))
}

// TestHelperPublish is the child process of TestHookKillsBetweenTruncateAndRename.
func TestHelperPublish(t *testing.T) {
	dir := os.Getenv("POWERCUT_HELPER_DIR")
	if dir == "" {
		t.Skip("a helper process, run by TestHookKillsBetweenTruncateAndRename")
	}
	f, err := os.OpenFile(filepath.Join(dir, "seg.partial"), os.O_RDWR, 0)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(page))
	require.NoError(t, durable.Rename(f, filepath.Join(dir, "seg")))
	t.Fatal("still alive after the truncate")
}

// TestHookKillsBetweenWriteAndSync kills a child process in its fsync, before the
// fsync is carried out: what it wrote is lost to a cut, what it had synced is not.
func TestHookKillsBetweenWriteAndSync(t *testing.T) {
	pc := mount(t)
	dir := pc.Dir()
	pc.On(powercut.OpFsync, "wal", powercut.Before, func(ev powercut.Event) error {
		if err := syscall.Kill(int(ev.Pid), syscall.SIGKILL); err != nil {
			t.Error(err)
		}
		return syscall.EIO // the fsync must not happen on behalf of the dying process
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperWriteSync$")
	cmd.Env = append(os.Environ(), "POWERCUT_HELPER_DIR="+dir)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit, "the helper was not killed: %s", out)
	require.Equal(t, syscall.SIGKILL, exit.Sys().(syscall.WaitStatus).Signal(), "%s", out)
	require.Equal(t, "synced.unsynced", content(t, filepath.Join(dir, "wal")))

	_, err = pc.Cut(powercut.All)
	require.NoError(t, err)
	require.Equal(t, "synced.", content(t, filepath.Join(dir, "wal")))
}

// TestHelperWriteSync is the child process of TestHookKillsBetweenWriteAndSync.
func TestHelperWriteSync(t *testing.T) {
	dir := os.Getenv("POWERCUT_HELPER_DIR")
	if dir == "" {
		t.Skip("a helper process, run by TestHookKillsBetweenWriteAndSync")
	}
	require.NoError(t, durable.WriteFile(filepath.Join(dir, "wal"), []byte("synced."), 0o644))
	f, err := os.OpenFile(filepath.Join(dir, "wal"), os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte("unsynced"), 7)
	require.NoError(t, err)
	err = f.Sync()
	t.Fatalf("still alive after the fsync (which returned %v)", err)
}

func TestBlockedHookDoesNotHoldUpClose(t *testing.T) {
	mnt := t.TempDir()
	pc, err := powercut.New(t.TempDir(), mnt)
	if errors.Is(err, powercut.ErrUnavailable) {
		t.Skip(err)
	}
	require.NoError(t, err)
	stop := make(chan struct{})
	defer close(stop)
	entered := make(chan struct{})
	pc.On(powercut.OpWrite, "f", powercut.Before, func(powercut.Event) error {
		close(entered)
		<-stop // blocks until the test ends
		return nil
	})
	wrote := make(chan error, 1)
	go func() {
		f, err := os.Create(filepath.Join(mnt, "f"))
		if err == nil {
			_, err = f.Write([]byte("x"))
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		wrote <- err
	}()
	<-entered
	closed := make(chan error, 1)
	go func() { closed <- pc.Close() }()
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("Close is held up by a blocked hook")
	}
	require.ErrorIs(t, <-wrote, syscall.EIO)
	require.False(t, mounted(t, mnt), "%s is still mounted", mnt)
}

func TestCloseWithAFileOpenLeavesNoMount(t *testing.T) {
	mnt := t.TempDir()
	pc, err := powercut.New(t.TempDir(), mnt)
	if errors.Is(err, powercut.ErrUnavailable) {
		t.Skip(err)
	}
	require.NoError(t, err)
	f, err := os.Create(filepath.Join(mnt, "open"))
	require.NoError(t, err)
	defer func() { _ = f.Close() }() // closed already, or the test has failed
	err = pc.Close()
	require.Error(t, err, "Close with a file open")
	t.Log(err)
	require.False(t, mounted(t, mnt), "%s is still mounted", mnt)
	_, err = f.Write([]byte("x"))
	require.Error(t, err, "a write after the connection was aborted")
	require.Error(t, f.Close(), "a close after the connection was aborted")
}

func TestCloseMakesEverythingDurable(t *testing.T) {
	backing, mnt := t.TempDir(), t.TempDir()
	pc, err := powercut.New(backing, mnt)
	if errors.Is(err, powercut.ErrUnavailable) {
		t.Skip(err)
	}
	require.NoError(t, err)
	put(t, filepath.Join(mnt, "f"), []byte("unsynced"), false)
	require.NoError(t, pc.Close())
	require.False(t, mounted(t, mnt))
	require.Equal(t, "unsynced", content(t, filepath.Join(backing, "f")))
	ents, err := os.ReadDir(backing)
	require.NoError(t, err)
	require.Len(t, ents, 1, "the backing directory holds more than f: %v", ents)
}

func TestFilesOfTheReceiverKind(t *testing.T) {
	pc := mount(t)
	dir := pc.Dir()

	// Pre-sized with fallocate (durable.WritePadded), published durably.
	require.NoError(t, durable.WritePadded(filepath.Join(dir, "padded"), []byte("head"), 3*page, 0o644))
	// fdatasync through a read-only handle syncs what another handle wrote, as
	// spool.SyncPartial relies on.
	w, err := os.OpenFile(filepath.Join(dir, "padded"), os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = w.WriteAt([]byte("tail"), 2*page)
	require.NoError(t, err)
	require.NoError(t, w.Close())
	r, err := os.Open(filepath.Join(dir, "padded"))
	require.NoError(t, err)
	require.NoError(t, unix.Fdatasync(int(r.Fd())))
	require.NoError(t, r.Close())
	// A Unix socket in the spool, as the receiver's control socket.
	l, err := net.Listen("unix", filepath.Join(dir, "ctl.sock"))
	require.NoError(t, err)
	defer l.Close()
	served := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			_, err = c.Write([]byte("hi"))
			c.Close()
		}
		served <- err
	}()
	c, err := net.Dial("unix", filepath.Join(dir, "ctl.sock"))
	require.NoError(t, err)
	b := make([]byte, 2)
	_, err = c.Read(b)
	require.NoError(t, err)
	require.Equal(t, "hi", string(b))
	require.NoError(t, <-served)
	c.Close()
	// An exclusive flock, as the spool's locks.
	lf, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, lf.Close()) })
	require.NoError(t, syscall.Flock(int(lf.Fd()), syscall.LOCK_EX|syscall.LOCK_NB))
	lf2, err := os.Open(filepath.Join(dir, "lock"))
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, lf2.Close()) })
	require.ErrorIs(t, syscall.Flock(int(lf2.Fd()), syscall.LOCK_EX|syscall.LOCK_NB), syscall.EWOULDBLOCK)

	_, err = pc.Cut(powercut.All)
	require.NoError(t, err)
	want := append(append([]byte("head"), make([]byte, 2*page-4)...), append([]byte("tail"), make([]byte, page-4)...)...)
	got, err := os.ReadFile(filepath.Join(dir, "padded"))
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "padded after the cut: %d bytes", len(got))
	st := pc.Stats()
	require.NotZero(t, st.Fdatasyncs)
	require.NotZero(t, st.PagesWritten)
}
