package tail

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// AppSwitchover is the application_name of the connection that checks the primary
// before a switchover stops it.
const AppSwitchover = "walship switchover"

// switchoverWait bounds the wait for the postmaster to exit after the fast shutdown.
const switchoverWait = 5 * time.Minute

// switchover stops the primary with a fast shutdown (SIGINT to its postmaster, as
// pg_ctl stop -m fast sends), when the sidecar was started allowing it. The session's
// own loop sees the server go and drains its WAL, the shutdown checkpoint included,
// then sends the end-of-WAL mark, which the command on the standby's host waits for
// before it promotes. bc is told when the shutdown was asked for and when the
// postmaster has exited.
func (p *primary) switchover(ctx context.Context, bc *transport.ControlConn) error {
	if !p.cfg.AllowSwitchover {
		return errors.New("this sidecar was not started with --allow-switchover: stop the primary yourself (pg_ctl stop -m fast), then run walship promote on the standby's host")
	}
	if p.cfg.NoDrain {
		return errors.New("this sidecar runs with --no-drain: a switchover needs the drain that sends the primary's last WAL")
	}
	pg, err := connect(ctx, p.cfg.DSN, AppSwitchover)
	if err != nil {
		return fmt.Errorf("connect to the primary: %w", err)
	}
	rec, err := InRecovery(ctx, pg)
	var flush wal.LSN
	if err == nil && !rec {
		err = pg.QueryRow(ctx, "SELECT pg_current_wal_flush_lsn()").Scan(&flush)
	}
	pg.Close(context.Background())
	switch {
	case err != nil:
		return err
	case rec:
		return errors.New("the sidecar's server is a standby: there is no primary to stop")
	}
	pid, err := postmasterPID(p.pgdata)
	if err != nil {
		return err
	}
	told := make(chan struct{})
	p.stopped.Store(&told)
	defer close(told)
	if err := syscall.Kill(pid, syscall.SIGINT); err != nil {
		return fmt.Errorf("ask the postmaster (PID %d) for a fast shutdown: %w (the sidecar must run as the server's user, or as root)", pid, err)
	}
	p.log.Warn().Int("pid", pid).Stringer("flush", flush).Msg("switchover: fast shutdown of the primary asked for")
	if err := bc.Send(&transport.SwitchoverStopping{PID: pid, Flush: flush.String()}); err != nil {
		return err
	}
	if err := bc.Flush(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, switchoverWait)
	defer cancel()
	for {
		gone, _, err := serverState(p.pgdata)
		if err != nil {
			return err
		}
		if gone {
			break
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("the postmaster (PID %d) has not exited %s after the fast shutdown was asked for", pid, switchoverWait)
			}
			return fmt.Errorf("the session with the receiver ended while the postmaster (PID %d) shut down: %w", pid, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	state := "unknown"
	if c, err := wal.ReadControl(p.pgdata); err == nil {
		state = c.State.String()
	}
	p.log.Info().Int("pid", pid).Str("state", state).Msg("switchover: the primary has stopped")
	if err := bc.Send(&transport.SwitchoverStopped{State: state}); err != nil {
		return err
	}
	return bc.Flush()
}

// postmasterPID reads the postmaster's PID from pgdata's postmaster.pid.
func postmasterPID(pgdata string) (int, error) {
	path := filepath.Join(pgdata, "postmaster.pid")
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("read the postmaster's PID: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("%s names no postmaster: %q", path, line)
	}
	return pid, nil
}
