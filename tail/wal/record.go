package wal

// Record header layout, xlogrecord.h: xl_tot_len u32, xl_xid u32, xl_prev u64,
// xl_info u8, xl_rmid u8, two bytes of padding, xl_crc u32.
const (
	RecordHeaderSize = 24
	rmXLOG           = 0    // RM_XLOG_ID
	xlogSwitch       = 0x40 // XLOG_SWITCH
	infoMask         = 0x0F // XLR_INFO_MASK: the bits of xl_info that are not the rmgr's
)

func maxAlign(n uint64) uint64 { return (n + 7) &^ 7 }

// After pg_switch_wal() (or archive_timeout, a backup's start, a shutdown with archiving
// on) the server moves its position to the end of the segment without writing the
// pages after the XLOG_SWITCH record: the rest of the record's last page and every
// page after it in the segment are zeros, headers included (xlog.c: CopyXLogRecordToWAL).
// They are part of the segment as archived, but carry no valid page headers, so a
// reader that checks pages must know padding from damage.
//
// A switch record is 24 bytes, its header alone, and a record may start in the last 16
// bytes of a page: its header then continues on the next page (XLP_FIRST_IS_CONTRECORD,
// xlp_rem_len 8 or 16), which may be the next segment's first page, and the padding
// begins after that page. The last good page then holds only the record's tail.

// SwitchPadding says whether the page at page, the last whose header checks before
// pages that do not, ends its segment's valid WAL with an XLOG_SWITCH record, so that
// the pages after it are the switch's padding; it returns where the padding begins,
// the next page's start. page must be a page start.
//
// It reads the records from the page before on (a switch may start there), checking
// them as Reader does, CRCs included. Where the page before cannot be read or does not
// check (a segment recycled since, say), the page alone must hold the tail of a switch
// record split across pages and zeros after it.
func SwitchPadding(s Stream, tli uint32, src Source, page LSN) (LSN, bool) {
	bs := LSN(s.BlockSize)
	next := page + bs
	from := []LSN{page}
	if page >= bs {
		from = []LSN{page - bs, page}
	}
	for _, start := range from {
		r := NewReader(s, tli, src, start, 0)
		for {
			rec, err := r.Next()
			if err != nil || rec.LSN >= next {
				break
			}
			if rec.IsSwitch() {
				if rec.Last > page && rec.Last <= next {
					return next, true
				}
				break
			}
		}
		if r.tail > page && r.tail <= next {
			return next, true // read alone, the page holds a split switch's tail
		}
	}
	return 0, false
}

// switchTail says whether the page at page, whose header h says it begins with the
// rest of a record from the page before, holds only the tail of an XLOG_SWITCH record
// whose header was split across the two pages, and zeros after it. It returns the end
// of the segment (where the next record starts) and, in r.tail, where the tail ends.
//
// The record's start is on the page before, which a reader that starts here has not
// read: it takes the record for 24 bytes, as a switch is, and finds xl_info and xl_rmid
// where that puts them among the xlp_rem_len bytes. Its CRC cannot be checked, for the
// bytes before are not read; the zeros after the tail, to the page's end, where a
// record would otherwise follow, are what confirm it.
func (r *Reader) switchTail(page LSN, h PageHeader) (LSN, bool) {
	rem := uint64(h.RemLen)
	if rem != 8 && rem != 16 {
		return 0, false
	}
	hs := uint64(HeaderSize(page, r.s.SegSize))
	b := make([]byte, r.s.BlockSize)
	if err := r.read(b, page); err != nil {
		return 0, false
	}
	tail := b[hs : hs+rem] // bytes 24-rem to 23 of the record
	info, rmid := tail[rem-8], tail[rem-7]
	if rmid != rmXLOG || info&^infoMask != xlogSwitch {
		return 0, false
	}
	for _, c := range b[hs+rem:] {
		if c != 0 {
			return 0, false
		}
	}
	r.tail = page + LSN(hs+rem)
	seg, _ := SegmentOf(r.tli, page, r.s.SegSize)
	return seg.Start(r.s.SegSize) + LSN(r.s.SegSize), true
}
