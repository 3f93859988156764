package wal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Source gives the WAL bytes at a position. ReadAt returns fewer than len(p) bytes,
// with io.EOF, where the available WAL ends (the end of a partial segment, a segment
// that is not there).
type Source interface {
	ReadAt(p []byte, lsn LSN) (int, error)
}

// Record is one WAL record the reader found valid.
type Record struct {
	LSN    LSN // where the record starts
	End    LSN // where the next record may start: after this one, MAXALIGNed
	TotLen uint32
	Last   LSN // where the record's bytes end: End before alignment and switch padding
	Prev   LSN // xl_prev
	RmID   uint8
	Info   uint8
}

// IsSwitch says whether the record is an XLOG_SWITCH, which ends its segment early.
func (r Record) IsSwitch() bool { return r.RmID == rmXLOG && r.Info&^infoMask == xlogSwitch }

// ErrInvalidRecord is wrapped when the reader stops at bytes that are not a valid
// record: a bad length, a broken xl_prev chain, a CRC mismatch, a bad page header.
var ErrInvalidRecord = errors.New("invalid wal record")

// EndError says where and why the valid WAL ended.
type EndError struct {
	At     LSN
	Reason string
	Err    error // ErrInvalidRecord, wal.ErrPage or io.EOF (the bytes ran out)
}

func (e *EndError) Error() string { return fmt.Sprintf("end of valid wal at %s: %s", e.At, e.Reason) }
func (e *EndError) Unwrap() error { return e.Err }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Reader walks the records of one timeline's WAL, as xlogreader.c does: every page
// header is checked, records are followed across pages and segments (xlp_rem_len and
// the continuation flag), each record's xl_prev must be the start of the one before,
// and its CRC-32C must hold (computed over the data after the header, then the header up
// to xl_crc). After an XLOG_SWITCH the next record is at the next segment's start.
//
// It is pure: the bytes come from a Source. Stale bytes of a recycled segment never
// pass: their pages carry another xlp_pageaddr, and their records another chain.
type Reader struct {
	s    Stream
	tli  uint32
	src  Source
	pos  LSN // where the next record starts (or the page header before it)
	prev LSN // start of the last valid record; 0 before the first
	tail LSN // the end of a split switch's tail skipped at the start; 0 for none
	rec  []byte
}

// NewReader starts at start, which is either the start of a record whose predecessor
// began at prev (0 if unknown), or the start of a page, where any continuation of a
// record from before is skipped.
func NewReader(s Stream, tli uint32, src Source, start, prev LSN) *Reader {
	return &Reader{s: s, tli: tli, src: src, pos: start, prev: prev}
}

// Pos is where the next record starts: after the last valid record returned, the end
// of the valid WAL so far.
func (r *Reader) Pos() LSN { return r.pos }

func (r *Reader) read(p []byte, lsn LSN) error {
	n, err := r.src.ReadAt(p, lsn)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return &EndError{At: lsn, Reason: "no more bytes", Err: io.EOF}
	}
	return err
}

// header reads and checks the header of the page that starts at page.
func (r *Reader) header(page LSN) (PageHeader, error) {
	b := make([]byte, HeaderSize(page, r.s.SegSize))
	if err := r.read(b, page); err != nil {
		return PageHeader{}, err
	}
	if err := r.s.CheckPage(b, page, r.tli); err != nil {
		return PageHeader{}, &EndError{At: page, Reason: err.Error(), Err: err}
	}
	h, _ := ParsePageHeader(b)
	return h, nil
}

// skipContinuation moves pos, a page start, past the rest of a record begun before it.
func (r *Reader) skipContinuation() error {
	bs := LSN(r.s.BlockSize)
	for {
		h, err := r.header(r.pos)
		if err != nil {
			return err
		}
		hs := LSN(HeaderSize(r.pos, r.s.SegSize))
		if h.Info&FlagFirstIsContRecord == 0 {
			r.pos += hs
			return nil
		}
		if LSN(h.RemLen) < bs-hs {
			if end, ok := r.switchTail(r.pos, h); ok {
				// The rest of the segment is the switch's padding.
				r.pos = end
				return nil
			}
			r.pos = LSN(maxAlign(uint64(r.pos + hs + LSN(h.RemLen))))
			return nil
		}
		if LSN(h.RemLen) == bs-hs {
			r.pos += bs // the continuation fills the page; the next page starts fresh
			continue
		}
		r.pos += bs // it goes on past this page too
	}
}

// Next returns the next valid record. At the end of the valid WAL it returns an
// *EndError (wrapping io.EOF when the bytes ran out, ErrInvalidRecord or ErrPage
// when they stopped making sense), and Pos is the end of the valid WAL.
func (r *Reader) Next() (Record, error) {
	bs := LSN(r.s.BlockSize)
	if r.prev == 0 && r.pos%bs == 0 {
		if err := r.skipContinuation(); err != nil {
			return Record{}, err
		}
	}
	start := r.pos
	if start%bs == 0 {
		// A record starting right at a page boundary: the page header comes first.
		h, err := r.header(start)
		if err != nil {
			return Record{}, err
		}
		if h.Info&FlagFirstIsContRecord != 0 {
			return Record{}, &EndError{At: start, Reason: "page continues a record, but none was begun", Err: ErrInvalidRecord}
		}
		start += LSN(HeaderSize(start, r.s.SegSize))
	}
	// xl_tot_len: records are MAXALIGNed, so these four bytes never cross a page.
	var lenb [4]byte
	if err := r.read(lenb[:], start); err != nil {
		return Record{}, err
	}
	tot := binary.LittleEndian.Uint32(lenb[:])
	if tot < RecordHeaderSize {
		reason := fmt.Sprintf("record length %d, want at least %d", tot, RecordHeaderSize)
		if tot == 0 {
			reason = "zeros where a record should start (the end of written WAL)"
		}
		return Record{}, &EndError{At: start, Reason: reason, Err: ErrInvalidRecord}
	}
	if tot > 1<<30 {
		return Record{}, &EndError{At: start, Reason: fmt.Sprintf("record length %d is not possible", tot), Err: ErrInvalidRecord}
	}
	// Gather the record, page by page.
	if cap(r.rec) < int(tot) {
		r.rec = make([]byte, tot)
	}
	rec := r.rec[:tot]
	at, got := start, uint32(0)
	for got < tot {
		if at%bs == 0 {
			h, err := r.header(at)
			if err != nil {
				return Record{}, err
			}
			if h.Info&FlagOverwriteContRec != 0 {
				// The record was abandoned by a crash: the server that came back wrote
				// new WAL from this page on, starting with an XLOG_OVERWRITE_CONTRECORD
				// record whose xl_prev is the abandoned record's. Read on from there,
				// as xlogreader.c does (XLogDecodeNextRecord: "restart the read by
				// assuming the address to read is the location where we found this
				// flag").
				r.pos = at
				return r.Next()
			}
			if h.Info&FlagFirstIsContRecord == 0 || h.RemLen != tot-got {
				return Record{}, &EndError{At: start, Reason: fmt.Sprintf("record continues onto page %s, whose header says continuation flag %t, %d bytes remaining; want %d",
					at, h.Info&FlagFirstIsContRecord != 0, h.RemLen, tot-got), Err: ErrInvalidRecord}
			}
			at += LSN(HeaderSize(at, r.s.SegSize))
		}
		n := min(uint32(bs-at%bs), tot-got)
		if err := r.read(rec[got:got+n], at); err != nil {
			return Record{}, err
		}
		got += n
		at += LSN(n)
	}
	prev := LSN(binary.LittleEndian.Uint64(rec[8:]))
	if r.prev != 0 && prev != r.prev {
		return Record{}, &EndError{At: start, Reason: fmt.Sprintf("xl_prev %s, want %s", prev, r.prev), Err: ErrInvalidRecord}
	}
	crc := crc32.Update(0, castagnoli, rec[RecordHeaderSize:])
	crc = crc32.Update(crc, castagnoli, rec[:20])
	if want := binary.LittleEndian.Uint32(rec[20:]); crc != want {
		return Record{}, &EndError{At: start, Reason: fmt.Sprintf("record crc %08x, want %08x", crc, want), Err: ErrInvalidRecord}
	}
	out := Record{LSN: start, TotLen: tot, Prev: prev, Info: rec[16], RmID: rec[17], Last: at}
	out.End = LSN(maxAlign(uint64(at)))
	if out.IsSwitch() {
		// The rest of the segment the record ends in is padding; the next record opens
		// the next segment. A switch that starts in a segment's last 16 bytes ends in
		// the next segment, whose rest is then the padding (xlogreader.c: "pretend it
		// extends to end of segment", counted from the record's end).
		seg, _ := SegmentOf(r.tli, at-1, r.s.SegSize)
		out.End = seg.Start(r.s.SegSize) + LSN(r.s.SegSize)
	}
	r.pos, r.prev = out.End, out.LSN
	return out, nil
}

// ValidEnd reads records from start until the valid WAL ends, and returns where it
// ends, the last record and why it stopped.
func ValidEnd(s Stream, tli uint32, src Source, start, prev LSN) (end LSN, last Record, stop *EndError, err error) {
	r := NewReader(s, tli, src, start, prev)
	for {
		rec, err := r.Next()
		var ee *EndError
		if errors.As(err, &ee) {
			return r.Pos(), last, ee, nil
		}
		if err != nil {
			return r.Pos(), last, nil, err
		}
		last = rec
	}
}

// RecordAtOrBefore finds where to start reading so that every byte from lsn on is
// checked: the start of the first record on the nearest page at or before lsn that
// has a record starting at or before lsn. Page headers give it (a page's first record
// follows the xlp_rem_len bytes continued from the record before). It looks no lower
// than floor, and fails when a page on the way does not check (a recycled or missing
// segment).
func RecordAtOrBefore(s Stream, tli uint32, src Source, lsn, floor LSN) (LSN, error) {
	bs := LSN(s.BlockSize)
	r := NewReader(s, tli, src, 0, 0)
	for page := lsn - lsn%bs; page >= floor; page -= bs {
		h, err := r.header(page)
		if err != nil {
			return 0, err
		}
		hs := LSN(HeaderSize(page, s.SegSize))
		first := page + hs
		if h.Info&FlagFirstIsContRecord != 0 {
			if LSN(h.RemLen) >= bs-hs {
				if page < bs {
					break
				}
				continue // the record from before fills this page
			}
			first = LSN(maxAlign(uint64(first + LSN(h.RemLen))))
		}
		if first <= lsn {
			return first, nil
		}
		if page < bs {
			break
		}
	}
	return 0, fmt.Errorf("no record starts between %s and %s", floor, lsn)
}

// Bytes is a Source over WAL held in memory from Base on.
type Bytes struct {
	Base LSN
	Data []byte
}

// ReadAt implements Source.
func (b Bytes) ReadAt(p []byte, lsn LSN) (int, error) {
	if lsn < b.Base || uint64(lsn-b.Base) >= uint64(len(b.Data)) {
		return 0, io.EOF
	}
	n := copy(p, b.Data[lsn-b.Base:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
