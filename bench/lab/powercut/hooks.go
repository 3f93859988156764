package powercut

import (
	"errors"
	"path"
	"strings"
	"sync"
	"syscall"
)

// Op is a kind of file-system call that hooks and FailNextSync can match.
type Op int

const (
	OpWrite    Op = iota + 1 // write(2) and its kin
	OpTruncate               // truncate, ftruncate, open with O_TRUNC
	OpFsync                  // fsync or fdatasync of a file that is not a directory
	OpFsyncDir               // fsync of a directory
	OpCreate                 // create, mkdir, mknod (a Unix socket too), symlink
	OpUnlink                 // unlink, rmdir
	OpRename                 // rename, renameat2
)

func (o Op) String() string {
	switch o {
	case OpWrite:
		return "write"
	case OpTruncate:
		return "truncate"
	case OpFsync:
		return "fsync"
	case OpFsyncDir:
		return "fsync-dir"
	case OpCreate:
		return "create"
	case OpUnlink:
		return "unlink"
	case OpRename:
		return "rename"
	}
	return "op?"
}

// When says whether a hook runs before or after the call is carried out.
type When int

const (
	Before When = iota + 1
	After
)

func (w When) String() string {
	switch w {
	case Before:
		return "before"
	case After:
		return "after"
	}
	return "when?"
}

// Event is what a hook is told of the call it stands in.
type Event struct {
	Op   Op
	When When
	// Path is the file's path relative to the mount point, slash-separated; NewPath is
	// the target of a rename.
	Path, NewPath string
	// Off and Len are a write's range; Off is a truncation's new size.
	Off, Len int64
	// Datasync says an OpFsync is an fdatasync.
	Datasync bool
	// Pid is the thread that made the call, as the kernel reports it: kill(2) on it
	// reaches its process.
	Pid uint32
	// Err is, after the call, what it returns unless the hook says otherwise.
	Err error
}

// Hook is called synchronously, in the FUSE server, while the caller's system call
// waits. A non-nil error from a Before hook fails the call with it (an errno, or EIO)
// without carrying it out; from an After hook, it replaces the call's result, the call
// having been carried out. A hook that stands for a crash of the caller kills the
// caller (Event.Pid, or a process the test knows) and, Before, returns an error such as
// syscall.EIO: the caller dies waiting, as the kernel delivers SIGKILL only when the
// call returns, and the call must not happen on its behalf meanwhile.
//
// A hook runs on a goroutine of its own, with no lock of the FS held: it may read and
// write the mount, and call Cut; it must not call t.FailNow (if it does, the call
// fails with EIO). It may block; Close unblocks the call it stands in (which then fails with EIO)
// but not the hook itself, which should also watch whatever the test uses to stop.
type Hook func(Event) error

type hook struct {
	op   Op
	glob string
	when When
	fn   Hook
}

// failRule is a FailNextSync not used yet.
type failRule struct {
	glob  string
	errno syscall.Errno
}

type hooks struct {
	mu    sync.Mutex
	hooks []*hook
	fails []failRule
}

// match says whether glob matches p, a slash-separated path relative to the mount
// point: an empty glob matches every path, a glob without a slash is matched against
// p's last element, any other against the whole of p (path.Match).
func match(glob, p string) bool {
	if glob == "" {
		return true
	}
	if !strings.Contains(glob, "/") {
		p = path.Base(p)
	}
	ok, _ := path.Match(glob, p)
	return ok
}

func (hs *hooks) add(h *hook) (remove func()) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	hs.hooks = append(hs.hooks, h)
	return func() {
		hs.mu.Lock()
		defer hs.mu.Unlock()
		for i, x := range hs.hooks {
			if x == h {
				hs.hooks = append(hs.hooks[:i:i], hs.hooks[i+1:]...)
				return
			}
		}
	}
}

func (hs *hooks) matching(ev Event) []*hook {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	var out []*hook
	for _, h := range hs.hooks {
		if h.op == ev.Op && h.when == ev.When && (match(h.glob, ev.Path) || ev.NewPath != "" && match(h.glob, ev.NewPath)) {
			out = append(out, h)
		}
	}
	return out
}

// takeFail removes and returns the first FailNextSync rule matching p, if any.
func (hs *hooks) takeFail(p string) (syscall.Errno, bool) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	for i, r := range hs.fails {
		if match(r.glob, p) {
			hs.fails = append(hs.fails[:i:i], hs.fails[i+1:]...)
			return r.errno, true
		}
	}
	return 0, false
}

// errnoOf turns a hook's error into the errno the caller gets.
func errnoOf(err error) syscall.Errno {
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 {
		return errno
	}
	return syscall.EIO
}
