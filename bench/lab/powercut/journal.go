package powercut

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The namespace changes made through the mount (create, mkdir, mknod, symlink, unlink,
// rmdir, rename) are applied to the backing directory at once, and journalled so that
// a cut can undo the ones that were not durable yet. Nothing is deleted from the
// backing directory until its removal is durable: an unlinked file, a removed
// directory and the file a rename replaced wait in the attic, a directory of the
// backing root hidden from the mount, from which an undo brings them back.
//
// When a change becomes durable:
//   - every directory whose entries it changed was fsynced after it (one directory, or
//     the two of a rename between directories); or
//   - a later change that became durable touches a directory it touches, or the
//     directory it removed: a file system commits the changes of a directory in
//     order, so a later change cannot survive without the earlier ones it may build on.
//
// Directories are told apart by inode, not by path, and each journal entry holds the
// directories it changed open (O_PATH): undoing it works whatever was renamed since.

// ident is a backing inode: device and inode number.
type ident struct{ dev, ino uint64 }

type nsKind int

const (
	nsCreate   nsKind = iota // a file, a special file or a symbolic link
	nsMkdir                  // a directory
	nsUnlink                 // a non-directory, now in the attic
	nsRmdir                  // an empty directory, now in the attic
	nsRename                 // the entry replaced, if any, is in the attic
	nsExchange               // RENAME_EXCHANGE
)

// dirRef is a directory a namespace change touched.
type dirRef struct {
	f      *os.File // O_PATH
	id     ident
	synced bool // fsynced since the change
}

// nsOp is one journalled namespace change. For a rename, names[0] is in dirs[0] and
// names[1] in the last of dirs (the same when the rename stays in one directory).
type nsOp struct {
	kind  nsKind
	dirs  []*dirRef
	names [2]string
	// attic is the name in the attic of what the change took out of the namespace: the
	// file or directory removed, or the entry a rename replaced.
	attic string
	// removed is the directory the change took out of the namespace, if any.
	removed ident
	keep    bool // scratch of settle
}

func (op *nsOp) from() *dirRef { return op.dirs[0] }
func (op *nsOp) to() *dirRef   { return op.dirs[len(op.dirs)-1] }

func (op *nsOp) String() string {
	switch op.kind {
	case nsCreate:
		return "create " + op.names[0]
	case nsMkdir:
		return "mkdir " + op.names[0]
	case nsUnlink:
		return "unlink " + op.names[0]
	case nsRmdir:
		return "rmdir " + op.names[0]
	case nsRename:
		return "rename " + op.names[0] + " to " + op.names[1]
	default:
		return "exchange " + op.names[0] + " and " + op.names[1]
	}
}

func (op *nsOp) synced() bool {
	for _, d := range op.dirs {
		if !d.synced {
			return false
		}
	}
	return true
}

// touches says whether the change touches a directory in set: one whose entries it
// changed, or the one it removed.
func (op *nsOp) touches(set map[ident]bool) bool {
	for _, d := range op.dirs {
		if set[d.id] {
			return true
		}
	}
	return op.removed != ident{} && set[op.removed]
}

func (op *nsOp) mark(set map[ident]bool) {
	for _, d := range op.dirs {
		set[d.id] = true
	}
	if op.removed != (ident{}) {
		set[op.removed] = true
	}
}

func (op *nsOp) close() {
	for _, d := range op.dirs {
		_ = d.f.Close() // O_PATH: no data goes through it, its Close has nothing to report
	}
}

// journal is the list of namespace changes not durable yet, oldest first.
type journal struct {
	ops       []*nsOp
	atticPath string
	attic     *os.File // O_PATH
	next      uint64
}

// atticName returns a new name in the attic.
func (j *journal) atticName() string {
	j.next++
	return fmt.Sprintf("%d", j.next)
}

// dirSynced records an fsync of directory id.
func (j *journal) dirSynced(id ident) {
	for _, op := range j.ops {
		for _, d := range op.dirs {
			if d.id == id {
				d.synced = true
			}
		}
	}
}

// settle marks the changes that are durable, and those that extra keeps (the choice
// of a random cut, by their index in the journal), with every earlier change that they
// make durable in turn (see the rules above). It returns them and leaves the others in
// the journal.
func (j *journal) settle(extra func(i int) bool) (kept []*nsOp) {
	set := make(map[ident]bool)
	for i := len(j.ops) - 1; i >= 0; i-- {
		op := j.ops[i]
		op.keep = op.synced() || extra != nil && extra(i) || op.touches(set)
		if op.keep {
			op.mark(set)
		}
	}
	rest := j.ops[:0:0]
	for _, op := range j.ops {
		if op.keep {
			kept = append(kept, op)
		} else {
			rest = append(rest, op)
		}
	}
	j.ops = rest
	return kept
}

// commit forgets changes that are durable: what they took out of the namespace leaves
// the attic for good.
func (j *journal) commit(ops []*nsOp) error {
	var errs []error
	for _, op := range ops {
		if op.attic != "" {
			if err := os.RemoveAll(filepath.Join(j.atticPath, op.attic)); err != nil {
				errs = append(errs, fmt.Errorf("%v: %w", op, err))
			}
		}
		op.close()
	}
	return errors.Join(errs...)
}

// undoAll undoes the changes left in the journal, newest first, and empties it.
func (j *journal) undoAll() error {
	var errs []error
	for i := len(j.ops) - 1; i >= 0; i-- {
		op := j.ops[i]
		if err := j.undo(op); err != nil {
			errs = append(errs, fmt.Errorf("undo %v: %w", op, err))
		}
		op.close()
	}
	j.ops = nil
	return errors.Join(errs...)
}

func (j *journal) undo(op *nsOp) error {
	attic := int(j.attic.Fd())
	from, to := int(op.from().f.Fd()), int(op.to().f.Fd())
	switch op.kind {
	case nsCreate, nsMkdir:
		// Into the attic and away: a directory goes with whatever it holds, as a
		// directory whose entry was lost takes its files with it.
		g := j.atticName()
		if err := unix.Renameat2(from, op.names[0], attic, g, unix.RENAME_NOREPLACE); err != nil {
			return err
		}
		return os.RemoveAll(filepath.Join(j.atticPath, g))
	case nsUnlink, nsRmdir:
		return unix.Renameat2(attic, op.attic, from, op.names[0], unix.RENAME_NOREPLACE)
	case nsRename:
		if err := unix.Renameat2(to, op.names[1], from, op.names[0], unix.RENAME_NOREPLACE); err != nil {
			return err
		}
		if op.attic != "" {
			return unix.Renameat2(attic, op.attic, to, op.names[1], unix.RENAME_NOREPLACE)
		}
		return nil
	default:
		return unix.Renameat2(from, op.names[0], to, op.names[1], unix.RENAME_EXCHANGE)
	}
}
