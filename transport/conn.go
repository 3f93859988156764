package transport

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
)

// Timeouts of a session. The sidecar's keepalives every KeepAlive keep NAT bindings and
// both peers' idle timers fresh while the primary is idle (the receiver's
// acknowledgements of them count as traffic for the sidecar); a peer silent for
// IdleTimeout is gone. The receiver sends no keepalives of its own: they would only
// double an idle session's packets.
const (
	KeepAlive   = 4 * time.Second
	IdleTimeout = 10 * time.Second
)

func quicConfig() *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout: 5 * time.Second,
		MaxIdleTimeout:       IdleTimeout,
		// One stream carries a session; a larger window than the defaults lets a backlog
		// catch up at disk speed over links with some latency.
		MaxStreamReceiveWindow:     32 << 20,
		MaxConnectionReceiveWindow: 48 << 20,
		MaxIncomingStreams:         1,
		MaxIncomingUniStreams:      -1,
	}
}

// Conn is one session between a sidecar and a receiver: a QUIC connection with one
// bidirectional stream. Send and Recv may be called from different goroutines; Send
// must not be called concurrently with itself, nor Recv with itself.
type Conn struct {
	qc   *quic.Conn
	st   *quic.Stream
	rbuf []byte
	wbuf []byte

	closeOnce sync.Once
}

// Send writes one frame.
func (c *Conn) Send(f Frame) error {
	c.wbuf = AppendFrame(c.wbuf[:0], f)
	if _, err := c.st.Write(c.wbuf); err != nil {
		return fmt.Errorf("send to %s: %w", c.qc.RemoteAddr(), err)
	}
	return nil
}

// Recv reads one frame. Byte slices in it stay valid until the next Recv.
func (c *Conn) Recv() (Frame, error) {
	f, buf, err := c.RecvInto(c.rbuf)
	c.rbuf = buf
	return f, err
}

// Reader returns a Reader of the session's frames. It must not be used together with
// Recv or RecvInto.
func (c *Conn) Reader() *Reader { return NewReader(connReader{c}) }

// SetReadDeadline makes a read from the session's stream (Recv, RecvInto, a Reader's
// Fill) that is waiting, or the next one, give up at t with an error for which
// Deadline says true. The zero time takes the deadline away.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.st.SetReadDeadline(t) }

// Deadline says whether err is a read that gave up at its deadline, as opposed to a
// session that ended (a peer silent for IdleTimeout is a timeout too, but not this).
func Deadline(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// connReader reads the session's stream, naming the peer in its errors.
type connReader struct{ c *Conn }

func (r connReader) Read(p []byte) (int, error) {
	n, err := r.c.st.Read(p)
	if err != nil && n == 0 {
		err = fmt.Errorf("receive from %s: %w", r.c.qc.RemoteAddr(), err)
	}
	return n, err
}

// RecvInto reads one frame into buf (grown as needed; nil for a new one) and returns
// the buffer, which the frame aliases: a caller that keeps frames while it reads the
// next passes a buffer of its own each time, and hands one back only once done with
// the frame read into it. It must not be called concurrently with Recv.
func (c *Conn) RecvInto(buf []byte) (Frame, []byte, error) {
	f, buf, err := ReadFrame(c.st, buf)
	if err != nil {
		return nil, buf, fmt.Errorf("receive from %s: %w", c.qc.RemoteAddr(), err)
	}
	return f, buf, nil
}

// RemoteAddr is the peer's address.
func (c *Conn) RemoteAddr() net.Addr { return c.qc.RemoteAddr() }

// Context is done when the connection is closed.
func (c *Conn) Context() context.Context { return c.qc.Context() }

// Close ends the session, telling the peer why. Frames already written are delivered
// before the close where the network allows; call Refuse to send a reason first.
func (c *Conn) Close(reason string) error {
	var err error
	c.closeOnce.Do(func() {
		// The connection's close ends the stream in any case: its own close only lets
		// what was written go out first, where the network allows.
		_ = c.st.Close()
		err = c.qc.CloseWithError(0, reason)
	})
	return err
}

// Refuse sends a Refuse frame and closes the session.
func (c *Conn) Refuse(reason string, fatal bool) error {
	_ = c.Send(&Refuse{Fatal: fatal, Reason: reason})
	// Give the frame a moment to leave before the connection close overtakes it;
	// CloseWithError discards unsent stream data. The refusal is a courtesy to the
	// peer, sent as well as it can be: the session ends below whatever these say.
	_ = c.st.Close()
	select {
	case <-c.qc.Context().Done():
	case <-time.After(200 * time.Millisecond):
	}
	return c.Close(reason)
}

// Dial connects to a receiver at addr and opens the session's stream.
func Dial(ctx context.Context, addr string, tlsConf *tls.Config) (*Conn, error) {
	conf := quicConfig()
	conf.KeepAlivePeriod = KeepAlive
	qc, err := quic.DialAddr(ctx, addr, tlsConf, conf)
	if err != nil {
		return nil, fmt.Errorf("connect to receiver %s: %w", addr, err)
	}
	st, err := qc.OpenStreamSync(ctx)
	if err != nil {
		qc.CloseWithError(0, "")
		return nil, fmt.Errorf("open stream to %s: %w", addr, err)
	}
	return &Conn{qc: qc, st: st}, nil
}

// Listener accepts sessions from sidecars.
type Listener struct {
	ln *quic.Listener
	tr *quic.Transport
}

// Listen listens on addr (HOST:PORT, UDP).
//
// The listener answers packets of connections it does not know with a QUIC stateless
// reset, keyed from its certificate's private key so that the key survives a restart:
// a sidecar whose receiver restarted learns it at its next packet instead of after the
// idle timeout.
func Listen(addr string, tlsConf *tls.Config) (*Listener, error) {
	udpAddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	udp, err := net.ListenUDP("udp", udpAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	tr := &quic.Transport{Conn: udp}
	if key, ok := resetKey(tlsConf); ok {
		tr.StatelessResetKey = &key
	}
	ln, err := tr.Listen(tlsConf, quicConfig())
	if err != nil {
		udp.Close()
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return &Listener{ln: ln, tr: tr}, nil
}

// resetKey derives the stateless reset key from the server's private key.
func resetKey(tlsConf *tls.Config) (quic.StatelessResetKey, bool) {
	if len(tlsConf.Certificates) == 0 {
		return quic.StatelessResetKey{}, false
	}
	der, err := x509.MarshalPKCS8PrivateKey(tlsConf.Certificates[0].PrivateKey)
	if err != nil {
		return quic.StatelessResetKey{}, false
	}
	return quic.StatelessResetKey(sha256.Sum256(append([]byte("walship stateless reset key\x00"), der...))), true
}

// Addr is the address the listener is bound to.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Close stops listening and closes every session.
func (l *Listener) Close() error {
	return errors.Join(l.ln.Close(), l.tr.Close())
}

// Accept waits for a sidecar's connection and its stream. A peer whose TLS handshake
// fails (no certificate, one of another CA) never reaches Accept.
func (l *Listener) Accept(ctx context.Context) (*Conn, error) {
	for {
		qc, err := l.ln.Accept(ctx)
		if err != nil {
			return nil, err
		}
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := qc.AcceptStream(sctx)
		cancel()
		if err != nil {
			qc.CloseWithError(0, "no stream opened")
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			continue
		}
		return &Conn{qc: qc, st: st}, nil
	}
}

// RefusedError is the reason a peer gave for ending the session.
type RefusedError struct {
	Fatal  bool
	Reason string
}

func (e *RefusedError) Error() string { return "refused by receiver: " + e.Reason }

// Retryable says whether a session that failed with err may succeed if started again:
// network failures, timeouts and refusals for a bad frame are; a fatal refusal (another
// cluster) and a protocol version mismatch are not.
func Retryable(err error) bool {
	var re *RefusedError
	if errors.As(err, &re) {
		return !re.Fatal
	}
	return !errors.Is(err, ErrVersion)
}

// ErrVersion is wrapped when the peers speak different protocol versions.
var ErrVersion = errors.New("protocol version mismatch")

// Handshake is the sidecar's half of the session start: send hello, return the
// receiver's welcome, or its refusal as a *RefusedError. It gives up when ctx ends.
func Handshake(ctx context.Context, c *Conn, hello *Hello) (*Welcome, error) {
	if dl, ok := ctx.Deadline(); ok {
		c.st.SetDeadline(dl)
		defer c.st.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { c.st.SetDeadline(time.Now()) })
	defer stop()
	if err := c.Send(hello); err != nil {
		return nil, err
	}
	f, err := c.Recv()
	if err != nil {
		return nil, err
	}
	switch f := f.(type) {
	case *Welcome:
		if f.Version != hello.Version {
			return nil, fmt.Errorf("%w: receiver speaks version %d, sidecar %d", ErrVersion, f.Version, hello.Version)
		}
		return f, nil
	case *Refuse:
		return nil, &RefusedError{Fatal: f.Fatal, Reason: f.Reason}
	default:
		return nil, fmt.Errorf("handshake with %s: %w: got frame kind %d, want welcome", c.RemoteAddr(), ErrMalformed, f.kind())
	}
}
