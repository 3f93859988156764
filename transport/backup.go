package transport

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/quic-go/quic-go"
)

// A control stream runs beside a session's own: the receiver opens it towards the
// sidecar when a command on the standby's host asks (walship standby init, walship
// switchover), and passes its bytes through both ways, so the two ends of the
// conversation are the command and the sidecar beside the primary. The command's first
// message says what it wants.
//
// A base backup: the command speaks first: the files of the copy
// it already holds (BackupHave, one per file, for a refresh), then BackupRequest. The
// sidecar answers BackupBegin, then for every directory, link and file of the backup a
// BackupEntry, a file's entry followed by a BackupBlock for each of its blocks that the
// command does not already hold, and last BackupDone; or BackupError at any point.
//
// Messages are a kind byte, a 4-byte little-endian body length and the body: JSON,
// except a block's, which is the offset (8 bytes, little-endian) and the bytes.

// BlockSize is the unit in which a refresh compares files: a block whose length and
// SHA-256 match the copy's is not sent.
const BlockSize = 1 << 20

// Backup message kinds.
const (
	kindBackupHave    = 1
	kindBackupRequest = 2
	kindBackupBegin   = 3
	kindBackupEntry   = 4
	kindBackupBlock   = 5
	kindBackupDone    = 6
	kindBackupError   = 7
	kindSwitchover    = 8
	kindStopping      = 9
	kindStopped       = 10
)

// maxBackupBody bounds a message: a block and its offset, or the JSON of a file's
// entry or of the sums of a file of up to 1 TiB.
const maxBackupBody = 64 << 20

// BackupHave is a file the command's copy holds: its path in the backup (see
// BackupEntry), its size, and the SHA-256 of each BlockSize block (the last one shorter).
type BackupHave struct {
	Path string     `json:"path"`
	Size int64      `json:"size"`
	Sums [][32]byte `json:"sums"`
}

// BackupRequest asks for the backup. Fast asks for an immediate checkpoint at its
// start, where a spread one would take up to checkpoint_timeout's share of time.
type BackupRequest struct {
	Label string `json:"label"`
	Fast  bool   `json:"fast"`
}

// BackupTablespace is a tablespace of the primary: its OID and its location there.
type BackupTablespace struct {
	OID      uint32 `json:"oid"`
	Location string `json:"location"`
}

// BackupBegin says that the backup has started: whose it is, where its WAL starts,
// and how many bytes of files the sidecar will read.
type BackupBegin struct {
	SysID         uint64             `json:"system_identifier"`
	ServerVersion int                `json:"server_version_num"`
	SegSize       uint64             `json:"wal_segment_size"`
	Start         string             `json:"start_lsn"`
	Total         int64              `json:"total_bytes"`
	Tablespaces   []BackupTablespace `json:"tablespaces"`
}

// Entry types.
const (
	EntryDir        = "dir"
	EntryFile       = "file"
	EntryTablespace = "tablespace" // pg_tblspc/OID: a link to the tablespace's location
)

// BackupEntry is a directory, a file or a tablespace link of the backup. Path is
// slash-separated and relative to the data directory; a tablespace's files are under
// pg_tblspc/OID/. A file's blocks that differ from the command's copy follow it.
type BackupEntry struct {
	Path string `json:"path"`
	Type string `json:"type"`
	Mode uint32 `json:"mode"`
	Size int64  `json:"size,omitempty"`
}

// BackupBlock is bytes of the file of the last entry, at Offset, a multiple of
// BlockSize.
type BackupBlock struct {
	Offset int64
	Data   []byte
}

// BackupDone ends the backup: where its WAL ends, and the backup label and tablespace
// map the server returned, which recovery needs.
type BackupDone struct {
	Stop          string `json:"stop_lsn"`
	Label         string `json:"backup_label"`
	TablespaceMap string `json:"tablespace_map"`
	Sent          int64  `json:"sent_bytes"` // of blocks sent
	Same          int64  `json:"same_bytes"` // of blocks the copy already held
}

// SwitchoverRequest asks the sidecar to stop its primary with a fast shutdown, for a
// switchover: the sidecar refuses unless it was started allowing it.
type SwitchoverRequest struct{}

// SwitchoverStopping says that the sidecar has asked the primary's postmaster, PID,
// for a fast shutdown; Flush is the flush position it read just before.
type SwitchoverStopping struct {
	PID   int    `json:"pid"`
	Flush string `json:"flush_lsn"`
}

// SwitchoverStopped says that the postmaster has exited; State is its control file's
// state then ("shut down" after a clean shutdown).
type SwitchoverStopped struct {
	State string `json:"state"`
}

// BackupError is the sidecar's reason for ending a backup or a switchover, or the
// receiver's for not starting one.
type BackupError struct {
	Message string `json:"message"`
}

func (e *BackupError) Error() string { return e.Message }

// ControlConn reads and writes a control stream's messages on a byte stream.
type ControlConn struct {
	rw  io.ReadWriter
	r   *bufio.Reader
	w   *bufio.Writer
	hdr [5]byte
	buf []byte
}

// NewControlConn reads and writes backup messages on rw.
func NewControlConn(rw io.ReadWriter) *ControlConn {
	return &ControlConn{rw: rw, r: bufio.NewReaderSize(rw, 256<<10), w: bufio.NewWriterSize(rw, 256<<10)}
}

// Send writes one message: a *BackupHave, *BackupRequest, *BackupBegin, *BackupEntry,
// *BackupBlock, *BackupDone, *SwitchoverRequest, *SwitchoverStopping,
// *SwitchoverStopped or *BackupError. Messages wait in a buffer until Flush.
func (c *ControlConn) Send(m any) error {
	var kind byte
	switch m := m.(type) {
	case *BackupHave:
		kind = kindBackupHave
	case *BackupRequest:
		kind = kindBackupRequest
	case *BackupBegin:
		kind = kindBackupBegin
	case *BackupEntry:
		kind = kindBackupEntry
	case *BackupDone:
		kind = kindBackupDone
	case *BackupError:
		kind = kindBackupError
	case *SwitchoverRequest:
		kind = kindSwitchover
	case *SwitchoverStopping:
		kind = kindStopping
	case *SwitchoverStopped:
		kind = kindStopped
	case *BackupBlock:
		c.hdr[0] = kindBackupBlock
		binary.LittleEndian.PutUint32(c.hdr[1:], uint32(8+len(m.Data)))
		var off [8]byte
		binary.LittleEndian.PutUint64(off[:], uint64(m.Offset))
		for _, b := range [][]byte{c.hdr[:], off[:], m.Data} {
			if _, err := c.w.Write(b); err != nil {
				return err
			}
		}
		return nil
	default:
		return fmt.Errorf("backup message of type %T", m)
	}
	body, err := json.Marshal(m)
	if err != nil {
		return err
	}
	c.hdr[0] = kind
	binary.LittleEndian.PutUint32(c.hdr[1:], uint32(len(body)))
	if _, err := c.w.Write(c.hdr[:]); err != nil {
		return err
	}
	_, err = c.w.Write(body)
	return err
}

// Flush sends what Send buffered.
func (c *ControlConn) Flush() error { return c.w.Flush() }

// Recv reads one message. A block's Data is valid until the next Recv. A BackupError
// from the peer is returned as the error.
func (c *ControlConn) Recv() (any, error) {
	if _, err := io.ReadFull(c.r, c.hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			err = fmt.Errorf("%w: backup stream ended inside a message header", ErrMalformed)
		}
		return nil, err
	}
	kind, n := c.hdr[0], binary.LittleEndian.Uint32(c.hdr[1:])
	if n > maxBackupBody {
		return nil, fmt.Errorf("%w: backup message of %d bytes exceeds %d", ErrMalformed, n, maxBackupBody)
	}
	if cap(c.buf) < int(n) {
		c.buf = make([]byte, n)
	}
	b := c.buf[:n]
	if _, err := io.ReadFull(c.r, b); err != nil {
		return nil, fmt.Errorf("%w: backup stream ended inside a message: %w", ErrMalformed, err)
	}
	var m any
	switch kind {
	case kindBackupBlock:
		if n < 8 {
			return nil, fmt.Errorf("%w: backup block of %d bytes", ErrMalformed, n)
		}
		return &BackupBlock{Offset: int64(binary.LittleEndian.Uint64(b)), Data: b[8:]}, nil
	case kindBackupHave:
		m = new(BackupHave)
	case kindBackupRequest:
		m = new(BackupRequest)
	case kindBackupBegin:
		m = new(BackupBegin)
	case kindBackupEntry:
		m = new(BackupEntry)
	case kindBackupDone:
		m = new(BackupDone)
	case kindBackupError:
		m = new(BackupError)
	case kindSwitchover:
		m = new(SwitchoverRequest)
	case kindStopping:
		m = new(SwitchoverStopping)
	case kindStopped:
		m = new(SwitchoverStopped)
	default:
		return nil, fmt.Errorf("%w: backup message of unknown kind %d", ErrMalformed, kind)
	}
	if err := json.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("%w: backup message of kind %d: %w", ErrMalformed, kind, err)
	}
	if e, ok := m.(*BackupError); ok {
		return nil, e
	}
	return m, nil
}

// OpenControl opens a control stream towards the sidecar of the session (receiver side).
func (c *Conn) OpenControl(ctx context.Context) (*quic.Stream, error) {
	st, err := c.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, fmt.Errorf("open a backup stream to %s: %w", c.qc.RemoteAddr(), err)
	}
	return st, nil
}

// AcceptControl waits for the receiver to open a control stream (sidecar side). It
// returns an error once the session has ended.
func (c *Conn) AcceptControl(ctx context.Context) (*quic.Stream, error) {
	return c.qc.AcceptStream(ctx)
}

// CloseStream ends a control stream: the write side is closed (the peer reads the end
// after what was sent) and reading is given up. Its error is the close's: the peer may
// not read the end.
func CloseStream(st *quic.Stream) error {
	err := st.Close()
	st.CancelRead(0)
	return err
}
