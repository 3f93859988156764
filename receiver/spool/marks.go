package spool

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/tail/wal"
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

// Freeze makes the freeze marker. A receiver's session that sees it stops writing; the
// caller then takes LockWriter to know that none writes any more.
func Freeze(dir string) error {
	return durable.WriteFile(filepath.Join(dir, FreezeFile), []byte(now()+"\n"), 0o644)
}

// Unfreeze removes the promotion trigger and the freeze marker, for a promotion that
// did not start. It tries both and returns what failed.
func Unfreeze(dir string) error {
	var errs []error
	for _, f := range []string{TriggerFile, FreezeFile} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, durable.SyncDir(dir))
	return errors.Join(errs...)
}

// Trigger is the content of TriggerFile: the partial segment the promotion froze and how
// many of its bytes recovery gets. Segment names the segment after the spool's end, with
// Bytes 0, when the spool held no partial.
type Trigger struct {
	TLI     uint32 `json:"timeline"`
	Segment string `json:"segment"`
	Bytes   uint64 `json:"bytes"`
	Hash    string `json:"xxhash64"` // of the Bytes frozen, as 16 hex digits
	At      string `json:"frozen_at"`
}

// HashTail is the Hash of a trigger for the frozen bytes b.
func HashTail(b []byte) string { return fmt.Sprintf("%016x", xxhash.Sum64(b)) }

// ReadTrigger reads the promotion trigger; ok is false when there is none.
func ReadTrigger(dir string) (t Trigger, ok bool, err error) {
	ok, err = readJSON(dir, TriggerFile, "promotion trigger", &t)
	return t, ok, err
}

// WriteTrigger publishes the promotion trigger; At is set to now when empty.
func WriteTrigger(dir string, t Trigger) error {
	if t.At == "" {
		t.At = now()
	}
	return writeJSON(dir, TriggerFile, t)
}

// EndMark is the content of EndFile: where the drained primary's WAL ends.
type EndMark struct {
	wal.Position
	At string `json:"recorded_at"`
}

// ReadEnd reads the spool's end-of-WAL mark; ok is false when there is none.
func ReadEnd(dir string) (m EndMark, ok bool, err error) {
	ok, err = readJSON(dir, EndFile, "end-of-WAL mark", &m)
	return m, ok, err
}

// WriteEnd records the end-of-WAL mark durably.
func WriteEnd(dir string, pos wal.Position) error {
	return writeJSON(dir, EndFile, EndMark{Position: pos, At: now()})
}

// ClearEnd removes the end-of-WAL mark, durably, when there is one.
func ClearEnd(dir string) error { return removeMark(dir, EndFile, "end-of-WAL mark") }

// ClearStart removes the start mark, durably, when there is one: once the spool holds
// WAL, where it started is settled.
func ClearStart(dir string) error { return removeMark(dir, StartFile, "start mark") }

func removeMark(dir, name, what string) error {
	err := os.Remove(filepath.Join(dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove the old %s: %w", what, err)
	}
	return durable.SyncDir(dir)
}

// StartMark is the content of StartFile: where an empty spool's WAL is to start.
type StartMark struct {
	LSN wal.LSN `json:"lsn"`
	At  string  `json:"written_at"`
}

// ReadStart reads the spool's start mark; ok is false when there is none.
func ReadStart(dir string) (m StartMark, ok bool, err error) {
	ok, err = readJSON(dir, StartFile, "start mark", &m)
	return m, ok, err
}

// WriteStart records durably where the spool's WAL is to start, while it holds none:
// the first session ships from the segment holding lsn (on the sidecar's timeline, or
// from where that timeline begins, if later) instead of the segment being written.
func WriteStart(dir string, lsn wal.LSN) error {
	return writeJSON(dir, StartFile, StartMark{LSN: lsn, At: now()})
}

// Session is the content of SessionFile: whether a receiver is serving a sidecar's
// session now, and since when it is, or since when it has had none.
type Session struct {
	Connected bool   `json:"connected"`
	Peer      string `json:"peer,omitempty"`
	Since     string `json:"since"`
}

// WriteSession records the session the receiver serves from now on; an empty peer
// records that it serves none from now on (it started, or a session ended).
func WriteSession(dir, peer string) error {
	return writeJSON(dir, SessionFile, Session{Connected: peer != "", Peer: peer, Since: now()})
}

// ReadSession reads the session record; ok is false when there is none. It says
// something only while a receiver runs (ReceiverRunning): one that died leaves it.
func ReadSession(dir string) (s Session, ok bool, err error) {
	ok, err = readJSON(dir, SessionFile, "session record", &s)
	return s, ok, err
}

// ArchiveState is the content of ArchiveFile: how the uploads of the spool's files to
// an archive stand. Times are RFC 3339 in UTC.
type ArchiveState struct {
	URL        string `json:"url"`
	Newest     string `json:"newest,omitempty"`      // the file last uploaded
	UploadedAt string `json:"uploaded_at,omitempty"` // when it was
	// Pending counts the files the spool holds and the archive lacks, as of the
	// uploader's last look, refused ones left out.
	Pending int `json:"pending"`
	// Refused names the files the archive holds with other bytes: they are not
	// overwritten, and never uploaded.
	Refused []string `json:"refused,omitempty"`
	// FailingSince is set while uploads fail: when the first failure after the last
	// success was. LastError is the last failure's.
	FailingSince string `json:"failing_since,omitempty"`
	LastError    string `json:"last_error,omitempty"`
	// Through is the newest segment that the archive holds (or refused) together with
	// every segment before it in the spool: restore --cleanup removes none after it.
	// "" before the uploader has seen one.
	Through string `json:"uploaded_through,omitempty"`
	// Missing names the segments that left the spool before they were uploaded: the
	// archive lacks them for good.
	Missing []string `json:"missing,omitempty"`
}

// WriteArchiveState publishes the state of the uploads.
func WriteArchiveState(dir string, s ArchiveState) error { return writeJSON(dir, ArchiveFile, s) }

// ReadArchiveState reads the state of the uploads; ok is false when there is none. It
// says something only while a receiver runs (ReceiverRunning).
func ReadArchiveState(dir string) (s ArchiveState, ok bool, err error) {
	ok, err = readJSON(dir, ArchiveFile, "archive state", &s)
	return s, ok, err
}

// ClearArchiveState removes the state of the uploads, durably: a receiver that uploads
// nothing does not leave an earlier one's for walship status to show.
func ClearArchiveState(dir string) error { return removeMark(dir, ArchiveFile, "archive state") }

// LiveState is what walship restore --live last handed one standby of the segment the
// spool is receiving, kept so that a partial that has not grown is not copied again.
type LiveState struct {
	PGData string `json:"pgdata"` // the standby's data directory
	// Postmaster is the standby's postmaster.pid's process id and start time: a
	// standby started again (or made anew in the same directory) is handed the
	// partial again.
	Postmaster string `json:"postmaster"`
	Segment    string `json:"segment"`
	Bytes      uint64 `json:"bytes"`      // how many bytes of it, the rest zeros
	End        string `json:"replayable"` // where its last whole record ends: how far the standby can replay
	At         string `json:"handed_at"`  // when, RFC 3339 in UTC
	// ArchiveMode is the standby's archive_mode as its configuration sets it, read
	// once per postmaster.
	ArchiveMode string `json:"archive_mode,omitempty"`
	// Refused says why nothing was handed to this postmaster, if nothing may be.
	Refused string `json:"refused,omitempty"`
}

// liveName is the record's file name, in LiveDir, for the standby in the data
// directory pgdata (an absolute path).
func liveName(pgdata string) string {
	sum := sha256.Sum256([]byte(pgdata))
	return hex.EncodeToString(sum[:8]) + ".json"
}

// WriteLive records, durably, what was handed to the standby s.PGData.
func WriteLive(dir string, s LiveState) error {
	s.At = now()
	live := filepath.Join(dir, LiveDir)
	if err := os.Mkdir(live, 0o755); err == nil {
		if err := durable.SyncDir(dir); err != nil {
			return err
		}
	} else if !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("make %s: %w", live, err)
	}
	return writeJSON(live, liveName(s.PGData), s)
}

// ReadLive reads what was last handed to the standby in pgdata; ok is false if nothing.
func ReadLive(dir, pgdata string) (s LiveState, ok bool, err error) {
	ok, err = readJSON(filepath.Join(dir, LiveDir), liveName(pgdata), "live hand-out record", &s)
	return s, ok, err
}

// ReadLives reads the records of every standby handed a live partial, by data
// directory.
func ReadLives(dir string) ([]LiveState, error) {
	live := filepath.Join(dir, LiveDir)
	names, err := filepath.Glob(filepath.Join(live, "*.json"))
	if err != nil {
		return nil, err
	}
	var out []LiveState
	for _, n := range names {
		var s LiveState
		if ok, err := readJSON(live, filepath.Base(n), "live hand-out record", &s); err != nil {
			return nil, err
		} else if ok {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PGData < out[j].PGData })
	return out, nil
}

// PublishOnce publishes a timeline history file under name, unless the same content
// is there already; other content there is ErrConflict and stays. The content is parsed
// first, as recovery will read it (timeline.c: readTimeLineHistory: a timeline and a
// switch point a line, timelines ascending, each below the file's own): recovery stops
// with FATAL on a malformed one, so it is refused, and nothing is published.
func PublishOnce(dir, name string, content []byte) error {
	tli, err := wal.ParseHistoryName(name)
	if err != nil {
		return fmt.Errorf("publish history file: %w", err)
	}
	hist, err := wal.ParseHistory(content)
	if err != nil {
		return fmt.Errorf("publish history file %s: %w", name, err)
	}
	if last := hist[len(hist)-1]; last.TLI >= tli {
		return fmt.Errorf("publish history file %s: timeline %d in the history of timeline %d, which lists only the timelines before it", name, last.TLI, tli)
	}
	path := filepath.Join(dir, name)
	have, err := os.ReadFile(path)
	switch {
	case err == nil && bytes.Equal(have, content):
		return nil
	case err == nil:
		return fmt.Errorf("%s: %w", path, ErrConflict)
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	return durable.WriteFile(path, content, 0o644)
}

func now() string { return time.Now().UTC().Format(time.RFC3339Nano) }

// RelayHolds is the content of RelaysFile: for each relay of the receiver, by the
// address of the receiver it ships to, the oldest segment that receiver may still need
// (where its acknowledged position is), or "" while that is not known yet (nothing is
// removed for it then).
type RelayHolds struct {
	Needs map[string]string `json:"needs"`
}

// WriteRelayHolds publishes the relays' holds.
func WriteRelayHolds(dir string, h RelayHolds) error { return writeJSON(dir, RelaysFile, h) }

// ReadRelayHolds reads the relays' holds; ok is false when there are none.
func ReadRelayHolds(dir string) (h RelayHolds, ok bool, err error) {
	ok, err = readJSON(dir, RelaysFile, "relay holds", &h)
	return h, ok, err
}

// ClearRelayHolds removes the relays' holds, durably: a receiver without relays holds
// nothing for the ones an earlier run had.
func ClearRelayHolds(dir string) error { return removeMark(dir, RelaysFile, "relay holds") }

// Held says why the published segment name must stay in the spool for a consumer that
// has not taken it yet, or "" if none needs it: the archive uploader (ArchiveState:
// every segment after Through, and those the archive refused) and the receiver's relays
// (RelayHolds). What they record only moves forward, so a record read late keeps more,
// never less. A record that cannot be read keeps everything.
func Held(dir, name string) string {
	a, ok, err := ReadArchiveState(dir)
	switch {
	case err != nil:
		return "the archive uploader's state cannot be read: " + err.Error()
	case ok && (a.Through == "" || name > a.Through):
		return "not uploaded to the archive yet"
	case ok && slices.Contains(a.Refused, name):
		return "the archive holds other bytes under its name"
	}
	h, ok, err := ReadRelayHolds(dir)
	if err != nil {
		return "the relays' holds cannot be read: " + err.Error()
	}
	if ok {
		for to, need := range h.Needs {
			if need == "" || name >= need {
				return "not shipped yet by the relay to " + to
			}
		}
	}
	return ""
}
