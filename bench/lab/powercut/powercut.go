package powercut

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// ErrUnavailable means FUSE cannot be used here: no /dev/fuse, not root (the mount is
// made with mount(2) directly, as there is no fusermount), or mount(2) refused.
var ErrUnavailable = errors.New("FUSE is not usable here")

// atticName is the directory of the backing root that holds what the namespace
// changes not durable yet took away (see journal.go). The mount does not show it.
const atticName = ".powercut-attic"

// FS is a mounted power-cut file system.
type FS struct {
	dir, backing string
	server       *fuse.Server
	rootDev      uint64

	// nsmu orders namespace changes (held to write) against lookups and directory
	// listings (held to read), so that the two steps of a rename that replaces an
	// entry look like one. Taken before mu.
	nsmu sync.RWMutex
	// mu guards files, open and journal.
	mu      sync.Mutex
	files   map[fileKey]*vfile
	open    map[fileKey]int // open handles of each file
	journal journal

	hooks   hooks
	stats   counters
	closing chan struct{}
	close   sync.Once
	err     error // of Close
}

// fileKey is a backing inode and its generation (its birth time where the backing
// file system has one): the volatile state of a file goes with its inode, whatever
// its names, and an inode number used again is another file.
type fileKey struct {
	ident
	gen uint64
}

// New mounts at dir (an existing empty directory) a file system backed by the
// directory backing. Errors that say FUSE cannot be used here wrap ErrUnavailable.
// Close unmounts it.
func New(backing, dir string) (*FS, error) {
	backing, err := filepath.Abs(backing)
	if err != nil {
		return nil, err
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return nil, err
	}
	for _, d := range []string{backing, dir} {
		if st, err := os.Stat(d); err != nil {
			return nil, fmt.Errorf("powercut: %w", err)
		} else if !st.IsDir() {
			return nil, fmt.Errorf("powercut: %s is not a directory", d)
		}
	}
	if err := usable(); err != nil {
		return nil, err
	}
	attic := filepath.Join(backing, atticName)
	// An attic left by a mount that was never closed holds changes that can no
	// longer be undone.
	if err := os.RemoveAll(attic); err != nil {
		return nil, fmt.Errorf("powercut: %w", err)
	}
	if err := os.Mkdir(attic, 0o700); err != nil {
		return nil, fmt.Errorf("powercut: %w", err)
	}
	pc := &FS{
		dir:     dir,
		backing: backing,
		files:   make(map[fileKey]*vfile),
		open:    make(map[fileKey]int),
		closing: make(chan struct{}),
	}
	pc.journal.atticPath = attic
	var root *node
	defer func() {
		if pc.server == nil {
			// New failed, and its error is the one returned.
			if root != nil {
				_ = root.fd.Close() // O_PATH: no data goes through it
			}
			if pc.journal.attic != nil {
				_ = pc.journal.attic.Close() // O_PATH: no data goes through it
			}
			_ = os.Remove(attic) // empty; the next New on backing removes it anyway
		}
	}()
	if pc.journal.attic, err = openPath(unix.AT_FDCWD, attic); err != nil {
		return nil, fmt.Errorf("powercut: open %s: %w", attic, err)
	}
	rootFd, err := openPath(unix.AT_FDCWD, backing)
	if err != nil {
		return nil, fmt.Errorf("powercut: open %s: %w", backing, err)
	}
	if root, _, err = pc.newNode(rootFd); err != nil {
		_ = rootFd.Close() // O_PATH: no data goes through it
		return nil, fmt.Errorf("powercut: %s: %w", backing, err)
	}
	pc.rootDev = root.key.dev
	root.root = true

	zero := time.Duration(0)
	opts := &fs.Options{
		MountOptions: fuse.MountOptions{
			// There is no fusermount: mount(2) directly, and fail if it refuses.
			DirectMountStrict: true,
			// PostgreSQL's restore_command runs as another user.
			AllowOther: true,
			// The kernel checks permissions against the modes, as on a disk.
			Options:       []string{"default_permissions"},
			FsName:        backing,
			Name:          "powercut",
			DisableXAttrs: true,
		},
		// Nothing is cached in the kernel, so that after a cut the mount shows at once
		// what survived. Data caching is off too (FOPEN_DIRECT_IO on every open).
		EntryTimeout:    &zero,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		NullPermissions: true,
	}
	server, err := fs.Mount(dir, root, opts)
	if err != nil {
		return nil, fmt.Errorf("powercut: mount %s: %w: %w", dir, ErrUnavailable, err)
	}
	pc.server = server
	return pc, nil
}

// usable says why FUSE cannot be mounted here, if it cannot.
func usable() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("powercut: %w: not root (mount(2) needs it, and there is no fusermount)", ErrUnavailable)
	}
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("powercut: %w: %w", ErrUnavailable, err)
	}
	_ = f.Close() // opened only to see that it can be: nothing was written through it
	return nil
}

// Mount mounts a power-cut file system for the test on a new directory, backed by
// backing (a new temporary directory if empty), and unmounts it when the test ends.
// It skips the test if FUSE cannot be used here, and fails it on any other error.
func Mount(t testing.TB, backing string) *FS {
	t.Helper()
	if backing == "" {
		backing = t.TempDir()
	}
	pc, err := New(backing, t.TempDir())
	if errors.Is(err, ErrUnavailable) {
		t.Skipf("no power-cut file system: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := pc.Close(); err != nil {
			t.Error(err)
		}
	})
	return pc
}

// Dir is the mount point.
func (pc *FS) Dir() string { return pc.dir }

// Backing is the backing directory.
func (pc *FS) Backing() string { return pc.backing }

// Close unmounts the file system, as a clean shutdown does: what is still volatile is
// made durable first (except the pages lost to a failed fsync), and the backing
// directory is left as the mount showed it. Close first fails every call still
// waiting for a hook with EIO. If files are still open on the mount, Close aborts the
// FUSE connection and detaches the mount, and says so.
func (pc *FS) Close() error {
	pc.close.Do(func() {
		close(pc.closing)
		var errs []error
		if err := pc.server.Unmount(); err != nil {
			errs = append(errs, fmt.Errorf("powercut: unmount %s: %w (files still open?); aborting the connection", pc.dir, err))
			// MNT_FORCE aborts a FUSE connection: every call on it fails and the
			// server's loop ends. MNT_DETACH then takes the mount away however busy.
			if err := unix.Unmount(pc.dir, unix.MNT_FORCE); err != nil {
				if err := unix.Unmount(pc.dir, unix.MNT_DETACH); err != nil {
					errs = append(errs, fmt.Errorf("powercut: detach %s: %w", pc.dir, err))
				}
			}
			done := make(chan struct{})
			go func() { pc.server.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				errs = append(errs, fmt.Errorf("powercut: the FUSE server of %s did not stop", pc.dir))
			}
		}
		if err := pc.SyncAll(); err != nil {
			errs = append(errs, err)
		}
		pc.mu.Lock()
		for k := range pc.files {
			// What is left has lost pages; SyncAll may just have written its other pages back.
			if err := pc.dropFile(k); err != nil {
				errs = append(errs, fmt.Errorf("powercut: %w", err))
			}
		}
		_ = pc.journal.attic.Close() // O_PATH: no data goes through it
		pc.mu.Unlock()
		if err := os.RemoveAll(pc.journal.atticPath); err != nil {
			errs = append(errs, fmt.Errorf("powercut: %w", err))
		}
		pc.err = errors.Join(errs...)
	})
	return pc.err
}

// Mode is how a cut decides what survives.
type Mode struct {
	random bool
	seed   uint64
}

// All is the cut that loses everything not durable.
var All = Mode{}

// Random is the cut that keeps a random part of what is not durable, drawn from seed:
// of each file, each dirty page (whole) with probability 1/2, and the new size with
// probability 1/2; of the namespace changes not durable, those made before a point
// drawn uniformly in the order they were made (see doc.go).
func Random(seed uint64) Mode { return Mode{random: true, seed: seed} }

func (m Mode) String() string {
	if m.random {
		return fmt.Sprintf("random(%d)", m.seed)
	}
	return "all"
}

// CutReport says what a cut kept and dropped.
type CutReport struct {
	Files                   int // files with something not durable
	PagesKept, PagesDropped int // dirty pages
	LostPages               int // pages lost earlier to a failed fsync, now gone from the cache too
	OpsKept, OpsUndone      int // namespace changes
}

// Cut is a power cut: what is not durable is lost (all of it, or a random part, as m
// says), and the mount goes on showing what survived, as the file system would after
// the machine came back. The programs using the mount must have been stopped first;
// a file still open keeps working on what survived of it.
func (pc *FS) Cut(m Mode) (CutReport, error) {
	pc.nsmu.Lock()
	defer pc.nsmu.Unlock()
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.stats.cuts.Add(1)
	var rng *rand.Rand
	if m.random {
		rng = rand.New(rand.NewPCG(m.seed, m.seed^0x9e3779b97f4a7c15))
	}
	var rep CutReport
	var errs []error
	keys := slices.SortedFunc(maps.Keys(pc.files), func(a, b fileKey) int {
		if a.ino != b.ino {
			return cmpU64(a.ino, b.ino)
		}
		if a.dev != b.dev {
			return cmpU64(a.dev, b.dev)
		}
		return cmpU64(a.gen, b.gen)
	})
	for _, k := range keys {
		v := pc.files[k]
		rep.Files++
		for _, pg := range v.pages {
			if pg.lost {
				rep.LostPages++
			}
		}
		if rng != nil {
			kept, dropped, err := v.persistRandom(rng)
			rep.PagesKept += kept
			rep.PagesDropped += dropped
			if err != nil {
				errs = append(errs, fmt.Errorf("powercut: cut: %w", err))
			}
		} else {
			rep.PagesDropped += len(v.pages) - countLost(v)
		}
		if err := pc.dropFile(k); err != nil {
			errs = append(errs, fmt.Errorf("powercut: cut: %w", err))
		}
	}
	var kept []*nsOp
	if rng != nil {
		// The power went at a point of the journal: the changes before it survive.
		k := rng.IntN(len(pc.journal.ops) + 1)
		kept = pc.journal.settle(func(i int) bool { return i < k })
	}
	rep.OpsKept, rep.OpsUndone = len(kept), len(pc.journal.ops)
	if err := pc.journal.undoAll(); err != nil {
		errs = append(errs, fmt.Errorf("powercut: cut: %w", err))
	}
	if err := pc.journal.commit(kept); err != nil {
		errs = append(errs, fmt.Errorf("powercut: cut: %w", err))
	}
	return rep, errors.Join(errs...)
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func countLost(v *vfile) int {
	n := 0
	for _, pg := range v.pages {
		if pg.lost {
			n++
		}
	}
	return n
}

// SyncAll makes everything durable, as sync(2) would on a disk (a sync(2) on the mount
// itself does nothing): the dirty pages and sizes of every file, and every namespace
// change. Pages lost to a failed fsync stay lost.
func (pc *FS) SyncAll() error {
	pc.nsmu.Lock()
	defer pc.nsmu.Unlock()
	pc.mu.Lock()
	defer pc.mu.Unlock()
	var errs []error
	for k, v := range pc.files {
		if _, err := pc.writeBack(v); err != nil {
			errs = append(errs, fmt.Errorf("powercut: sync: %w", err))
		}
		if v.clean() {
			if err := pc.dropFile(k); err != nil {
				errs = append(errs, fmt.Errorf("powercut: sync: %w", err))
			}
		}
	}
	kept := pc.journal.settle(func(int) bool { return true })
	if err := pc.journal.commit(kept); err != nil {
		errs = append(errs, fmt.Errorf("powercut: sync: %w", err))
	}
	return errors.Join(errs...)
}

// FailNextSync makes the next fsync or fdatasync of a file whose path matches glob (an
// fsync of a directory too) fail with errno (EIO if 0), as a disk's write error does.
// Like Linux after a failed writeback, the file's dirty pages are then lost: readers
// still see them, but no later fsync writes them, and a cut drops them. Its size and
// any truncation stay pending. A directory's namespace changes stay as they were, not
// durable. A glob is matched as Hook globs are (see On); one call fails one fsync.
func (pc *FS) FailNextSync(glob string, errno syscall.Errno) {
	if errno == 0 {
		errno = syscall.EIO
	}
	pc.hooks.mu.Lock()
	defer pc.hooks.mu.Unlock()
	pc.hooks.fails = append(pc.hooks.fails, failRule{glob: glob, errno: errno})
}

// On registers fn to be called when a call of kind op on a path matching glob is
// about to be carried out (Before) or has been (After). An empty glob matches every
// path, a glob without a slash the last element of the path, any other the whole path
// relative to the mount point (path.Match); a rename matches by either of its paths.
// The returned function removes the hook.
func (pc *FS) On(op Op, glob string, when When, fn Hook) (remove func()) {
	return pc.hooks.add(&hook{op: op, glob: glob, when: when, fn: fn})
}

// fire runs the hooks matching ev and returns the errno the first that failed asked
// for. A hook that has not returned when Close starts is left running, and the call
// fails with EIO: the FUSE server must be able to stop.
func (pc *FS) fire(ev Event) syscall.Errno {
	for _, h := range pc.hooks.matching(ev) {
		res := make(chan error, 1)
		go func() {
			// A hook that ends its goroutine (t.FailNow) fails the call with EIO.
			err := error(syscall.EIO)
			defer func() { res <- err }()
			err = h.fn(ev)
		}()
		select {
		case err := <-res:
			if err != nil {
				return errnoOf(err)
			}
		case <-pc.closing:
			return syscall.EIO
		}
	}
	return 0
}

// Stats counts the calls the file system served.
type Stats struct {
	Writes, Truncates  int64
	Fsyncs, Fdatasyncs int64 // of files, successful or not
	DirFsyncs          int64 // successful or not
	FailedSyncs        int64 // of files and directories, by FailNextSync
	PagesWritten       int64 // pages written back to the backing files
	Creates, Unlinks   int64
	Renames            int64
	Cuts               int64
}

type counters struct {
	writes, truncates, fsyncs, fdatasyncs, dirFsyncs, failedSyncs, pagesWritten atomic.Int64
	creates, unlinks, renames, cuts                                             atomic.Int64
}

// Stats returns the counts so far.
func (pc *FS) Stats() Stats {
	c := &pc.stats
	return Stats{
		Writes: c.writes.Load(), Truncates: c.truncates.Load(),
		Fsyncs: c.fsyncs.Load(), Fdatasyncs: c.fdatasyncs.Load(), DirFsyncs: c.dirFsyncs.Load(),
		FailedSyncs: c.failedSyncs.Load(), PagesWritten: c.pagesWritten.Load(),
		Creates: c.creates.Load(), Unlinks: c.unlinks.Load(), Renames: c.renames.Load(),
		Cuts: c.cuts.Load(),
	}
}

// file returns the volatile state of n's file, made if need be. pc.mu is held.
func (pc *FS) file(n *node) (*vfile, error) {
	if v := pc.files[n.key]; v != nil {
		return v, nil
	}
	f, err := os.OpenFile(procPath(n.fd), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		_ = f.Close() // nothing was written through it; the Stat's error is returned
		return nil, err
	}
	v := newVfile(f, st.Size())
	v.mtime = st.ModTime()
	pc.files[n.key] = v
	return v, nil
}

// writeBack writes v back and leaves its modification time on the backing file.
// pc.mu is held.
func (pc *FS) writeBack(v *vfile) (int, error) {
	if !v.dirty() {
		return 0, nil
	}
	n, err := v.writeBack()
	pc.stats.pagesWritten.Add(int64(n))
	if err != nil {
		return n, err
	}
	f := v.b.(*os.File)
	ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, unix.NsecToTimespec(v.mtime.UnixNano())}
	return n, unix.UtimesNanoAt(unix.AT_FDCWD, procPath(f), ts, 0)
}

// dropFile forgets the volatile state of a file and closes its backing file. That file
// is the one write-backs go through, so its Close is checked: it can report a write the
// backing file system did not keep. pc.mu is held.
func (pc *FS) dropFile(k fileKey) error {
	v := pc.files[k]
	if v == nil {
		return nil
	}
	delete(pc.files, k)
	if err := v.b.(*os.File).Close(); err != nil {
		return fmt.Errorf("close the backing file of inode %d: %w", k.ino, err)
	}
	return nil
}

// procPath is a path that opens what f is open on, even when it has no name left.
func procPath(f *os.File) string { return fmt.Sprintf("/proc/self/fd/%d", f.Fd()) }

func openPath(dirfd int, name string) (*os.File, error) {
	fd, err := unix.Openat(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), name), nil
}

// joinPath joins a directory's mount-relative path and a name.
func joinPath(dir, name string) string {
	if dir == "" {
		return name
	}
	return strings.TrimSuffix(dir, "/") + "/" + name
}
