package wal

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Page header layout, xlog_internal.h. All fields are in the server's byte order; walship
// supports little-endian servers only (x86-64, arm64), which it checks at the first long
// header through the segment size field.
const (
	ShortHeaderSize = 24 // MAXALIGN(sizeof(XLogPageHeaderData))
	LongHeaderSize  = 40 // MAXALIGN(sizeof(XLogLongPageHeaderData))

	FlagFirstIsContRecord = 0x0001 // XLP_FIRST_IS_CONTRECORD
	FlagLongHeader        = 0x0002 // XLP_LONG_HEADER
	FlagBkpRemovable      = 0x0004 // XLP_BKP_REMOVABLE
	FlagOverwriteContRec  = 0x0008 // XLP_FIRST_IS_OVERWRITE_CONTRECORD
	allFlags              = 0x000F // XLP_ALL_FLAGS
)

// Magics maps each supported major version to its XLOG_PAGE_MAGIC.
var Magics = map[int]uint16{13: 0xD106, 14: 0xD10D, 15: 0xD110, 16: 0xD113, 17: 0xD116, 18: 0xD118}

// MagicFor returns the page magic of the server version (server_version_num, e.g. 150004).
func MagicFor(serverVersionNum int) (uint16, error) {
	m, ok := Magics[serverVersionNum/10000]
	if !ok {
		return 0, fmt.Errorf("postgresql %d: unsupported major version (walship knows 13 to 18)", serverVersionNum)
	}
	return m, nil
}

// PageHeader is a parsed XLogPageHeaderData, with the long-header fields when
// Info has FlagLongHeader.
type PageHeader struct {
	Magic    uint16
	Info     uint16
	TLI      uint32
	PageAddr LSN
	RemLen   uint32
	// Long header only.
	SysID     uint64
	SegSize   uint32
	BlockSize uint32
}

// ErrPage is wrapped by every page check failure.
var ErrPage = errors.New("invalid wal page")

// PageError says which page failed which check.
type PageError struct {
	At     LSN // the page's position in the stream
	Reason string
}

func (e *PageError) Error() string {
	return fmt.Sprintf("wal page at %s: %s", e.At, e.Reason)
}

func (e *PageError) Unwrap() error { return ErrPage }

// ParsePageHeader parses the header at the start of b. It needs ShortHeaderSize bytes,
// or LongHeaderSize when the long-header flag is set.
func ParsePageHeader(b []byte) (PageHeader, error) {
	if len(b) < ShortHeaderSize {
		return PageHeader{}, fmt.Errorf("page header: %d bytes, want at least %d", len(b), ShortHeaderSize)
	}
	h := PageHeader{
		Magic:    binary.LittleEndian.Uint16(b[0:]),
		Info:     binary.LittleEndian.Uint16(b[2:]),
		TLI:      binary.LittleEndian.Uint32(b[4:]),
		PageAddr: LSN(binary.LittleEndian.Uint64(b[8:])),
		RemLen:   binary.LittleEndian.Uint32(b[16:]),
	}
	if h.Info&FlagLongHeader != 0 {
		if len(b) < LongHeaderSize {
			return PageHeader{}, fmt.Errorf("long page header: %d bytes, want at least %d", len(b), LongHeaderSize)
		}
		h.SysID = binary.LittleEndian.Uint64(b[24:])
		h.SegSize = binary.LittleEndian.Uint32(b[32:])
		h.BlockSize = binary.LittleEndian.Uint32(b[36:])
	}
	return h, nil
}

// HeaderSize is the size of the header of the page that starts at lsn: long on the first
// page of a segment, short elsewhere.
func HeaderSize(lsn LSN, segSize uint64) int {
	if uint64(lsn)%segSize == 0 {
		return LongHeaderSize
	}
	return ShortHeaderSize
}

// Stream describes one cluster's WAL: what every page of it must agree with.
type Stream struct {
	SysID     uint64
	SegSize   uint64
	BlockSize uint64
	Magic     uint16
}

// Validate checks that the stream's parameters are possible.
func (s Stream) Validate() error {
	if err := CheckSegSize(s.SegSize); err != nil {
		return err
	}
	if s.BlockSize < 1024 || s.BlockSize > 65536 || s.BlockSize&(s.BlockSize-1) != 0 || s.SegSize%s.BlockSize != 0 {
		return fmt.Errorf("wal block size %d: want a power of two from 1 kB to 64 kB", s.BlockSize)
	}
	if s.SysID == 0 {
		return errors.New("system identifier is zero")
	}
	for _, m := range Magics {
		if s.Magic == m {
			return nil
		}
	}
	return fmt.Errorf("wal page magic %04X is not one of PostgreSQL 13 to 18", s.Magic)
}

// CheckPage checks the header of the page that starts at lsn on timeline tli, the way
// xlogreader.c (XLogReaderValidatePageHeader) does: the magic, known info bits, the long
// header exactly on a segment's first page with this cluster's system identifier, segment
// size and block size, xlp_pageaddr equal to lsn, and a page timeline no newer than tli.
// A page of a recycled segment fails the xlp_pageaddr check.
func (s Stream) CheckPage(b []byte, lsn LSN, tli uint32) error {
	h, err := ParsePageHeader(b)
	if err != nil {
		return &PageError{At: lsn, Reason: err.Error()}
	}
	switch {
	case h.Magic != s.Magic:
		return &PageError{At: lsn, Reason: fmt.Sprintf("magic %04X, want %04X", h.Magic, s.Magic)}
	case h.Info&^allFlags != 0:
		return &PageError{At: lsn, Reason: fmt.Sprintf("unknown info bits %04X", h.Info)}
	case h.PageAddr != lsn:
		return &PageError{At: lsn, Reason: fmt.Sprintf("xlp_pageaddr %s, want %s (stale page of a recycled segment?)", h.PageAddr, lsn)}
	case h.TLI == 0 || h.TLI > tli:
		return &PageError{At: lsn, Reason: fmt.Sprintf("page timeline %d, want 1 to %d", h.TLI, tli)}
	}
	first := uint64(lsn)%s.SegSize == 0
	if first != (h.Info&FlagLongHeader != 0) {
		return &PageError{At: lsn, Reason: fmt.Sprintf("long header flag is %t on a page at segment offset %d", !first, uint64(lsn)%s.SegSize)}
	}
	if !first {
		return nil
	}
	switch {
	case h.SysID != s.SysID:
		return &PageError{At: lsn, Reason: fmt.Sprintf("system identifier %d, want %d (WAL of another cluster)", h.SysID, s.SysID)}
	case uint64(h.SegSize) != s.SegSize:
		return &PageError{At: lsn, Reason: fmt.Sprintf("segment size %d, want %d", h.SegSize, s.SegSize)}
	case uint64(h.BlockSize) != s.BlockSize:
		return &PageError{At: lsn, Reason: fmt.Sprintf("block size %d, want %d", h.BlockSize, s.BlockSize)}
	}
	return nil
}

// CheckPages checks every page header that starts inside b, where b holds the stream's
// bytes from lsn on. The caller must hand ranges that never end inside a page header;
// PostgreSQL's flush position never does (a record ends after its page's header).
func (s Stream) CheckPages(b []byte, lsn LSN, tli uint32) error {
	bs := s.BlockSize
	first := (uint64(lsn) + bs - 1) / bs * bs // first page start at or after lsn
	for p := first; p < uint64(lsn)+uint64(len(b)); p += bs {
		i := p - uint64(lsn)
		hs := uint64(HeaderSize(LSN(p), s.SegSize))
		if i+hs > uint64(len(b)) {
			return &PageError{At: LSN(p), Reason: fmt.Sprintf("range ends inside the page header (%d of %d bytes)", uint64(len(b))-i, hs)}
		}
		if err := s.CheckPage(b[i:i+hs], LSN(p), tli); err != nil {
			return err
		}
	}
	return nil
}
