package tail

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/walship/walship/tail/dirwatch"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// Primary is a primary server as a Tailer's source: its flush position, read every
// Poll, and the files of its pg_wal.
type Primary struct {
	// DSN is the primary's connection string. Required. The role needs to read
	// data_directory and pg_control_system(): a superuser or pg_read_all_settings plus
	// pg_monitor.
	DSN string
	// PGData is the primary's data directory as this process sees it. Empty means the
	// server's data_directory setting.
	PGData string
	// Poll is how often the flush position is read while it moves. Zero means
	// DefaultPoll. Each poll is one trivial query on the primary; the poll interval
	// bounds how late a flushed byte leaves for the standby.
	Poll time.Duration
	// IdlePoll is how often it is read once it has stood still for a second: the bound
	// for the first commit after a quiet spell. Zero means DefaultIdlePoll; it must not
	// be less than Poll.
	IdlePoll time.Duration
	// Wake chooses how an idle sidecar learns of new WAL: WakeInotify (the default)
	// waits for the server to write to pg_wal, WakePoll reads the flush position every
	// IdlePoll.
	Wake Wake
	// ArchiveDir is where the primary's archive_command puts whole segments. A segment
	// that pg_wal no longer holds (removed or recycled before it was shipped, as can
	// happen without the slot) is taken from there; without it, that is a gap error.
	ArchiveDir string
	// NoDrain turns the drain off: when the server is lost, the sidecar stops at the
	// last flush position it read. The drain needs to see the server's processes (same
	// host, or the same PID and IPC namespaces); without that, turn it off.
	NoDrain bool
	// AllowSwitchover lets walship switchover, run on a receiver's host, stop this
	// primary with a fast shutdown over the link (see switchover).
	AllowSwitchover bool
}

// wakeCheck is how often an idle sidecar that waits on inotify reads the flush position
// anyway: a safety net for a write that inotify did not report (see primary.wait).
const wakeCheck = 5 * time.Second

// Wake is how an idle sidecar learns of new WAL.
type Wake string

// Ways to wake.
const (
	// WakeInotify waits for the server to write to pg_wal (inotify), and reads the
	// flush position every wakeCheck anyway. Where inotify cannot be had, the sidecar
	// says so and polls.
	WakeInotify Wake = "inotify"
	// WakePoll reads the flush position every IdlePoll.
	WakePoll Wake = "poll"
)

func (p Primary) newSource(log zerolog.Logger) (source, error) {
	if p.Wake == "" {
		p.Wake = WakeInotify
	}
	if p.Wake != WakeInotify && p.Wake != WakePoll {
		return nil, fmt.Errorf("tail: wake %q: want %q or %q", p.Wake, WakeInotify, WakePoll)
	}
	switch {
	case p.DSN == "":
		return nil, errors.New("tail: no --dsn")
	case p.Poll < 0:
		return nil, fmt.Errorf("tail: poll interval %s is negative", p.Poll)
	case p.IdlePoll < 0:
		return nil, fmt.Errorf("tail: idle poll interval %s is negative", p.IdlePoll)
	}
	if p.Poll == 0 {
		p.Poll = DefaultPoll
	}
	if p.IdlePoll == 0 {
		p.IdlePoll = max(DefaultIdlePoll, p.Poll)
	}
	if p.IdlePoll < p.Poll {
		return nil, fmt.Errorf("tail: idle poll interval %s is shorter than the poll interval %s", p.IdlePoll, p.Poll)
	}
	return &primary{cfg: p, log: log}, nil
}

// primary is a session's view of a primary server: a connection that reads its flush
// position, and its pg_wal.
type primary struct {
	cfg    Primary
	log    zerolog.Logger
	pg     *pgx.Conn
	srv    Server
	tli    uint32
	pgdata string
	last   Positions // as last read

	// stopped, while a switchover stops the server, is closed once the sidecar has told
	// the command that the postmaster exited: the drain's end-of-WAL mark waits for it,
	// lest the session end first and take the message with it.
	stopped atomic.Pointer[chan struct{}]

	// gone says that this session began with the server gone (beginGone): it only
	// drains. drained says that the server's WAL was drained since it was last reached:
	// no session begins gone again, which would open one for nothing and take away the
	// receiver's end-of-WAL mark (a new session removes it).
	gone, drained bool

	watch     *dirwatch.Watch // nil: poll while idle
	armed     bool            // the watch's stale events are drained and the position read since
	stopWatch func() bool
	warned    bool // that inotify cannot be had
}

func (p *primary) begin(ctx context.Context) (*transport.Hello, wal.LSN, wal.LSN, error) {
	p.gone = false
	pg, err := connect(ctx, p.cfg.DSN, AppTail)
	if err != nil {
		if hello, end, empty, ok := p.beginGone(err); ok {
			return hello, end, empty, nil
		}
		return nil, 0, 0, fmt.Errorf("connect to the primary: %w", err)
	}
	p.pg, p.drained = pg, false
	fail := func(err error) (*transport.Hello, wal.LSN, wal.LSN, error) {
		p.end()
		return nil, 0, 0, err
	}
	if p.srv, err = ReadServer(ctx, pg); err != nil {
		return fail(err)
	}
	if err := p.waitPrimary(ctx); err != nil {
		return fail(err)
	}
	pos, err := p.srv.Positions(ctx, pg)
	if err != nil {
		return fail(err)
	}
	flush, tli := pos.Flush, pos.TLI
	p.tli, p.pgdata, p.last = tli, p.srv.DataDir, pos
	if p.cfg.PGData != "" {
		p.pgdata = p.cfg.PGData
	}
	// The magic of the WAL on disk must be the version's: a wrong --pgdata shows here.
	if err := checkWALDir(p.walDir(), p.srv, tli, flush); err != nil {
		return fail(fmt.Errorf("%w: %w", errFatal, err))
	}
	if p.cfg.Wake == WakeInotify {
		if p.watch, err = dirwatch.New(p.walDir(), dirwatch.Written|dirwatch.Added); err != nil && !p.warned {
			p.log.Warn().Err(err).Dur("idle_poll", p.cfg.IdlePoll).Msg("cannot watch pg_wal; an idle sidecar polls the flush position instead")
			p.warned = true
		}
		if p.watch != nil {
			p.stopWatch = context.AfterFunc(ctx, p.watch.Interrupt)
		}
	}
	srv := p.srv
	hello := &transport.Hello{Version: transport.Version, SysID: srv.SysID, SegSize: uint32(srv.SegSize),
		BlockSize: uint32(srv.BlockSize), Magic: srv.Magic, TLI: tli, ServerVersion: uint32(srv.VersionNum)}
	// A new spool starts with the segment being written.
	flushSeg, _ := wal.SegmentOf(tli, flush, srv.SegSize)
	return hello, flush, flushSeg.Start(srv.SegSize), nil
}

func (p *primary) walDir() string { return filepath.Join(p.pgdata, "pg_wal") }

// beginGone begins a session that only drains, when the server cannot be reached and
// its processes are all gone, for a sidecar that knows the server from an earlier
// session. The server may have died while the sidecar had no session with the
// receiver (the receiver restarting, the network down): its last WAL is then only in
// its pg_wal, and the sidecar drains it once the receiver can be reached again, which
// is what walship promote waits for. The session opens as the earlier ones did; its
// first read of the position fails (errGone), and the drain follows (serverLost).
func (p *primary) beginGone(cause error) (hello *transport.Hello, end, empty wal.LSN, ok bool) {
	if p.cfg.NoDrain || p.srv.SysID == 0 || p.drained {
		return nil, 0, 0, false
	}
	gone, why, err := serverState(p.pgdata)
	if err != nil || !gone {
		return nil, 0, 0, false
	}
	p.log.Warn().Err(cause).Str("why", why).Stringer("last_flush", p.last.Flush).
		Msg("the server is gone; opening a session with the receiver to drain its WAL")
	p.gone = true
	srv := p.srv
	hello = &transport.Hello{Version: transport.Version, SysID: srv.SysID, SegSize: uint32(srv.SegSize),
		BlockSize: uint32(srv.BlockSize), Magic: srv.Magic, TLI: p.tli, ServerVersion: uint32(srv.VersionNum)}
	flushSeg, _ := wal.SegmentOf(p.tli, p.last.Flush, srv.SegSize)
	return hello, p.last.Flush, flushSeg.Start(srv.SegSize), true
}

// errGone is the position of a session that began with the server gone.
var errGone = errors.New("the server is gone")

// waitPrimary waits while the server is a standby, so that a sidecar can be started
// beside a standby ahead of its promotion.
func (p *primary) waitPrimary(ctx context.Context) error {
	logged := false
	for {
		rec, err := InRecovery(ctx, p.pg)
		if err != nil || !rec {
			return err
		}
		if !logged {
			p.log.Info().Msg("server is in recovery; waiting for its promotion")
			logged = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(p.cfg.Poll * 10):
		}
	}
}

func (p *primary) history(tli uint32) ([]byte, error) {
	return os.ReadFile(filepath.Join(p.walDir(), wal.HistoryName(tli)))
}

func (p *primary) files() segmentFiles {
	return walFiles{dir: p.walDir(), archive: p.cfg.ArchiveDir, segSize: p.srv.SegSize, log: p.log}
}

// wait polls every Poll while the flush position moves, and while the server has WAL
// inserted that it has not flushed yet. Once it has stood still for lingerAfter, it
// waits for the server to write to pg_wal, or, without a watch, after idleAfter, polls
// every IdlePoll.
//
// The watch cannot see a flush, only the write before it, so a write counts as a move:
// the polls that follow it see its flush. Before a wait, the events queued while WAL
// moved are drained and the positions read once more: a write before the drain belongs
// to WAL inserted before it, which that read sees unflushed, so it keeps the sidecar
// polling; a write after the drain wakes the wait. So the wait misses no flush, and
// wakeCheck is only a safety net.
func (p *primary) wait(ctx context.Context, s *stream, moved time.Time) (bool, error) {
	if p.gone {
		return false, s.ended() // straight to the drain
	}
	still := idleAfter
	if p.watch != nil {
		still = lingerAfter
	}
	busy := time.Since(moved) < still || !p.last.Settled(p.srv.SegSize, p.srv.BlockSize)
	if busy || p.watch == nil {
		d := p.cfg.Poll
		if !busy {
			d = p.cfg.IdlePoll
		}
		return s.wait(ctx, d, nil)
	}
	if !p.armed {
		p.armed = true
		return false, p.watch.Drain()
	}
	if err := s.ended(); err != nil {
		return false, err
	}
	woke, err := p.watch.Wait(wakeCheck)
	if err != nil {
		return false, err
	}
	// After a wait that saw nothing, nothing is queued: the next wait needs no drain
	// first. After a write, the polls that follow drain before the next one.
	p.armed = !woke
	return woke, s.ended()
}

func (p *primary) interrupt() {
	if p.watch != nil {
		p.watch.Interrupt()
	}
}

func (p *primary) position(ctx context.Context) (wal.LSN, error) {
	if p.gone {
		return 0, errGone
	}
	pos, err := p.srv.Positions(ctx, p.pg)
	if err != nil {
		return 0, err
	}
	if pos.TLI != p.tli {
		return 0, fmt.Errorf("the primary moved from timeline %d to %d", p.tli, pos.TLI)
	}
	if pos != p.last {
		p.armed = false // events came with the move: drain them before the next wait
	}
	p.last = pos
	return pos.Flush, nil
}

// lost runs when a read of the flush position failed: see serverLost.
func (p *primary) lost(ctx context.Context, s *stream, err error) error {
	if p.cfg.NoDrain {
		return err
	}
	return p.serverLost(ctx, s, err)
}

func (p *primary) shipped(*stream) error { return nil }

func (p *primary) end() {
	if p.watch != nil {
		p.stopWatch()
		p.watch.Close()
		p.watch, p.armed = nil, false
	}
	if p.pg != nil {
		p.pg.Close(context.Background())
		p.pg = nil
	}
}

// checkWALDir checks that the segment holding flush is readable in pgwal and starts
// with a page of this server's version and cluster.
func checkWALDir(pgwal string, srv Server, tli uint32, flush wal.LSN) error {
	// The segment holding the last flushed byte: a flush position exactly on a boundary
	// belongs to a segment whose file the server may not have created yet.
	seg, _ := wal.SegmentOf(tli, max(flush, 1)-1, srv.SegSize)
	name := filepath.Join(pgwal, seg.Name(srv.SegSize))
	f, err := os.Open(name)
	if err != nil {
		return fmt.Errorf("open the primary's current segment (is --pgdata right?): %w", err)
	}
	defer func() { _ = f.Close() }() // read only
	head := make([]byte, wal.LongHeaderSize)
	if _, err := io.ReadFull(f, head); err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	st := wal.Stream{SysID: srv.SysID, SegSize: srv.SegSize, BlockSize: srv.BlockSize, Magic: srv.Magic}
	if err := st.CheckPage(head, seg.Start(srv.SegSize), tli); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// walFiles are the segments of a primary's pg_wal, and of its archive for those gone
// from pg_wal.
type walFiles struct {
	dir     string
	archive string // the primary's archive directory, or ""
	segSize uint64
	log     zerolog.Logger
}

func (w walFiles) String() string { return w.dir }

func (w walFiles) open(seg wal.Segment) (*os.File, error) {
	name := seg.Name(w.segSize)
	f, err := os.Open(filepath.Join(w.dir, name))
	if errors.Is(err, fs.ErrNotExist) && w.archive != "" {
		if f, err = openArchived(filepath.Join(w.archive, name), w.segSize); err == nil {
			w.log.Warn().Str("segment", name).Str("archive", w.archive).Msg("pg_wal no longer holds the segment; shipping the archived copy")
		}
	}
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: segment %s is gone from %s: the primary removed or recycled it before it was shipped; "+
			"keep the replication slot on, give --archive-dir, or rebuild the standby from a new base backup", ErrGap, name, w.dir)
	}
	if err != nil {
		return nil, fmt.Errorf("open segment %s: %w", name, err)
	}
	return f, nil
}

// ErrGap means WAL the receiver needs is no longer on the primary.
var ErrGap = errors.New("gap in the WAL")

// openArchived opens an archived segment, which must be whole; its pages are checked
// as they are read, like those of pg_wal.
func openArchived(path string, segSize uint64) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	info, err := f.Stat()
	if err == nil && uint64(info.Size()) != segSize {
		err = fmt.Errorf("archived segment %s holds %d bytes, want %d", path, info.Size(), segSize)
	}
	if err != nil {
		_ = f.Close() // read only; the error returned is the one above
		return nil, err
	}
	return f, nil
}
