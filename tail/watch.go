package tail

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// walWatch tells when the server writes to pg_wal, through inotify: a write to a
// segment file, a segment created or renamed into place. The sidecar reads it only
// while the flush position stands still, so that an idle primary costs nothing but a
// safety read every wakeCheck; while WAL moves, the kernel coalesces the events of the
// repeated writes into one queued event, and nothing reads them.
type walWatch struct {
	f   *os.File
	buf [4096]byte
}

// wakeCheck is how often an idle sidecar that waits on inotify reads the flush position
// anyway: a safety net for a flush that no write announced (see primary.wait).
const wakeCheck = time.Second

func watchWAL(dir string) (*walWatch, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_MODIFY|unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("inotify watch on %s: %w", dir, err)
	}
	// A non-blocking descriptor goes to the runtime's poller: Read waits without a thread.
	return &walWatch{f: os.NewFile(uintptr(fd), "inotify "+dir)}, nil
}

// drain throws away the events queued so far, without waiting.
func (w *walWatch) drain() error {
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

// wait waits for an event for at most d; it says whether one came.
func (w *walWatch) wait(d time.Duration) (bool, error) {
	if err := w.f.SetReadDeadline(time.Now().Add(d)); err != nil {
		return false, err
	}
	n, err := w.f.Read(w.buf[:])
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return false, nil
	}
	return n > 0, err
}

// interrupt ends a wait at once.
func (w *walWatch) interrupt() { w.f.SetReadDeadline(time.Now()) }

func (w *walWatch) close() error { return w.f.Close() }
