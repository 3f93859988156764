package receiver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/transport"
)

// listenControl listens on the spool's control socket, which only the receiver's user
// (and root) may connect to. A socket left by a receiver that died is replaced: the
// receiver lock, held by the caller, says that no other receiver serves the spool.
func listenControl(dir string) (*net.UnixListener, error) {
	path := filepath.Join(dir, spool.ControlSocket)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove the old control socket: %w", err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("restrict %s to its owner: %w", path, err)
	}
	return ln, nil
}

// DialControl connects to the control socket of the receiver running on spoolDir, with
// errors that say what to do.
func DialControl(spoolDir string) (net.Conn, error) {
	sock := filepath.Join(spoolDir, spool.ControlSocket)
	uc, err := net.Dial("unix", sock)
	switch {
	case err == nil:
		return uc, nil
	case errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED):
		return nil, fmt.Errorf("no receiver is running on spool %s (%s): %w", spoolDir, sock, err)
	case errors.Is(err, os.ErrPermission):
		return nil, fmt.Errorf("%s: %w: run this as the receiver's user or as root", sock, err)
	}
	return nil, err
}

// serveControl passes each connection to the control socket through to a backup stream
// to the sidecar of the running session, both ways, until ctx is done.
func (r *Receiver) serveControl(ctx context.Context, ln *net.UnixListener) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		uc, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.passControl(ctx, uc)
		}()
	}
}

// passControl connects uc to a new backup stream of the running session.
func (r *Receiver) passControl(ctx context.Context, uc *net.UnixConn) {
	defer uc.Close()
	c := r.conn.Load()
	if c == nil {
		r.refuseControl(uc, "no sidecar is connected to the receiver of "+r.cfg.Spool+": start walship tail beside the primary")
		return
	}
	st, err := c.OpenControl(ctx)
	if err != nil {
		r.refuseControl(uc, err.Error())
		return
	}
	r.log.Info().Msg("passing a control stream (a base backup or a switchover) through to the sidecar")
	// Either side's end, or the receiver's, ends both.
	stop := context.AfterFunc(ctx, func() { uc.Close(); st.CancelRead(0); st.CancelWrite(0) })
	defer stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, err := io.Copy(st, uc); err != nil {
			st.CancelWrite(0)
			return
		}
		if err := st.Close(); err != nil {
			r.log.Warn().Err(err).Msg("could not end the control stream to the sidecar")
		}
	}()
	if _, err := io.Copy(uc, st); err != nil {
		r.log.Warn().Err(err).Msg("base backup stream ended early")
		st.CancelRead(0)
		uc.Close()
	} else if err := uc.CloseWrite(); err != nil {
		r.log.Warn().Err(err).Msg("could not end the control stream to its client")
	}
	<-done
}

// refuseControl tells a control client why its stream cannot be passed on.
func (r *Receiver) refuseControl(uc net.Conn, msg string) {
	bc := transport.NewControlConn(uc)
	err := bc.Send(&transport.BackupError{Message: msg})
	if err == nil {
		err = bc.Flush()
	}
	if err != nil {
		r.log.Warn().Err(err).Str("refusal", msg).Msg("could not tell a control client why its stream was refused")
	}
}
