package feeder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/receiver"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// SwitchoverReport says what a switchover did.
type SwitchoverReport struct {
	PID     int    // the old primary's postmaster
	Flush   string // its flush position just before the shutdown
	State   string // its control file's state once it had exited; "" if the sidecar could not say
	Promote Report // the standby's promotion
}

func (r SwitchoverReport) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "switchover: the primary (postmaster PID %d, flush position %s) was stopped with a fast shutdown", r.PID, r.Flush)
	if r.State != "" {
		fmt.Fprintf(&b, "; its control file says %q", r.State)
	}
	b.WriteString("\n")
	b.WriteString(r.Promote.String())
	return b.String()
}

// Switchover swaps the roles of the primary and the standby without losing a commit:
// it checks that the standby is one and belongs to the spool's cluster, asks the
// primary's sidecar (started with --allow-switchover) over the link to stop the primary
// with a fast shutdown, waits for the sidecar's end-of-WAL mark (the drain of the
// primary's last WAL, its shutdown checkpoint included), and promotes the standby
// (Promote). cfg names the standby as for Promote; its Timeout bounds the whole
// switchover (zero: five minutes). If the primary cannot be stopped, nothing changes; if
// it stopped but no end-of-WAL mark comes, the standby is not promoted.
func Switchover(ctx context.Context, cfg PromoteConfig) (SwitchoverReport, error) {
	var rep SwitchoverReport
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Minute // the shutdown checkpoint, the drain and the promotion
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	id, ok, err := spool.ReadIdentity(cfg.Spool)
	if err != nil {
		return rep, err
	}
	if !ok {
		return rep, fmt.Errorf("switchover: spool %s has received nothing yet", cfg.Spool)
	}
	if err := checkStandby(ctx, cfg, id); err != nil {
		return rep, err
	}
	if _, ok, err := spool.ReadTrigger(cfg.Spool); err != nil || ok {
		if err == nil {
			err = fmt.Errorf("spool %s was promoted from before (%s is there): a switchover needs a standby that follows the primary", cfg.Spool, spool.TriggerFile)
		}
		return rep, fmt.Errorf("switchover: %w", err)
	}
	uc, err := receiver.DialControl(cfg.Spool)
	if err != nil {
		return rep, fmt.Errorf("switchover: %w", err)
	}
	defer uc.Close()
	stop := context.AfterFunc(ctx, func() { uc.Close() })
	defer stop()
	cc := transport.NewControlConn(uc)
	if err := cc.Send(&transport.SwitchoverRequest{}); err != nil {
		return rep, fmt.Errorf("switchover: send the request to stop the primary: %w", err)
	}
	if err := cc.Flush(); err != nil {
		return rep, fmt.Errorf("switchover: send the request to stop the primary: %w", err)
	}
	m, err := cc.Recv()
	if err != nil {
		return rep, fmt.Errorf("switchover: the primary was not stopped: %w", err)
	}
	stopping, ok := m.(*transport.SwitchoverStopping)
	if !ok {
		return rep, fmt.Errorf("switchover: the sidecar answered %T", m)
	}
	rep.PID, rep.Flush = stopping.PID, stopping.Flush
	cfg.Logger.Info().Int("pid", rep.PID).Str("flush", rep.Flush).Msg("the primary is shutting down; waiting for the sidecar's drain")
	// The sidecar says when the postmaster has exited: the end-of-WAL mark below is
	// what counts, but its word, or its error, says more if the mark does not come.
	var sidecarErr error
	if m, err := cc.Recv(); err == nil {
		if st, ok := m.(*transport.SwitchoverStopped); ok {
			rep.State = st.State
		}
	} else if !errors.Is(err, io.EOF) {
		sidecarErr = err
		cfg.Logger.Warn().Err(err).Msg("the sidecar did not say that the postmaster exited")
	}
	var mark spool.EndMark
	if err := waitFor(ctx, 10*time.Millisecond, func() (bool, error) {
		var ok bool
		var err error
		mark, ok, err = spool.ReadEnd(cfg.Spool)
		return ok, err
	}); err != nil {
		if sidecarErr != nil {
			err = fmt.Errorf("%w; the sidecar said: %w", err, sidecarErr)
		}
		return rep, fmt.Errorf("switchover: the primary was asked to shut down, but the sidecar's end-of-WAL mark did not come (%w), so the standby was not promoted. "+
			"Do not run walship promote now: it would go on without the primary's last WAL. See the sidecar's log; start the primary again (the sidecar resumes its session) and retry", err)
	}
	if err := checkDrained(mark, rep.Flush); err != nil {
		return rep, err
	}
	rep.Promote, err = Promote(ctx, cfg)
	return rep, err
}

// checkDrained is the check that must pass before a switchover promotes the standby:
// the sidecar's end-of-WAL mark must be at or past flush, the primary's flush position
// that the sidecar reported before the shutdown. A flush position that does not parse
// fails the check: without it, nothing says that the mark holds every commit the
// primary acknowledged.
func checkDrained(mark spool.EndMark, flush string) error {
	lsn, err := wal.ParseLSN(flush)
	if err != nil {
		return fmt.Errorf("switchover: the sidecar reported a flush position that does not parse (%w), so the end-of-WAL mark (%s) cannot be checked against it; the standby was not promoted: see the sidecar's log", err, mark.Position)
	}
	if mark.LSN < lsn {
		return fmt.Errorf("switchover: the end-of-WAL mark says %s, before the flush position %s read before the shutdown; the standby was not promoted: see the sidecar's log", mark.Position, flush)
	}
	return nil
}

// checkStandby checks that the standby runs, is in recovery and belongs to the spool's
// cluster.
func checkStandby(ctx context.Context, cfg PromoteConfig, id spool.Identity) error {
	dsn := cfg.DSN
	if dsn == "" {
		var err error
		if dsn, err = dsnFromPGData(cfg.PGData); err != nil {
			return err
		}
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("switchover: connect to the standby: %w", err)
	}
	defer conn.Close(context.Background())
	var sysid uint64
	var inRecovery bool
	var versionNum int
	if err := conn.QueryRow(ctx, `SELECT (SELECT system_identifier FROM pg_control_system()), pg_is_in_recovery(),
		current_setting('server_version_num')::int`).Scan(&sysid, &inRecovery, &versionNum); err != nil {
		return fmt.Errorf("switchover: read the standby's state: %w", err)
	}
	if err := sameMajor(versionNum, id); err != nil {
		return fmt.Errorf("switchover: %w", err)
	}
	switch {
	case sysid != id.SysID:
		return fmt.Errorf("switchover: %w: spool %s holds system identifier %d, the standby is %d", spool.ErrWrongCluster, cfg.Spool, id.SysID, sysid)
	case !inRecovery:
		return errors.New("switchover: the standby is not in recovery: it is a primary already")
	}
	return nil
}
