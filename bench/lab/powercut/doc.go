// Package powercut is a file system for tests that loses, on demand, what a power cut
// would lose: a FUSE mount (github.com/hanwen/go-fuse/v2) over a real directory, the
// backing directory, with a volatile layer in between, after LazyFS. A program under
// test uses the mount through its ordinary system calls; the test cuts the power
// (Cut), fails an fsync (FailNextSync), or stops the program at an exact call (On),
// then restarts the program on what survived.
//
// # What it models
//
// File data. Each file has a page cache of 4 KiB pages (PageSize), kept per inode,
// whatever its names. write, truncate, ftruncate, open with O_TRUNC and fallocate
// (modes 0 and FALLOC_FL_KEEP_SIZE: only the size is modelled) change the cache only.
// fsync and fdatasync of the file, through any of its open files (a read-only one
// too), write all its dirty pages and its size back to the backing file; the two
// calls do the same here. A write through a file opened with O_SYNC or O_DSYNC is
// written back at once. close makes nothing durable; neither does sync(2) or
// syncfs(2) on the mount (SyncAll is the test's sync). Reads see the cache, as they
// would see the kernel's page cache.
//
// Namespace. create, mkdir, mknod (Unix sockets too), symlink, unlink, rmdir and
// rename (with RENAME_NOREPLACE or RENAME_EXCHANGE) are applied to the backing
// directory at once and journalled; a cut undoes those not durable yet, newest first.
// A change is durable once every directory whose entries it changed (one, or the two
// of a rename between directories) was fsynced after it. Following the order in which
// a journalling file system commits, a durable change also makes durable every earlier
// change to a directory it touches, or to the directory it removed. An fsync of a
// file does not make its name durable: as POSIX says and PostgreSQL assumes, only an
// fsync of its directory does (ext4 is more lenient). What a change removed (an
// unlinked file, a removed directory, the file a rename replaced) waits in
// .powercut-attic in the backing root, hidden from the mount, until the change is
// durable or undone.
//
// Power cuts. Cut(All) drops every dirty page and size change and undoes every
// namespace change not durable. Cut(Random(seed)) keeps a part of them drawn from the
// seed, the same part for the same seed and calls: of each file, the new size (with
// any truncation before it) with probability 1/2 and each dirty page, whole, with
// probability 1/2, so that each page holds its old content or its new, never a mix
// (after a truncation, a page may also hold the truncation's zeros); of the namespace
// changes, those made before a point drawn uniformly in the order they were made, as
// a journalling file system commits them in order. After a cut the mount shows at once what survived; it stays mounted and
// is used on as a file system after a reboot.
//
// Write errors. FailNextSync makes the next fsync of a matching file (or directory)
// fail, by default with EIO. As Linux does after a failed writeback, the file's dirty
// pages are then marked clean but never reach the disk: readers still see them until a
// cut, a later fsync succeeds without writing them, and a cut drops them. That is what
// PostgreSQL learnt in 2018 ("fsyncgate"): a failed fsync means the data written since
// the last good one may be lost, and retrying the fsync proves nothing. A page written
// again is dirty again, whole. The error is reported once, not once for each open
// file as Linux's errseq does. A failed directory fsync leaves its namespace changes
// as they were, not durable.
//
// Crash points. On registers a Hook called before or after a write, truncate, fsync,
// directory fsync, create, unlink or rename of a matching path, synchronously, while
// the caller waits in its system call: a test can kill the process under test exactly
// between a write and its fsync, or between a truncate and a rename. Stats counts the
// calls, for assertions.
//
// # What it does not model
//
//   - Metadata other than size and names: mode, owner and times are set on the
//     backing file at once and are durable at once (the mtime shown is the cache's).
//   - Torn writes inside a page (a 512-byte sector written alone), and any order among
//     the pages of one write-back: a write-back is whole, and a cut never falls inside
//     one unless a hook calls Cut there.
//   - Any tie between a file's data and its name (ext4's data=ordered): they are made
//     durable independently.
//   - Hard links and extended attributes (EOPNOTSUPP), shared mmap (the mount uses
//     direct I/O so that nothing is cached in the kernel), O_TMPFILE, fallocate's punch
//     and zero ranges (EOPNOTSUPP), copy_file_range (the kernel falls back to copying).
//   - A full disk: writes only fail when the backing file system does; FailNextSync
//     stands in for write errors.
//   - The backing directory itself is never fsynced: it is the disk, and the machine
//     that runs the tests is not expected to lose power.
//
// File locks (flock, fcntl) are kept by the kernel for the mount, as on a local file
// system, and are gone with the processes that held them.
//
// # The caller's duties, in order
//
//  1. Mount (in a test; it skips the test when FUSE is unusable: no /dev/fuse, not
//     root, or mount(2) refused) or New, on a new directory. The backing directory may
//     hold a starting state, durable as it is. Leave the backing directory alone while
//     it is mounted: pending namespace changes are applied in it, and the attic is in
//     it.
//  2. Run the program under test on Dir(). It may run as another user (the mount
//     allows other users, and the kernel checks permissions against the modes), if the
//     directories above the mount point let that user through.
//  3. To crash it: kill every process that uses the mount and wait for them to exit,
//     then Cut. A file still open across a cut goes on working on what survived of it.
//     A Hook that kills the caller at an exact call and stands for its crash returns
//     an error from a Before hook, so that the call is not carried out on behalf of the
//     dying process.
//  4. Restart the program on the same Dir(), and check what it recovers.
//  5. Close (Mount's cleanup does it) once every process using the mount has ended:
//     it is a clean shutdown, which makes durable what is still volatile, removes the
//     attic and unmounts. With files still open, Close aborts the FUSE connection and
//     detaches the mount, and returns an error that says so; it never leaves a mount
//     behind. Close also fails with EIO every call still waiting for a Hook, so a
//     blocked hook cannot keep the FUSE server from stopping; the hook itself should
//     watch what the test uses to stop.
package powercut
