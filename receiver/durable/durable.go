// Package durable makes files visible to other processes only whole: every file that
// PostgreSQL or another walship process may read is written under a temporary name in
// the target directory, fsynced, renamed to its final name, and then the directory is
// fsynced so that the rename itself survives a crash. It is the one way walship
// publishes a file; nothing else writes straight into a final name.
package durable

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
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
// perm. The zeros are a hole, not written: a zero-padded partial segment costs the
// copy of its bytes only.
func WritePadded(path string, data []byte, size int64, perm os.FileMode) error {
	if int64(len(data)) > size {
		return fmt.Errorf("publish %s: %d bytes do not fit in %d", path, len(data), size)
	}
	return WriteFrom(path, func(w io.Writer) error {
		if _, err := w.Write(data); err != nil {
			return err
		}
		return w.(*os.File).Truncate(size)
	}, perm)
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
			f.Close()
			os.Remove(f.Name())
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
		f.Close()
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

// SyncDir fsyncs a directory, making the renames and creations in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
