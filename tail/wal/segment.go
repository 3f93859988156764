package wal

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Size limits of wal_segment_size (initdb --wal-segsize): a power of two from 1 MiB to
// 1 GiB (xlog_internal.h: IsValidWalSegSize).
const (
	MinSegSize = 1 << 20
	MaxSegSize = 1 << 30
)

// ErrBadName is returned for a file name that is not a WAL file name of the asked kind.
var ErrBadName = errors.New("not a WAL file name")

// CheckSegSize returns an error unless size is a valid wal_segment_size.
func CheckSegSize(size uint64) error {
	if size < MinSegSize || size > MaxSegSize || size&(size-1) != 0 {
		return fmt.Errorf("wal segment size %d: want a power of two from 1 MiB to 1 GiB", size)
	}
	return nil
}

// Segment identifies one WAL segment file: a timeline and a segment number. Turning it
// into a name or a position needs the segment size, which the caller carries.
type Segment struct {
	TLI uint32
	No  uint64
}

// SegmentOf returns the segment of timeline tli that holds the byte at lsn, and the
// offset of that byte in it.
func SegmentOf(tli uint32, lsn LSN, segSize uint64) (Segment, uint64) {
	return Segment{TLI: tli, No: uint64(lsn) / segSize}, uint64(lsn) % segSize
}

// Start is the LSN of the segment's first byte.
func (s Segment) Start(segSize uint64) LSN { return LSN(s.No * segSize) }

// Name is the segment's file name, TTTTTTTTXXXXXXXXYYYYYYYY (xlog_internal.h: XLogFileName).
func (s Segment) Name(segSize uint64) string {
	perID := segmentsPerID(segSize)
	return fmt.Sprintf("%08X%08X%08X", s.TLI, uint32(s.No/perID), uint32(s.No%perID))
}

// String names the segment without a size, for messages: "tli 1 segment 42".
func (s Segment) String() string { return fmt.Sprintf("tli %d segment %d", s.TLI, s.No) }

// segmentsPerID is XLogSegmentsPerXLogId: how many segments make one 4 GiB "log id".
func segmentsPerID(segSize uint64) uint64 { return 0x100000000 / segSize }

// ParseSegmentName parses a 24-hex-digit segment file name. It refuses anything else,
// including names with a suffix or a directory part.
func ParseSegmentName(name string, segSize uint64) (Segment, error) {
	if len(name) != 24 || !isUpperHex(name) {
		return Segment{}, fmt.Errorf("%q: %w", name, ErrBadName)
	}
	tli, _ := strconv.ParseUint(name[0:8], 16, 32)
	log, _ := strconv.ParseUint(name[8:16], 16, 32)
	seg, _ := strconv.ParseUint(name[16:24], 16, 32)
	perID := segmentsPerID(segSize)
	if tli == 0 || seg >= perID {
		return Segment{}, fmt.Errorf("%q: %w (timeline 0 or segment out of range for %d-byte segments)", name, ErrBadName, segSize)
	}
	return Segment{TLI: uint32(tli), No: log*perID + seg}, nil
}

// HistoryName is the file name of a timeline's history file, "00000002.history".
func HistoryName(tli uint32) string { return fmt.Sprintf("%08X.history", tli) }

// ParseHistoryName parses "TTTTTTTT.history" and returns the timeline.
func ParseHistoryName(name string) (uint32, error) {
	hex, ok := strings.CutSuffix(name, ".history")
	if !ok || len(hex) != 8 || !isUpperHex(hex) {
		return 0, fmt.Errorf("%q: %w", name, ErrBadName)
	}
	tli, _ := strconv.ParseUint(hex, 16, 32)
	if tli < 2 {
		// Timeline 1 has no history file; its parent would be timeline 0.
		return 0, fmt.Errorf("%q: %w (timeline 1 has no history file)", name, ErrBadName)
	}
	return uint32(tli), nil
}

func isUpperHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}
