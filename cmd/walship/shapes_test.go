package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// TestSwitchPlacements puts an XLOG_SWITCH record at every MAXALIGNed offset of a page's
// last 40 bytes, on PostgreSQL 13, 15 and 18, with the sidecar streaming throughout and
// wal_buffers (64 kB) smaller than the padding that follows a switch.
// At the last two offsets the record's header is split across two pages (8176, 8184),
// and on a segment's last page across two segments, which leaves the next segment all
// padding after the record's tail. Each time the spool must get past the switch to the
// commit after it, and in the end every published segment is the primary's own.
//
// A non-transactional logical message of a computed size puts the insert position
// where wanted; the switch record is then found in pg_wal and its place checked, and a
// placement that background WAL moved is tried again.
func TestSwitchPlacements(t *testing.T) {
	for _, major := range []int{13, 15, 18} {
		t.Run(fmt.Sprintf("pg%d", major), func(t *testing.T) {
			ctx := testContext(t, 4*time.Minute)
			r := newRigMajor(t, ctx, 1, major)
			r.startReceiver(ctx)
			r.startSidecar(ctx, r.primary)
			r.waitStreaming(ctx)
			// WAL buffers smaller than a segment's switch padding: the WAL writer flushes
			// the padding in pieces, and the flush position may stop inside it.
			require.NoError(t, r.primary.Exec(ctx, "ALTER SYSTEM SET wal_buffers = '64kB'"))
			require.NoError(t, r.primary.Exec(ctx, "ALTER SYSTEM SET autovacuum = off"))
			require.NoError(t, r.primary.Stop(ctx))
			require.NoError(t, r.primary.Start(ctx))
			require.Equal(t, "64kB", mustQuery(t, ctx, r.primary, "SHOW wal_buffers"))
			require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE marks (i int)"))
			id, ok, err := spool.ReadIdentity(r.spool)
			require.NoError(t, err)
			require.True(t, ok)
			p := placer{t: t, c: r.primary, st: id.Stream()}
			p.calibrate(ctx)

			const bs = 8192
			for i, place := range []struct {
				lastPage bool
				off      wal.LSN
			}{
				{false, 8152}, {false, 8160}, {false, 8168}, {false, 8176}, {false, 8184},
				{true, 8168}, {true, 8176}, {true, 8184},
			} {
				at := p.switchAt(ctx, place.off, place.lastPage)
				require.NoError(t, r.primary.Exec(ctx, "INSERT INTO marks VALUES ($1)", i))
				flush := flushLSN(t, ctx, r.primary)
				sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				err := lab.Wait(sctx, 10*time.Millisecond, "the spool past the switch at "+at.String(), func() (bool, error) {
					pos, _ := spoolPosition(t, r.spool)
					return pos.LSN >= flush, nil
				})
				cancel()
				require.NoError(t, err, "switch at %s (page offset %d): sidecar log:\n%s", at, uint64(at)%bs, lastBytes(r.sidecar.Log(), 3000))
			}
			require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
			require.NoError(t, r.primary.Exec(ctx, "INSERT INTO marks VALUES (-1)"))
			segs := r.checkIdentical(ctx)
			t.Logf("PostgreSQL %d: %d segments identical to the primary's", major, segs)

			// Each segment checks on its own, as restore checks it: the one that holds
			// only a split switch's tail and padding too.
			r.sidecar.Kill()
			out, err := exec.CommandContext(ctx, walshipBin, "verify", "--spool", copySpool(t, r.spool)).CombinedOutput()
			require.NoError(t, err, "walship verify:\n%s", out)
			require.Equal(t, segs+1, strings.Count(string(out), " ok: "), "%s", out)
		})
	}
}

// placer puts a server's insert position at a wanted page offset and switches there.
type placer struct {
	t  *testing.T
	c  *lab.Cluster
	st wal.Stream
	// overhead is the MAXALIGNed size of a non-transactional logical message's record
	// beyond its message bytes, for messages long enough to take the long data header.
	overhead uint64
}

func (p *placer) insertLSN(ctx context.Context) wal.LSN {
	p.t.Helper()
	l, err := wal.ParseLSN(mustQuery(p.t, ctx, p.c, "SELECT pg_current_wal_insert_lsn()"))
	require.NoError(p.t, err)
	return l
}

// headers counts the bytes of the page headers between two record positions.
func (p *placer) headers(from, to wal.LSN) uint64 {
	n := uint64(0)
	bs := p.st.BlockSize
	for pg := (uint64(from)/bs + 1) * bs; pg < uint64(to); pg += bs {
		n += uint64(wal.HeaderSize(wal.LSN(pg), p.st.SegSize))
	}
	return n
}

func (p *placer) emit(ctx context.Context, n uint64) {
	p.t.Helper()
	require.NoError(p.t, p.c.Exec(ctx, "SELECT pg_logical_emit_message(false, 'walship', repeat('x', $1))", int(n)))
}

// calibrate measures the record overhead of a logical message, from messages that
// nothing else wrote beside.
func (p *placer) calibrate(ctx context.Context) {
	p.t.Helper()
	for try := 0; try < 5; try++ {
		a := p.insertLSN(ctx)
		p.emit(ctx, 1000)
		b := p.insertLSN(ctx)
		p.emit(ctx, 2000)
		c := p.insertLSN(ctx)
		d1 := uint64(b-a) - p.headers(a, b) - 1000
		d2 := uint64(c-b) - p.headers(b, c) - 2000
		if d1 == d2 {
			p.overhead = d1
			return
		}
	}
	p.t.Fatal("could not measure a logical message's size: other WAL kept coming")
}

// switchAt puts an XLOG_SWITCH record at page offset off of a page inside a fresh
// segment, or of a segment's last page, and returns where it starts.
func (p *placer) switchAt(ctx context.Context, off wal.LSN, lastPage bool) wal.LSN {
	p.t.Helper()
	bs, segSize := p.st.BlockSize, p.st.SegSize
	for try := 0; try < 10; try++ {
		require.NoError(p.t, p.c.Exec(ctx, "SELECT pg_switch_wal()"))
		from := p.insertLSN(ctx)
		seg := uint64(from) / segSize * segSize
		page := seg + 3*bs
		if lastPage {
			page = seg + segSize - bs
		}
		target := wal.LSN(page) + off
		size := uint64(target-from) - p.headers(from, target)
		if size < p.overhead+300 {
			continue
		}
		p.emit(ctx, size-p.overhead)
		if got := p.insertLSN(ctx); got != target {
			p.t.Logf("placing a switch at %s: the insert position is %s (other WAL came in); again", target, got)
			continue
		}
		require.NoError(p.t, p.c.Exec(ctx, "SELECT pg_switch_wal()"))
		at, ok := p.findSwitch(target)
		if ok && at == target {
			return at
		}
		p.t.Logf("placing a switch at %s: it went to %s; again", target, at)
	}
	p.t.Fatalf("could not place a switch at page offset %d", off)
	return 0
}

// findSwitch reads the primary's pg_wal from the page before lsn to the first switch
// record, and returns where that record starts.
func (p *placer) findSwitch(lsn wal.LSN) (wal.LSN, bool) {
	p.t.Helper()
	segSize := p.st.SegSize
	pgwal := filepath.Join(p.c.Data, "pg_wal")
	src := &wal.Files{SegSize: segSize, Locate: func(no uint64) (string, int64, bool) {
		return filepath.Join(pgwal, wal.Segment{TLI: 1, No: no}.Name(segSize)), int64(segSize), true
	}}
	defer src.Close()
	bs := wal.LSN(p.st.BlockSize)
	start := lsn/bs*bs - bs
	r := wal.NewReader(p.st, 1, src, start, 0)
	for {
		rec, err := r.Next()
		var end *wal.EndError
		if errors.As(err, &end) || err != nil {
			p.t.Logf("no switch record after %s: %v", start, err)
			return 0, false
		}
		if rec.IsSwitch() {
			return rec.LSN, true
		}
	}
}

// TestOverwrittenContrecord: a backend killed in the middle of a 64 MB WAL record (a
// non-transactional logical message, larger than wal_buffers, so that its first pages
// are written before it ends) makes the server restart by itself and abandon the
// record: crash recovery writes new WAL from the first page it could not read, flagged
// XLP_FIRST_IS_OVERWRITE_CONTRECORD (xlog.c: CreateOverwriteContrecordRecord). With
// the sidecar streaming and a hot standby fed by walship restore --live throughout:
// the spool gets past it byte-identical to the primary's WAL, walship verify passes,
// the standby is handed the partial that holds the page and shows a commit made after
// it, and a failover (drain, promote with that partial) loses no acknowledged commit.
func TestOverwrittenContrecord(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	r := streamingRig(t, ctx, 16)
	require.NoError(t, r.primary.Own(r.spool))
	createLoadTable(t, ctx, r.primary)
	r.restoreArgs = []string{"--live"}
	sb := r.standby(ctx, false)
	id, ok, err := spool.ReadIdentity(r.spool)
	require.NoError(t, err)
	require.True(t, ok)
	st := id.Stream()

	over := abandonRecord(t, ctx, r.primary, st)
	t.Logf("crash recovery overwrote the abandoned record's continuation at %s", over)

	// A commit after it reaches the spool, and the hot standby through a live hand-out
	// of the partial that holds the overwrite page (a whole segment would take 16 MB).
	require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) VALUES (-2, 'after the overwrite')"))
	flush := flushLSN(t, ctx, r.primary)
	require.Equal(t, uint64(over)/id.SegSize, uint64(flush)/id.SegSize, "the commit is in the overwrite page's segment")
	r.waitSpoolAt(ctx, flush)
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the standby to show the commit after the overwrite", func() (bool, error) {
		n, err := sb.QueryString(ctx, "SELECT count(*) FROM "+lab.LoadTable+" WHERE client = -2")
		return err == nil && n == "1", nil
	}))
	require.NotContains(t, sb.Log(), "refus", "no hand-out was refused")

	// The primary's archive_command is no witness here: a segment the killed backend
	// finished writing but had not yet marked ready is archived only once a checkpoint
	// removes it (XLogArchiveCheckDone). pg_wal is: the replication slot keeps it.
	segs := identicalToPGWAL(t, r, id)
	require.GreaterOrEqual(t, segs, 3, "the segments of the abandoned record and after it")
	out, err := exec.CommandContext(ctx, walshipBin, "verify", "--spool", copySpool(t, r.spool)).CombinedOutput()
	require.NoError(t, err, "walship verify:\n%s", out)
	t.Logf("%d segments identical to the primary's pg_wal; walship verify:\n%s", segs, out)

	crashAndPromote(t, ctx, r, sb, []string{"--dsn", sb.DSN()}, crash{})
}

// abandonRecord kills the backend that writes a 64 MB logical message once the server
// has written part of it, waits for the server to restart by itself, and returns the
// page crash recovery flagged XLP_FIRST_IS_OVERWRITE_CONTRECORD.
func abandonRecord(t *testing.T, ctx context.Context, c *lab.Cluster, st wal.Stream) wal.LSN {
	t.Helper()
	conn, err := c.Connect(ctx)
	require.NoError(t, err)
	var pid int
	require.NoError(t, conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid))
	start := flushLSN(t, ctx, c)
	// Past a segment boundary and a little more, so that the new WAL after the
	// overwrite has most of a segment before it.
	kill := wal.LSN((uint64(start)/st.SegSize+1)*st.SegSize) + 1<<20
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, "SELECT pg_logical_emit_message(false, 'walship', repeat('x', 64 << 20))")
		done <- err
	}()
	poll, err := c.Connect(ctx)
	require.NoError(t, err)
	for {
		var written wal.LSN
		require.NoError(t, poll.QueryRow(ctx, "SELECT pg_current_wal_lsn()").Scan(&written))
		if written >= kill {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("the 64 MB message was written whole before the kill: %v", err)
		default:
		}
	}
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	require.Error(t, <-done, "the backend was killed: its statement fails")
	poll.Close(context.Background())
	conn.Close(context.Background())
	require.NoError(t, lab.Wait(ctx, 50*time.Millisecond, "the server to restart after the crash", func() (bool, error) {
		_, err := c.QueryString(ctx, "SELECT 1")
		return err == nil, nil
	}))
	// Find the flagged page in pg_wal, from the message's start on.
	end := flushLSN(t, ctx, c)
	bs := wal.LSN(st.BlockSize)
	for page := start / bs * bs; page < end; page += bs {
		seg, off := wal.SegmentOf(1, page, st.SegSize)
		f, err := os.Open(filepath.Join(c.Data, "pg_wal", seg.Name(st.SegSize)))
		require.NoError(t, err)
		h := make([]byte, wal.LongHeaderSize)
		_, err = f.ReadAt(h, int64(off))
		_ = f.Close() // read only
		require.NoError(t, err)
		ph, err := wal.ParsePageHeader(h)
		require.NoError(t, err)
		if ph.PageAddr == page && ph.Info&wal.FlagOverwriteContRec != 0 {
			return page
		}
	}
	t.Fatalf("no page between %s and %s is flagged XLP_FIRST_IS_OVERWRITE_CONTRECORD; server log:\n%s", start, end, c.Log())
	return 0
}

// identicalToPGWAL compares each published segment of the spool with the primary's
// pg_wal file of the same name, where pg_wal still has it, and returns how many it
// compared.
func identicalToPGWAL(t *testing.T, r *rig, id spool.Identity) int {
	t.Helper()
	_, c := spoolPosition(t, r.spool)
	n := 0
	for _, seg := range c.Segments {
		name := seg.Name(id.SegSize)
		want, err := os.ReadFile(filepath.Join(r.primary.Data, "pg_wal", name))
		if errors.Is(err, os.ErrNotExist) {
			continue // removed or recycled since
		}
		require.NoError(t, err)
		got, err := os.ReadFile(filepath.Join(r.spool, name))
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got), "segment %s differs from the primary's", name)
		n++
	}
	return n
}
