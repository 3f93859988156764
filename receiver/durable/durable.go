// Package durable makes files visible to other processes only whole: every file that
// PostgreSQL or another walship process may read is written under a temporary name in
// the target directory, fsynced, renamed to its final name, and then the directory is
// fsynced so that the rename itself survives a crash. It is the one way walship
// publishes a file; nothing else writes straight into a final name.
package durable

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// TempPrefix starts the name of every temporary file, so that a directory scan can
// recognise and remove the leftovers of a crash.
const TempPrefix = ".walship-tmp-"

// WriteFile publishes data at path with mode perm.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return WriteFrom(path, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	}, perm)
}

// WritePadded publishes data at path followed by zeros up to size bytes, with mode
// perm. The zeros are allocated (fallocate), not written: the file costs the copy of
// data only, and has no hole that a later write into it could fail to fill.
func WritePadded(path string, data []byte, size int64, perm os.FileMode) error {
	if int64(len(data)) > size {
		return fmt.Errorf("publish %s: %d bytes do not fit in %d", path, len(data), size)
	}
	return WriteFrom(path, func(w io.Writer) error {
		f := w.(*os.File) // WriteFrom's writer is the file
		if _, err := f.Write(data); err != nil {
			return err
		}
		err := unix.Fallocate(int(f.Fd()), 0, int64(len(data)), size-int64(len(data)))
		if errors.Is(err, unix.EOPNOTSUPP) {
			err = writeZeros(f, int64(len(data)), size) // a file system without fallocate
		}
		if err != nil {
			return fmt.Errorf("allocate the zeros: %w", err)
		}
		return nil
	}, perm)
}

// writeZeros writes zeros over [from, to) of f.
func writeZeros(f *os.File, from, to int64) error {
	zeros := make([]byte, min(to-from, 1<<20))
	for from < to {
		n, err := f.WriteAt(zeros[:min(to-from, int64(len(zeros)))], from)
		if err != nil {
			return err
		}
		from += int64(n)
	}
	return nil
}

// WriteFrom publishes at path what fill writes, with mode perm. If fill or any step
// fails, the temporary file is removed and path is untouched.
func WriteFrom(path string, fill func(io.Writer) error, perm os.FileMode) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, TempPrefix+base+"-")
	if err != nil {
		return fmt.Errorf("publish %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			// err says what failed; the temporary file is no part of anything, and a
			// leftover of it carries TempPrefix, by which a scan can remove it.
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("publish %s: %w", path, err)
	}
	if err = fill(f); err != nil {
		return fmt.Errorf("publish %s: write: %w", path, err)
	}
	return Rename(f, path)
}

// Rename makes the open file f visible as path: fsync f, close it, rename it and fsync
// the directory. f must live in path's directory. f is closed whatever happens.
func Rename(f *os.File, path string) error {
	if err := f.Sync(); err != nil {
		_ = f.Close() // the fsync failed: that is the error, and the file is not published
		return fmt.Errorf("publish %s: fsync: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("publish %s: close: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("publish %s: %w", path, err)
	}
	return SyncDir(filepath.Dir(path))
}

// MkdirAll makes the directory path, and every directory above it that is missing,
// with mode perm, and fsyncs the directory that holds each one it made: a new
// directory's name is durable only once its parent is fsynced, and everything
// published inside it would go with it. Directories that exist already are left as
// they are, and their parents unsynced.
func MkdirAll(path string, perm os.FileMode) error {
	// The directories to make, from the topmost missing one down.
	var made []string
	for d := filepath.Clean(path); ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil || !errors.Is(err, os.ErrNotExist) {
			break
		}
		made = append([]string{d}, made...)
		if filepath.Dir(d) == d {
			break
		}
	}
	if err := os.MkdirAll(path, perm); err != nil {
		return err
	}
	for _, d := range made {
		if err := SyncDir(filepath.Dir(d)); err != nil {
			return err
		}
	}
	return nil
}

// SyncDir fsyncs a directory, making the renames and creations in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	defer func() { _ = d.Close() }() // read only: the fsync is what counts, and its error is checked
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
