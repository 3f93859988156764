package feeder

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// Status is what walship status reports of a spool. Its JSON field names are stable:
// scripts may rely on them. Positions are LSNs in PostgreSQL's text form.
type Status struct {
	Spool            string  `json:"spool"`
	SystemID         uint64  `json:"system_identifier,omitempty"`
	Major            int     `json:"postgresql_major,omitempty"`
	SegmentBytes     uint64  `json:"wal_segment_size,omitempty"`
	Timeline         uint32  `json:"timeline,omitempty"`
	Durable          string  `json:"durable_lsn,omitempty"`
	PartialSegment   string  `json:"partial_segment,omitempty"`
	PartialBytes     uint64  `json:"partial_bytes"`
	OldestSegment    string  `json:"oldest_segment,omitempty"`
	NewestSegment    string  `json:"newest_segment,omitempty"`
	Segments         int     `json:"segments"`
	FreeBytes        uint64  `json:"free_bytes"`
	ReceiverRunning  bool    `json:"receiver_running"`
	SidecarConnected bool    `json:"sidecar_connected"`
	SidecarPeer      string  `json:"sidecar_peer,omitempty"`
	SidecarSince     string  `json:"sidecar_since,omitempty"`
	Frozen           bool    `json:"frozen"`
	Promoted         bool    `json:"promoted"`
	EndOfWAL         string  `json:"end_of_wal,omitempty"` // the drain's end-of-WAL mark
	PrimaryFlush     string  `json:"primary_flush_lsn,omitempty"`
	LagBytes         *uint64 `json:"lag_bytes,omitempty"`
}

// ReadStatus reads the spool dir; with dsn, the primary's flush position too, and how
// far the spool is behind it.
func ReadStatus(ctx context.Context, dir, dsn string) (Status, error) {
	st := Status{Spool: dir}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return st, fmt.Errorf("status of spool %s: %w", dir, err)
	}
	st.FreeBytes = fs.Bavail * uint64(fs.Bsize)
	var err error
	if st.ReceiverRunning, err = spool.ReceiverRunning(dir); err != nil {
		return st, err
	}
	if st.ReceiverRunning {
		s, ok, err := spool.ReadSession(dir)
		if err != nil {
			return st, err
		}
		st.SidecarConnected, st.SidecarPeer, st.SidecarSince = ok, s.Peer, s.Since
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
	id, ok, err := spool.ReadIdentity(dir)
	if err != nil || !ok {
		return st, err
	}
	st.SystemID, st.Major, st.SegmentBytes = id.SysID, int(id.ServerVersion)/10000, id.SegSize
	c, err := spool.Scan(dir, id.SegSize)
	if err != nil {
		return st, err
	}
	st.Segments = len(c.Segments)
	if n := len(c.Segments); n > 0 {
		st.OldestSegment, st.NewestSegment = c.Segments[0].Name(id.SegSize), c.Segments[n-1].Name(id.SegSize)
	}
	pos, ok := c.Position(id.SegSize)
	if ok {
		st.Timeline, st.Durable = pos.TLI, pos.LSN.String()
		if p, ok := c.Partials[pos.TLI]; ok {
			st.PartialSegment, st.PartialBytes = p.Seg.Name(id.SegSize), p.Size
		}
	}
	if dsn == "" {
		return st, nil
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
	if ok {
		lag := uint64(0)
		if flush > pos.LSN {
			lag = uint64(flush - pos.LSN)
		}
		st.LagBytes = &lag
	}
	return st, nil
}

func (s Status) String() string {
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	row := func(k string, v any) { fmt.Fprintf(w, "%s\t%v\n", k, v) }
	row("spool", s.Spool)
	if s.SystemID == 0 {
		row("cluster", "none yet: no sidecar has streamed into it")
	} else {
		row("cluster", fmt.Sprintf("system identifier %d, PostgreSQL %d, %d-byte segments", s.SystemID, s.Major, s.SegmentBytes))
	}
	if s.Durable != "" {
		row("durable", fmt.Sprintf("%s on timeline %d", s.Durable, s.Timeline))
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
	if s.SidecarConnected {
		sidecar = fmt.Sprintf("connected from %s since %s", s.SidecarPeer, s.SidecarSince)
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
		row("primary", fmt.Sprintf("flushed to %s; the spool is %s", s.PrimaryFlush, lag))
	}
	w.Flush()
	return b.String()
}
