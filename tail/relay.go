package tail

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// Spool is a receiver's spool as a Tailer's source, for a relay: it ships the spool
// onward as a sidecar ships pg_wal. The receiver's durable position takes the place of
// the flush position, the spool's published segments and partial that of pg_wal's
// files, and its end-of-WAL mark is passed on once everything before it has been sent.
type Spool struct {
	// Dir is the spool directory. Required.
	Dir string
	// Durable is the receiver's durable position; ok is false while the spool holds no
	// WAL. Required.
	Durable func() (pos wal.Position, ok bool)
	// Moved returns a channel that is closed when the durable position next moves, so
	// that the relay wakes at once; it is called before each read of Durable. Nil: the
	// relay reads Durable every Poll.
	Moved func() <-chan struct{}
	// Poll is how often Durable is read without Moved, and, with it, how often it is
	// read anyway while nothing moves. Zero means DefaultRelayPoll without Moved, and
	// DefaultRelayCheck with it.
	Poll time.Duration
}

func (s Spool) newSource(log zerolog.Logger) (source, error) {
	switch {
	case s.Dir == "":
		return nil, errors.New("tail: a relay needs its spool")
	case s.Durable == nil:
		return nil, errors.New("tail: a relay needs the spool's durable position")
	case s.Poll < 0:
		return nil, fmt.Errorf("tail: relay poll interval %s is negative", s.Poll)
	}
	if s.Poll == 0 && s.Moved != nil {
		s.Poll = DefaultRelayCheck
	}
	if s.Poll == 0 {
		s.Poll = DefaultRelayPoll
	}
	return &relay{cfg: s, log: log}, nil
}

// errNothingYet is the retryable error of a relay whose spool holds no WAL yet.
var errNothingYet = errors.New("the spool holds no WAL yet")

// relay is a session's view of a spool.
type relay struct {
	cfg     Spool
	log     zerolog.Logger
	id      spool.Identity
	tli     uint32
	endSent wal.LSN         // where the end-of-WAL mark was last passed on
	moved   <-chan struct{} // closed when the durable position moves past the one last read
}

func (r *relay) begin(context.Context) (*transport.Hello, wal.LSN, wal.LSN, error) {
	id, ok, err := spool.ReadIdentity(r.cfg.Dir)
	if err != nil {
		return nil, 0, 0, err
	}
	if r.cfg.Moved != nil {
		r.moved = r.cfg.Moved()
	}
	pos, have := r.cfg.Durable()
	if !ok || !have {
		return nil, 0, 0, errNothingYet
	}
	r.id, r.tli, r.endSent = id, pos.TLI, 0
	hello := &transport.Hello{Version: transport.Version, SysID: id.SysID, SegSize: uint32(id.SegSize),
		BlockSize: uint32(id.BlockSize), Magic: id.Magic, TLI: pos.TLI, ServerVersion: id.ServerVersion}
	// An empty spool downstream gets all this one holds of the timeline, not just the
	// segment being written: the two nodes then serve the same base backups.
	c, err := spool.Scan(r.cfg.Dir, id.SegSize)
	if err != nil {
		return nil, 0, 0, err
	}
	durableSeg, _ := wal.SegmentOf(pos.TLI, pos.LSN, id.SegSize)
	return hello, pos.LSN, c.OldestRun(pos.TLI, durableSeg.Start(id.SegSize), id.SegSize), nil
}

func (r *relay) history(tli uint32) ([]byte, error) {
	return os.ReadFile(filepath.Join(r.cfg.Dir, wal.HistoryName(tli)))
}

func (r *relay) files() segmentFiles { return spoolFiles{dir: r.cfg.Dir, segSize: r.id.SegSize} }

func (r *relay) wait(ctx context.Context, s *stream, _ time.Time) (bool, error) {
	return s.wait(ctx, r.cfg.Poll, r.moved)
}

func (r *relay) interrupt() {}

func (r *relay) position(context.Context) (wal.LSN, error) {
	// The channel first: a move between the read and the wait still wakes it.
	if r.cfg.Moved != nil {
		r.moved = r.cfg.Moved()
	}
	pos, _ := r.cfg.Durable()
	if pos.TLI != r.tli {
		return 0, fmt.Errorf("the spool moved from timeline %d to %d", r.tli, pos.TLI)
	}
	return pos.LSN, nil
}

func (r *relay) lost(_ context.Context, _ *stream, err error) error { return err }

// shipped passes the end-of-WAL mark on once the WAL before it has been sent: the next
// receiver checks that the mark sits where its spool ends.
func (r *relay) shipped(s *stream) error {
	m, ok, err := spool.ReadEnd(r.cfg.Dir)
	if err != nil || !ok || m.Position != (wal.Position{TLI: s.tli, LSN: s.from}) || r.endSent == s.from {
		return nil
	}
	if err := s.conn.Send(&transport.End{TLI: s.tli, LSN: s.from}); err != nil {
		return err
	}
	r.endSent = s.from
	r.log.Info().Stringer("end", s.from).Msg("passed the end-of-WAL mark on")
	return nil
}

func (r *relay) end() {}

// spoolFiles are the segments of a spool, published or partial.
type spoolFiles struct {
	dir     string
	segSize uint64
}

func (f spoolFiles) String() string { return f.dir }

func (f spoolFiles) open(seg wal.Segment) (*os.File, error) {
	file, err := spool.OpenSegment(f.dir, seg, f.segSize)
	if err != nil {
		return nil, fmt.Errorf("open segment %s of the spool: %w", seg.Name(f.segSize), err)
	}
	return file, nil
}
