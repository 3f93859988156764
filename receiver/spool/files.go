package spool

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/tail/wal"
)

// Names in a spool directory besides WAL files.
const (
	IdentityFile  = "walship.json" // the cluster the spool belongs to
	PartialSuffix = ".partial"
	// FreezeFile stops every receiver from writing the spool: walship promote makes it
	// before it takes the writer lock, so that what recovery is handed cannot change.
	FreezeFile = "walship.freeze"
	// TriggerFile is the promotion trigger: it names the frozen partial segment and how
	// many of its bytes recovery gets.
	TriggerFile = "walship.promote"
	// EndFile is the end-of-WAL mark: the sidecar found the primary's server gone and
	// sent every valid record its pg_wal held. A new session removes it.
	EndFile = "walship.end"
	// StartFile says where the WAL of a spool that holds none is to start (WriteStart):
	// walship standby rejoin writes it, for an old primary needs the new timeline from
	// where its own WAL ends, which may be segments before the one being written.
	StartFile = "walship.start"
	// SessionFile records the sidecar session the running receiver serves, for
	// walship status.
	SessionFile = "walship.session"
	// ArchiveFile records how the running receiver's uploads to its archive stand, for
	// walship status and walship check.
	ArchiveFile = "walship.archive"
	// RelaysFile records, for each relay of the running receiver (--relay-to), the
	// oldest segment its downstream receiver may still need (RelayHolds).
	RelaysFile = "walship.relays"
	// LiveDir holds a record for each live standby (LiveState): what walship restore
	// --live last handed it of the segment being received. A directory of its own, so
	// that the records, rewritten at each hand-out, wake no watcher of the spool.
	LiveDir = "walship.live"
	// ControlSocket is the receiver's Unix socket through which walship standby init
	// asks the connected sidecar for a base backup. Only the receiver's user (and root)
	// may connect.
	ControlSocket = ".walship.sock"

	receiverLockFile = ".walship.receiver.lock" // one receiver process per spool
	writerLockFile   = ".walship.lock"          // held while a session may write
)

var (
	// ErrWrongCluster means WAL of one cluster was offered to a spool of another.
	ErrWrongCluster = errors.New("spool belongs to another cluster")
	// ErrConflict means bytes differ from those the spool already holds at the same
	// place. The spool keeps what it has; nothing is overwritten.
	ErrConflict = errors.New("conflicting bytes for a position already held")
)

// Identity binds a spool to one cluster's WAL stream. It is written once, when the
// first sidecar connects, and never changes.
type Identity struct {
	SysID         uint64 `json:"system_identifier,string"`
	SegSize       uint64 `json:"wal_segment_size"`
	BlockSize     uint64 `json:"wal_block_size"`
	Magic         uint16 `json:"wal_page_magic"`
	ServerVersion uint32 `json:"server_version_num"`
}

// Stream is the WAL stream the identity describes.
func (id Identity) Stream() wal.Stream {
	return wal.Stream{SysID: id.SysID, SegSize: id.SegSize, BlockSize: id.BlockSize, Magic: id.Magic}
}

// ReadIdentity reads a spool's identity; ok is false when the spool has none yet.
func ReadIdentity(dir string) (id Identity, ok bool, err error) {
	ok, err = readJSON(dir, IdentityFile, "spool identity", &id)
	if err == nil && ok {
		if err = id.Stream().Validate(); err != nil {
			err = fmt.Errorf("read spool identity %s: %w", filepath.Join(dir, IdentityFile), err)
		}
	}
	if err != nil {
		return Identity{}, false, err
	}
	return id, ok, nil
}

// Bind makes the spool belong to id, or checks that it already does. A mismatch is
// ErrWrongCluster and changes nothing.
func Bind(dir string, id Identity) error {
	have, ok, err := ReadIdentity(dir)
	if err != nil {
		return err
	}
	if !ok {
		return writeJSON(dir, IdentityFile, id)
	}
	switch {
	case have.SysID != id.SysID:
		return fmt.Errorf("%w: spool %s holds system identifier %d, sidecar streams %d", ErrWrongCluster, dir, have.SysID, id.SysID)
	case have.SegSize != id.SegSize || have.BlockSize != id.BlockSize:
		return fmt.Errorf("%w: spool %s holds %d-byte segments of %d-byte pages, sidecar streams %d and %d",
			ErrWrongCluster, dir, have.SegSize, have.BlockSize, id.SegSize, id.BlockSize)
	case have.Magic != id.Magic:
		return fmt.Errorf("%w: spool %s holds WAL with page magic %04X, sidecar streams %04X (another major version)",
			ErrWrongCluster, dir, have.Magic, id.Magic)
	}
	return nil
}

// readJSON reads the spool's file name into v; ok is false when there is no such file.
func readJSON(dir, name, what string, v any) (ok bool, err error) {
	path := filepath.Join(dir, name)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", what, err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return false, fmt.Errorf("read %s %s: %w", what, path, err)
	}
	return true, nil
}

// writeJSON publishes v as the spool's file name.
func writeJSON(dir, name string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return durable.WriteFile(filepath.Join(dir, name), append(b, '\n'), 0o644)
}

// Contents is what a scan of a spool found.
type Contents struct {
	Segments  []wal.Segment      // published, sorted by timeline then number
	Partials  map[uint32]Partial // the in-progress segment of each timeline that has one
	Histories []uint32           // timelines with a history file, ascending
	Temps     []string           // leftovers of interrupted publishes
}

// Partial is a <segment>.partial file: the bytes received of a segment, pre-sized (see
// EndBlockSize).
type Partial struct {
	Seg wal.Segment
	// Size is how many bytes it holds, from the segment's start, for certain durable:
	// its end, not its file size, and not an end the writer may still be syncing (see
	// DurableEnd). After Recover, all that the partial holds.
	Size uint64
}

// SegmentPath is where a published segment lives in the spool.
func SegmentPath(dir string, seg wal.Segment, segSize uint64) string {
	return filepath.Join(dir, seg.Name(segSize))
}

// PartialPath is where a segment lives in the spool while it is being received.
func PartialPath(dir string, seg wal.Segment, segSize uint64) string {
	return filepath.Join(dir, seg.Name(segSize)+PartialSuffix)
}

// OpenSegment opens a segment of the spool, published or partial: a reader that
// follows a receiver's durable position finds the segment under one name or the other,
// and may see it published between its two looks.
func OpenSegment(dir string, seg wal.Segment, segSize uint64) (*os.File, error) {
	f, err := os.Open(SegmentPath(dir, seg, segSize))
	if errors.Is(err, fs.ErrNotExist) {
		f, err = os.Open(PartialPath(dir, seg, segSize))
		if errors.Is(err, fs.ErrNotExist) {
			f, err = os.Open(SegmentPath(dir, seg, segSize)) // published meanwhile
		}
	}
	return f, err
}

// Scan lists a spool's WAL files, each partial with the bytes it holds for certain
// durable: it takes no lock and syncs nothing, and serves walship status, walship check
// and walship standby init, which must never claim WAL that a crash can still take
// away. A published segment of the wrong size, a partial of neither the pre-sized nor
// the old kind's size, or two partials of one timeline are errors: the spool is
// damaged and nothing should guess around it. A receiver may publish while Scan reads;
// a file that vanishes between the listing and its stat makes Scan look again.
func Scan(dir string, segSize uint64) (Contents, error) {
	for attempt := 0; ; attempt++ {
		c, err := scanOnce(dir, segSize)
		if errors.Is(err, fs.ErrNotExist) && attempt < 100 {
			continue
		}
		return c, err
	}
}

func scanOnce(dir string, segSize uint64) (Contents, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return Contents{}, fmt.Errorf("scan spool: %w", err)
	}
	c := Contents{Partials: map[uint32]Partial{}}
	for _, e := range ents {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, durable.TempPrefix):
			c.Temps = append(c.Temps, name)
		case strings.HasSuffix(name, ".history"):
			tli, err := wal.ParseHistoryName(name)
			if err != nil {
				continue
			}
			c.Histories = append(c.Histories, tli)
		case strings.HasSuffix(name, PartialSuffix):
			seg, err := wal.ParseSegmentName(strings.TrimSuffix(name, PartialSuffix), segSize)
			if err != nil {
				continue
			}
			end, err := DurableEnd(filepath.Join(dir, name), segSize)
			if err != nil {
				return Contents{}, fmt.Errorf("scan spool: %w", err)
			}
			if old, dup := c.Partials[seg.TLI]; dup {
				return Contents{}, fmt.Errorf("scan spool: two partial segments on timeline %d: %s and %s",
					seg.TLI, old.Seg.Name(segSize)+PartialSuffix, name)
			}
			c.Partials[seg.TLI] = Partial{Seg: seg, Size: end}
		default:
			seg, err := wal.ParseSegmentName(name, segSize)
			if err != nil {
				continue
			}
			info, err := e.Info()
			if err != nil {
				return Contents{}, fmt.Errorf("scan spool: %w", err)
			}
			if uint64(info.Size()) != segSize {
				return Contents{}, fmt.Errorf("scan spool: published segment %s holds %d bytes, want %d", name, info.Size(), segSize)
			}
			c.Segments = append(c.Segments, seg)
		}
	}
	sort.Slice(c.Segments, func(i, j int) bool {
		a, b := c.Segments[i], c.Segments[j]
		return a.TLI < b.TLI || a.TLI == b.TLI && a.No < b.No
	})
	sort.Slice(c.Histories, func(i, j int) bool { return c.Histories[i] < c.Histories[j] })
	return c, nil
}

// Position is where the spool's WAL ends: the newest timeline with data, and the end of
// its partial or, without one, of its last published segment. ok is false for a spool
// with no WAL.
func (c Contents) Position(segSize uint64) (pos wal.Position, ok bool) {
	for _, s := range c.Segments {
		if end := s.Start(segSize) + wal.LSN(segSize); s.TLI > pos.TLI || s.TLI == pos.TLI && end > pos.LSN {
			pos, ok = wal.Position{TLI: s.TLI, LSN: end}, true
		}
	}
	for _, p := range c.Partials {
		if end := p.Seg.Start(segSize) + wal.LSN(p.Size); p.Seg.TLI > pos.TLI || p.Seg.TLI == pos.TLI && end >= pos.LSN {
			pos, ok = wal.Position{TLI: p.Seg.TLI, LSN: end}, true
		}
	}
	return pos, ok
}

// HasHistory says whether the spool holds timeline tli's history file.
func (c Contents) HasHistory(tli uint32) bool {
	for _, h := range c.Histories {
		if h == tli {
			return true
		}
	}
	return false
}

// OldestRun returns the start of the oldest published segment of timeline tli from
// which the spool holds every segment up to from.
func (c Contents) OldestRun(tli uint32, from wal.LSN, segSize uint64) wal.LSN {
	have := map[uint64]bool{}
	for _, s := range c.Segments {
		if s.TLI == tli {
			have[s.No] = true
		}
	}
	seg, _ := wal.SegmentOf(tli, from, segSize)
	for seg.No > 0 && have[seg.No-1] {
		seg.No--
	}
	return seg.Start(segSize)
}
