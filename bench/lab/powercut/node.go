package powercut

import (
	"context"
	"errors"
	"io"
	"log"
	"os"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// node is a file, directory, symbolic link or special file of the mount. It holds its
// backing object open (O_PATH), so that it reaches the same object whatever was
// renamed, and needs no path in the backing directory.
type node struct {
	fs.Inode
	pc   *FS
	fd   *os.File // O_PATH|O_NOFOLLOW
	key  fileKey
	mode uint32 // the S_IFMT bits
	root bool
}

var (
	_ fs.NodeLookuper   = (*node)(nil)
	_ fs.NodeGetattrer  = (*node)(nil)
	_ fs.NodeSetattrer  = (*node)(nil)
	_ fs.NodeOpener     = (*node)(nil)
	_ fs.NodeCreater    = (*node)(nil)
	_ fs.NodeMkdirer    = (*node)(nil)
	_ fs.NodeMknoder    = (*node)(nil)
	_ fs.NodeSymlinker  = (*node)(nil)
	_ fs.NodeReadlinker = (*node)(nil)
	_ fs.NodeUnlinker   = (*node)(nil)
	_ fs.NodeRmdirer    = (*node)(nil)
	_ fs.NodeRenamer    = (*node)(nil)
	_ fs.NodeFsyncer    = (*node)(nil)
	_ fs.NodeReaddirer  = (*node)(nil)
	_ fs.NodeStatfser   = (*node)(nil)
)

// newNode makes the node of the backing object f is open on (O_PATH), and its identity
// for go-fuse.
func (pc *FS) newNode(f *os.File) (*node, fs.StableAttr, error) {
	var stx unix.Statx_t
	err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_TYPE|unix.STATX_INO|unix.STATX_BTIME, &stx)
	if err != nil {
		return nil, fs.StableAttr{}, err
	}
	gen := uint64(1)
	if stx.Mask&unix.STATX_BTIME != 0 {
		gen = uint64(stx.Btime.Sec)*1e9 + uint64(stx.Btime.Nsec)
	}
	dev := unix.Mkdev(stx.Dev_major, stx.Dev_minor)
	n := &node{pc: pc, fd: f, key: fileKey{ident{dev, stx.Ino}, gen}, mode: uint32(stx.Mode) & unix.S_IFMT}
	return n, fs.StableAttr{Mode: n.mode, Ino: pc.ino(dev, stx.Ino), Gen: gen}, nil
}

// ino is the inode number the mount shows for a backing inode: the backing one, with
// the device mixed in for an inode on another device than the backing root's, as
// go-fuse's loopback does.
func (pc *FS) ino(dev, ino uint64) uint64 {
	swap := func(x uint64) uint64 { return x<<32 | x>>32 }
	return swap(dev) ^ swap(pc.rootDev) ^ ino
}

func (n *node) dirfd() int { return int(n.fd.Fd()) }

// path is the node's path relative to the mount point, for hooks and FailNextSync.
func (n *node) path() string { return n.Path(nil) }

// reserved says name is the attic, which the mount does not show.
func (n *node) reserved(name string) bool { return n.root && name == atticName }

// dirRef returns a reference to the directory n for the journal.
func (n *node) dirRef() (*dirRef, error) {
	fd, err := unix.FcntlInt(uintptr(n.fd.Fd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return &dirRef{f: os.NewFile(uintptr(fd), n.fd.Name()), id: n.key.ident}, nil
}

func pidOf(ctx context.Context) uint32 {
	if c, ok := fuse.FromContext(ctx); ok {
		return c.Pid
	}
	return 0
}

// after runs the After hooks of ev, the call having returned errno.
func (pc *FS) after(ev Event, errno syscall.Errno) syscall.Errno {
	ev.When = After
	if errno != 0 {
		ev.Err = errno
	}
	if e := pc.fire(ev); e != 0 {
		return e
	}
	return errno
}

// before runs the Before hooks of ev.
func (pc *FS) before(ev Event) syscall.Errno {
	ev.When = Before
	return pc.fire(ev)
}

// record journals a namespace change. pc.nsmu is held.
func (pc *FS) record(op *nsOp) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.journal.ops = append(pc.journal.ops, op)
}

// atticName reserves a name in the attic. pc.nsmu is held.
func (pc *FS) atticName() string {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.journal.atticName()
}

// own gives what the caller of ctx made to the caller, as a disk file system would.
func own(ctx context.Context, fd int, name string) error {
	c, ok := fuse.FromContext(ctx)
	if !ok || os.Geteuid() != 0 || c.Uid == 0 && c.Gid == 0 {
		return nil
	}
	return unix.Fchownat(fd, name, int(c.Uid), int(c.Gid), unix.AT_SYMLINK_NOFOLLOW|unix.AT_EMPTY_PATH)
}

// unmake removes name, which a create, mkdir, mknod or symlink in n made in the backing
// directory before it failed, not journalled yet: the call fails whole, as on a disk.
// Its caller returns the error that made it fail; if name cannot be removed, it is
// logged, as it stays in the backing directory outside the journal (a cut keeps it).
// pc.nsmu is held.
func (n *node) unmake(name string, dir bool) {
	flags := 0
	if dir {
		flags = unix.AT_REMOVEDIR
	}
	if err := unix.Unlinkat(n.dirfd(), name, flags); err != nil {
		log.Printf("powercut: %s, made by a call that failed, stays in the backing directory, not journalled: %v", joinPath(n.path(), name), err)
	}
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if n.reserved(name) {
		return nil, syscall.ENOENT
	}
	n.pc.nsmu.RLock()
	defer n.pc.nsmu.RUnlock()
	f, err := openPath(n.dirfd(), name)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	return n.adopt(ctx, name, f, out)
}

// adopt makes the child name of n, which f is open on (O_PATH), a node of the tree,
// unless it is one already.
func (n *node) adopt(ctx context.Context, name string, f *os.File, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	child, id, err := n.pc.newNode(f)
	if err != nil {
		_ = f.Close() // O_PATH: no data goes through it
		return nil, fs.ToErrno(err)
	}
	if errno := child.getattr(&out.Attr); errno != 0 {
		_ = f.Close() // O_PATH: no data goes through it
		return nil, errno
	}
	if c := n.GetChild(name); c != nil && c.StableAttr() == id {
		_ = f.Close() // O_PATH: no data goes through it
		return c, 0
	}
	// If go-fuse knows the inode under another name, it keeps that node and drops
	// this one, whose file the runtime closes once it is unreachable.
	return n.NewInode(ctx, child, id), 0
}

func (n *node) getattr(out *fuse.Attr) syscall.Errno {
	var st syscall.Stat_t
	if err := syscall.Fstat(n.dirfd(), &st); err != nil {
		return fs.ToErrno(err)
	}
	out.FromStat(&st)
	out.Ino = n.pc.ino(st.Dev, st.Ino)
	if n.mode != unix.S_IFREG {
		return 0
	}
	n.pc.mu.Lock()
	defer n.pc.mu.Unlock()
	if v := n.pc.files[n.key]; v != nil {
		out.Size = uint64(v.size)
		out.Blocks = (out.Size + 511) / 512
		out.Mtime, out.Mtimensec = uint64(v.mtime.Unix()), uint32(v.mtime.Nanosecond())
	}
	return 0
}

func (n *node) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return n.getattr(&out.Attr)
}

func (n *node) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if size, ok := in.GetSize(); ok {
		switch n.mode {
		case unix.S_IFREG:
		case unix.S_IFDIR:
			return syscall.EISDIR
		default:
			return syscall.EINVAL
		}
		if errno := n.pc.truncate(ctx, n, int64(size)); errno != 0 {
			return errno
		}
	}
	if mode, ok := in.GetMode(); ok && n.mode != unix.S_IFLNK {
		if err := unix.Fchmodat(unix.AT_FDCWD, procPath(n.fd), mode, 0); err != nil {
			return fs.ToErrno(err)
		}
	}
	uid, uok := in.GetUID()
	gid, gok := in.GetGID()
	if uok || gok {
		u, g := -1, -1
		if uok {
			u = int(uid)
		}
		if gok {
			g = int(gid)
		}
		if err := unix.Fchownat(n.dirfd(), "", u, g, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fs.ToErrno(err)
		}
	}
	atime, aok := in.GetATime()
	mtime, mok := in.GetMTime()
	if (aok || mok) && n.mode != unix.S_IFLNK {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if aok {
			ts[0] = unix.NsecToTimespec(atime.UnixNano())
		}
		if mok {
			ts[1] = unix.NsecToTimespec(mtime.UnixNano())
			n.pc.mu.Lock()
			if v := n.pc.files[n.key]; v != nil {
				v.mtime = mtime
			}
			n.pc.mu.Unlock()
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, procPath(n.fd), ts, 0); err != nil {
			return fs.ToErrno(err)
		}
	}
	return n.getattr(&out.Attr)
}

// truncate sets the size of n's file in the cache.
func (pc *FS) truncate(ctx context.Context, n *node, size int64) syscall.Errno {
	ev := Event{Op: OpTruncate, Path: n.path(), Off: size, Pid: pidOf(ctx)}
	if errno := pc.before(ev); errno != 0 {
		return errno
	}
	pc.stats.truncates.Add(1)
	pc.mu.Lock()
	v, err := pc.file(n)
	if err == nil {
		v.truncate(size)
		v.mtime = time.Now()
	}
	pc.mu.Unlock()
	return pc.after(ev, fs.ToErrno(err))
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.mode != unix.S_IFREG {
		return nil, 0, syscall.EINVAL
	}
	acc := int(flags) & unix.O_ACCMODE
	f, err := os.OpenFile(procPath(n.fd), acc|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, 0, fs.ToErrno(err)
	}
	if flags&unix.O_TRUNC != 0 && acc != unix.O_RDONLY {
		if errno := n.pc.truncate(ctx, n, 0); errno != 0 {
			_ = f.Close() // nothing was written through it; the truncate's errno is returned
			return nil, 0, errno
		}
	}
	return n.pc.handle(n, f, flags), fuse.FOPEN_DIRECT_IO, 0
}

// handle makes the handle of an open of n, f being the backing file open.
func (pc *FS) handle(n *node, f *os.File, flags uint32) *handle {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.open[n.key]++
	// O_SYNC includes O_DSYNC.
	return &handle{n: n, f: f, sync: flags&unix.O_DSYNC != 0}
}

// errExists says that a create without O_EXCL found the file there.
var errExists = errors.New("exists")

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	if n.reserved(name) {
		return nil, nil, 0, syscall.EPERM
	}
	ev := Event{Op: OpCreate, Path: joinPath(n.path(), name), Pid: pidOf(ctx)}
	if errno := n.pc.before(ev); errno != 0 {
		return nil, nil, 0, errno
	}
	child, h, err := n.create(ctx, name, flags, mode, out)
	if errors.Is(err, errExists) {
		// The kernel thought the name free: open the file that is there instead.
		ch, errno := n.Lookup(ctx, name, out)
		if errno != 0 {
			return nil, nil, 0, n.pc.after(ev, errno)
		}
		fh, fl, errno := ch.Operations().(*node).Open(ctx, flags&^(unix.O_CREAT|unix.O_EXCL))
		if errno = n.pc.after(ev, errno); errno != 0 {
			if h, ok := fh.(*handle); ok {
				_ = h.Release(ctx) // always 0; the errno returned is the create's
			}
			return nil, nil, 0, errno
		}
		return ch, fh, fl, 0
	}
	if errno := n.pc.after(ev, fs.ToErrno(err)); errno != 0 {
		if h != nil {
			_ = h.Release(ctx) // always 0; the errno returned is the create's
		}
		return nil, nil, 0, errno
	}
	return child, h, fuse.FOPEN_DIRECT_IO, 0
}

func (n *node) create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, *handle, error) {
	n.pc.nsmu.Lock()
	defer n.pc.nsmu.Unlock()
	fd, err := unix.Openat(n.dirfd(), name, unix.O_CREAT|unix.O_EXCL|unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, mode&0o7777)
	if errors.Is(err, unix.EEXIST) && flags&unix.O_EXCL == 0 {
		return nil, nil, errExists
	}
	if err != nil {
		return nil, nil, err
	}
	f := os.NewFile(uintptr(fd), name)
	err = unix.Fchmod(fd, mode&0o7777) // exactly the mode asked for: the kernel applied the umask
	if err == nil {
		err = own(ctx, fd, "")
	}
	if err != nil {
		_ = f.Close() // nothing was written through it; err is the one returned
		n.unmake(name, false)
		return nil, nil, err
	}
	child, errno := n.made(ctx, nsCreate, name, out)
	if errno != 0 {
		_ = f.Close() // nothing was written through it; errno is the one returned
		return nil, nil, errno
	}
	return child, n.pc.handle(child.Operations().(*node), f, flags), nil
}

// made journals the creation of name in n and returns its node. pc.nsmu is held.
func (n *node) made(ctx context.Context, kind nsKind, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	d, err := n.dirRef()
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	n.pc.record(&nsOp{kind: kind, dirs: []*dirRef{d}, names: [2]string{name}})
	n.pc.stats.creates.Add(1)
	f, err := openPath(n.dirfd(), name)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	return n.adopt(ctx, name, f, out)
}

// mk runs make, which makes name in n, as a namespace change of kind.
func (n *node) mk(ctx context.Context, kind nsKind, name string, out *fuse.EntryOut, make func() error) (*fs.Inode, syscall.Errno) {
	if n.reserved(name) {
		return nil, syscall.EPERM
	}
	ev := Event{Op: OpCreate, Path: joinPath(n.path(), name), Pid: pidOf(ctx)}
	if errno := n.pc.before(ev); errno != 0 {
		return nil, errno
	}
	child, errno := func() (*fs.Inode, syscall.Errno) {
		n.pc.nsmu.Lock()
		defer n.pc.nsmu.Unlock()
		if err := make(); err != nil {
			return nil, fs.ToErrno(err)
		}
		if err := own(ctx, n.dirfd(), name); err != nil {
			n.unmake(name, kind == nsMkdir)
			return nil, fs.ToErrno(err)
		}
		return n.made(ctx, kind, name, out)
	}()
	if errno := n.pc.after(ev, errno); errno != 0 {
		return nil, errno
	}
	return child, 0
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return n.mk(ctx, nsMkdir, name, out, func() error {
		if err := unix.Mkdirat(n.dirfd(), name, mode&0o7777); err != nil {
			return err
		}
		return unix.Fchmodat(n.dirfd(), name, mode&0o7777, 0)
	})
}

func (n *node) Mknod(ctx context.Context, name string, mode uint32, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return n.mk(ctx, nsCreate, name, out, func() error {
		if err := unix.Mknodat(n.dirfd(), name, mode, int(dev)); err != nil {
			return err
		}
		return unix.Fchmodat(n.dirfd(), name, mode&0o7777, 0)
	})
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return n.mk(ctx, nsCreate, name, out, func() error {
		return unix.Symlinkat(target, n.dirfd(), name)
	})
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	buf := make([]byte, unix.PathMax)
	k, err := unix.Readlinkat(n.dirfd(), "", buf)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	return buf[:k], 0
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	return n.remove(ctx, name, false)
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	return n.remove(ctx, name, true)
}

// remove unlinks name from n (rmdir: a directory, unlink: anything else) by moving it
// into the attic.
func (n *node) remove(ctx context.Context, name string, dir bool) syscall.Errno {
	if n.reserved(name) {
		return syscall.EPERM
	}
	ev := Event{Op: OpUnlink, Path: joinPath(n.path(), name), Pid: pidOf(ctx)}
	if errno := n.pc.before(ev); errno != 0 {
		return errno
	}
	err := func() error {
		n.pc.nsmu.Lock()
		defer n.pc.nsmu.Unlock()
		var st unix.Stat_t
		if err := unix.Fstatat(n.dirfd(), name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
		isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
		switch {
		case dir && !isDir:
			return unix.ENOTDIR
		case !dir && isDir:
			return unix.EISDIR
		}
		op := &nsOp{kind: nsUnlink, names: [2]string{name}}
		if dir {
			if err := empty(n.dirfd(), name); err != nil {
				return err
			}
			op.kind, op.removed = nsRmdir, ident{st.Dev, st.Ino}
		}
		d, err := n.dirRef()
		if err != nil {
			return err
		}
		op.dirs = []*dirRef{d}
		op.attic = n.pc.atticName()
		if err := unix.Renameat(n.dirfd(), name, int(n.pc.journal.attic.Fd()), op.attic); err != nil {
			_ = d.f.Close() // O_PATH: no data goes through it
			return err
		}
		n.pc.record(op)
		n.pc.stats.unlinks.Add(1)
		return nil
	}()
	return n.pc.after(ev, fs.ToErrno(err))
}

// empty says, with ENOTEMPTY, whether the directory name in dirfd holds anything.
func empty(dirfd int, name string) error {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), name)
	defer func() { _ = f.Close() }() // read only
	names, err := f.Readdirnames(1)
	if err != nil && err != io.EOF {
		return err
	}
	if len(names) > 0 {
		return unix.ENOTEMPTY
	}
	return nil
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	if n.reserved(name) || np.reserved(newName) {
		return syscall.EPERM
	}
	ev := Event{Op: OpRename, Path: joinPath(n.path(), name), NewPath: joinPath(np.path(), newName), Pid: pidOf(ctx)}
	if errno := n.pc.before(ev); errno != 0 {
		return errno
	}
	err := n.rename(name, np, newName, flags)
	return n.pc.after(ev, fs.ToErrno(err))
}

func (n *node) rename(name string, np *node, newName string, flags uint32) error {
	n.pc.nsmu.Lock()
	defer n.pc.nsmu.Unlock()
	from, to := n.dirfd(), np.dirfd()
	op := &nsOp{kind: nsRename, names: [2]string{name, newName}}
	d, err := n.dirRef()
	if err != nil {
		return err
	}
	op.dirs = []*dirRef{d}
	if np.key.ident != n.key.ident {
		d2, err := np.dirRef()
		if err != nil {
			_ = d.f.Close() // O_PATH: no data goes through it
			return err
		}
		op.dirs = append(op.dirs, d2)
	}
	err = n.pc.renameBacking(op, from, to, flags)
	if err != nil || op.kind < 0 {
		op.close()
		return err
	}
	n.pc.record(op)
	n.pc.stats.renames.Add(1)
	return nil
}

// renameBacking renames in the backing directory as op says, keeping in the attic the
// entry the rename replaces. An op whose kind it sets negative is a rename that
// changes nothing (both names are links of one file). pc.nsmu is held.
func (pc *FS) renameBacking(op *nsOp, from, to int, flags uint32) error {
	name, newName := op.names[0], op.names[1]
	if flags&unix.RENAME_EXCHANGE != 0 {
		if flags != unix.RENAME_EXCHANGE {
			return unix.EINVAL
		}
		op.kind = nsExchange
		return unix.Renameat2(from, name, to, newName, unix.RENAME_EXCHANGE)
	}
	if flags&^unix.RENAME_NOREPLACE != 0 {
		return unix.EINVAL
	}
	var src, dst unix.Stat_t
	if err := unix.Fstatat(from, name, &src, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return err
	}
	err := unix.Fstatat(to, newName, &dst, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return unix.Renameat2(from, name, to, newName, unix.RENAME_NOREPLACE)
	}
	if err != nil {
		return err
	}
	switch srcDir, dstDir := src.Mode&unix.S_IFMT == unix.S_IFDIR, dst.Mode&unix.S_IFMT == unix.S_IFDIR; {
	case flags&unix.RENAME_NOREPLACE != 0:
		return unix.EEXIST
	case src.Dev == dst.Dev && src.Ino == dst.Ino:
		op.kind = -1 // rename(2): "do nothing, and return a success status"
		return nil
	case srcDir && !dstDir:
		return unix.ENOTDIR
	case !srcDir && dstDir:
		return unix.EISDIR
	case dstDir:
		if err := empty(to, newName); err != nil {
			return err
		}
		attic := int(pc.journal.attic.Fd())
		op.attic, op.removed = pc.atticName(), ident{dst.Dev, dst.Ino}
		if err := unix.Renameat(to, newName, attic, op.attic); err != nil {
			return err
		}
		if err := unix.Renameat2(from, name, to, newName, unix.RENAME_NOREPLACE); err != nil {
			// The rename's error is the one returned. A directory that cannot be put
			// back is lost from the namespace, and with the attic at Close: say so.
			if perr := unix.Renameat(attic, op.attic, to, newName); perr != nil {
				log.Printf("powercut: rename onto %s failed (%v), and the directory it replaced cannot be put back from the attic (%s): %v", newName, err, op.attic, perr)
			}
			return err
		}
		return nil
	default:
		// A hard link keeps the replaced file in the attic, and the rename itself
		// stays atomic in the backing directory.
		attic := int(pc.journal.attic.Fd())
		op.attic = pc.atticName()
		if err := unix.Linkat(to, newName, attic, op.attic, 0); err != nil {
			return err
		}
		if err := unix.Renameat(from, name, to, newName); err != nil {
			// The rename's error is the one returned. A link left in the attic is an
			// extra name of a file that keeps its own, gone with the attic at Close.
			_ = unix.Unlinkat(attic, op.attic, 0)
			return err
		}
		return nil
	}
}

func (n *node) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	if n.mode == unix.S_IFDIR {
		return n.pc.fsyncDir(ctx, n)
	}
	return n.pc.fsyncFile(ctx, n, flags&1 != 0)
}

// fsyncFile is fsync (datasync false) or fdatasync of n's file: both make its data
// and size durable.
func (pc *FS) fsyncFile(ctx context.Context, n *node, datasync bool) syscall.Errno {
	ev := Event{Op: OpFsync, Path: n.path(), Datasync: datasync, Pid: pidOf(ctx)}
	if datasync {
		pc.stats.fdatasyncs.Add(1)
	} else {
		pc.stats.fsyncs.Add(1)
	}
	if errno := pc.before(ev); errno != 0 {
		return errno
	}
	var errno syscall.Errno
	pc.mu.Lock()
	v := pc.files[n.key]
	if e, ok := pc.hooks.takeFail(ev.Path); ok {
		pc.stats.failedSyncs.Add(1)
		errno = e
		if v != nil {
			v.fail()
		}
	} else if v != nil {
		_, err := pc.writeBack(v)
		if v.clean() {
			err = errors.Join(err, pc.dropFile(n.key))
		}
		errno = fs.ToErrno(err)
	}
	pc.mu.Unlock()
	return pc.after(ev, errno)
}

// fsyncDir makes the namespace changes in directory n durable.
func (pc *FS) fsyncDir(ctx context.Context, n *node) syscall.Errno {
	ev := Event{Op: OpFsyncDir, Path: n.path(), Pid: pidOf(ctx)}
	pc.stats.dirFsyncs.Add(1)
	if errno := pc.before(ev); errno != 0 {
		return errno
	}
	errno := func() syscall.Errno {
		pc.nsmu.Lock()
		defer pc.nsmu.Unlock()
		pc.mu.Lock()
		defer pc.mu.Unlock()
		if e, ok := pc.hooks.takeFail(ev.Path); ok {
			pc.stats.failedSyncs.Add(1)
			return e
		}
		pc.journal.dirSynced(n.key.ident)
		return fs.ToErrno(pc.journal.commit(pc.journal.settle(nil)))
	}()
	return pc.after(ev, errno)
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	n.pc.nsmu.RLock()
	defer n.pc.nsmu.RUnlock()
	f, err := os.OpenFile(procPath(n.fd), os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	names, err := f.Readdirnames(-1)
	_ = f.Close() // read only
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	entries := make([]fuse.DirEntry, 0, len(names)+2)
	entries = append(entries, fuse.DirEntry{Name: ".", Mode: unix.S_IFDIR}, fuse.DirEntry{Name: "..", Mode: unix.S_IFDIR})
	for _, name := range names {
		var st unix.Stat_t
		if n.reserved(name) || unix.Fstatat(n.dirfd(), name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil {
			continue
		}
		entries = append(entries, fuse.DirEntry{Name: name, Mode: st.Mode & unix.S_IFMT, Ino: n.pc.ino(st.Dev, st.Ino)})
	}
	return fs.NewListDirStream(entries), 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	var s syscall.Statfs_t
	if err := syscall.Fstatfs(n.dirfd(), &s); err != nil {
		return fs.ToErrno(err)
	}
	out.FromStatfsT(&s)
	return 0
}

// handle is an open regular file.
type handle struct {
	n    *node
	f    *os.File // the backing file, open as the caller asked
	sync bool     // O_SYNC or O_DSYNC: every write is written back at once
}

var (
	_ fs.FileReader    = (*handle)(nil)
	_ fs.FileWriter    = (*handle)(nil)
	_ fs.FileFlusher   = (*handle)(nil)
	_ fs.FileReleaser  = (*handle)(nil)
	_ fs.FileAllocater = (*handle)(nil)
)

func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	pc := h.n.pc
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if v := pc.files[h.n.key]; v != nil {
		k, err := v.read(dest, off)
		if err != nil {
			return nil, fs.ToErrno(err)
		}
		return fuse.ReadResultData(dest[:k]), 0
	}
	k, err := h.f.ReadAt(dest, off)
	if err != nil && err != io.EOF {
		return nil, fs.ToErrno(err)
	}
	return fuse.ReadResultData(dest[:k]), 0
}

func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	pc := h.n.pc
	pc.stats.writes.Add(1)
	ev := Event{Op: OpWrite, Path: h.n.path(), Off: off, Len: int64(len(data)), Pid: pidOf(ctx)}
	if errno := pc.before(ev); errno != 0 {
		return 0, errno
	}
	pc.mu.Lock()
	v, err := pc.file(h.n)
	if err == nil {
		err = v.write(data, off)
		v.mtime = time.Now()
	}
	if err == nil && h.sync {
		_, err = pc.writeBack(v)
	}
	pc.mu.Unlock()
	if errno := pc.after(ev, fs.ToErrno(err)); errno != 0 {
		return 0, errno
	}
	return uint32(len(data)), 0
}

// Flush is close(2): it makes nothing durable.
func (h *handle) Flush(ctx context.Context) syscall.Errno { return 0 }

func (h *handle) Release(ctx context.Context) syscall.Errno {
	// Nothing is written through h.f: writes go to the cache, and a write-back goes
	// through the file FS.file opens, whose Close dropFile checks.
	_ = h.f.Close()
	pc := h.n.pc
	pc.mu.Lock()
	defer pc.mu.Unlock()
	k := h.n.key
	if pc.open[k]--; pc.open[k] > 0 {
		return 0
	}
	delete(pc.open, k)
	// The cache of a file that is gone for good goes with its last handle.
	if v := pc.files[k]; v != nil {
		var st unix.Stat_t
		if unix.Fstat(int(v.b.(*os.File).Fd()), &st) == nil && st.Nlink == 0 {
			// No name is left to it, not even in the attic: nothing of it can be
			// read again, whatever its Close says.
			_ = pc.dropFile(k)
		}
	}
	return 0
}

func (h *handle) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	if mode&^unix.FALLOC_FL_KEEP_SIZE != 0 {
		return syscall.EOPNOTSUPP
	}
	pc := h.n.pc
	pc.mu.Lock()
	defer pc.mu.Unlock()
	v, err := pc.file(h.n)
	if err != nil {
		return fs.ToErrno(err)
	}
	v.allocate(int64(off), int64(size), mode&unix.FALLOC_FL_KEEP_SIZE != 0)
	v.mtime = time.Now()
	return 0
}
