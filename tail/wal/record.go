package wal

import (
	"encoding/binary"
)

// Record header layout, xlogrecord.h: xl_tot_len u32, xl_xid u32, xl_prev u64,
// xl_info u8, xl_rmid u8, two bytes of padding, xl_crc u32.
const (
	RecordHeaderSize = 24
	rmXLOG           = 0    // RM_XLOG_ID
	xlogSwitch       = 0x40 // XLOG_SWITCH
	infoMask         = 0x0F // XLR_INFO_MASK: the bits of xl_info that are not the rmgr's
)

func maxAlign(n uint64) uint64 { return (n + 7) &^ 7 }

// SwitchEnd looks at one whole WAL page that starts at lsn and reports whether its last
// record is an XLOG_SWITCH, and where that record ends. After pg_switch_wal() the
// server moves its flush position to the end of the segment without writing the pages
// after the switch record: they hold zeros, or stale pages of a recycled file. They are
// part of the segment as archived, but carry no valid page headers.
//
// It walks the records that start on the page from the first one (after the header and
// any continuation of the record before), and gives up (ok false) on anything that does
// not fit: a record that runs onto the next page cannot be followed by padding.
func SwitchEnd(page []byte, lsn LSN, segSize uint64) (end LSN, ok bool) {
	h, err := ParsePageHeader(page)
	if err != nil {
		return 0, false
	}
	pos := uint64(HeaderSize(lsn, segSize))
	if h.Info&FlagFirstIsContRecord != 0 {
		pos = maxAlign(pos + uint64(h.RemLen))
	}
	last := -1
	for pos+RecordHeaderSize <= uint64(len(page)) {
		tot := uint64(binary.LittleEndian.Uint32(page[pos:]))
		if tot == 0 {
			break // the rest of the page was never written
		}
		if tot < RecordHeaderSize || pos+tot > uint64(len(page)) {
			return 0, false
		}
		last = int(pos)
		pos = maxAlign(pos + tot)
	}
	if last < 0 {
		return 0, false
	}
	rec := page[last:]
	if rec[17] != rmXLOG || rec[16]&^infoMask != xlogSwitch {
		return 0, false
	}
	return lsn + LSN(last) + LSN(binary.LittleEndian.Uint32(rec)), true
}
