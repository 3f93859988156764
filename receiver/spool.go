package receiver

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

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
	// many of its bytes recovery gets (see feeder).
	TriggerFile = "walship.promote"
	// EndFile is the end-of-WAL mark: the sidecar found the primary's server gone and
	// sent every valid record its pg_wal held. A new session removes it.
	EndFile = "walship.end"

	receiverLockFile = ".walship.receiver.lock" // one receiver process per spool
	writerLockFile   = ".walship.lock"          // held while a session may write
)

// ErrFrozen means the spool was frozen for a promotion and takes no more WAL.
var ErrFrozen = errors.New("spool is frozen for promotion")

// Frozen says whether the spool has been frozen for a promotion.
func Frozen(dir string) (bool, error) {
	_, err := os.Stat(filepath.Join(dir, FreezeFile))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// ErrWrongCluster means WAL of one cluster was offered to a spool of another.
var ErrWrongCluster = errors.New("spool belongs to another cluster")

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

// Position is a place in one timeline's WAL.
type Position struct {
	TLI uint32
	LSN wal.LSN
}

func (p Position) String() string { return fmt.Sprintf("%s on timeline %d", p.LSN, p.TLI) }

// ReadIdentity reads a spool's identity; ok is false when the spool has none yet.
func ReadIdentity(dir string) (id Identity, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(dir, IdentityFile))
	if errors.Is(err, fs.ErrNotExist) {
		return Identity{}, false, nil
	}
	if err != nil {
		return Identity{}, false, fmt.Errorf("read spool identity: %w", err)
	}
	if err := json.Unmarshal(b, &id); err != nil {
		return Identity{}, false, fmt.Errorf("read spool identity %s: %w", filepath.Join(dir, IdentityFile), err)
	}
	if err := id.Stream().Validate(); err != nil {
		return Identity{}, false, fmt.Errorf("read spool identity %s: %w", filepath.Join(dir, IdentityFile), err)
	}
	return id, true, nil
}

// EndMark is the content of EndFile.
type EndMark struct {
	TLI uint32 `json:"timeline"`
	LSN string `json:"lsn"`
	At  string `json:"recorded_at"`
}

// ReadEnd reads the spool's end-of-WAL mark; ok is false when there is none.
func ReadEnd(dir string) (m EndMark, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(dir, EndFile))
	if errors.Is(err, fs.ErrNotExist) {
		return EndMark{}, false, nil
	}
	if err == nil {
		err = json.Unmarshal(b, &m)
	}
	if err != nil {
		return EndMark{}, false, fmt.Errorf("read end-of-WAL mark: %w", err)
	}
	return m, true, nil
}

// writeEnd records the end-of-WAL mark durably.
func writeEnd(dir string, pos Position) error {
	m := EndMark{TLI: pos.TLI, LSN: pos.LSN.String(), At: time.Now().UTC().Format(time.RFC3339Nano)}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return durable.WriteFile(filepath.Join(dir, EndFile), append(b, '\n'), 0o644)
}

// clearEnd removes the end-of-WAL mark, durably, when there is one.
func clearEnd(dir string) error {
	err := os.Remove(filepath.Join(dir, EndFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove the old end-of-WAL mark: %w", err)
	}
	return durable.SyncDir(dir)
}

// ErrLocked means another process holds a spool lock.
var ErrLocked = errors.New("spool is locked by another process")

// lock takes an exclusive lock on a file of the spool without waiting. The lock goes
// with the process; Close of the returned file releases it.
func lock(dir, name, who string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock spool %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock spool %s: %w (%s)", dir, ErrLocked, who)
		}
		return nil, fmt.Errorf("lock spool %s: %w", dir, err)
	}
	return f, nil
}

// LockReceiver takes the lock that keeps a second receiver process off the spool.
func LockReceiver(dir string) (*os.File, error) {
	return lock(dir, receiverLockFile, "another walship receiver runs on it")
}

// LockWriter takes the lock that anyone writing WAL into the spool holds: a receiver's
// session, or walship promote while it freezes the spool.
func LockWriter(dir string) (*os.File, error) {
	return lock(dir, writerLockFile, "a receiver session or a promotion is writing it")
}

// Bind makes the spool belong to id, or checks that it already does. A mismatch is
// ErrWrongCluster and changes nothing.
func Bind(dir string, id Identity) error {
	have, ok, err := ReadIdentity(dir)
	if err != nil {
		return err
	}
	if !ok {
		b, err := json.MarshalIndent(id, "", "  ")
		if err != nil {
			return err
		}
		return durable.WriteFile(filepath.Join(dir, IdentityFile), append(b, '\n'), 0o644)
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

// Contents is what a scan of a spool found.
type Contents struct {
	Segments  []wal.Segment      // published, sorted by timeline then number
	Partials  map[uint32]Partial // the in-progress segment of each timeline that has one
	Histories []uint32           // timelines with a history file, ascending
	Temps     []string           // leftovers of interrupted publishes
}

// Partial is a <segment>.partial file: the exact bytes received of a segment.
type Partial struct {
	Seg  wal.Segment
	Size uint64
}

// Scan lists a spool's WAL files. A published segment of the wrong size, a partial
// longer than a segment, or two partials of one timeline are errors: the spool is damaged
// and nothing should guess around it. A receiver may publish while Scan reads; a file
// that vanishes between the listing and its stat makes Scan look again.
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
			info, err := e.Info()
			if err != nil {
				return Contents{}, fmt.Errorf("scan spool: %w", err)
			}
			if uint64(info.Size()) > segSize {
				return Contents{}, fmt.Errorf("scan spool: %s holds %d bytes, more than a %d-byte segment", name, info.Size(), segSize)
			}
			if old, dup := c.Partials[seg.TLI]; dup {
				return Contents{}, fmt.Errorf("scan spool: two partial segments on timeline %d: %s and %s",
					seg.TLI, old.Seg.Name(segSize)+PartialSuffix, name)
			}
			c.Partials[seg.TLI] = Partial{Seg: seg, Size: uint64(info.Size())}
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
func (c Contents) Position(segSize uint64) (pos Position, ok bool) {
	for _, s := range c.Segments {
		if end := s.Start(segSize) + wal.LSN(segSize); s.TLI > pos.TLI || s.TLI == pos.TLI && end > pos.LSN {
			pos, ok = Position{TLI: s.TLI, LSN: end}, true
		}
	}
	for _, p := range c.Partials {
		if end := p.Seg.Start(segSize) + wal.LSN(p.Size); p.Seg.TLI > pos.TLI || p.Seg.TLI == pos.TLI && end >= pos.LSN {
			pos, ok = Position{TLI: p.Seg.TLI, LSN: end}, true
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
