package feeder

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// Status is what walship status reports of a spool. Its JSON field names are stable:
// scripts may rely on them. Positions are LSNs in PostgreSQL's text form, times
// RFC 3339 in UTC.
type Status struct {
	Spool            string   `json:"spool"`
	SystemID         uint64   `json:"system_identifier,omitempty"`
	Major            int      `json:"postgresql_major,omitempty"`
	SegmentBytes     uint64   `json:"wal_segment_size,omitempty"`
	Timeline         uint32   `json:"timeline,omitempty"`
	Durable          string   `json:"durable_lsn,omitempty"`
	LastWAL          string   `json:"last_wal_at,omitempty"` // when the spool last took WAL
	PartialSegment   string   `json:"partial_segment,omitempty"`
	PartialBytes     uint64   `json:"partial_bytes"`
	OldestSegment    string   `json:"oldest_segment,omitempty"`
	NewestSegment    string   `json:"newest_segment,omitempty"`
	Segments         int      `json:"segments"`
	FreeBytes        uint64   `json:"free_bytes"`
	TotalBytes       uint64   `json:"total_bytes"` // the size of the spool's file system
	ReceiverRunning  bool     `json:"receiver_running"`
	SidecarConnected bool     `json:"sidecar_connected"`
	SidecarPeer      string   `json:"sidecar_peer,omitempty"`
	SidecarSince     string   `json:"sidecar_since,omitempty"`    // connected since
	NoSidecarSince   string   `json:"no_sidecar_since,omitempty"` // the running receiver has had no sidecar since
	Frozen           bool     `json:"frozen"`
	Promoted         bool     `json:"promoted"`
	EndOfWAL         string   `json:"end_of_wal,omitempty"` // the drain's end-of-WAL mark
	PrimaryFlush     string   `json:"primary_flush_lsn,omitempty"`
	LagBytes         *uint64  `json:"lag_bytes,omitempty"`
	LagSeconds       *float64 `json:"lag_seconds,omitempty"`
	Slot             string   `json:"slot,omitempty"`
	SlotRetained     *uint64  `json:"slot_retained_bytes,omitempty"`
	// Archive is how the running receiver's uploads stand; nil when it uploads none.
	Archive *spool.ArchiveState `json:"archive,omitempty"`
	// Live lists the standbys walship restore --live has handed a partial segment.
	Live []spool.LiveState `json:"live,omitempty"`
	// With the standby's DSN: how far its replay has gone, how far that is behind the
	// primary's flush position (with the primary's DSN) or else the spool's durable
	// one, and when the last transaction it replayed committed on the primary.
	StandbyReplay     string  `json:"standby_replay_lsn,omitempty"`
	StandbyBehind     *uint64 `json:"standby_replay_behind_bytes,omitempty"`
	StandbyLastCommit string  `json:"standby_last_replayed_commit_at,omitempty"`
	StandbyError      string  `json:"standby_error,omitempty"` // why the standby could not be read
}

// StatusConfig says what walship status reads.
type StatusConfig struct {
	Spool      string
	DSN        string // the primary, for its flush position and the slot; "" for none
	Slot       string // the slot whose retention to show, with DSN
	StandbyDSN string // the standby, for how far it has replayed; "" for none
}

// ReadStatus reads the spool dir; with dsn, the primary's flush position too, how far
// the spool is behind it, and what the replication slot named slot (if it exists)
// holds back on the primary.
//
// The lag in seconds is 0 when the spool holds all the primary has flushed, and else
// the time since the spool last took WAL: how long it has stood behind. It is not the
// age of the oldest missing commit, which the spool cannot know; while WAL flows it is
// the time since the last acknowledged write, a few milliseconds.
func ReadStatus(ctx context.Context, cfg StatusConfig) (Status, error) {
	st, err := readStatus(ctx, cfg.Spool, cfg.DSN, cfg.Slot)
	if err != nil || cfg.StandbyDSN == "" {
		return st, err
	}
	// A standby that is down or promoted is part of the status, not a failure of it.
	if err := readStandby(ctx, cfg.StandbyDSN, &st); err != nil {
		st.StandbyError = err.Error()
	}
	return st, nil
}

// readStandby adds how far the standby has replayed.
func readStandby(ctx context.Context, dsn string, st *Status) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("status: connect to the standby: %w", err)
	}
	defer conn.Close(context.Background())
	var recovering bool
	var replay *wal.LSN
	var last *time.Time
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), pg_last_xact_replay_timestamp()").Scan(&recovering, &replay, &last); err != nil {
		return fmt.Errorf("status: read the standby's replay position: %w", err)
	}
	if !recovering || replay == nil {
		return errors.New("status: the standby is not in recovery (promoted?): it replays nothing")
	}
	st.StandbyReplay = replay.String()
	if last != nil {
		st.StandbyLastCommit = last.UTC().Format(time.RFC3339Nano)
	}
	ahead := cmp.Or(st.PrimaryFlush, st.Durable)
	if ahead == "" {
		return nil
	}
	to, err := wal.ParseLSN(ahead)
	if err != nil {
		return err
	}
	behind := uint64(0)
	if to > *replay {
		behind = uint64(to - *replay)
	}
	st.StandbyBehind = &behind
	return nil
}

func readStatus(ctx context.Context, dir, dsn, slot string) (Status, error) {
	st := Status{Spool: dir}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return st, fmt.Errorf("status of spool %s: %w", dir, err)
	}
	st.FreeBytes, st.TotalBytes = fs.Bavail*uint64(fs.Bsize), fs.Blocks*uint64(fs.Bsize)
	var err error
	if st.ReceiverRunning, err = spool.ReceiverRunning(dir); err != nil {
		return st, err
	}
	if st.ReceiverRunning {
		s, ok, err := spool.ReadSession(dir)
		if err != nil {
			return st, err
		}
		switch {
		case ok && s.Connected:
			st.SidecarConnected, st.SidecarPeer, st.SidecarSince = true, s.Peer, s.Since
		case ok:
			st.NoSidecarSince = s.Since
		}
		a, ok, err := spool.ReadArchiveState(dir)
		if err != nil {
			return st, err
		}
		if ok {
			st.Archive = &a
		}
	}
	if st.Live, err = spool.ReadLives(dir); err != nil {
		return st, err
	}
	if st.Frozen, err = spool.Frozen(dir); err != nil {
		return st, err
	}
	if _, st.Promoted, err = spool.ReadTrigger(dir); err != nil {
		return st, err
	}
	if m, ok, err := spool.ReadEnd(dir); err != nil {
		return st, err
	} else if ok {
		st.EndOfWAL = m.Position.String()
	}
	pos, known, lastWAL, err := readSpool(dir, &st)
	if err != nil || dsn == "" {
		return st, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return st, fmt.Errorf("status: connect to the primary: %w", err)
	}
	defer conn.Close(context.Background())
	var flush wal.LSN
	if err := conn.QueryRow(ctx, "SELECT pg_current_wal_flush_lsn()").Scan(&flush); err != nil {
		return st, fmt.Errorf("status: read the primary's flush position: %w", err)
	}
	st.PrimaryFlush = flush.String()
	if known {
		lag, secs := uint64(0), 0.0
		if flush > pos.LSN {
			lag = uint64(flush - pos.LSN)
			secs = max(time.Since(lastWAL).Seconds(), 0)
		}
		st.LagBytes, st.LagSeconds = &lag, &secs
	}
	if slot == "" {
		return st, nil
	}
	var retained *int64
	err = conn.QueryRow(ctx, "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&retained)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		// No such slot (the sidecar runs with --no-slot, or has not started yet).
	case err != nil:
		return st, fmt.Errorf("status: read replication slot %s: %w", slot, err)
	default:
		st.Slot = slot
		n := uint64(0)
		if retained != nil && *retained > 0 {
			n = uint64(*retained)
		}
		st.SlotRetained = &n
	}
	return st, nil
}

// readSpool fills in what the spool's files say of its WAL, and returns its durable
// position (known is false while it holds none) and when it last took WAL.
func readSpool(dir string, st *Status) (pos wal.Position, known bool, lastWAL time.Time, err error) {
	id, ok, err := spool.ReadIdentity(dir)
	if err != nil || !ok {
		return pos, false, lastWAL, err
	}
	st.SystemID, st.Major, st.SegmentBytes = id.SysID, int(id.ServerVersion)/10000, id.SegSize
	c, err := spool.Scan(dir, id.SegSize)
	if err != nil {
		return pos, false, lastWAL, err
	}
	newer := func(path string) {
		if fi, err := os.Stat(path); err == nil && fi.ModTime().After(lastWAL) {
			lastWAL = fi.ModTime()
		}
	}
	st.Segments = len(c.Segments)
	if n := len(c.Segments); n > 0 {
		st.OldestSegment, st.NewestSegment = c.Segments[0].Name(id.SegSize), c.Segments[n-1].Name(id.SegSize)
		newer(spool.SegmentPath(dir, c.Segments[n-1], id.SegSize))
	}
	pos, known = c.Position(id.SegSize)
	if known {
		st.Timeline, st.Durable = pos.TLI, pos.LSN.String()
		if p, ok := c.Partials[pos.TLI]; ok {
			st.PartialSegment, st.PartialBytes = p.Seg.Name(id.SegSize), p.Size
			newer(spool.PartialPath(dir, p.Seg, id.SegSize))
		}
	}
	if !lastWAL.IsZero() {
		st.LastWAL = lastWAL.UTC().Format(time.RFC3339Nano)
	}
	return pos, known, lastWAL, nil
}

func (s Status) String() string {
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	// The tabwriter writes to a strings.Builder, which never fails: neither do its
	// writes nor its Flush.
	row := func(k string, v any) { _, _ = fmt.Fprintf(w, "%s\t%v\n", k, v) }
	row("spool", s.Spool)
	if s.SystemID == 0 {
		row("cluster", "none yet: no sidecar has streamed into it")
	} else {
		row("cluster", fmt.Sprintf("system identifier %d, PostgreSQL %d, %d-byte segments", s.SystemID, s.Major, s.SegmentBytes))
	}
	if s.Durable != "" {
		row("durable", fmt.Sprintf("%s on timeline %d", s.Durable, s.Timeline))
	}
	if s.LastWAL != "" {
		row("last WAL", s.LastWAL)
	}
	if s.PartialSegment != "" {
		row("partial", fmt.Sprintf("%s, %d bytes", s.PartialSegment, s.PartialBytes))
	}
	if s.Segments > 0 {
		row("segments", fmt.Sprintf("%d published, %s to %s", s.Segments, s.OldestSegment, s.NewestSegment))
	}
	row("free", fmt.Sprintf("%.1f GiB", float64(s.FreeBytes)/(1<<30)))
	receiver := "not running"
	if s.ReceiverRunning {
		receiver = "running"
	}
	row("receiver", receiver)
	sidecar := "not connected"
	switch {
	case s.SidecarConnected:
		sidecar = fmt.Sprintf("connected from %s since %s", s.SidecarPeer, s.SidecarSince)
	case s.NoSidecarSince != "":
		sidecar = "not connected since " + s.NoSidecarSince
	}
	row("sidecar", sidecar)
	var marks []string
	if s.EndOfWAL != "" {
		marks = append(marks, "end-of-WAL mark at "+s.EndOfWAL+" (the primary's server is gone and drained)")
	}
	if s.Frozen {
		marks = append(marks, "frozen")
	}
	if s.Promoted {
		marks = append(marks, "promoted from")
	}
	if len(marks) > 0 {
		row("marks", strings.Join(marks, "; "))
	}
	if s.PrimaryFlush != "" {
		lag := "-"
		if s.LagBytes != nil {
			lag = fmt.Sprintf("%d bytes behind", *s.LagBytes)
		}
		if s.LagSeconds != nil && *s.LagSeconds > 0 {
			lag += fmt.Sprintf(", for %.1f s", *s.LagSeconds)
		}
		row("primary", fmt.Sprintf("flushed to %s; the spool is %s", s.PrimaryFlush, lag))
	}
	if a := s.Archive; a != nil {
		up := fmt.Sprintf("%s: %d file(s) to upload", a.URL, a.Pending)
		if a.Newest != "" {
			up += fmt.Sprintf("; %s uploaded at %s", a.Newest, a.UploadedAt)
		}
		if a.FailingSince != "" {
			up += fmt.Sprintf("; failing since %s: %s", a.FailingSince, a.LastError)
		}
		if n := len(a.Missing); n > 0 {
			up += fmt.Sprintf("; %d missing, gone from the spool before upload: %s", n, strings.Join(a.Missing, ", "))
		}
		if n := len(a.Refused); n > 0 {
			up += fmt.Sprintf("; %d refused for holding other bytes: %s", n, strings.Join(a.Refused, ", "))
		}
		row("archive", up)
	}
	for _, l := range s.Live {
		row("live standby", fmt.Sprintf("%s: handed %s, %d bytes (replayable to %s), at %s", l.PGData, l.Segment, l.Bytes, l.End, l.At))
	}
	if s.StandbyError != "" {
		row("standby", s.StandbyError)
	}
	if s.StandbyReplay != "" {
		replay := "replayed to " + s.StandbyReplay
		if s.StandbyBehind != nil {
			replay += fmt.Sprintf(", %d bytes behind the %s", *s.StandbyBehind, map[bool]string{true: "primary", false: "spool"}[s.PrimaryFlush != ""])
		}
		if s.StandbyLastCommit != "" {
			replay += "; last replayed commit of " + s.StandbyLastCommit
		}
		row("standby", replay)
	}
	if s.SlotRetained != nil {
		row("slot", fmt.Sprintf("%s holds back %d bytes of WAL on the primary", s.Slot, *s.SlotRetained))
	}
	_ = w.Flush()
	return b.String()
}
