package receiver

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// Config configures a Receiver.
type Config struct {
	// Listen is the UDP address to listen on, HOST:PORT. Required; port 0 picks a free one.
	Listen string
	// Spool is the directory that holds the received WAL. Required; created if missing.
	Spool string
	// TLS is the server configuration (transport.ServerTLS). Required.
	TLS *tls.Config
	// Logger receives progress and errors. The zero value logs nothing.
	Logger zerolog.Logger
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

	durable atomic.Pointer[Position] // the spool's durable end; nil while it holds no WAL
}

// Durable is where the spool's durable WAL ends: everything before it is fsynced (and
// acknowledged, once a sidecar has sent it). ok is false while the spool holds no WAL.
func (r *Receiver) Durable() (Position, bool) {
	p := r.durable.Load()
	if p == nil {
		return Position{}, false
	}
	return *p, true
}

func (r *Receiver) setDurable(p Position) { r.durable.Store(&p) }

// New opens (creating if needed) and locks the spool, and starts listening.
func New(cfg Config) (*Receiver, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Spool, 0o755); err != nil {
		return nil, fmt.Errorf("receiver: create spool: %w", err)
	}
	lock, err := LockReceiver(cfg.Spool)
	if err != nil {
		return nil, err
	}
	ln, err := transport.Listen(cfg.Listen, cfg.TLS)
	if err != nil {
		lock.Close()
		return nil, err
	}
	r := &Receiver{cfg: cfg, log: cfg.Logger, ln: ln, lock: lock}
	// What the spool holds from before is durable, once crash leftovers are dealt with;
	// a spool frozen for a promotion stays exactly as it is.
	id, ok, err := ReadIdentity(cfg.Spool)
	if err == nil && ok {
		var c Contents
		if c, err = recoverIdle(cfg.Spool, id, cfg.Logger); err == nil {
			if pos, ok := c.Position(id.SegSize); ok {
				r.setDurable(pos)
			}
		}
	}
	if err != nil {
		ln.Close()
		lock.Close()
		return nil, err
	}
	return r, nil
}

// recoverIdle runs Recover on a spool no session writes, under the writer lock and
// unless it is frozen; otherwise it only scans it.
func recoverIdle(dir string, id Identity, log zerolog.Logger) (Contents, error) {
	wlock, err := LockWriter(dir)
	if errors.Is(err, ErrLocked) {
		return Scan(dir, id.SegSize) // a promotion is freezing it
	}
	if err != nil {
		return Contents{}, err
	}
	defer wlock.Close()
	if frozen, err := Frozen(dir); err != nil || frozen {
		if err != nil {
			return Contents{}, err
		}
		return Scan(dir, id.SegSize)
	}
	return Recover(dir, id.Stream(), log)
}

// Addr is the address the receiver listens on.
func (r *Receiver) Addr() net.Addr { return r.ln.Addr() }

// Run accepts sessions until ctx is done, then closes the listener and the spool.
func (r *Receiver) Run(ctx context.Context) error {
	defer r.lock.Close()
	defer r.ln.Close()
	r.log.Info().Str("listen", r.ln.Addr().String()).Str("spool", r.cfg.Spool).Msg("receiver ready")
	var wg sync.WaitGroup
	defer wg.Wait()
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

// serve runs one session from hello to close.
func (r *Receiver) serve(ctx context.Context, c *transport.Conn, log zerolog.Logger) error {
	defer c.Close("session ended")
	f, err := c.Recv()
	if err != nil {
		return err
	}
	id, err := checkHello(f)
	if err != nil {
		c.Refuse(err.Error(), true)
		return err
	}
	if err := Bind(r.cfg.Spool, id); err != nil {
		c.Refuse(err.Error(), errors.Is(err, ErrWrongCluster))
		return err
	}
	// The writer lock first, the freeze marker second: walship promote makes the
	// marker first and takes the lock second, so one of us sees the other.
	wlock, err := LockWriter(r.cfg.Spool)
	if err != nil {
		c.Refuse(err.Error(), false)
		return err
	}
	defer wlock.Close()
	if frozen, err := Frozen(r.cfg.Spool); err != nil || frozen {
		if err == nil {
			err = ErrFrozen
		}
		c.Refuse(err.Error(), true)
		return err
	}
	// A session means the primary's server is up again: its WAL goes on past any mark.
	if err := clearEnd(r.cfg.Spool); err != nil {
		c.Refuse(err.Error(), false)
		return err
	}
	contents, err := Recover(r.cfg.Spool, id.Stream(), log)
	if err != nil {
		c.Refuse(err.Error(), false)
		return err
	}
	rb := NewRebuild(id.Stream(), contents)
	w := &writer{dir: r.cfg.Spool, segSize: id.SegSize}
	defer w.close()
	pos := rb.Durable()
	if err := c.Send(&transport.Welcome{Version: transport.Version, Empty: rb.Empty(), TLI: pos.TLI, LSN: pos.LSN}); err != nil {
		return err
	}
	log.Info().Uint64("system_identifier", id.SysID).Stringer("position", pos).Bool("empty", rb.Empty()).Msg("sidecar session started")

	frames := make(chan transport.Frame, 64)
	recvErr := make(chan error, 1)
	go func() {
		defer close(frames)
		for {
			// A fresh buffer per frame: frames wait in the channel while the next is read.
			f, _, err := transport.ReadFrame(streamReader{c}, nil)
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case frames <- f:
			case <-ctx.Done():
				return
			}
		}
	}()

	// The freeze marker is checked between frames and, while none come, every
	// freezeCheck, so that a promotion waits for this session at most that long.
	tick := time.NewTicker(freezeCheck)
	defer tick.Stop()
	lastCheck := time.Now()
	for {
		var f transport.Frame
		var ok bool
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			if err := checkFrozen(r.cfg.Spool, c, w); err != nil {
				return err
			}
			lastCheck = time.Now()
			continue
		case f, ok = <-frames:
			if !ok {
				return fmt.Errorf("receive: %w", <-recvErr)
			}
		}
		if time.Since(lastCheck) >= freezeCheck {
			if err := checkFrozen(r.cfg.Spool, c, w); err != nil {
				return err
			}
			lastCheck = time.Now()
		}
		if end, ok := f.(*transport.End); ok {
			if err := r.end(end, rb, w, log); err != nil {
				c.Refuse(err.Error(), false)
				return err
			}
			// Everything before the mark is durable now; the echo tells the sidecar that
			// the mark is too.
			r.setDurable(rb.Durable())
			if err := c.Send(end); err != nil {
				return err
			}
			continue
		} else if err := r.apply(f, rb, w, log); err != nil {
			c.Refuse(err.Error(), false)
			return err
		}
		if len(frames) > 0 {
			continue // group the fsync and the ack with the frames already waiting
		}
		if err := w.sync(); err != nil {
			c.Refuse(err.Error(), false)
			return err
		}
		pos := rb.Durable()
		r.setDurable(pos)
		if err := c.Send(&transport.Ack{TLI: pos.TLI, LSN: pos.LSN}); err != nil {
			return err
		}
	}
}

// checkHello checks a session's first frame: a hello of this protocol version that
// describes a WAL stream walship can take. Every failure is fatal for the session.
func checkHello(f transport.Frame) (Identity, error) {
	hello, ok := f.(*transport.Hello)
	if !ok {
		return Identity{}, fmt.Errorf("handshake: %w: first frame is %T, not a hello", transport.ErrMalformed, f)
	}
	if hello.Version != transport.Version {
		return Identity{}, fmt.Errorf("%w: sidecar speaks version %d, receiver %d", transport.ErrVersion, hello.Version, transport.Version)
	}
	id := Identity{SysID: hello.SysID, SegSize: uint64(hello.SegSize), BlockSize: uint64(hello.BlockSize), Magic: hello.Magic, ServerVersion: hello.ServerVersion}
	if err := id.Stream().Validate(); err != nil {
		return Identity{}, fmt.Errorf("handshake: %w", err)
	}
	return id, nil
}

// freezeCheck is how often a session looks for the freeze marker.
const freezeCheck = 50 * time.Millisecond

// checkFrozen ends the session when the spool has been frozen for a promotion; what is
// written so far is fsynced first, so that the partial the promotion reads is durable.
func checkFrozen(dir string, c *transport.Conn, w *writer) error {
	frozen, err := Frozen(dir)
	if err == nil && !frozen {
		return nil
	}
	if err == nil {
		err = ErrFrozen
	}
	if serr := w.sync(); serr != nil {
		err = errors.Join(err, serr)
	}
	c.Refuse(err.Error(), true)
	return err
}

// streamReader lets ReadFrame read from a Conn's stream without the Conn's buffer.
type streamReader struct{ c *transport.Conn }

func (s streamReader) Read(p []byte) (int, error) { return s.c.Read(p) }

// apply does the I/O for one frame.
func (r *Receiver) apply(f transport.Frame, rb *Rebuild, w *writer, log zerolog.Logger) error {
	switch f := f.(type) {
	case *transport.Data:
		if err := f.CheckHash(); err != nil {
			return err
		}
		st, err := rb.Offer(f.TLI, f.Seg, uint64(f.Offset), f.Payload, f.Padding)
		if err != nil {
			return err
		}
		if err := w.do(st); err != nil {
			return err
		}
		rb.Commit(st)
		if st.Complete {
			log.Debug().Str("segment", st.Seg.Name(w.segSize)).Msg("segment published")
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
		if err := publishOnce(filepath.Join(r.cfg.Spool, f.Name), f.Content); err != nil {
			return err
		}
		rb.AddHistory(tli)
		log.Info().Str("file", f.Name).Msg("history file published")
		return nil
	default:
		return fmt.Errorf("%w: unexpected frame %T in a session", transport.ErrMalformed, f)
	}
}

// end records the sidecar's end-of-WAL mark once every byte before it is durable. The
// mark must sit exactly where the received WAL ends: anything else means frames were
// lost or the sidecar is confused, and recording it would mislead the promotion.
func (r *Receiver) end(e *transport.End, rb *Rebuild, w *writer, log zerolog.Logger) error {
	if err := w.sync(); err != nil {
		return err
	}
	pos := rb.Durable()
	if pos.TLI != e.TLI || pos.LSN != e.LSN {
		return fmt.Errorf("end-of-WAL mark at %s on timeline %d, but the spool holds WAL up to %s", e.LSN, e.TLI, pos)
	}
	if err := writeEnd(r.cfg.Spool, pos); err != nil {
		return err
	}
	log.Info().Stringer("end", pos).Msg("the sidecar drained the primary's WAL; end-of-WAL mark recorded")
	return nil
}

// publishOnce publishes content at path unless the same content is there already; other
// content there is ErrConflict and stays.
func publishOnce(path string, content []byte) error {
	have, err := os.ReadFile(path)
	switch {
	case err == nil && bytes.Equal(have, content):
		return nil
	case err == nil:
		return fmt.Errorf("%s: %w", path, ErrConflict)
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	return durable.WriteFile(path, content, 0o644)
}

// writer does the file I/O of Rebuild steps for the segment being rebuilt.
type writer struct {
	dir     string
	segSize uint64
	f       *os.File
	seg     wal.Segment
	dirty   bool
}

func (w *writer) partialPath(seg wal.Segment) string {
	return filepath.Join(w.dir, seg.Name(w.segSize)+PartialSuffix)
}

func (w *writer) do(st Step) error {
	if st.Open || w.f == nil || w.seg != st.Seg {
		if err := w.sync(); err != nil {
			return err
		}
		w.close()
		f, err := os.OpenFile(w.partialPath(st.Seg), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return fmt.Errorf("open partial segment: %w", err)
		}
		if st.Open {
			// The new file's name must survive a crash before its first ack.
			if err := durable.SyncDir(w.dir); err != nil {
				f.Close()
				return err
			}
		}
		w.f, w.seg = f, st.Seg
	}
	if len(st.Held) > 0 {
		have := make([]byte, len(st.Held))
		if _, err := w.f.ReadAt(have, int64(st.HeldAt)); err != nil {
			return fmt.Errorf("read %s at %d: %w", w.f.Name(), st.HeldAt, err)
		}
		if !bytes.Equal(have, st.Held) {
			return fmt.Errorf("segment %s at offset %d (%d bytes): %w", st.Seg.Name(w.segSize), st.HeldAt, len(st.Held), ErrConflict)
		}
	}
	if len(st.Write) > 0 {
		if _, err := w.f.WriteAt(st.Write, int64(st.WriteAt)); err != nil {
			// Cut back whatever part of the write landed, so that the file holds only
			// bytes the rebuild knows of.
			w.f.Truncate(int64(st.WriteAt))
			return fmt.Errorf("write segment %s at offset %d: %w", st.Seg.Name(w.segSize), st.WriteAt, err)
		}
		w.dirty = true
	}
	if st.Complete {
		f := w.f
		w.f, w.dirty = nil, false
		if err := durable.Rename(f, filepath.Join(w.dir, st.Seg.Name(w.segSize))); err != nil {
			return err
		}
	}
	return nil
}

// sync makes everything written so far durable.
func (w *writer) sync() error {
	if !w.dirty {
		return nil
	}
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", w.f.Name(), err)
	}
	w.dirty = false
	return nil
}

func (w *writer) close() {
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
}

// Recover brings a spool to a clean state before a session: leftovers of interrupted
// publishes are removed, a partial that is already whole (a crash between its last write
// and its rename) is published, and the page headers of each timeline's partial are
// checked; a partial is cut back to its first bad page, whose bytes were never fsynced
// and acked (a crash of the host can leave a file longer than its durable data).
func Recover(dir string, stream wal.Stream, log zerolog.Logger) (Contents, error) {
	c, err := Scan(dir, stream.SegSize)
	if err != nil {
		return Contents{}, err
	}
	for _, t := range c.Temps {
		if err := os.Remove(filepath.Join(dir, t)); err != nil {
			return Contents{}, fmt.Errorf("recover spool: %w", err)
		}
		log.Info().Str("file", t).Msg("removed the leftover of an interrupted publish")
	}
	changed := len(c.Temps) > 0
	for _, p := range c.Partials {
		name := filepath.Join(dir, p.Seg.Name(stream.SegSize)+PartialSuffix)
		data, err := os.ReadFile(name)
		if err != nil {
			return Contents{}, fmt.Errorf("recover spool: %w", err)
		}
		good := uint64(len(data))
		if err := stream.CheckPages(data, p.Seg.Start(stream.SegSize), p.Seg.TLI); err != nil {
			var pe *wal.PageError
			if !errors.As(err, &pe) {
				return Contents{}, err
			}
			good = uint64(pe.At - p.Seg.Start(stream.SegSize))
			log.Warn().Str("file", name).Err(err).Uint64("kept_bytes", good).Msg("cutting a partial segment back to its last good page")
			if err := os.Truncate(name, int64(good)); err != nil {
				return Contents{}, fmt.Errorf("recover spool: %w", err)
			}
			changed = true
		}
		if good == stream.SegSize {
			f, err := os.OpenFile(name, os.O_RDWR, 0)
			if err != nil {
				return Contents{}, fmt.Errorf("recover spool: %w", err)
			}
			if err := durable.Rename(f, filepath.Join(dir, p.Seg.Name(stream.SegSize))); err != nil {
				return Contents{}, fmt.Errorf("recover spool: %w", err)
			}
			log.Info().Str("file", name).Msg("published a whole partial segment left by a crash")
			changed = true
		}
	}
	if !changed {
		return c, nil
	}
	if err := durable.SyncDir(dir); err != nil {
		return Contents{}, err
	}
	return Scan(dir, stream.SegSize)
}
