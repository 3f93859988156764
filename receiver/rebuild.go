package receiver

import (
	"errors"
	"fmt"
	"math"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

var (
	// ErrGap means a frame starts past the end of what the spool holds: bytes in between
	// were never received. The stream is ordered, so this is the sidecar's fault.
	ErrGap = errors.New("gap in the wal stream")
	// ErrTimeline means a frame is for a timeline the spool cannot take now: an older one,
	// or a newer one whose history file has not arrived.
	ErrTimeline = errors.New("unexpected timeline")
)

// Rebuild is the pure state machine that turns the ordered stream of Data frames into
// segments. It does no I/O: Offer says what to do, and the caller does it, in order:
//
//  1. if Step.Open, create the segment's .partial file;
//  2. compare Step.Held with the bytes already in the file at Step.HeldAt, and stop with
//     spool.ErrConflict if they differ;
//  3. write Step.Write at Step.WriteAt;
//  4. if Step.Complete, fsync the file and publish it under its final name;
//  5. Commit the step, only once all of the above succeeded;
//  6. ack only Durable(), after an fsync of everything written so far.
//
// A step that fails is not committed, and the state stays where the spool is.
//
// The current segment is held as one contiguous prefix: a QUIC stream is ordered and the
// sidecar resumes at the durable position, so the only legitimate frame that does not
// append is a resend of bytes already held, which must match them exactly.
type Rebuild struct {
	stream wal.Stream
	tli    uint32
	seg    uint64 // the segment being rebuilt, or the next one when !open
	have   uint64 // bytes of seg held, from offset 0
	open   bool   // seg has a .partial file
	padAt  uint64 // offset in seg where switch padding began; 0 for none
	// histories are the timelines whose history file the spool holds.
	histories map[uint32]bool
}

// NewRebuild starts from the spool's contents.
func NewRebuild(stream wal.Stream, c spool.Contents) *Rebuild {
	r := &Rebuild{stream: stream, histories: map[uint32]bool{}}
	for _, h := range c.Histories {
		r.histories[h] = true
	}
	pos, ok := c.Position(stream.SegSize)
	if !ok {
		return r
	}
	r.tli = pos.TLI
	seg, off := wal.SegmentOf(pos.TLI, pos.LSN, stream.SegSize)
	r.seg, r.have = seg.No, off
	if p, ok := c.Partials[pos.TLI]; ok && p.Seg.No == seg.No {
		r.open = true
	}
	return r
}

// Empty says whether the spool holds no WAL yet.
func (r *Rebuild) Empty() bool { return r.tli == 0 }

// Durable is the position after the last byte held. It is durable only once the caller
// has fsynced what the steps so far wrote.
func (r *Rebuild) Durable() wal.Position {
	return wal.Position{TLI: r.tli, LSN: wal.LSN(r.seg*r.stream.SegSize + r.have)}
}

// AddHistory records that the spool now holds timeline tli's history file.
func (r *Rebuild) AddHistory(tli uint32) { r.histories[tli] = true }

// Step is what the caller must do for one frame; see Rebuild.
type Step struct {
	next     Rebuild // the state once the step is done
	Seg      wal.Segment
	Open     bool
	HeldAt   uint64
	Held     []byte // aliases the frame's payload
	WriteAt  uint64
	Write    []byte // aliases the frame's payload
	Complete bool
}

// Offer takes one Data frame (whose hash the caller has checked) and returns the step
// that applies it. It changes nothing; Commit does, once the step is done.
//
// padding marks bytes after an XLOG_SWITCH record (transport.Data.Padding): their page
// headers are not checked, and once padding has begun in a segment, every later byte of
// that segment must be padding too.
func (r *Rebuild) Offer(tli uint32, segNo uint64, off uint64, payload []byte, padding bool) (Step, error) {
	segSize := r.stream.SegSize
	seg := wal.Segment{TLI: tli, No: segNo}
	// A segment number is 64 bits on the wire, and so is the LSN: a segment past the last
	// one of the LSN space would start at a wrapped-around position (2^44 1 MiB segments
	// start at 2^64, which is 0), and another segment's pages would pass as its own.
	if last := math.MaxUint64 / segSize; segNo > last {
		return Step{}, fmt.Errorf("frame for %s: segment number past the last of the 64-bit LSN space (%d for %d-byte segments): %w",
			seg, last, segSize, transport.ErrMalformed)
	}
	end := off + uint64(len(payload))
	if end > segSize {
		return Step{}, fmt.Errorf("frame for %s at offset %d length %d runs past the %d-byte segment: %w", seg, off, len(payload), segSize, ErrGap)
	}
	st := Step{Seg: seg}
	next := *r // histories is shared: AddHistory is the only writer
	switch {
	case r.tli == 0 || tli > r.tli:
		if tli > 1 && !r.histories[tli] {
			return Step{}, fmt.Errorf("frame for %s before the history file of timeline %d: %w", seg, tli, ErrTimeline)
		}
		if off != 0 {
			return Step{}, fmt.Errorf("first frame of timeline %d starts at offset %d of %s, want 0: %w", tli, off, seg, ErrGap)
		}
		next.tli, next.seg, next.have, next.open, next.padAt = tli, segNo, 0, true, 0
		st.Open = true
	case tli < r.tli:
		return Step{}, fmt.Errorf("frame for %s, but the spool has moved on to timeline %d: %w", seg, r.tli, ErrTimeline)
	case segNo == r.seg && r.open:
	case segNo == r.seg && !r.open && off == 0:
		next.open, next.padAt = true, 0
		st.Open = true
	default:
		return Step{}, fmt.Errorf("frame for %s offset %d, but the spool holds up to %s: %w", seg, off, r.Durable().LSN, ErrGap)
	}
	if off > next.have {
		return Step{}, fmt.Errorf("frame for %s starts at offset %d, but only %d bytes are held: %w", seg, off, next.have, ErrGap)
	}
	held := min(end, next.have) - off
	st.HeldAt, st.Held = off, payload[:held]
	st.WriteAt, st.Write = off+held, payload[held:]
	if len(st.Write) > 0 {
		switch {
		case padding && next.padAt == 0:
			if st.WriteAt == 0 {
				return Step{}, fmt.Errorf("frame for %s: a segment cannot start with switch padding: %w", seg, ErrGap)
			}
			next.padAt = st.WriteAt
		case !padding && next.padAt != 0:
			return Step{}, fmt.Errorf("frame for %s at offset %d: WAL after the switch padding that began at %d: %w", seg, st.WriteAt, next.padAt, ErrGap)
		case !padding:
			lsn := seg.Start(segSize) + wal.LSN(st.WriteAt)
			if err := r.stream.CheckPages(st.Write, lsn, tli); err != nil {
				return Step{}, fmt.Errorf("frame for %s: %w", seg, err)
			}
		}
	}
	next.have = max(next.have, end)
	if next.have == segSize && len(st.Write) > 0 {
		st.Complete = true
		next.seg, next.have, next.open, next.padAt = next.seg+1, 0, false, 0
	}
	st.next = next
	return st, nil
}

// Commit moves the state past a step the caller has carried out.
func (r *Rebuild) Commit(st Step) { *r = st.next }
