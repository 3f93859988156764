package tail

import (
	"context"
	"crypto/tls"
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

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// Defaults of Config.
const (
	DefaultPoll     = 2 * time.Millisecond
	DefaultIdlePoll = 10 * time.Millisecond
	// DefaultRelayPoll is how often a relay looks for newly durable WAL in its spool.
	DefaultRelayPoll = 10 * time.Millisecond
	// idleAfter is how long the flush position must stay still before polls slow down
	// to IdlePoll.
	idleAfter    = time.Second
	defaultChunk = 256 << 10
	maxBackoff   = 5 * time.Second
)

// Config configures a Tailer.
type Config struct {
	// DSN is the primary's connection string. Required. The role needs to read
	// data_directory and pg_control_system(): a superuser or pg_read_all_settings plus
	// pg_monitor.
	DSN string
	// PGData is the primary's data directory as this process sees it. Empty means the
	// server's data_directory setting.
	PGData string
	// To is the receiver's address, HOST:PORT. Required.
	To string
	// TLS is the client configuration (transport.ClientTLS). Required.
	TLS *tls.Config
	// Poll is how often the flush position is read while it moves. Zero means
	// DefaultPoll. Each poll is one trivial query on the primary; the poll interval
	// bounds how late a flushed byte leaves for the standby.
	Poll time.Duration
	// IdlePoll is how often it is read once it has stood still for a second: the bound
	// for the first commit after a quiet spell. Zero means DefaultIdlePoll; never less
	// than Poll. A relay uses Poll throughout.
	IdlePoll time.Duration
	// ArchiveDir is where the primary's archive_command puts whole segments. A segment
	// that pg_wal no longer holds (removed or recycled before it was shipped, as can
	// happen without the slot) is taken from there; without it, that is a gap error.
	ArchiveDir string
	// NoDrain turns the drain off: when the server is lost, the sidecar stops at the
	// last flush position it read. The drain needs to see the server's processes (same
	// host, or the same PID and IPC namespaces); without that, turn it off.
	NoDrain bool
	// Spool, when set, makes the Tailer a relay: it ships this receiver's spool instead
	// of a primary's pg_wal, up to SpoolDurable, and DSN is not used.
	Spool        string
	SpoolDurable func() (wal.Position, bool)
	// Logger receives progress and errors. The zero value logs nothing.
	Logger zerolog.Logger
}

func (c *Config) validate() error {
	switch {
	case c.Spool != "" && c.SpoolDurable == nil:
		return errors.New("tail: a relay needs the spool's durable position")
	case c.DSN == "" && c.Spool == "":
		return errors.New("tail: no --dsn")
	case c.To == "":
		return errors.New("tail: no receiver address (--to)")
	case c.TLS == nil:
		return errors.New("tail: no tls configuration")
	case c.Poll < 0:
		return fmt.Errorf("tail: poll interval %s is negative", c.Poll)
	case c.IdlePoll < 0:
		return fmt.Errorf("tail: idle poll interval %s is negative", c.IdlePoll)
	}
	if c.Poll == 0 {
		c.Poll = DefaultPoll
	}
	if c.IdlePoll == 0 {
		c.IdlePoll = DefaultIdlePoll
	}
	c.IdlePoll = max(c.IdlePoll, c.Poll)
	return nil
}

// Tailer ships a primary's WAL to one receiver.
type Tailer struct {
	cfg Config
	log zerolog.Logger

	shipped atomic.Uint64 // LSN after the last byte sent
	acked   atomic.Uint64 // LSN the receiver last acked as durable
	known   atomic.Bool   // acked holds the receiver's word (a welcome or an ack)
}

// New checks cfg and returns a Tailer.
func New(cfg Config) (*Tailer, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Tailer{cfg: cfg, log: cfg.Logger}, nil
}

// Shipped is the position after the last byte sent; Acked the receiver's durable one.
func (t *Tailer) Shipped() wal.LSN { return wal.LSN(t.shipped.Load()) }

// Acked is the position the receiver last reported durable.
func (t *Tailer) Acked() wal.LSN { return wal.LSN(t.acked.Load()) }

// Durable is the position the receiver last reported durable, from its welcome or its
// acks; ok is false until it has said anything since this process started.
func (t *Tailer) Durable() (wal.LSN, bool) { return wal.LSN(t.acked.Load()), t.known.Load() }

// Receiver is the receiver's address.
func (t *Tailer) Receiver() string { return t.cfg.To }

// Run ships WAL until ctx is done or a fatal error: a receiver bound to another cluster,
// another protocol version, a spool ahead of the primary. Lost connections to the
// server or the receiver are retried with a growing pause.
func (t *Tailer) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		start := time.Now()
		var err error
		if t.cfg.Spool != "" {
			err = t.relaySession(ctx)
		} else {
			err = t.session(ctx)
		}
		if ctx.Err() != nil {
			return nil
		}
		if !transport.Retryable(err) || errors.Is(err, errFatal) {
			return err
		}
		if time.Since(start) > 10*time.Second {
			backoff = 100 * time.Millisecond
		}
		t.log.Warn().Err(err).Dur("retry_in", backoff).Msg("session lost")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// errFatal marks errors that reconnecting cannot mend.
var errFatal = errors.New("fatal")

func (t *Tailer) session(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pg, err := pgx.Connect(ctx, t.cfg.DSN)
	if err != nil {
		return fmt.Errorf("connect to the primary: %w", err)
	}
	defer pg.Close(context.Background())
	srv, err := ReadServer(ctx, pg)
	if err != nil {
		return err
	}
	if err := t.waitPrimary(ctx, pg); err != nil {
		return err
	}
	flush, tli, err := srv.Flush(ctx, pg)
	if err != nil {
		return err
	}
	pgdata := srv.DataDir
	if t.cfg.PGData != "" {
		pgdata = t.cfg.PGData
	}
	pgwal := filepath.Join(pgdata, "pg_wal")
	// The magic of the WAL on disk must be the version's: a wrong --pgdata shows here.
	if err := checkWALDir(pgwal, srv, tli, flush); err != nil {
		return fmt.Errorf("%w: %w", errFatal, err)
	}

	hello := &transport.Hello{Version: transport.Version, SysID: srv.SysID, SegSize: uint32(srv.SegSize),
		BlockSize: uint32(srv.BlockSize), Magic: srv.Magic, TLI: tli, ServerVersion: uint32(srv.VersionNum)}
	c, _, from, err := t.open(ctx, hello, flush, pgwal)
	if err != nil {
		return err
	}
	defer c.Close("sidecar stopping")
	t.log.Info().Str("receiver", t.cfg.To).Uint64("system_identifier", srv.SysID).Uint32("timeline", tli).
		Stringer("from", from).Stringer("flush", flush).Msg("streaming")
	t.shipped.Store(uint64(from))
	// The receiver holds everything before from: its spool's end, or for an empty spool
	// the point where it starts.
	t.acked.Store(uint64(from))
	t.known.Store(true)

	acks := make(chan error, 1)
	ends := make(chan wal.LSN, 1)
	go func() { acks <- t.readAcks(c, ends) }()
	sh := &shipper{dir: pgwal, archive: t.cfg.ArchiveDir, stream: hello.Stream(), tli: tli, conn: c, log: t.log}
	defer sh.close()
	// Polls come every Poll while the flush position moves, every IdlePoll once it has
	// stood still for idleAfter.
	next := time.NewTimer(t.cfg.Poll)
	defer next.Stop()
	moved := time.Now()
	for {
		if flush > from {
			if err := sh.ship(from, flush); err != nil {
				return err
			}
			from = flush
			t.shipped.Store(uint64(from))
			moved = time.Now()
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-acks:
			return err
		case <-next.C:
		}
		if time.Since(moved) < idleAfter {
			next.Reset(t.cfg.Poll)
		} else {
			next.Reset(t.cfg.IdlePoll)
		}
		var now uint32
		flush, now, err = srv.Flush(ctx, pg)
		if err != nil && ctx.Err() == nil && !t.cfg.NoDrain {
			lost := &lostServer{pgdata: pgdata, dsn: t.cfg.DSN, poll: t.cfg.Poll, acks: acks, ends: ends}
			return t.serverLost(ctx, err, lost, sh, from)
		}
		if err != nil {
			return err
		}
		if now != tli {
			return fmt.Errorf("the primary moved from timeline %d to %d", tli, now)
		}
	}
}

// open starts a session with the receiver: the handshake, where shipping starts (see
// startAt; dir holds the history files), and the history file of a timeline above 1
// first, for a receiver takes no segment of a timeline without it and recovery asks
// for it at promotion.
func (t *Tailer) open(ctx context.Context, hello *transport.Hello, flush wal.LSN, dir string) (*transport.Conn, *transport.Welcome, wal.LSN, error) {
	c, err := transport.Dial(ctx, t.cfg.To, t.cfg.TLS)
	if err != nil {
		return nil, nil, 0, err
	}
	fail := func(err error) (*transport.Conn, *transport.Welcome, wal.LSN, error) {
		c.Close("sidecar stopping")
		return nil, nil, 0, err
	}
	hctx, hcancel := context.WithTimeout(ctx, transport.IdleTimeout)
	welcome, err := transport.Handshake(hctx, c, hello)
	hcancel()
	if err != nil {
		return fail(err)
	}
	from, err := t.startAt(welcome, hello.TLI, flush, dir, uint64(hello.SegSize))
	if err != nil {
		return fail(fmt.Errorf("%w: %w", errFatal, err))
	}
	if hello.TLI > 1 {
		name := wal.HistoryName(hello.TLI)
		content, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return fail(fmt.Errorf("read history file of timeline %d: %w", hello.TLI, err))
		}
		if err := c.Send(transport.NewFile(name, content)); err != nil {
			return fail(err)
		}
	}
	return c, welcome, from, nil
}

// waitPrimary waits while the server is a standby, so that a sidecar can be started
// beside a standby ahead of its promotion.
func (t *Tailer) waitPrimary(ctx context.Context, pg *pgx.Conn) error {
	logged := false
	for {
		rec, err := InRecovery(ctx, pg)
		if err != nil || !rec {
			return err
		}
		if !logged {
			t.log.Info().Msg("server is in recovery; waiting for its promotion")
			logged = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(t.cfg.Poll * 10):
		}
	}
}

// startAt decides where shipping starts from the receiver's welcome.
func (t *Tailer) startAt(w *transport.Welcome, tli uint32, flush wal.LSN, pgwal string, segSize uint64) (wal.LSN, error) {
	flushSeg, _ := wal.SegmentOf(tli, flush, segSize)
	switch {
	case w.Empty:
		// A new spool starts with the segment being written.
		return flushSeg.Start(segSize), nil
	case w.TLI == tli:
		if w.LSN > flush {
			return 0, fmt.Errorf("the receiver holds WAL up to %s on timeline %d, past this primary's flush position %s: the spool is not this server's past", w.LSN, tli, flush)
		}
		return w.LSN, nil
	case w.TLI > tli:
		return 0, fmt.Errorf("the receiver is on timeline %d, newer than this primary's %d", w.TLI, tli)
	}
	// A newer timeline than the spool's: start with the segment where it branched off,
	// which the new timeline's first file holds whole.
	content, err := os.ReadFile(filepath.Join(pgwal, wal.HistoryName(tli)))
	if err != nil {
		return 0, fmt.Errorf("read history file of timeline %d: %w", tli, err)
	}
	hist, err := wal.ParseHistory(content)
	if err != nil {
		return 0, fmt.Errorf("history file of timeline %d: %w", tli, err)
	}
	sw := hist[len(hist)-1].Switch
	start, _ := wal.SegmentOf(tli, sw, segSize)
	if w.LSN < start.Start(segSize) {
		t.log.Warn().Stringer("spool_end", w.LSN).Stringer("branch", sw).Uint32("spool_timeline", w.TLI).
			Msg("the spool lacks WAL of the old timeline before the segment where this timeline branched off")
	}
	return start.Start(segSize), nil
}

func (t *Tailer) readAcks(c *transport.Conn, ends chan<- wal.LSN) error {
	for {
		f, err := c.Recv()
		if err != nil {
			return err
		}
		switch f := f.(type) {
		case *transport.Ack:
			t.acked.Store(uint64(f.LSN))
		case *transport.End:
			select {
			case ends <- f.LSN:
			default:
			}
		case *transport.Refuse:
			return &transport.RefusedError{Fatal: f.Fatal, Reason: f.Reason}
		default:
			return fmt.Errorf("%w: unexpected %T from the receiver", transport.ErrMalformed, f)
		}
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
	defer f.Close()
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

// shipper reads byte ranges of the primary's segments and sends them.
type shipper struct {
	dir     string
	spool   bool   // dir is a spool: a segment is <name> once published, <name>.partial before
	archive string // the primary's archive directory, or ""
	log     zerolog.Logger
	stream  wal.Stream
	tli     uint32
	conn    *transport.Conn
	f       *os.File
	seg     wal.Segment
	padAt   uint64 // where switch padding begins in seg; 0 for none found
	buf     []byte
}

// ship sends [from, to). It never reads a byte at or past to, the flush position:
// beyond it a recycled segment holds stale pages of an older one.
func (s *shipper) ship(from, to wal.LSN) error {
	segSize := s.stream.SegSize
	for from < to {
		seg, off := wal.SegmentOf(s.tli, from, segSize)
		end := min(uint64(to)-uint64(seg.Start(segSize)), segSize)
		if err := s.open(seg); err != nil {
			return err
		}
		for off < end {
			n := min(end-off, defaultChunk)
			if off+n < end {
				// Cut chunks at page boundaries, so that no frame ends inside a page header.
				n = (off+n)/s.stream.BlockSize*s.stream.BlockSize - off
			}
			if cap(s.buf) < int(n) {
				s.buf = make([]byte, defaultChunk)
			}
			b := s.buf[:n]
			if _, err := s.f.ReadAt(b, int64(off)); err != nil {
				return fmt.Errorf("read segment %s at %d: %w", seg.Name(segSize), off, err)
			}
			padding := s.padAt != 0 && off >= s.padAt
			if !padding {
				lsn := seg.Start(segSize) + wal.LSN(off)
				if err := s.stream.CheckPages(b, lsn, s.tli); err != nil {
					padAt, ok := s.switchPadding(seg, err, end == segSize)
					if !ok {
						return fmt.Errorf("segment %s in %s: %w", seg.Name(segSize), s.dir, err)
					}
					s.padAt = padAt
					if padAt <= off {
						continue // the whole chunk is padding: read it again as such
					}
					n = padAt - off
					b = b[:n]
				}
			}
			d := transport.NewData(s.tli, seg.No, uint32(off), b)
			d.Padding = padding
			if err := s.conn.Send(d); err != nil {
				return err
			}
			off += n
		}
		from = seg.Start(segSize) + wal.LSN(end)
	}
	return nil
}

// switchPadding decides whether a page check failure is the unwritten rest of a
// segment after pg_switch_wal(): the pages from the failing one back to the last page
// that checks must all fail, and that last good page must end with an XLOG_SWITCH
// record. In pg_wal it is looked for only in a segment the flush position has left (the
// server moves it to the segment's end at once); a spool's durable end can stop inside
// the padding. It returns the offset where the padding starts, which is before the
// failing page when a shipment resumes inside the padding.
func (s *shipper) switchPadding(seg wal.Segment, err error, segDone bool) (uint64, bool) {
	var pe *wal.PageError
	if !segDone && !s.spool || !errors.As(err, &pe) {
		return 0, false
	}
	segSize, bs := s.stream.SegSize, s.stream.BlockSize
	at := uint64(pe.At - seg.Start(segSize))
	if at == 0 || at%bs != 0 {
		return 0, false
	}
	page := make([]byte, bs)
	for p := at - bs; ; p -= bs {
		if _, err := s.f.ReadAt(page, int64(p)); err != nil {
			return 0, false
		}
		lsn := seg.Start(segSize) + wal.LSN(p)
		if s.stream.CheckPage(page, lsn, s.tli) == nil {
			end, ok := wal.SwitchEnd(page, lsn, segSize)
			if !ok || end > lsn+wal.LSN(bs) {
				return 0, false
			}
			return p + bs, true
		}
		if p == 0 {
			return 0, false
		}
	}
}

func (s *shipper) open(seg wal.Segment) error {
	if s.f != nil && s.seg == seg {
		return nil
	}
	s.close()
	name := seg.Name(s.stream.SegSize)
	var f *os.File
	var err error
	if s.spool {
		f, err = spool.OpenSegment(s.dir, seg, s.stream.SegSize)
	} else {
		f, err = os.Open(filepath.Join(s.dir, name))
	}
	if errors.Is(err, fs.ErrNotExist) && s.archive != "" {
		if f, err = openArchived(filepath.Join(s.archive, name), s.stream.SegSize); err == nil {
			s.log.Warn().Str("segment", name).Str("archive", s.archive).Msg("pg_wal no longer holds the segment; shipping the archived copy")
		}
	}
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: segment %s is gone from %s: the primary removed or recycled it before it was shipped; "+
			"keep the replication slot on, give --archive-dir, or rebuild the standby from a new base backup", ErrGap, name, s.dir)
	}
	if err != nil {
		return fmt.Errorf("open segment %s: %w", name, err)
	}
	s.f, s.seg, s.padAt = f, seg, 0
	return nil
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
		f.Close()
		return nil, err
	}
	return f, nil
}

func (s *shipper) close() {
	if s.f != nil {
		s.f.Close()
		s.f = nil
	}
}
