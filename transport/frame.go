package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/cespare/xxhash/v2"

	"github.com/walship/walship/tail/wal"
)

// Version is the protocol version carried in Hello and Welcome. Peers of different
// versions refuse each other.
const Version = 2

// Frame kinds on the wire.
const (
	kindHello   = 1
	kindWelcome = 2
	kindData    = 3
	kindFile    = 4
	kindAck     = 5
	kindRefuse  = 6
	kindEnd     = 7
)

// Limits that keep a malformed or hostile peer from making us allocate without bound.
const (
	frameHeaderSize = 5       // kind u8, body length u32
	MaxPayload      = 1 << 20 // largest Data payload
	maxFileSize     = 1 << 20 // largest File content (history files are tiny)
	maxBody         = MaxPayload + 64
)

var (
	// ErrMalformed is wrapped by every decode failure of a frame's structure.
	ErrMalformed = errors.New("malformed frame")
	// ErrChecksum means a payload does not match the xxhash64 its frame carries.
	ErrChecksum = errors.New("payload checksum mismatch")
)

// Frame is one message of the walship protocol.
type Frame interface{ kind() byte }

// Hello opens a session: the sidecar says which cluster's WAL it streams.
type Hello struct {
	Version       uint16
	SysID         uint64
	SegSize       uint32
	BlockSize     uint32
	Magic         uint16
	TLI           uint32 // the primary's current timeline
	ServerVersion uint32 // server_version_num
}

// Stream returns the WAL stream the hello announces.
func (h Hello) Stream() wal.Stream {
	return wal.Stream{SysID: h.SysID, SegSize: uint64(h.SegSize), BlockSize: uint64(h.BlockSize), Magic: h.Magic}
}

// Welcome answers a Hello: the receiver's durable position, where the sidecar resumes.
// Empty means the spool holds nothing of this cluster yet.
type Welcome struct {
	Version uint16
	Empty   bool
	TLI     uint32
	LSN     wal.LSN
}

// Data carries bytes of one WAL segment: Payload goes at Offset of segment Seg on
// timeline TLI. Hash is the xxhash64 of Payload. Padding marks the rest of a segment
// after an XLOG_SWITCH record, which the server never wrote pages into (zeros or stale
// bytes of a recycled file): the receiver keeps those bytes but checks no page header
// in them.
type Data struct {
	TLI uint32
	// Seg is 64 bits, as the LSN is, so the frame alone cannot bound it: a receiver
	// refuses a segment past the last one of the LSN space for its segment size
	// (receiver.Rebuild.Offer), whose start would wrap around.
	Seg     uint64
	Offset  uint32
	Padding bool
	Hash    uint64
	Payload []byte
}

// NewData builds a Data frame and computes its hash.
func NewData(tli uint32, seg uint64, off uint32, payload []byte) *Data {
	d := &Data{}
	d.Set(tli, seg, off, payload, false)
	return d
}

// Set makes d a Data frame of payload, whose hash it computes; d aliases payload.
func (d *Data) Set(tli uint32, seg uint64, off uint32, payload []byte, padding bool) {
	*d = Data{TLI: tli, Seg: seg, Offset: off, Padding: padding, Hash: xxhash.Sum64(payload), Payload: payload}
}

// File carries a whole small file, a timeline history file, to be published under Name.
type File struct {
	Name    string
	Hash    uint64
	Content []byte
}

// NewFile builds a File frame and computes its hash.
func NewFile(name string, content []byte) *File {
	return &File{Name: name, Hash: xxhash.Sum64(content), Content: content}
}

// Ack tells the sidecar that the receiver holds every byte before LSN on timeline TLI
// durably (fsynced, and a completed segment published).
type Ack struct {
	TLI uint32
	LSN wal.LSN
}

// Position is where the ack says the receiver's durable WAL ends.
func (a Ack) Position() wal.Position { return wal.Position{TLI: a.TLI, LSN: a.LSN} }

// Refuse ends a session with the reason, for the peer to log. Fatal says that trying
// again cannot help (another cluster, another protocol version): the sidecar stops
// instead of reconnecting.
type Refuse struct {
	Fatal  bool
	Reason string
}

// End is the sidecar's end-of-WAL mark: the primary's server is gone, and the sidecar
// has sent every valid record its pg_wal holds. The WAL of timeline TLI ends at LSN,
// where the bytes sent before the mark end. The receiver records the mark durably, and
// walship promote waits for it while a sidecar is connected.
type End struct {
	TLI uint32
	LSN wal.LSN
}

func (*Hello) kind() byte   { return kindHello }
func (*Welcome) kind() byte { return kindWelcome }
func (*Data) kind() byte    { return kindData }
func (*File) kind() byte    { return kindFile }
func (*Ack) kind() byte     { return kindAck }
func (*Refuse) kind() byte  { return kindRefuse }
func (*End) kind() byte     { return kindEnd }

// CheckHash verifies the payload against the frame's hash.
func (d *Data) CheckHash() error {
	if got := xxhash.Sum64(d.Payload); got != d.Hash {
		return fmt.Errorf("data frame tli %d segment %d offset %d length %d: %w (got %016x, frame says %016x)",
			d.TLI, d.Seg, d.Offset, len(d.Payload), ErrChecksum, got, d.Hash)
	}
	return nil
}

// CheckHash verifies the content against the frame's hash.
func (f *File) CheckHash() error {
	if got := xxhash.Sum64(f.Content); got != f.Hash {
		return fmt.Errorf("file frame %q: %w", f.Name, ErrChecksum)
	}
	return nil
}

var le = binary.LittleEndian

// AppendFrame appends the encoding of f to dst and returns the extended slice.
func AppendFrame(dst []byte, f Frame) []byte {
	start := len(dst)
	dst = append(dst, f.kind(), 0, 0, 0, 0)
	switch f := f.(type) {
	case *Hello:
		dst = le.AppendUint16(dst, f.Version)
		dst = le.AppendUint64(dst, f.SysID)
		dst = le.AppendUint32(dst, f.SegSize)
		dst = le.AppendUint32(dst, f.BlockSize)
		dst = le.AppendUint16(dst, f.Magic)
		dst = le.AppendUint32(dst, f.TLI)
		dst = le.AppendUint32(dst, f.ServerVersion)
	case *Welcome:
		dst = le.AppendUint16(dst, f.Version)
		dst = append(dst, boolByte(f.Empty))
		dst = le.AppendUint32(dst, f.TLI)
		dst = le.AppendUint64(dst, uint64(f.LSN))
	case *Data:
		dst = le.AppendUint32(dst, f.TLI)
		dst = le.AppendUint64(dst, f.Seg)
		dst = le.AppendUint32(dst, f.Offset)
		dst = append(dst, boolByte(f.Padding))
		dst = le.AppendUint32(dst, uint32(len(f.Payload)))
		dst = le.AppendUint64(dst, f.Hash)
		dst = append(dst, f.Payload...)
	case *File:
		dst = le.AppendUint16(dst, uint16(len(f.Name)))
		dst = append(dst, f.Name...)
		dst = le.AppendUint32(dst, uint32(len(f.Content)))
		dst = le.AppendUint64(dst, f.Hash)
		dst = append(dst, f.Content...)
	case *Ack:
		dst = le.AppendUint32(dst, f.TLI)
		dst = le.AppendUint64(dst, uint64(f.LSN))
	case *End:
		dst = le.AppendUint32(dst, f.TLI)
		dst = le.AppendUint64(dst, uint64(f.LSN))
	case *Refuse:
		dst = append(dst, boolByte(f.Fatal))
		dst = le.AppendUint16(dst, uint16(len(f.Reason)))
		dst = append(dst, f.Reason...)
	}
	le.PutUint32(dst[start+1:], uint32(len(dst)-start-frameHeaderSize))
	return dst
}

// ParseFrame decodes one whole frame from the start of b and returns it with the
// number of bytes it took. Lengths are checked exactly: a body with bytes left over, or
// too few, is ErrMalformed. Byte slices in the result (Data.Payload, File.Content) alias
// b. It does not check hashes; the receiver does, with CheckHash.
func ParseFrame(b []byte) (Frame, int, error) {
	return new(Decoder).Parse(b)
}

// Decoder parses frames into values it owns and reuses, so that the frames of a
// session's steady state (data, acks, end marks) cost no allocation. The frame Parse
// returns, and every byte slice in it, is valid only until the next Parse.
type Decoder struct {
	data    Data
	ack     Ack
	end     End
	welcome Welcome
}

// Parse is ParseFrame into d's values.
func (d *Decoder) Parse(b []byte) (Frame, int, error) {
	if len(b) < frameHeaderSize {
		return nil, 0, fmt.Errorf("%w: %d bytes, want a %d-byte header", ErrMalformed, len(b), frameHeaderSize)
	}
	kind, n := b[0], le.Uint32(b[1:])
	if n > maxBody {
		return nil, 0, fmt.Errorf("%w: body of %d bytes exceeds %d", ErrMalformed, n, maxBody)
	}
	if uint64(len(b)) < frameHeaderSize+uint64(n) {
		return nil, 0, fmt.Errorf("%w: %d body bytes, header says %d", ErrMalformed, len(b)-frameHeaderSize, n)
	}
	f, err := parseBody(kind, b[frameHeaderSize:frameHeaderSize+int(n)], d)
	if err != nil {
		return nil, 0, err
	}
	return f, frameHeaderSize + int(n), nil
}

// zeros stands in for the bytes of a body that is too short: the parse goes on to its
// end without a bounds check at each field, and its result is thrown away.
var zeros [8]byte

// body is a cursor over a frame body that remembers the first short read.
type body struct {
	b   []byte
	bad bool
}

func (r *body) take(n int) []byte {
	if r.bad || n > len(r.b) {
		r.bad = true
		return zeros[:min(n, len(zeros))]
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}
func (r *body) u8() byte { return r.take(1)[0] }

// flag reads a boolean byte, which must be 0 or 1.
func (r *body) flag(what string) (bool, error) {
	switch r.u8() {
	case 0:
		return false, nil
	case 1:
		return true, nil
	}
	return false, fmt.Errorf("%w: %s flag is neither 0 nor 1", ErrMalformed, what)
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}
func (r *body) u16() uint16 { return le.Uint16(r.take(2)) }
func (r *body) u32() uint32 { return le.Uint32(r.take(4)) }
func (r *body) u64() uint64 { return le.Uint64(r.take(8)) }

// parseBody parses a frame's body into dec's values.
func parseBody(kind byte, b []byte, dec *Decoder) (Frame, error) {
	r := body{b: b}
	var f Frame
	switch kind {
	case kindHello:
		f = &Hello{Version: r.u16(), SysID: r.u64(), SegSize: r.u32(), BlockSize: r.u32(), Magic: r.u16(), TLI: r.u32(), ServerVersion: r.u32()}
	case kindWelcome:
		w := &dec.welcome
		*w = Welcome{Version: r.u16()}
		var err error
		if w.Empty, err = r.flag("welcome: empty"); err != nil {
			return nil, err
		}
		w.TLI, w.LSN = r.u32(), wal.LSN(r.u64())
		f = w
	case kindData:
		d := &dec.data
		*d = Data{TLI: r.u32(), Seg: r.u64(), Offset: r.u32()}
		var err error
		if d.Padding, err = r.flag("data: padding"); err != nil {
			return nil, err
		}
		n := r.u32()
		d.Hash = r.u64()
		if n > MaxPayload {
			return nil, fmt.Errorf("%w: data payload of %d bytes exceeds %d", ErrMalformed, n, MaxPayload)
		}
		d.Payload = r.take(int(n))
		f = d
	case kindFile:
		name := r.take(int(r.u16()))
		n := r.u32()
		if n > maxFileSize {
			return nil, fmt.Errorf("%w: file of %d bytes exceeds %d", ErrMalformed, n, maxFileSize)
		}
		fl := &File{Name: string(name), Hash: r.u64()}
		fl.Content = r.take(int(n))
		f = fl
	case kindAck:
		dec.ack = Ack{TLI: r.u32(), LSN: wal.LSN(r.u64())}
		f = &dec.ack
	case kindEnd:
		dec.end = End{TLI: r.u32(), LSN: wal.LSN(r.u64())}
		f = &dec.end
	case kindRefuse:
		fatal, err := r.flag("refuse: fatal")
		if err != nil {
			return nil, err
		}
		f = &Refuse{Fatal: fatal, Reason: string(r.take(int(r.u16())))}
	default:
		return nil, fmt.Errorf("%w: unknown kind %d", ErrMalformed, kind)
	}
	if r.bad {
		return nil, fmt.Errorf("%w: kind %d: body of %d bytes is too short", ErrMalformed, kind, len(b))
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("%w: kind %d: %d bytes left over", ErrMalformed, kind, len(r.b))
	}
	return f, nil
}

// ReadFrame reads one frame from r into buf (grown as needed) and parses it. The
// returned frame aliases the returned buffer, which the caller passes back in for the
// next read once it is done with the frame.
func ReadFrame(r io.Reader, buf []byte) (Frame, []byte, error) {
	buf = append(buf[:0], make([]byte, frameHeaderSize)...)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, buf, err
	}
	n := le.Uint32(buf[1:])
	if n > maxBody {
		return nil, buf, fmt.Errorf("%w: body of %d bytes exceeds %d", ErrMalformed, n, maxBody)
	}
	if cap(buf) < frameHeaderSize+int(n) {
		nb := make([]byte, frameHeaderSize, frameHeaderSize+int(n))
		copy(nb, buf)
		buf = nb
	}
	buf = buf[:frameHeaderSize+int(n)]
	if _, err := io.ReadFull(r, buf[frameHeaderSize:]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, buf, err
	}
	f, _, err := ParseFrame(buf)
	return f, buf, err
}
