package dirwatch

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Package dirwatch tells when files in a directory are written, created or renamed
// into it, through Linux's inotify. walship uses it to sleep while nothing happens: the
// sidecar waits for the server to write to pg_wal, and a receiver's session for a
// promotion to freeze its spool. While nobody reads, the kernel coalesces the events of
// repeated writes to one file into one queued event, so a busy directory costs a
// watcher that does not read nothing.
//
// Watch is not safe for concurrent use, but for Interrupt.

// Watch is a watch on one directory.
type Watch struct {
	f   *os.File
	buf [4096]byte
}

// Events says which events a Watch reports.
type Events uint32

// Events a Watch can report.
const (
	Written Events = unix.IN_MODIFY                    // a file of the directory was written to
	Added   Events = unix.IN_CREATE | unix.IN_MOVED_TO // a file was created or renamed into it
)

// New watches dir for the events of what.
func New(dir string, what Events) (*Watch, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, uint32(what)); err != nil {
		_ = unix.Close(fd) // a descriptor that watches nothing: the watch's error is the one returned
		return nil, fmt.Errorf("inotify watch on %s: %w", dir, err)
	}
	// A non-blocking descriptor goes to the runtime's poller: Read waits without a thread.
	return &Watch{f: os.NewFile(uintptr(fd), "inotify "+dir)}, nil
}

// Drain throws away the events queued so far, without waiting.
func (w *Watch) Drain() error {
	// A deadline that has passed (the last wait's) would fail the read below at once.
	if err := w.f.SetReadDeadline(time.Time{}); err != nil {
		return err
	}
	rc, err := w.f.SyscallConn()
	if err != nil {
		return err
	}
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			_, err := unix.Read(int(fd), w.buf[:])
			if err != nil {
				if !errors.Is(err, unix.EAGAIN) {
					rerr = err
				}
				return true
			}
		}
	})
	return errors.Join(err, rerr)
}

// Wait waits for an event for at most d; it says whether one came.
func (w *Watch) Wait(d time.Duration) (bool, error) {
	if err := w.f.SetReadDeadline(time.Now().Add(d)); err != nil {
		return false, err
	}
	n, err := w.f.Read(w.buf[:])
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return false, nil
	}
	return n > 0, err
}

// Interrupt ends a Wait at once.
func (w *Watch) Interrupt() {
	// The deadline fails only on a watch that is closed, or one whose descriptor the
	// poller refused: Wait sets a deadline too, and fails the same way, so no Wait is
	// left to end then.
	_ = w.f.SetReadDeadline(time.Now())
}

// Close ends the watch.
func (w *Watch) Close() error { return w.f.Close() }
