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

// A base backup travels on a stream of its own beside a session's: the receiver opens
// it towards the sidecar when `walship standby init` asks, and passes its bytes through
// both ways, so the two ends of the conversation are the command on the standby's host
// and the sidecar beside the primary. The command speaks first: the files of the copy
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

// BackupError is the sidecar's reason for ending a backup, or the receiver's for not
// starting one.
type BackupError struct {
	Message string `json:"message"`
}

func (e *BackupError) Error() string { return e.Message }

// BackupConn reads and writes backup messages on a byte stream.
type BackupConn struct {
	rw  io.ReadWriter
	r   *bufio.Reader
	w   *bufio.Writer
	hdr [5]byte
	buf []byte
}

// NewBackupConn reads and writes backup messages on rw.
func NewBackupConn(rw io.ReadWriter) *BackupConn {
	return &BackupConn{rw: rw, r: bufio.NewReaderSize(rw, 256<<10), w: bufio.NewWriterSize(rw, 256<<10)}
}

// Send writes one message: a *BackupHave, *BackupRequest, *BackupBegin, *BackupEntry,
// *BackupBlock, *BackupDone or *BackupError. Messages wait in a buffer until Flush.
func (c *BackupConn) Send(m any) error {
	var kind byte
	switch m.(type) {
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
	case *BackupBlock:
		b := m.(*BackupBlock)
		c.hdr[0] = kindBackupBlock
		binary.LittleEndian.PutUint32(c.hdr[1:], uint32(8+len(b.Data)))
		var off [8]byte
		binary.LittleEndian.PutUint64(off[:], uint64(b.Offset))
		c.w.Write(c.hdr[:])
		c.w.Write(off[:])
		_, err := c.w.Write(b.Data)
		return err
	default:
		return fmt.Errorf("backup message of type %T", m)
	}
	body, err := json.Marshal(m)
	if err != nil {
		return err
	}
	c.hdr[0] = kind
	binary.LittleEndian.PutUint32(c.hdr[1:], uint32(len(body)))
	c.w.Write(c.hdr[:])
	_, err = c.w.Write(body)
	return err
}

// Flush sends what Send buffered.
func (c *BackupConn) Flush() error { return c.w.Flush() }

// Recv reads one message. A block's Data is valid until the next Recv. A BackupError
// from the peer is returned as the error.
func (c *BackupConn) Recv() (any, error) {
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

// OpenBackup opens a backup stream towards the sidecar of the session (receiver side).
func (c *Conn) OpenBackup(ctx context.Context) (*quic.Stream, error) {
	st, err := c.qc.OpenStreamSync(ctx)
	if err != nil {
		return nil, fmt.Errorf("open a backup stream to %s: %w", c.qc.RemoteAddr(), err)
	}
	return st, nil
}

// AcceptBackup waits for the receiver to open a backup stream (sidecar side). It
// returns an error once the session has ended.
func (c *Conn) AcceptBackup(ctx context.Context) (*quic.Stream, error) {
	return c.qc.AcceptStream(ctx)
}

// CloseStream ends a backup stream: the write side is closed (the peer reads the end
// after what was sent) and reading is given up.
func CloseStream(st *quic.Stream) {
	st.Close()
	st.CancelRead(0)
}
