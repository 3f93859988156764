package receiver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/dirwatch"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// Config configures a Receiver.
type Config struct {
	// Listen is the UDP address to listen on, HOST:PORT. Required; port 0 picks a free one.
	Listen string
	// Spool is the directory that holds the received WAL. Required; created if missing,
	// durably (fsynced in the directory above, and so on for each directory made).
	Spool string
	// TLS is the server configuration (transport.ServerTLS). Required.
	TLS *tls.Config
	// Logger receives progress and errors. The zero value logs nothing.
	Logger zerolog.Logger
	// ObserveFsync, if set, is given the duration of each fsync of received WAL, the
	// ones Fsyncs counts (for a histogram). It is called on the session's goroutine
	// between frames: it must be quick and never block. Nil: fsyncs are not timed.
	ObserveFsync func(time.Duration)
}

func (c Config) validate() error {
	switch {
	case c.Listen == "":
		return errors.New("receiver: no listen address")
	case c.Spool == "":
		return errors.New("receiver: no spool directory")
	case c.TLS == nil:
		return errors.New("receiver: no tls configuration")
	}
	return nil
}

// Receiver accepts sidecars and writes their WAL into its spool. One session writes at
// a time: a new session replaces the one before (a sidecar that restarted finds its old
// connection gone at once rather than after the idle timeout).
type Receiver struct {
	cfg  Config
	log  zerolog.Logger
	ln   *transport.Listener
	lock *os.File

	mu      sync.Mutex // serialises sessions
	cancel  context.CancelFunc
	session chan struct{} // closed when the current session has ended

	durable atomic.Pointer[wal.Position]   // the spool's durable end; nil while it holds no WAL
	moved   notifier                       // wakes those waiting for durable to move
	fsyncs  atomic.Uint64                  // of received WAL, by every session
	admits  atomic.Uint64                  // sessions admitted
	conn    atomic.Pointer[transport.Conn] // the admitted session's, for backups; nil without one

	// For the metrics, each read by the method of the same name.
	received atomic.Uint64
	frames   atomic.Uint64
	refusals [numRefusalReasons]atomic.Uint64

	// For alerts: the session's peer (empty without one) and since when it has
	// served it or none, and the last refusal (see State).
	stateMu     sync.Mutex
	peer        string
	since       time.Time
	lastRefusal string
}

// State says which sidecar the receiver serves now (peer is empty if none), since
// when it has served it or none, and the last refusal it sent (empty before any).
func (r *Receiver) State() (peer string, since time.Time, lastRefusal string) {
	r.stateMu.Lock()
	defer r.stateMu.Unlock()
	return r.peer, r.since, r.lastRefusal
}

// setPeer records the session the receiver serves from now on ("": none), for State
// and for walship status.
func (r *Receiver) setPeer(peer string, log zerolog.Logger) {
	r.stateMu.Lock()
	r.peer, r.since = peer, time.Now()
	r.stateMu.Unlock()
	if err := spool.WriteSession(r.cfg.Spool, peer); err != nil {
		log.Warn().Err(err).Msg("cannot record the sidecar session for walship status")
	}
}

// Sessions is how many sidecar sessions the receiver has admitted since it started.
func (r *Receiver) Sessions() uint64 { return r.admits.Load() }

// Fsyncs is how many times the receiver has fsynced received WAL since it started.
func (r *Receiver) Fsyncs() uint64 { return r.fsyncs.Load() }

// Received is how many bytes of WAL the receiver has written into its spool since it
// started; a resend of bytes the spool already held is not counted.
func (r *Receiver) Received() uint64 { return r.received.Load() }

// Frames is how many frames the receiver has read in sidecar sessions since it
// started, after their hellos: data, history files and end-of-WAL marks.
func (r *Receiver) Frames() uint64 { return r.frames.Load() }

// Refusals is how many sessions the receiver has refused for reason why since it
// started.
func (r *Receiver) Refusals(why RefusalReason) uint64 { return r.refusals[why].Load() }

// Durable is where the spool's durable WAL ends: everything before it is fsynced (and
// acknowledged, once a sidecar has sent it). ok is false while the spool holds no WAL.
func (r *Receiver) Durable() (wal.Position, bool) {
	p := r.durable.Load()
	if p == nil {
		return wal.Position{}, false
	}
	return *p, true
}

// Moved returns a channel that is closed when the durable position next moves.
func (r *Receiver) Moved() <-chan struct{} { return r.moved.wait() }

func (r *Receiver) setDurable(p wal.Position) {
	if old := r.durable.Load(); old != nil && *old == p {
		return
	}
	r.durable.Store(&p)
	r.moved.notify()
}

// notifier is a broadcast: every channel wait has handed out is closed at the next
// notify. Without waiters, a notify costs a lock and no allocation.
type notifier struct {
	mu sync.Mutex
	ch chan struct{}
}

func (n *notifier) wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.ch == nil {
		n.ch = make(chan struct{})
	}
	return n.ch
}

func (n *notifier) notify() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.ch != nil {
		close(n.ch)
		n.ch = nil
	}
}

// New opens (creating if needed) and locks the spool, and starts listening.
func New(cfg Config) (*Receiver, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := durable.MkdirAll(cfg.Spool, 0o755); err != nil {
		return nil, fmt.Errorf("receiver: create spool: %w", err)
	}
	lock, err := spool.LockReceiver(cfg.Spool)
	if err != nil {
		return nil, err
	}
	ln, err := transport.Listen(cfg.Listen, cfg.TLS)
	if err != nil {
		_ = lock.Close() // releases the lock; the listen error is the one returned
		return nil, err
	}
	r := &Receiver{cfg: cfg, log: cfg.Logger, ln: ln, lock: lock}
	// What the spool holds from before is durable, once crash leftovers are dealt with.
	id, ok, err := spool.ReadIdentity(cfg.Spool)
	if err == nil && ok {
		var c spool.Contents
		if c, err = spool.RecoverIdle(cfg.Spool, id, cfg.Logger); err == nil {
			if pos, ok := c.Position(id.SegSize); ok {
				r.setDurable(pos)
			}
		}
	}
	if err != nil {
		ln.Close()
		_ = lock.Close() // releases the lock; the error above is the one returned
		return nil, err
	}
	return r, nil
}

// Addr is the address the receiver listens on.
func (r *Receiver) Addr() net.Addr { return r.ln.Addr() }

// Run accepts sessions until ctx is done, then closes the listener and the spool.
func (r *Receiver) Run(ctx context.Context) error {
	defer func() { _ = r.lock.Close() }() // releases the lock; nothing is written to the lock file
	defer r.ln.Close()
	r.setPeer("", r.log)
	r.log.Info().Str("listen", r.ln.Addr().String()).Str("spool", r.cfg.Spool).Msg("receiver ready")
	var wg sync.WaitGroup
	defer wg.Wait()
	if ctl, err := listenControl(r.cfg.Spool); err != nil {
		r.log.Warn().Err(err).Msg("no control socket: walship standby init cannot reach this receiver")
	} else {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.serveControl(ctx, ctl)
		}()
	}
	for {
		c, err := r.ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("receiver: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.takeOver(ctx, c)
		}()
	}
}

// takeOver ends the running session, if any, and runs c in its place.
func (r *Receiver) takeOver(ctx context.Context, c *transport.Conn) {
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	r.mu.Lock()
	prevCancel, prevDone := r.cancel, r.session
	r.cancel, r.session = cancel, done
	r.mu.Unlock()

	defer func() {
		cancel()
		r.mu.Lock()
		if r.session == done {
			r.cancel, r.session = nil, nil
		}
		r.mu.Unlock()
		close(done)
	}()
	log := r.log.With().Str("peer", c.RemoteAddr().String()).Logger()
	if prevCancel != nil {
		// Wait for the old session to let go of the spool, without holding the lock
		// that its own ending needs.
		log.Info().Msg("new sidecar session replaces the running one")
		prevCancel()
		<-prevDone
	}
	if err := r.serve(sctx, c, log); err != nil && sctx.Err() == nil {
		log.Error().Err(err).Msg("session ended")
		return
	}
	log.Info().Msg("session ended")
}

// serve runs one session from hello to close: admission, then the frame loop. Every
// error that is the session's verdict rather than a lost connection is sent to the
// sidecar as a refusal first (see refusal).
func (r *Receiver) serve(ctx context.Context, c *transport.Conn, log zerolog.Logger) error {
	defer c.Close("session ended")
	s, err := r.admit(c, log)
	if err == nil {
		defer s.close()
		r.conn.Store(c)
		r.setPeer(c.RemoteAddr().String(), log)
		defer func() {
			if r.conn.CompareAndSwap(c, nil) {
				r.setPeer("", log)
			}
		}()
		err = s.run(ctx)
	}
	var rf *refusal
	if errors.As(err, &rf) {
		r.refusals[reasonOf(err)].Add(1) // before the refusal goes: its reader may look at once
		r.stateMu.Lock()
		r.lastRefusal = err.Error()
		r.stateMu.Unlock()
		if rerr := c.Refuse(err.Error(), rf.fatal()); rerr != nil {
			log.Debug().Err(rerr).Msg("the refused session did not close cleanly")
		}
	}
	return err
}

// RefusalReason sorts the refusals of sessions (and of the frames that end them), for
// the metrics.
type RefusalReason int

// Reasons of refusals, from the error that ended the session.
const (
	// RefusedCluster: the spool belongs to another cluster (spool.ErrWrongCluster).
	RefusedCluster RefusalReason = iota
	// RefusedVersion: the sidecar speaks another protocol version (transport.ErrVersion).
	RefusedVersion
	// RefusedChecksum: a frame's payload does not match its hash (transport.ErrChecksum).
	RefusedChecksum
	// RefusedPage: a page of WAL failed its header checks (wal.ErrPage).
	RefusedPage
	// RefusedOrder: WAL out of order: a gap (ErrGap), a timeline the spool cannot take
	// (ErrTimeline), bytes that differ from those held (spool.ErrConflict), an end-of-WAL
	// mark that is not where the WAL ends.
	RefusedOrder
	// RefusedFrozen: the spool is frozen for a promotion (spool.ErrFrozen).
	RefusedFrozen
	// RefusedOther: anything else: a malformed frame or hello, a spool locked by
	// another writer, an I/O error.
	RefusedOther

	numRefusalReasons = iota
)

// RefusalReasons lists every RefusalReason.
func RefusalReasons() []RefusalReason {
	rs := make([]RefusalReason, numRefusalReasons)
	for i := range rs {
		rs[i] = RefusalReason(i)
	}
	return rs
}

// String is the reason's label value: cluster, version, checksum, page, order, frozen
// or other.
func (why RefusalReason) String() string {
	switch why {
	case RefusedCluster:
		return "cluster"
	case RefusedVersion:
		return "version"
	case RefusedChecksum:
		return "checksum"
	case RefusedPage:
		return "page"
	case RefusedOrder:
		return "order"
	case RefusedFrozen:
		return "frozen"
	}
	return "other"
}

// reasonOf sorts the error that ended a refused session.
func reasonOf(err error) RefusalReason {
	var misplaced *misplacedEndError
	switch {
	case errors.Is(err, spool.ErrWrongCluster):
		return RefusedCluster
	case errors.Is(err, transport.ErrVersion):
		return RefusedVersion
	case errors.Is(err, transport.ErrChecksum):
		return RefusedChecksum
	case errors.Is(err, wal.ErrPage):
		return RefusedPage
	case errors.Is(err, ErrGap), errors.Is(err, ErrTimeline), errors.Is(err, spool.ErrConflict), errors.As(err, &misplaced):
		return RefusedOrder
	case errors.Is(err, spool.ErrFrozen):
		return RefusedFrozen
	}
	return RefusedOther
}

// refusal is an error that ends a session and is told to the sidecar.
type refusal struct{ err error }

func refuse(err error) error { return &refusal{err} }

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// fatal says whether a sidecar refused for this reason must stop rather than try again:
// a hello that cannot be served, a spool of another cluster, or a spool frozen for a
// promotion. Anything else (a bad frame, a full disk, a lock held a moment) may pass.
func (r *refusal) fatal() bool {
	return errors.Is(r.err, errBadHello) || errors.Is(r.err, spool.ErrWrongCluster) || errors.Is(r.err, spool.ErrFrozen)
}

// errBadHello is wrapped by every reason checkHello refuses a session's first frame.
var errBadHello = errors.New("handshake")

// session is an admitted sidecar's session: it holds the writer lock on the spool.
type session struct {
	dir   string
	c     *transport.Conn
	log   zerolog.Logger
	wlock *os.File
	rb    *Rebuild
	w     *spool.Writer
	r     *Receiver
}

// admit runs the session's start: check the hello, bind the spool to its cluster, take
// the writer lock, check the freeze marker, recover the spool and send the welcome.
// The writer lock comes first, the freeze marker second: walship promote makes the
// marker first and takes the lock second, so one of the two sees the other.
func (r *Receiver) admit(c *transport.Conn, log zerolog.Logger) (*session, error) {
	dir := r.cfg.Spool
	f, err := c.Recv()
	if err != nil {
		return nil, err
	}
	id, err := checkHello(f)
	if err != nil {
		return nil, refuse(err)
	}
	if err := spool.Bind(dir, id); err != nil {
		return nil, refuse(err)
	}
	wlock, err := spool.LockWriter(dir)
	if err != nil {
		return nil, refuse(err)
	}
	contents, err := startWriting(dir, id, log)
	if err != nil {
		_ = wlock.Close() // releases the lock; the refusal is the error returned
		return nil, refuse(err)
	}
	s := &session{dir: dir, c: c, log: log, wlock: wlock, rb: NewRebuild(id.Stream(), contents), w: spool.NewWriter(dir, id.SegSize), r: r}
	s.w.Syncs = &r.fsyncs
	pos := s.rb.Durable()
	if s.rb.Empty() {
		// An empty spool may ask to start before the segment being written.
		m, ok, err := spool.ReadStart(dir)
		if err != nil {
			s.close()
			return nil, refuse(err)
		}
		if ok {
			pos.LSN = m.LSN
		}
	} else if err := spool.ClearStart(dir); err != nil {
		s.close()
		return nil, refuse(err)
	}
	if err := c.Send(&transport.Welcome{Version: transport.Version, Empty: s.rb.Empty(), TLI: pos.TLI, LSN: pos.LSN}); err != nil {
		s.close()
		return nil, err
	}
	r.admits.Add(1)
	log.Info().Uint64("system_identifier", id.SysID).Stringer("position", pos).Bool("empty", s.rb.Empty()).Msg("sidecar session started")
	return s, nil
}

// startWriting readies a spool whose writer lock the caller holds: it must not be
// frozen; a session means the primary's server is up again, so its WAL goes on past
// any end-of-WAL mark; and crash leftovers are dealt with.
func startWriting(dir string, id spool.Identity, log zerolog.Logger) (spool.Contents, error) {
	frozen, err := spool.Frozen(dir)
	if err == nil && frozen {
		err = spool.ErrFrozen
	}
	if err == nil {
		err = spool.ClearEnd(dir)
	}
	if err != nil {
		return spool.Contents{}, err
	}
	return spool.Recover(dir, id.Stream(), log)
}

func (s *session) close() {
	// A session that ends right after a sync (a sidecar that drained its primary and
	// left) settles it, for walship status and check; a spool frozen for a promotion
	// stays as it is.
	if frozen, err := spool.Frozen(s.dir); err == nil && !frozen {
		if err := s.fsynced(s.w.Settle); err != nil {
			s.log.Warn().Err(err).Msg("cannot settle the last sync of the partial segment; walship status counts it once the spool is recovered")
		}
	}
	// What was acknowledged was synced before: a close that fails loses none of it, and
	// the next session's Recover settles the partial from its end block.
	if err := s.w.Close(); err != nil {
		s.log.Warn().Err(err).Msg("the partial segment did not close cleanly at the end of the session")
	}
	s.w.Wait()
	_ = s.wlock.Close() // releases the lock; nothing is written to the lock file
}

// How often a session looks for the freeze marker: freezeCheck when it polls, and
// freezeSafety when a watch on the spool wakes it as files appear.
const (
	freezeCheck  = 50 * time.Millisecond
	freezeSafety = time.Second
)

// run is the frame loop. It applies every frame that is whole in the read buffer; once
// none is left, it fsyncs and acks what is durable, then reads the stream again, which
// by then holds every frame that came during the fsync: the busier the link, the more
// frames share one fsync and one ack.
//
// The freeze marker is looked for whenever a file appears in the spool (a watch pokes
// the loop: walship promote makes the marker under a temporary name and renames it),
// and every freezeSafety anyway; where the spool cannot be watched, every freezeCheck.
// A promotion waits for this session that long at most. At the same times, a stream
// that has had no fsync since the time before gets its last sync settled
// (spool.Writer.Settle): until then, walship status, check and standby init do not
// count it.
func (s *session) run(ctx context.Context) error {
	rd := s.c.Reader()
	stop := context.AfterFunc(ctx, func() { s.c.SetReadDeadline(time.Now()) })
	defer stop()
	every := freezeCheck
	var poked atomic.Bool
	if w, err := dirwatch.New(s.dir, dirwatch.Added); err != nil {
		s.log.Warn().Err(err).Dur("every", every).Msg("cannot watch the spool; looking for a freeze marker by polling")
	} else {
		every = freezeSafety
		done := make(chan struct{})
		defer func() { w.Close(); <-done }()
		go func() {
			defer close(done)
			for {
				woke, err := w.Wait(time.Hour)
				if err != nil {
					return
				}
				if woke {
					poked.Store(true)
					s.c.SetReadDeadline(time.Now())
				}
			}
		}()
	}
	// The welcome told the sidecar where the spool ends: the first ack is for more.
	pos := s.rb.Durable()
	ack := transport.Ack{TLI: pos.TLI, LSN: pos.LSN}
	lastCheck := time.Now()
	fsyncs := s.w.Syncs.Load() // as of the last look for the freeze marker
	for {
		f, ok, err := rd.Next()
		if err != nil {
			return refuse(err)
		}
		if ok {
			s.r.frames.Add(1)
			if err := s.frame(f); err != nil {
				return err
			}
			continue
		}
		if pos := s.rb.Durable(); s.w.Dirty() || pos != ack.Position() {
			if err := s.fsynced(s.w.Sync); err != nil {
				return refuse(err)
			}
			s.r.setDurable(pos)
			ack = transport.Ack{TLI: pos.TLI, LSN: pos.LSN}
			if err := s.c.Send(&ack); err != nil {
				return err
			}
		}
		// The deadline first, the poke second: a poke between the two is seen below,
		// and one after them ends the read at once.
		s.c.SetReadDeadline(lastCheck.Add(every))
		if now := time.Now(); poked.Swap(false) || now.Sub(lastCheck) >= every {
			if err := s.checkFrozen(); err != nil {
				return err
			}
			if s.w.Syncs.Load() == fsyncs {
				if err := s.fsynced(s.w.Settle); err != nil {
					return refuse(err)
				}
			}
			fsyncs = s.w.Syncs.Load()
			lastCheck = now
			s.c.SetReadDeadline(lastCheck.Add(every))
		}
		if err := rd.Fill(); err != nil && !transport.Deadline(err) {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// frame applies one frame; an end-of-WAL mark is recorded and echoed at once.
func (s *session) frame(f transport.Frame) error {
	end, ok := f.(*transport.End)
	if !ok {
		if err := s.apply(f); err != nil {
			return refuse(err)
		}
		return nil
	}
	if err := s.end(end); err != nil {
		return refuse(err)
	}
	// Everything before the mark is durable now; the echo tells the sidecar that the
	// mark is too.
	s.r.setDurable(s.rb.Durable())
	return s.c.Send(end)
}

// checkHello checks a session's first frame: a hello of this protocol version that
// describes a WAL stream walship can take. Every failure wraps errBadHello.
func checkHello(f transport.Frame) (spool.Identity, error) {
	hello, ok := f.(*transport.Hello)
	if !ok {
		return spool.Identity{}, fmt.Errorf("%w: %w: first frame is %T, not a hello", errBadHello, transport.ErrMalformed, f)
	}
	if hello.Version != transport.Version {
		return spool.Identity{}, fmt.Errorf("%w: %w: sidecar speaks version %d, receiver %d", errBadHello, transport.ErrVersion, hello.Version, transport.Version)
	}
	id := spool.Identity{SysID: hello.SysID, SegSize: uint64(hello.SegSize), BlockSize: uint64(hello.BlockSize), Magic: hello.Magic, ServerVersion: hello.ServerVersion}
	if err := id.Stream().Validate(); err != nil {
		return spool.Identity{}, fmt.Errorf("%w: %w", errBadHello, err)
	}
	return id, nil
}

// checkFrozen ends the session when the spool has been frozen for a promotion; what is
// written so far is fsynced first, so that the partial the promotion reads is durable.
func (s *session) checkFrozen() error {
	frozen, err := spool.Frozen(s.dir)
	if err == nil && !frozen {
		return nil
	}
	if err == nil {
		err = spool.ErrFrozen
	}
	return refuse(errors.Join(err, s.fsynced(s.w.Sync)))
}

// fsynced runs op, a call of the spool's writer that may fsync received WAL, and gives
// Config.ObserveFsync its duration if it did. The writer counts each of its fsyncs in
// r.fsyncs (spool.Writer.Syncs) and a session is the spool's only writer, so the
// fsyncs timed are exactly those that Fsyncs counts, as long as every call that may
// fsync goes through here.
func (s *session) fsynced(op func() error) error {
	observe := s.r.cfg.ObserveFsync
	if observe == nil {
		return op()
	}
	before := s.r.fsyncs.Load()
	start := time.Now()
	err := op()
	if n := s.r.fsyncs.Load() - before; n > 0 {
		d := time.Since(start) / time.Duration(n)
		for range n {
			observe(d)
		}
	}
	return err
}

// apply does the I/O for one frame.
func (s *session) apply(f transport.Frame) error {
	switch f := f.(type) {
	case *transport.Data:
		if err := f.CheckHash(); err != nil {
			return err
		}
		st, err := s.rb.Offer(f.TLI, f.Seg, uint64(f.Offset), f.Payload, f.Padding)
		if err != nil {
			return err
		}
		if err := s.do(st); err != nil {
			return err
		}
		s.rb.Commit(st)
		s.r.received.Add(uint64(len(st.Write)))
		if st.Complete {
			s.log.Debug().Stringer("segment", st.Seg).Msg("segment published")
		}
		return nil
	case *transport.File:
		if err := f.CheckHash(); err != nil {
			return err
		}
		tli, err := wal.ParseHistoryName(f.Name)
		if err != nil {
			return fmt.Errorf("file frame: %w", err)
		}
		if err := spool.PublishOnce(s.dir, f.Name, f.Content); err != nil {
			return err
		}
		s.rb.AddHistory(tli)
		s.log.Info().Str("file", f.Name).Msg("history file published")
		return nil
	default:
		return fmt.Errorf("%w: unexpected frame %T in a session", transport.ErrMalformed, f)
	}
}

// do carries out a Rebuild step with the spool's writer, in the order Rebuild's
// documentation gives.
func (s *session) do(st Step) error {
	w := s.w
	// Use fsyncs (and settles) the file it leaves for another, which only an Open step
	// asks for (Offer: every other step is for the segment being written). Those fsyncs
	// are done here first, so that they are timed on their own, without the next file's
	// creation.
	if st.Open {
		if err := s.fsynced(w.Sync); err != nil {
			return err
		}
		if err := s.fsynced(w.Settle); err != nil {
			return err
		}
	}
	if err := w.Use(st.Seg, st.Open); err != nil {
		return err
	}
	if len(st.Held) > 0 {
		if err := w.Check(st.HeldAt, st.Held); err != nil {
			return err
		}
	}
	if len(st.Write) > 0 {
		if err := w.WriteAt(st.WriteAt, st.Write); err != nil {
			return err
		}
	}
	if st.Complete {
		return s.fsynced(w.Publish)
	}
	return nil
}

// end records the sidecar's end-of-WAL mark once every byte before it is durable. The
// mark must sit exactly where the received WAL ends: anything else means frames were
// lost or the sidecar is confused, and recording it would mislead the promotion.
func (s *session) end(e *transport.End) error {
	if err := s.fsynced(s.w.Sync); err != nil {
		return err
	}
	pos := s.rb.Durable()
	if pos.TLI != e.TLI || pos.LSN != e.LSN {
		return &misplacedEndError{mark: wal.Position{TLI: e.TLI, LSN: e.LSN}, held: pos}
	}
	if err := spool.WriteEnd(s.dir, pos); err != nil {
		return err
	}
	s.log.Info().Stringer("end", pos).Msg("the sidecar drained the primary's WAL; end-of-WAL mark recorded")
	return nil
}

// misplacedEndError is an end-of-WAL mark that is not where the received WAL ends.
type misplacedEndError struct{ mark, held wal.Position }

func (e *misplacedEndError) Error() string {
	return fmt.Sprintf("end-of-WAL mark at %s on timeline %d, but the spool holds WAL up to %s", e.mark.LSN, e.mark.TLI, e.held)
}
