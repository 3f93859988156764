package tail

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// Defaults of Primary and Spool.
const (
	DefaultPoll     = 2 * time.Millisecond
	DefaultIdlePoll = 10 * time.Millisecond
	// DefaultRelayPoll is how often a relay reads its spool's durable position when
	// nothing tells it that the position moved.
	DefaultRelayPoll = 10 * time.Millisecond
	// DefaultRelayCheck is how often a relay that is told when its spool's durable
	// position moves reads the position anyway.
	DefaultRelayCheck = time.Second
	// idleAfter is how long the flush position must stay still before polls slow down
	// to IdlePoll (WakePoll); lingerAfter, before a sidecar that waits on inotify does
	// (WakeInotify): the wait wakes at once, so polling on only spares the wait's set-up
	// between commits that come close together.
	idleAfter   = time.Second
	lingerAfter = 50 * time.Millisecond
	maxBackoff  = 5 * time.Second
)

// Config configures a Tailer: where it ships to. Where the WAL comes from is its
// Source.
type Config struct {
	// To is the receiver's address, HOST:PORT. Required.
	To string
	// TLS is the client configuration (transport.ClientTLS). Required.
	TLS *tls.Config
	// Logger receives progress and errors. The zero value logs nothing.
	Logger zerolog.Logger
}

func (c Config) validate() error {
	switch {
	case c.To == "":
		return errors.New("tail: no receiver address (--to)")
	case c.TLS == nil:
		return errors.New("tail: no tls configuration")
	}
	return nil
}

// Source is where a Tailer's WAL comes from: a Primary's pg_wal, or a receiver's Spool
// (a relay).
type Source interface {
	// newSource checks the configuration and returns the source a Tailer's sessions
	// read, one session at a time.
	newSource(log zerolog.Logger) (source, error)
}

// source is what the session loop needs of where the WAL comes from.
type source interface {
	// begin starts a session's view of the source: the hello that describes its WAL,
	// the position up to which WAL may be shipped now, and where a receiver with an
	// empty spool starts.
	begin(ctx context.Context) (hello *transport.Hello, end, empty wal.LSN, err error)
	// history reads timeline tli's history file.
	history(tli uint32) ([]byte, error)
	// files are the segment files shipped from.
	files() segmentFiles
	// wait waits until the position should be read again; moved is when it last
	// advanced. woke says that the source saw a sign of new WAL (which counts as a
	// move). It returns early, with the receiver's error, when the receiver's session
	// ends.
	wait(ctx context.Context, s *stream, moved time.Time) (woke bool, err error)
	// interrupt ends a wait at once; it is called when the receiver's session ends.
	interrupt()
	// position reads again the position up to which WAL may be shipped.
	position(ctx context.Context) (wal.LSN, error)
	// lost decides what a session does when position failed with err: a primary whose
	// server is gone gets its WAL drained.
	lost(ctx context.Context, s *stream, err error) error
	// shipped runs once everything up to the current end has been sent: a relay passes
	// the end-of-WAL mark on.
	shipped(s *stream) error
	// end closes what begin opened.
	end()
}

// Tailer ships WAL from its source to one receiver.
type Tailer struct {
	cfg Config
	src source
	log zerolog.Logger

	shipped atomic.Uint64   // LSN after the last byte sent
	acked   atomic.Uint64   // LSN the receiver last acked as durable
	ackTLI  atomic.Uint32   // its timeline
	known   atomic.Bool     // acked holds the receiver's word (a welcome or an ack)
	poke    chan<- struct{} // told of each ack without waiting, if set (ackedTo)

	// For the metrics, each read by the method of the same name.
	end        atomic.Uint64 // the source's end as last read
	sentBytes  atomic.Uint64
	frames     atomic.Uint64
	reconnects atomic.Uint64
	drains     atomic.Uint64
	lag        lagTracker

	// For alerts: whether a session streams, since when it does or does not, and
	// the error that ended the last one (see State).
	stateMu   sync.Mutex
	streaming bool
	since     time.Time
	lastErr   error
}

// ackedTo makes each ack of the receiver poke ch, without waiting; ch has room for one.
// It must be called before Run.
func (t *Tailer) ackedTo(ch chan<- struct{}) { t.poke = ch }

// New checks cfg and the source and returns a Tailer.
func New(cfg Config, from Source) (*Tailer, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	src, err := from.newSource(cfg.Logger)
	if err != nil {
		return nil, err
	}
	return &Tailer{cfg: cfg, src: src, log: cfg.Logger, since: time.Now()}, nil
}

// Shipped is the position after the last byte sent.
func (t *Tailer) Shipped() wal.LSN { return wal.LSN(t.shipped.Load()) }

// Acked is the position the receiver last reported durable.
func (t *Tailer) Acked() wal.LSN { return wal.LSN(t.acked.Load()) }

// Durable is the position the receiver last reported durable, from its welcome or its
// acks; ok is false until it has said anything since this process started.
func (t *Tailer) Durable() (wal.LSN, bool) { return wal.LSN(t.acked.Load()), t.known.Load() }

// DurableAt is Durable with the timeline of the position.
func (t *Tailer) DurableAt() (wal.Position, bool) {
	return wal.Position{TLI: t.ackTLI.Load(), LSN: wal.LSN(t.acked.Load())}, t.known.Load()
}

// Receiver is the receiver's address.
func (t *Tailer) Receiver() string { return t.cfg.To }

// End is the source's end as last read: a primary's flush position, a spool's durable
// position for a relay; 0 before the first read.
func (t *Tailer) End() wal.LSN { return wal.LSN(t.end.Load()) }

// Behind is how many bytes the receiver lacks of the source's end as last read: End
// less Acked, or 0 if the receiver holds more (a drain ships past the last flush
// position read). ok is false until the receiver has said where its spool ends.
func (t *Tailer) Behind() (n uint64, ok bool) {
	acked, ok := t.Durable()
	return uint64(max(t.End(), acked) - acked), ok
}

// Lag is the flush lag: how long the receiver took to acknowledge as durable the
// positions read from the source, as PostgreSQL's pg_stat_replication.flush_lag (see
// lagTracker). It is 0 once the receiver has acknowledged every position read, and
// while some are waiting, at least the age of the oldest.
func (t *Tailer) Lag() time.Duration { return t.lag.lag(time.Now()) }

// SentBytes is how many bytes of WAL were sent in data frames since the Tailer was
// made, resends after a reconnect included.
func (t *Tailer) SentBytes() uint64 { return t.sentBytes.Load() }

// Frames is how many frames were sent on the WAL stream of the sessions: data, history
// files and end-of-WAL marks.
func (t *Tailer) Frames() uint64 { return t.frames.Load() }

// Reconnects is how many times a session ended with an error and was started again
// (lost connections to the server or the receiver, a refused frame, a drain), a first
// session that could not start included.
func (t *Tailer) Reconnects() uint64 { return t.reconnects.Load() }

// Drains is how many times the server was lost and its WAL drained to the receiver,
// the end-of-WAL mark recorded (ErrDrained).
func (t *Tailer) Drains() uint64 { return t.drains.Load() }

// State says whether a session with the receiver streams now, since when it has or
// has not, and what ended the last session (nil before any ended).
func (t *Tailer) State() (streaming bool, since time.Time, lastErr error) {
	t.stateMu.Lock()
	defer t.stateMu.Unlock()
	return t.streaming, t.since, t.lastErr
}

func (t *Tailer) setState(streaming bool, err error) {
	t.stateMu.Lock()
	defer t.stateMu.Unlock()
	if streaming != t.streaming {
		t.streaming, t.since = streaming, time.Now()
	}
	if err != nil {
		t.lastErr = err
	}
}

// readEnd records the source's end as just read.
func (t *Tailer) readEnd(end wal.LSN) {
	t.end.Store(uint64(end))
	t.lag.read(end, time.Now())
}

// ack records the receiver's word that everything before lsn is durable.
func (t *Tailer) ack(lsn wal.LSN) {
	t.acked.Store(uint64(lsn))
	t.lag.ack(lsn, time.Now())
}

// Run ships WAL until ctx is done or a fatal error: a receiver bound to another cluster,
// another protocol version, a spool ahead of the source. Lost connections to the
// server or the receiver are retried with a growing pause.
func (t *Tailer) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		start := time.Now()
		err := t.session(ctx)
		t.setState(false, err)
		if ctx.Err() != nil {
			return nil
		}
		if !transport.Retryable(err) || errors.Is(err, errFatal) {
			return err
		}
		if time.Since(start) > 10*time.Second {
			backoff = 100 * time.Millisecond
		}
		t.reconnects.Add(1)
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

// stream is a session in progress, as the source's hooks see it.
type stream struct {
	conn sender // the session's connection, counting what is sent (counting)
	sh   *shipper
	from wal.LSN        // everything before it has been sent
	acks <-chan error   // the receiver's session ended
	ends <-chan wal.LSN // the receiver recorded an end-of-WAL mark
	tli  uint32         // the session's timeline
	t    *Tailer

	timer *time.Timer // wait's, kept from one wait to the next
}

// send ships [s.from, to) and moves s.from there.
func (s *stream) send(to wal.LSN) error {
	if to <= s.from {
		return nil
	}
	if err := s.sh.ship(s.from, to); err != nil {
		return err
	}
	s.from = to
	s.t.shipped.Store(uint64(to))
	return nil
}

// session runs one session: begin the source, open the session with the receiver, then
// ship up to the source's end each time it moves.
func (t *Tailer) session(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hello, end, empty, err := t.src.begin(ctx)
	if err != nil {
		return err
	}
	defer t.src.end()
	t.readEnd(end)
	c, from, err := t.open(ctx, hello, end, empty)
	if err != nil {
		return err
	}
	defer c.Close("sidecar stopping")
	t.log.Info().Str("receiver", t.cfg.To).Uint64("system_identifier", hello.SysID).Uint32("timeline", hello.TLI).
		Stringer("from", from).Stringer("end", end).Msg("streaming")
	// The receiver holds everything before from: its spool's end, or for an empty spool
	// the point where it starts.
	t.shipped.Store(uint64(from))
	t.ackTLI.Store(hello.TLI)
	t.ack(from)
	t.known.Store(true)
	t.setState(true, nil)

	backups := make(chan struct{})
	go func() {
		defer close(backups)
		t.serveControl(ctx, c)
	}()
	// The backup ends with the session: cancel first (deferred above), then wait.
	defer func() { cancel(); c.Close("sidecar stopping"); <-backups }()
	acks := make(chan error, 1)
	ends := make(chan wal.LSN, 1)
	go func() {
		acks <- t.readAcks(c, ends)
		t.src.interrupt()
	}()
	out := counting{c, t}
	sh := &shipper{files: t.src.files(), stream: hello.Stream(), tli: hello.TLI, conn: out}
	defer sh.close()
	s := &stream{conn: out, sh: sh, from: from, acks: acks, ends: ends, tli: hello.TLI, t: t}
	moved := time.Now()
	for {
		if end > s.from {
			if err := s.send(end); err != nil {
				return err
			}
			moved = time.Now()
		}
		if err := t.src.shipped(s); err != nil {
			return err
		}
		woke, err := t.src.wait(ctx, s, moved)
		if err != nil || ctx.Err() != nil {
			return err
		}
		if woke {
			moved = time.Now()
		}
		if end, err = t.src.position(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return t.src.lost(ctx, s, err)
		}
		t.readEnd(end)
	}
}

// counting is a session's connection as the shipper and the source's hooks send on it:
// it counts the frames sent and the WAL bytes in them, for the metrics.
type counting struct {
	sender
	t *Tailer
}

func (c counting) Send(f transport.Frame) error {
	if err := c.sender.Send(f); err != nil {
		return err
	}
	c.t.frames.Add(1)
	if d, ok := f.(*transport.Data); ok {
		c.t.sentBytes.Add(uint64(len(d.Payload)))
	}
	return nil
}

// open starts a session with the receiver: the handshake, where shipping starts (see
// startAt), and the history file of a timeline above 1 first, for a receiver takes no
// segment of a timeline without it and recovery asks for it at promotion.
func (t *Tailer) open(ctx context.Context, hello *transport.Hello, end, empty wal.LSN) (*transport.Conn, wal.LSN, error) {
	var histFile []byte
	var hist []wal.HistoryEntry
	if hello.TLI > 1 {
		var err error
		if histFile, err = t.src.history(hello.TLI); err != nil {
			return nil, 0, fmt.Errorf("read history file of timeline %d: %w", hello.TLI, err)
		}
		if hist, err = wal.ParseHistory(histFile); err != nil {
			return nil, 0, fmt.Errorf("%w: history file of timeline %d: %w", errFatal, hello.TLI, err)
		}
	}
	c, err := transport.Dial(ctx, t.cfg.To, t.cfg.TLS)
	if err != nil {
		return nil, 0, err
	}
	fail := func(err error) (*transport.Conn, wal.LSN, error) {
		c.Close("sidecar stopping")
		return nil, 0, err
	}
	hctx, hcancel := context.WithTimeout(ctx, transport.IdleTimeout)
	welcome, err := transport.Handshake(hctx, c, hello)
	hcancel()
	if err != nil {
		return fail(err)
	}
	from, lacking, err := startAt(welcome, hello.TLI, end, uint64(hello.SegSize), hist, empty)
	if err != nil {
		return fail(fmt.Errorf("%w: %w", errFatal, err))
	}
	if welcome.Empty && welcome.LSN > end {
		t.log.Warn().Stringer("start_mark", welcome.LSN).Stringer("end", end).
			Msg("the receiver's empty spool asks to start past this source's end; it starts with the segment being written")
	}
	if lacking {
		t.log.Warn().Stringer("spool_end", welcome.LSN).Stringer("branch", hist[len(hist)-1].Switch).Uint32("spool_timeline", welcome.TLI).
			Msg("the spool lacks WAL of the old timeline before the segment where this timeline branched off")
	}
	if histFile != nil {
		if err := (counting{c, t}).Send(transport.NewFile(wal.HistoryName(hello.TLI), histFile)); err != nil {
			return fail(err)
		}
	}
	return c, from, nil
}

func (t *Tailer) readAcks(c *transport.Conn, ends chan<- wal.LSN) error {
	rd := c.Reader()
	for {
		f, err := rd.Read()
		if err != nil {
			return err
		}
		switch f := f.(type) {
		case *transport.Ack:
			t.ackTLI.Store(f.TLI)
			t.ack(f.LSN)
			if t.poke != nil {
				select {
				case t.poke <- struct{}{}:
				default:
				}
			}
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

// wait waits d, or less if the receiver's session ends or wake is ready (nil: never);
// it returns that session's error, or nil. It says whether wake was.
func (s *stream) wait(ctx context.Context, d time.Duration, wake <-chan struct{}) (bool, error) {
	if s.timer == nil {
		s.timer = time.NewTimer(d)
	} else {
		s.timer.Reset(d)
	}
	select {
	case <-ctx.Done():
		return false, nil
	case err := <-s.acks:
		return false, err
	case <-s.timer.C:
		return false, nil
	case <-wake:
		return true, nil
	}
}

// ended returns the receiver's error if its session has ended, without waiting.
func (s *stream) ended() error {
	select {
	case err := <-s.acks:
		return err
	default:
		return nil
	}
}
