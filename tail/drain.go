package tail

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// ErrDrained ends a session whose server is gone after the sidecar sent every valid
// record left in pg_wal and the receiver recorded the end-of-WAL mark. The sidecar
// goes on trying to reach the server, which may come back.
var ErrDrained = errors.New("the primary's server is gone; its WAL was drained to the receiver")

// lostServer is what a session needs to decide, once its query failed, whether the
// server is gone for good.
type lostServer struct {
	pgdata string
	dsn    string
	poll   time.Duration
	acks   <-chan error   // the receiver's session ended
	ends   <-chan wal.LSN // the receiver recorded an end-of-WAL mark
}

// serverLost runs when a poll of the flush position failed. A server that takes
// connections again (a dropped connection) starts the session over. A server whose
// processes have all exited gets its WAL drained. Meanwhile, a server that is shutting
// down or whose backends still run after the postmaster died, the session with the
// receiver stays open, so that walship promote knows to wait for the drain.
func (t *Tailer) serverLost(ctx context.Context, cause error, lost *lostServer, sh *shipper, from wal.LSN) error {
	logged := ""
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		pg, err := pgx.Connect(cctx, lost.dsn)
		cancel()
		if err == nil {
			pg.Close(context.Background())
			return cause
		}
		gone, why, err := serverState(lost.pgdata)
		if err != nil {
			t.log.Error().Err(err).Msg("the server does not answer, and whether its processes are gone cannot be told; no drain")
			return cause
		}
		if gone {
			t.log.Warn().Err(cause).Str("why", why).Stringer("last_flush", from).Msg("the server is gone; draining its WAL")
			return t.drain(ctx, lost, sh, from)
		}
		if why != logged {
			t.log.Warn().Err(cause).Str("why", why).Msg("the server does not answer; waiting for it to come back or for its processes to exit")
			logged = why
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-lost.acks:
			return err
		case <-time.After(lost.poll):
		}
	}
}

// drain ships the valid WAL past the last flush position read, then the end-of-WAL
// mark, and waits for the receiver to record it. Valid means what crash recovery of
// the server would replay: whole records whose page headers, xl_prev chain and CRCs
// hold. A failure to read sends no mark: the receiver's session ends without one, and
// walship promote goes on with what the spool holds.
func (t *Tailer) drain(ctx context.Context, lost *lostServer, sh *shipper, from wal.LSN) error {
	st, tli, segSize := sh.stream, sh.tli, sh.stream.SegSize
	src := &wal.Files{SegSize: segSize, Locate: func(no uint64) (string, int64, bool) {
		return filepath.Join(sh.dir, wal.Segment{TLI: tli, No: no}.Name(segSize)), int64(segSize), true
	}}
	defer src.Close()
	start, err := wal.RecordAtOrBefore(st, tli, src, from, 0)
	if err != nil {
		return fmt.Errorf("drain: find a record to start from at %s: %w", from, err)
	}
	r := wal.NewReader(st, tli, src, start, 0)
	var stop *wal.EndError
	for {
		_, err := r.Next()
		if errors.As(err, &stop) {
			break
		}
		if err != nil {
			return fmt.Errorf("drain: read %s: %w", sh.dir, err)
		}
	}
	end := max(r.Pos(), from)
	if end > from {
		if err := sh.ship(from, end); err != nil {
			return fmt.Errorf("drain: %w", err)
		}
		t.shipped.Store(uint64(end))
	}
	if err := sh.conn.Send(&transport.End{TLI: tli, LSN: end}); err != nil {
		return fmt.Errorf("drain: send the end-of-WAL mark: %w", err)
	}
	timer := time.NewTimer(transport.IdleTimeout)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-lost.acks:
			return fmt.Errorf("drain: the receiver did not record the end-of-WAL mark: %w", err)
		case <-timer.C:
			return fmt.Errorf("drain: the receiver did not record the end-of-WAL mark within %s", transport.IdleTimeout)
		case lsn := <-lost.ends:
			if lsn != end {
				continue
			}
			t.log.Info().Stringer("last_flush", from).Stringer("end", end).Uint64("drained_bytes", uint64(end-from)).
				Str("stopped", stop.Reason).Msg("drained: the receiver holds every valid record of the primary's WAL")
			return ErrDrained
		}
	}
}
