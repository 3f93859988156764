package feeder

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/walship/walship/receiver/archive"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// archivedSegment is a segment object of an archive: a whole segment, or a promotion's
// <segment>.partial.
type archivedSegment struct {
	obj     archive.Object
	seg     wal.Segment
	partial bool
}

// segmentsOf sorts an archive's objects: its segments (by timeline, then number), its
// history files' timelines, and the names of anything else.
func segmentsOf(objs []archive.Object, segSize uint64) (segs []archivedSegment, histories map[uint32]bool, other []string) {
	histories = map[uint32]bool{}
	for _, o := range objs {
		name, partial := strings.CutSuffix(o.Name, spool.PartialSuffix)
		if seg, err := wal.ParseSegmentName(name, segSize); err == nil {
			segs = append(segs, archivedSegment{o, seg, partial})
			continue
		}
		if tli, err := wal.ParseHistoryName(o.Name); err == nil {
			histories[tli] = true
			continue
		}
		if o.Name != archive.IdentityObject {
			other = append(other, o.Name)
		}
	}
	sort.Slice(segs, func(i, j int) bool {
		a, b := segs[i].seg, segs[j].seg
		return a.TLI < b.TLI || a.TLI == b.TLI && (a.No < b.No || a.No == b.No && !segs[i].partial && segs[j].partial)
	})
	return segs, histories, other
}

// VerifyArchive checks every object of an archive, as walship archive verify does:
// each segment's size, checksum (the SDK's, against the stored SHA-256), page headers,
// record chain and CRCs; no gap between a timeline's first and last segment; a history
// file for every timeline after the first. It returns one line per problem and how
// many objects it read.
func VerifyArchive(ctx context.Context, a *archive.Archive) (problems []string, checked int, err error) {
	id, ok, err := a.Identity(ctx)
	if err != nil {
		return nil, 0, err
	}
	if !ok {
		return nil, 0, fmt.Errorf("archive %s holds nothing: no %s", a, archive.IdentityObject)
	}
	objs, err := a.List(ctx)
	if err != nil {
		return nil, 0, err
	}
	segs, histories, other := segmentsOf(objs, id.SegSize)
	for _, name := range other {
		problems = append(problems, fmt.Sprintf("%s: not a WAL segment, history file or partial segment", name))
	}
	var prev *archivedSegment
	for i := range segs {
		s := &segs[i]
		if !s.partial && prev != nil && prev.seg.TLI == s.seg.TLI && s.seg.No > prev.seg.No+1 {
			problems = append(problems, fmt.Sprintf("gap on timeline %d: %d segments missing after %s, before %s",
				s.seg.TLI, s.seg.No-prev.seg.No-1, prev.obj.Name, s.obj.Name))
		}
		if !s.partial {
			prev = s
		}
		if s.seg.TLI > 1 && !histories[s.seg.TLI] {
			histories[s.seg.TLI] = true // said once per timeline
			problems = append(problems, fmt.Sprintf("timeline %d: no history file %s", s.seg.TLI, wal.HistoryName(s.seg.TLI)))
		}
		b, err := a.Get(ctx, s.obj.Name)
		checked++
		switch {
		case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
			return problems, checked, err
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s: %v", s.obj.Name, err))
			continue
		}
		check := checkSegment
		if s.partial {
			check = checkPadded
		}
		if err := check(id, s.seg, b); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", s.obj.Name, err))
		}
	}
	return problems, checked, nil
}

// checkPadded checks a promotion's partial segment as far as it can be: its pages and
// records from its start. Where its bytes end is not recorded in it (a promotion may cut
// a record short, and it is padded with zeros), so the stored SHA-256 is what vouches
// for the rest.
func checkPadded(id spool.Identity, seg wal.Segment, b []byte) error {
	if uint64(len(b)) != id.SegSize {
		return fmt.Errorf("%w: it holds %d bytes, want %d", ErrCorrupt, len(b), id.SegSize)
	}
	start := seg.Start(id.SegSize)
	end, _, _, err := wal.ValidEnd(id.Stream(), seg.TLI, wal.Bytes{Base: start, Data: b}, start, 0)
	if err == nil && end == start {
		err = errors.New("no valid record at its start")
	}
	return err
}

// ExpireRule says which segments walship archive expire removes: those before a
// segment (any timeline), older than a time, or all but the newest Keep. History files
// and the identity are never removed.
type ExpireRule struct {
	Before wal.Segment // zero: unused
	Older  time.Time   // zero: unused
	Keep   int         // 0: unused
}

// ExpireArchive removes (or with dryRun, only lists) the segments rule selects, and
// returns their names.
func ExpireArchive(ctx context.Context, a *archive.Archive, rule ExpireRule, dryRun bool) ([]string, error) {
	id, ok, err := a.Identity(ctx)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("archive %s holds nothing: no %s", a, archive.IdentityObject)
	}
	objs, err := a.List(ctx)
	if err != nil {
		return nil, err
	}
	segs, _, _ := segmentsOf(objs, id.SegSize)
	// Newest first by position: a segment number is a position, whatever its timeline.
	sort.SliceStable(segs, func(i, j int) bool { return segs[i].seg.No > segs[j].seg.No })
	var gone []string
	kept := 0
	for _, s := range segs {
		var expire bool
		switch {
		case rule.Keep > 0:
			if !s.partial {
				kept++
			}
			expire = kept > rule.Keep
		case rule.Before.No > 0:
			expire = s.seg.No < rule.Before.No
		case !rule.Older.IsZero():
			expire = s.obj.Modified.Before(rule.Older)
		}
		if !expire {
			continue
		}
		if !dryRun {
			if err := a.Delete(ctx, s.obj.Name); err != nil {
				return gone, err
			}
		}
		gone = append(gone, s.obj.Name)
	}
	sort.Strings(gone)
	return gone, nil
}
