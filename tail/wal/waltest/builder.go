// Package waltest lays out WAL the way PostgreSQL's XLogInsert does, for tests that need
// shapes real servers write only rarely: a switch record whose header is split across
// two pages or two segments, a flush position inside switch padding, a record abandoned
// by a crash and overwritten (XLP_FIRST_IS_OVERWRITE_CONTRECORD).
//
// What it writes follows xlog.c and xlog_internal.h: records start MAXALIGNed; a page
// starts with a short header (long on a segment's first page) that says, when a record
// runs onto it, XLP_FIRST_IS_CONTRECORD and how many of that record's bytes remain
// (xlp_rem_len); each record's CRC-32C covers its data, then its header up to xl_crc.
// After an XLOG_SWITCH the rest of its last page and every later page of the segment are
// zeros, headers included (CopyXLogRecordToWAL). Pages nothing was written to are zeros.
// Record payloads are filler bytes: the rmgr data of real records is not modelled.
package waltest

import (
	"encoding/binary"
	"hash/crc32"

	"github.com/walship/walship/tail/wal"
)

// Record header fields, xlogrecord.h and pg_control.h.
const (
	RmXLOG               = 0    // RM_XLOG_ID
	RmHeap               = 10   // RM_HEAP_ID
	InfoSwitch           = 0x40 // XLOG_SWITCH
	InfoOverwriteContrec = 0xD0 // XLOG_OVERWRITE_CONTRECORD
	recordHeaderSize     = 24
	flagContRecord       = wal.FlagFirstIsContRecord
	flagLongHeader       = wal.FlagLongHeader
	flagOverwrite        = wal.FlagOverwriteContRec
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Builder holds WAL from Base on, as written so far. The zero value is not usable: use New.
type Builder struct {
	S    wal.Stream
	TLI  uint32
	Base wal.LSN // a segment's start
	Data []byte  // the bytes from Base on; pages nothing was written to are zeros

	pos       wal.LSN // where the next record goes (or the page header before it)
	prev      wal.LSN // start of the last record; 0 before the first
	overwrite wal.LSN // a page to flag XLP_FIRST_IS_OVERWRITE_CONTRECORD, or 0
}

// New starts WAL at the start of segment no, with no record before it.
func New(s wal.Stream, tli uint32, no uint64) *Builder {
	base := wal.LSN(no * s.SegSize)
	return &Builder{S: s, TLI: tli, Base: base, pos: base}
}

// Pos is where the next record will start (after the page header, at a page start).
func (b *Builder) Pos() wal.LSN {
	if b.pos%wal.LSN(b.S.BlockSize) == 0 {
		return b.pos + wal.LSN(wal.HeaderSize(b.pos, b.S.SegSize))
	}
	return b.pos
}

// Prev is the start of the last record written.
func (b *Builder) Prev() wal.LSN { return b.prev }

// Bytes returns the WAL from Base up to end, zero-extended.
func (b *Builder) Bytes(end wal.LSN) []byte {
	b.grow(end)
	return b.Data[:end-b.Base]
}

// Segment returns the bytes of segment no, zero-extended to the segment size.
func (b *Builder) Segment(no uint64) []byte {
	start := wal.LSN(no * b.S.SegSize)
	b.grow(start + wal.LSN(b.S.SegSize))
	return b.Data[start-b.Base : start-b.Base+wal.LSN(b.S.SegSize)]
}

func (b *Builder) grow(end wal.LSN) {
	if n := int(end - b.Base); n > len(b.Data) {
		b.Data = append(b.Data, make([]byte, n-len(b.Data))...)
	}
}

// header writes the header of the page that starts at page; rem is how many bytes of a
// record begun before it remain (0 for none).
func (b *Builder) header(page wal.LSN, rem uint32) {
	b.grow(page + wal.LSN(b.S.BlockSize))
	p := b.Data[page-b.Base:]
	info := uint16(0)
	if rem > 0 {
		info |= flagContRecord
	}
	if page == b.overwrite {
		info |= flagOverwrite
		b.overwrite = 0
	}
	first := uint64(page)%b.S.SegSize == 0
	if first {
		info |= flagLongHeader
		binary.LittleEndian.PutUint64(p[24:], b.S.SysID)
		binary.LittleEndian.PutUint32(p[32:], uint32(b.S.SegSize))
		binary.LittleEndian.PutUint32(p[36:], uint32(b.S.BlockSize))
	}
	binary.LittleEndian.PutUint16(p[0:], b.S.Magic)
	binary.LittleEndian.PutUint16(p[2:], info)
	binary.LittleEndian.PutUint32(p[4:], b.TLI)
	binary.LittleEndian.PutUint64(p[8:], uint64(page))
	binary.LittleEndian.PutUint32(p[16:], rem)
}

// Record appends a record of rmgr rmid with xl_info info and n bytes of data after its
// 24-byte header, and returns where it starts.
func (b *Builder) Record(rmid, info uint8, n int) wal.LSN {
	rec := make([]byte, recordHeaderSize+n)
	for i := recordHeaderSize; i < len(rec); i++ {
		rec[i] = byte(i*7 + int(b.pos))
	}
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(rec)))
	binary.LittleEndian.PutUint64(rec[8:], uint64(b.prev))
	rec[16], rec[17] = info, rmid
	crc := crc32.Update(0, castagnoli, rec[recordHeaderSize:])
	crc = crc32.Update(crc, castagnoli, rec[:20])
	binary.LittleEndian.PutUint32(rec[20:], crc)

	bs := wal.LSN(b.S.BlockSize)
	if b.pos%bs == 0 {
		b.header(b.pos, 0)
		b.pos += wal.LSN(wal.HeaderSize(b.pos, b.S.SegSize))
	}
	start := b.pos
	for len(rec) > 0 {
		if b.pos%bs == 0 {
			b.header(b.pos, uint32(len(rec)))
			b.pos += wal.LSN(wal.HeaderSize(b.pos, b.S.SegSize))
		}
		n := min(int(bs-b.pos%bs), len(rec))
		b.grow(b.pos + wal.LSN(n))
		copy(b.Data[b.pos-b.Base:], rec[:n])
		rec = rec[n:]
		b.pos += wal.LSN(n)
	}
	b.pos = (b.pos + 7) &^ 7
	b.prev = start
	return start
}

// Switch appends an XLOG_SWITCH record and moves past the rest of its segment, which
// stays zeros. It returns where the record starts.
func (b *Builder) Switch() wal.LSN {
	start := b.Record(RmXLOG, InfoSwitch, 0)
	seg := uint64(b.pos-1) / b.S.SegSize
	b.pos = wal.LSN((seg + 1) * b.S.SegSize)
	return start
}

// FillTo appends heap records until the next record starts at lsn, which must be at
// least 64 bytes past Pos on the same page or a later one. The last filler record may
// run across pages.
func (b *Builder) FillTo(lsn wal.LSN) {
	for {
		pos := b.Pos()
		if pos == lsn {
			return
		}
		if pos > lsn {
			panic("waltest: FillTo went past its target")
		}
		// One record that ends exactly at lsn, if its data length is positive; pages
		// between add their headers, which the record's bytes skip.
		gap := uint64(lsn - pos)
		hdrs := uint64(0)
		bs := b.S.BlockSize
		for p := (uint64(pos)/bs + 1) * bs; p < uint64(lsn); p += bs {
			hdrs += uint64(wal.HeaderSize(wal.LSN(p), b.S.SegSize))
		}
		n := int(gap-hdrs) - recordHeaderSize
		switch {
		case n >= 0 && gap > hdrs && gap-hdrs <= 1<<20:
			b.Record(RmHeap, 0, n)
		default:
			b.Record(RmHeap, 0, 100)
		}
	}
}

// Abandon models a crash in the middle of the record being written: the record that
// starts at rec is cut at page, a later page start, whose bytes and everything after
// are lost. The next record written starts at page, on a page flagged
// XLP_FIRST_IS_OVERWRITE_CONTRECORD, with the record before rec as its xl_prev, as
// crash recovery leaves it (xlog.c: StartupXLOG, CreateOverwriteContrecordRecord;
// AdvanceXLInsertBuffer sets the flag). prevOfRec is the start of the record before rec.
func (b *Builder) Abandon(page, prevOfRec wal.LSN) {
	if int(page-b.Base) < len(b.Data) {
		clear(b.Data[page-b.Base:])
	}
	b.pos, b.prev, b.overwrite = page, prevOfRec, page
}

// OverwriteRecord appends the XLOG_OVERWRITE_CONTRECORD record that crash recovery
// writes after Abandon (16 bytes of data: the abandoned record's LSN and a time).
func (b *Builder) OverwriteRecord() wal.LSN { return b.Record(RmXLOG, InfoOverwriteContrec, 16) }
