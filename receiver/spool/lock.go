package spool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// ErrLocked means another process holds a spool lock.
var ErrLocked = errors.New("spool is locked by another process")

// lock takes an exclusive lock on a file of the spool without waiting. The lock goes
// with the process; Close of the returned file releases it.
func lock(dir, name, who string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock spool %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close() // nothing was written to it, and the error that counts is the lock's
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock spool %s: %w (%s)", dir, ErrLocked, who)
		}
		return nil, fmt.Errorf("lock spool %s: %w", dir, err)
	}
	return f, nil
}

// LockReceiver takes the lock that keeps a second receiver process off the spool.
func LockReceiver(dir string) (*os.File, error) {
	return lock(dir, receiverLockFile, "another walship receiver runs on it")
}

// LockWriter takes the lock that anyone writing WAL into the spool holds: a receiver's
// session, or walship promote while it freezes the spool.
func LockWriter(dir string) (*os.File, error) {
	return lock(dir, writerLockFile, "a receiver session or a promotion is writing it")
}

// ReceiverRunning says whether a receiver process holds the spool: its lock file is
// locked. It only reads, so any user who can read the spool can ask.
func ReceiverRunning(dir string) (bool, error) {
	f, err := os.Open(filepath.Join(dir, receiverLockFile))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer func() { _ = f.Close() }() // read only
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return true, nil
	}
	return false, err
}
