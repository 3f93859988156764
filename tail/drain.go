package tail

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// ErrDrained ends a session whose server is gone after the sidecar sent every valid
// record left in pg_wal and the receiver recorded the end-of-WAL mark. The sidecar
// goes on trying to reach the server, which may come back.
var ErrDrained = errors.New("the primary's server is gone; its WAL was drained to the receiver")

// serverLost runs when a poll of the flush position failed. A server that takes
// connections again (a dropped connection) starts the session over. A server whose
// processes have all exited gets its WAL drained. Meanwhile, a server that is shutting
// down or whose backends still run after the postmaster died, the session with the
// receiver stays open, so that walship promote knows to wait for the drain.
func (p *primary) serverLost(ctx context.Context, s *stream, cause error) error {
	logged := ""
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		pg, err := connect(cctx, p.cfg.DSN, AppTail)
		cancel()
		if err == nil {
			pg.Close(context.Background())
			return cause
		}
		gone, why, err := serverState(p.pgdata)
		if err != nil {
			p.log.Error().Err(err).Msg("the server does not answer, and whether its processes are gone cannot be told; no drain")
			return cause
		}
		if gone {
			p.log.Warn().Err(cause).Str("why", why).Stringer("last_flush", s.from).Msg("the server is gone; draining its WAL")
			return p.drain(ctx, s)
		}
		if why != logged {
			p.log.Warn().Err(cause).Str("why", why).Msg("the server does not answer; waiting for it to come back or for its processes to exit")
			logged = why
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-s.acks:
			return err
		case <-time.After(p.cfg.Poll):
		}
	}
}

// drain ships the valid WAL past the last flush position read, then the end-of-WAL
// mark, and waits for the receiver to record it. Valid means what crash recovery of
// the server would replay: whole records whose page headers, xl_prev chain and CRCs
// hold. A failure to read sends no mark: the receiver's session ends without one, and
// walship promote goes on with what the spool holds.
func (p *primary) drain(ctx context.Context, s *stream) error {
	st, tli, segSize, from := p.srv.stream(), s.tli, p.srv.SegSize, s.from
	src := &wal.Files{SegSize: segSize, Locate: func(no uint64) (string, int64, bool) {
		return filepath.Join(p.walDir(), wal.Segment{TLI: tli, No: no}.Name(segSize)), int64(segSize), true
	}}
	defer src.Close()
	end := from
	stop := &wal.EndError{Reason: "the page at the last flush position does not check (nothing was written past it)"}
	start, err := wal.RecordAtOrBefore(st, tli, src, from, 0)
	var noPage *wal.EndError
	switch {
	case errors.As(err, &noPage) && from%wal.LSN(st.BlockSize) == 0:
		// The last flush position is a page's start (a segment's, after a switch) and
		// that page holds no valid WAL: nothing was written past it, for WAL pages are
		// written in order.
		p.log.Info().Stringer("last_flush", from).Err(err).Msg("drain: no WAL past the last flush position")
	case err != nil:
		return fmt.Errorf("drain: find a record to start from at %s: %w", from, err)
	default:
		r := wal.NewReader(st, tli, src, start, 0)
		for {
			_, err := r.Next()
			if errors.As(err, &stop) {
				break
			}
			if err != nil {
				return fmt.Errorf("drain: read %s: %w", p.walDir(), err)
			}
		}
		end = max(r.Pos(), from)
	}
	if err := s.send(end); err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	if told := p.stopped.Load(); told != nil {
		// A switchover stopped the server: let its news reach the command first.
		select {
		case <-*told:
		case <-time.After(time.Second):
		}
	}
	if err := s.conn.Send(&transport.End{TLI: tli, LSN: end}); err != nil {
		return fmt.Errorf("drain: send the end-of-WAL mark: %w", err)
	}
	timer := time.NewTimer(transport.IdleTimeout)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-s.acks:
			return fmt.Errorf("drain: the receiver did not record the end-of-WAL mark: %w", err)
		case <-timer.C:
			return fmt.Errorf("drain: the receiver did not record the end-of-WAL mark within %s", transport.IdleTimeout)
		case lsn := <-s.ends:
			if lsn != end {
				continue
			}
			s.t.drains.Add(1)
			p.log.Info().Stringer("last_flush", from).Stringer("end", end).Uint64("drained_bytes", uint64(end-from)).
				Str("stopped", stop.Reason).Msg("drained: the receiver holds every valid record of the primary's WAL")
			p.drained = true
			return ErrDrained
		}
	}
}
