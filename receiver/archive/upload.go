package archive

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/dirwatch"
	"github.com/walship/walship/tail/wal"
)

// Uploader copies a spool's durable files into an archive: history files first, then
// published segments in order, and once the spool is promoted from, the partial
// segment the promotion used, zero-padded to a segment under PostgreSQL's
// <segment>.partial name. What the archive holds already is not sent again (it is
// listed once at the start); a file the archive holds with other bytes is refused,
// logged once and left alone; other failures are retried with a growing pause.
type Uploader struct {
	Spool   string
	Archive *Archive
	Logger  zerolog.Logger

	uploaded atomic.Uint64 // files uploaded
	bytes    atomic.Uint64 // their bytes
	failures atomic.Uint64 // failed attempts, conflicts included
	lastErr  atomic.Pointer[string]

	buf []byte // one segment's bytes, read again for each file

	mu           sync.Mutex
	state        spool.ArchiveState // as walship status reads it from the spool
	failingSince time.Time
	saved        time.Time          // when the state was last written to the spool
	savedState   spool.ArchiveState // what was written then
}

// saveEvery is how often, at most, the state is written to the spool while files are
// uploaded; it is written at once when something goes wrong, and at each round's end.
const saveEvery = time.Second

// rescan bounds the wait for the spool to change: a scan then happens anyway.
const rescan = time.Minute

const maxBackoff = 30 * time.Second

// Uploaded is how many files were uploaded since the start, and their bytes.
func (u *Uploader) Uploaded() (files, bytes uint64) { return u.uploaded.Load(), u.bytes.Load() }

// State is how the uploads stand: the last file uploaded, how many wait, which the
// archive refused, and since when uploads fail, if they do.
func (u *Uploader) State() (st spool.ArchiveState, failingSince time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	st = u.state
	st.Refused = append([]string(nil), u.state.Refused...)
	st.Missing = append([]string(nil), u.state.Missing...)
	return st, u.failingSince
}

// update changes the state under the lock and, if it differs from what the spool
// holds, writes it there when force is set or saveEvery has passed since the last
// write. (Writing it unchanged would wake the uploader's own watch of the spool for
// nothing.) A failure to write it is logged: the uploads go on.
func (u *Uploader) update(force bool, change func(*spool.ArchiveState)) {
	u.mu.Lock()
	change(&u.state)
	u.state.URL = u.Archive.String()
	st := u.state
	st.Refused = append([]string(nil), u.state.Refused...)
	st.Missing = append([]string(nil), u.state.Missing...)
	if reflect.DeepEqual(st, u.savedState) || !force && time.Since(u.saved) < saveEvery {
		u.mu.Unlock()
		return
	}
	u.saved = time.Now()
	u.mu.Unlock()
	if err := spool.WriteArchiveState(u.Spool, st); err != nil {
		u.Logger.Warn().Err(err).Msg("archive: cannot record the uploads' state for walship status")
		return
	}
	u.mu.Lock()
	u.savedState = st
	u.mu.Unlock()
}

// Failures is how many uploads failed since the start, and the last error.
func (u *Uploader) Failures() (n uint64, last string) {
	if p := u.lastErr.Load(); p != nil {
		last = *p
	}
	return u.failures.Load(), last
}

// Run uploads until ctx ends, or the archive belongs to another cluster.
func (u *Uploader) Run(ctx context.Context) error {
	w, err := dirwatch.New(u.Spool, dirwatch.Added)
	if err != nil {
		u.Logger.Warn().Err(err).Msg("archive: cannot watch the spool; it is scanned every minute")
	}
	if w != nil {
		defer w.Close()
		stop := context.AfterFunc(ctx, w.Interrupt)
		defer stop()
	}
	// Recorded at once, before the archive is listed: an earlier run's state, of this
	// archive or another, no longer says what restore --cleanup may remove.
	u.update(true, func(st *spool.ArchiveState) {})
	var have map[string]bool // what the archive holds, once listed
	refused := map[string]bool{}
	backoff := time.Duration(0)
	for ctx.Err() == nil {
		if w != nil {
			if err := w.Drain(); err != nil && ctx.Err() == nil {
				return fmt.Errorf("archive: watch the spool: %w", err)
			}
		}
		var err error
		if have == nil {
			have, err = u.start(ctx)
		}
		if err == nil {
			err = u.round(ctx, have, refused)
		}
		switch {
		case errors.Is(err, ErrWrongCluster):
			u.fail(err)
			return err
		case err != nil && ctx.Err() == nil:
			u.fail(err)
			backoff = min(max(2*backoff, 100*time.Millisecond), maxBackoff)
			u.Logger.Warn().Err(err).Dur("retry_in", backoff).Msg("archive: upload failed")
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if w == nil {
			select {
			case <-ctx.Done():
			case <-time.After(rescan):
			}
			continue
		}
		if _, err := w.Wait(rescan); err != nil && ctx.Err() == nil {
			return fmt.Errorf("archive: watch the spool: %w", err)
		}
	}
	return nil
}

// fail counts a failed upload and records it in the state.
func (u *Uploader) fail(err error) {
	u.failures.Add(1)
	s := err.Error()
	u.lastErr.Store(&s)
	u.update(true, func(st *spool.ArchiveState) {
		if u.failingSince.IsZero() {
			u.failingSince = time.Now()
			st.FailingSince = stamp(u.failingSince)
		}
		st.LastError = s
	})
}

// succeed records that an upload, or a look at the archive, went well.
func (u *Uploader) succeed(st *spool.ArchiveState) {
	u.failingSince = time.Time{}
	st.FailingSince, st.LastError = "", ""
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// start binds the archive to the spool's cluster and lists what it holds; a spool
// that holds nothing yet is no error: there is nothing to send.
func (u *Uploader) start(ctx context.Context) (map[string]bool, error) {
	id, ok, err := spool.ReadIdentity(u.Spool)
	if err != nil || !ok {
		return nil, err
	}
	if err := u.Archive.Bind(ctx, id); err != nil {
		return nil, err
	}
	objs, err := u.Archive.List(ctx)
	if err != nil {
		return nil, err
	}
	have := map[string]bool{}
	for _, o := range objs {
		have[o.Name] = true
	}
	u.Logger.Info().Stringer("archive", u.Archive).Int("objects", len(objs)).Msg("archive: uploading the spool's segments")
	return have, nil
}

// round uploads what the spool holds and the archive lacks.
func (u *Uploader) round(ctx context.Context, have, refused map[string]bool) error {
	if have == nil {
		return nil
	}
	id, _, err := spool.ReadIdentity(u.Spool)
	if err != nil {
		return err
	}
	c, err := spool.Scan(u.Spool, id.SegSize)
	if err != nil {
		return err
	}
	var names []string
	for _, tli := range c.Histories {
		names = append(names, wal.HistoryName(tli))
	}
	segs := append([]wal.Segment(nil), c.Segments...)
	sort.Slice(segs, func(i, j int) bool {
		return segs[i].TLI < segs[j].TLI || segs[i].TLI == segs[j].TLI && segs[i].No < segs[j].No
	})
	for _, s := range segs {
		names = append(names, s.Name(id.SegSize))
	}
	var todo []string
	for _, name := range names {
		if !have[name] && !refused[name] {
			todo = append(todo, name)
		}
	}
	// A segment that neither the spool nor the archive holds, between segments of its
	// timeline that one of them does, left the spool before it was uploaded.
	if gone := gaps(segs, have, id.SegSize); len(gone) > 0 {
		u.missing(gone)
	}
	// Through: the segments that, with all before them, the archive holds or refused.
	// restore --cleanup removes none after it (spool.Held).
	through := ""
	for _, s := range segs {
		name := s.Name(id.SegSize)
		if !have[name] && !refused[name] {
			break
		}
		through = name
	}
	u.update(false, func(st *spool.ArchiveState) { st.Pending, st.Through = len(todo), max(st.Through, through) })
	for i, name := range todo {
		b, err := u.read(filepath.Join(u.Spool, name))
		if errors.Is(err, os.ErrNotExist) {
			// Taken from the spool before it was uploaded (by hand, or by a cleanup
			// that did not ask spool.Held): the archive lacks it for good. Said, kept
			// in the state for walship status and check, and passed, so that the
			// uploads go on.
			u.missing([]string{name})
			refused[name] = true // not looked for again
			continue
		}
		if err != nil {
			return err
		}
		if err := u.put(ctx, name, b, have, refused); err != nil {
			return err
		}
		u.update(false, func(st *spool.ArchiveState) {
			st.Pending = len(todo) - i - 1
			if _, err := wal.ParseSegmentName(name, id.SegSize); err == nil {
				st.Through = max(st.Through, name)
			}
		})
	}
	if err := u.promotedPartial(ctx, id, have, refused); err != nil {
		return err
	}
	u.update(true, func(st *spool.ArchiveState) { u.succeed(st) })
	return nil
}

// read reads a file into the uploader's buffer, which the next read reuses.
func (u *Uploader) read(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read only
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if int64(cap(u.buf)) < st.Size() {
		u.buf = make([]byte, st.Size())
	}
	b := u.buf[:st.Size()]
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("archive: read %s: %w", path, err)
	}
	return b, nil
}

// put uploads one file; a conflict is logged once and the file left alone.
func (u *Uploader) put(ctx context.Context, name string, b []byte, have, refused map[string]bool) error {
	err := u.Archive.Put(ctx, name, b)
	if err != nil {
		// The HTTP client may still be reading the body of a request that failed
		// early: the next file gets a buffer of its own.
		u.buf = nil
	}
	if errors.Is(err, ErrConflict) {
		refused[name] = true
		u.update(true, func(st *spool.ArchiveState) { st.Refused = append(st.Refused, name) })
		u.fail(err)
		u.Logger.Error().Err(err).Str("file", name).Msg("archive: refused to overwrite an object that holds other bytes; it is left as it is")
		return nil
	}
	if err != nil {
		return err
	}
	have[name] = true
	u.update(false, func(st *spool.ArchiveState) {
		u.succeed(st)
		st.Newest, st.UploadedAt = name, stamp(time.Now())
	})
	u.uploaded.Add(1)
	u.bytes.Add(uint64(len(b)))
	u.Logger.Debug().Str("file", name).Int("bytes", len(b)).Msg("archive: uploaded")
	return nil
}

// promotedPartial uploads the partial segment a promotion from the spool used, as
// walship restore hands it to recovery: its frozen bytes, zero-padded.
func (u *Uploader) promotedPartial(ctx context.Context, id spool.Identity, have, refused map[string]bool) error {
	trig, ok, err := spool.ReadTrigger(u.Spool)
	if err != nil || !ok || trig.Bytes == 0 {
		return err
	}
	name := trig.Segment + spool.PartialSuffix
	if have[name] || refused[name] {
		return nil
	}
	f, err := os.Open(filepath.Join(u.Spool, name))
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }() // read only
	b := make([]byte, id.SegSize)
	if _, err := io.ReadFull(f, b[:trig.Bytes]); err != nil {
		return fmt.Errorf("archive: frozen partial %s: %w", name, err)
	}
	if got := spool.HashTail(b[:trig.Bytes]); got != trig.Hash {
		return fmt.Errorf("archive: frozen partial %s changed since the promotion froze it", name)
	}
	return u.put(ctx, name, b, have, refused)
}

// maxMissing bounds the names the state keeps of segments the archive lacks for good.
const maxMissing = 100

// missing records segments that left the spool before they were uploaded: said once
// each, kept in the state (the newest maxMissing) for walship status and check.
func (u *Uploader) missing(names []string) {
	var fresh []string
	u.mu.Lock()
	for _, n := range names {
		if !slices.Contains(u.state.Missing, n) {
			fresh = append(fresh, n)
		}
	}
	u.mu.Unlock()
	if len(fresh) == 0 {
		return
	}
	err := fmt.Errorf("archive: %d segment(s) left the spool before they were uploaded, %s the last: the archive lacks them", len(fresh), fresh[len(fresh)-1])
	u.Logger.Error().Err(err).Strs("segments", fresh).Msg("archive: a gap in the archive")
	u.update(true, func(st *spool.ArchiveState) {
		st.Missing = append(st.Missing, fresh...)
		if len(st.Missing) > maxMissing {
			st.Missing = st.Missing[len(st.Missing)-maxMissing:]
		}
	})
	u.fail(err)
}

// gaps lists, in order, the segments of each timeline that neither the spool (segs)
// nor the archive (have) holds, between the oldest and the newest that one of them
// does.
func gaps(segs []wal.Segment, have map[string]bool, segSize uint64) []string {
	held := map[uint32]map[uint64]bool{}
	add := func(s wal.Segment) {
		if held[s.TLI] == nil {
			held[s.TLI] = map[uint64]bool{}
		}
		held[s.TLI][s.No] = true
	}
	for _, s := range segs {
		add(s)
	}
	for name := range have {
		if s, err := wal.ParseSegmentName(name, segSize); err == nil {
			add(s)
		}
	}
	tlis := make([]uint32, 0, len(held))
	for tli := range held {
		tlis = append(tlis, tli)
	}
	slices.Sort(tlis)
	var out []string
	for _, tli := range tlis {
		nos := make([]uint64, 0, len(held[tli]))
		for no := range held[tli] {
			nos = append(nos, no)
		}
		slices.Sort(nos)
		for i := 1; i < len(nos); i++ {
			for no := nos[i-1] + 1; no < nos[i] && len(out) < 10*maxMissing; no++ {
				out = append(out, wal.Segment{TLI: tli, No: no}.Name(segSize))
			}
		}
	}
	return out
}
