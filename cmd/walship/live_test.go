package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// seenAfter commits a row on the primary and returns how long after the commit
// returned the standby showed it.
func seenAfter(t *testing.T, ctx context.Context, primary *lab.Cluster, standby *pgx.Conn) time.Duration {
	t.Helper()
	var id int64
	conn, err := primary.Connect(ctx)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	require.NoError(t, conn.QueryRow(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) VALUES (-5, 'probe') RETURNING id").Scan(&id))
	committed := time.Now()
	require.NoError(t, lab.Wait(ctx, 2*time.Millisecond, "the standby to show row "+strconv.FormatInt(id, 10), func() (bool, error) {
		var n int
		err := standby.QueryRow(ctx, "SELECT count(*) FROM "+lab.LoadTable+" WHERE id = $1", id).Scan(&n)
		return n == 1, err
	}))
	return time.Since(committed)
}

var (
	handOut  = regexp.MustCompile(`restored the partial segment being received.*`)
	notGrown = regexp.MustCompile(`has not grown past the \d+ bytes handed last`)
	fieldRe  = regexp.MustCompile(`(\w+)=(\S+)`)
)

// handOuts reads a standby's server log for walship restore --live's hand-outs: for
// each segment, the sizes handed in order; and how many requests found the partial
// not grown.
func handOuts(log string) (sizes map[string][]int, notGrownCount int) {
	sizes = map[string][]int{}
	for _, line := range strings.Split(log, "\n") {
		if notGrown.MatchString(line) {
			notGrownCount++
		}
		m := handOut.FindString(line)
		if m == "" {
			continue
		}
		fields := map[string]string{}
		for _, f := range fieldRe.FindAllStringSubmatch(m, -1) {
			fields[f[1]] = f[2]
		}
		n, _ := strconv.Atoi(fields["bytes"])
		sizes[fields["file"]] = append(sizes[fields["file"]], n)
	}
	return sizes, notGrownCount
}

// TestLiveStandby: a hot standby fed by walship restore --live shows a commit within a
// second of it, stays close behind under load, is never handed a partial that has not
// grown, replays no torn record, keeps its place across a restart, and fails over
// losing nothing. The hand-out's refusals (archive recovery, archive_mode = always, a
// damaged partial) are checked against a crafted spool.
func TestLiveStandby(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	r := streamingRig(t, ctx, 1)
	// The standby's user records its hand-outs in the spool, as the receiver's user
	// (the same, in deploy/) would.
	require.NoError(t, r.primary.Own(r.spool))
	createLoadTable(t, ctx, r.primary)
	r.restoreArgs = []string{"--live", "--log-level", "debug"}
	sb := r.standby(ctx, false)
	var conn *pgx.Conn
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the hot standby to accept connections", func() (bool, error) {
		var err error
		conn, err = sb.Connect(ctx)
		return err == nil, nil
	}))
	defer func() { conn.Close(context.Background()) }()

	// Quiet: a commit shows within a second (wal_retrieve_retry_interval is 100ms).
	d := seenAfter(t, ctx, r.primary, conn)
	t.Logf("a commit on a quiet primary showed on the standby after %s", d)
	require.Less(t, d, time.Second)

	// Under load: each probe shows within a few retry intervals.
	load, err := lab.StartLoad(ctx, r.primary.DSN(), 1, 100)
	require.NoError(t, err)
	var delays []time.Duration
	for range 10 {
		delays = append(delays, seenAfter(t, ctx, r.primary, conn))
	}
	require.NoError(t, load.Stop())
	slices.Sort(delays)
	t.Logf("under load (%d commits), probes showed on the standby after %v", load.Count(), delays)
	require.Less(t, delays[len(delays)/2], time.Second, "median")
	require.Less(t, delays[len(delays)-1], 3*time.Second, "max")

	// Caught up and quiet: further requests find the partial not grown and copy
	// nothing; no size is ever handed twice to this postmaster.
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the standby to replay all the primary flushed", func() (bool, error) {
		var replayed wal.LSN
		err := conn.QueryRow(ctx, "SELECT pg_last_wal_replay_lsn()").Scan(&replayed)
		return err == nil && replayed >= flushLSN(t, ctx, r.primary), err
	}))
	_, before := handOuts(sb.Log())
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "five requests answered: not grown", func() (bool, error) {
		_, n := handOuts(sb.Log())
		return n >= before+5, nil
	}))
	sizes, _ := handOuts(sb.Log())
	require.NotEmpty(t, sizes, "partials were handed out")
	for seg, s := range sizes {
		require.True(t, slices.IsSorted(s) && len(slices.Compact(slices.Clone(s))) == len(s), "%s handed with sizes %v: each larger than the last", seg, s)
	}
	st := status(t, "--spool", r.spool, "--dsn", r.primary.DSN(), "--standby-dsn", sb.DSN())
	require.Len(t, st.Live, 1, "%+v", st.Live)
	require.Equal(t, sb.Data, st.Live[0].PGData)
	require.NotEmpty(t, st.StandbyReplay)
	require.NotNil(t, st.StandbyBehind)
	require.Less(t, *st.StandbyBehind, uint64(1<<20), "caught up but for what the primary wrote since")
	require.NotEmpty(t, st.StandbyLastCommit)
	require.Regexp(t, `standby +replayed to [0-9A-F]+/[0-9A-F]+, \d+ bytes behind the spool; last replayed commit of `, runOK(t, "status", "--spool", r.spool, "--standby-dsn", sb.DSN()))

	// Restarted with the primary quiet, the standby shows the last commit again.
	var last int64
	require.NoError(t, conn.QueryRow(ctx, "SELECT max(id) FROM "+lab.LoadTable).Scan(&last))
	conn.Close(context.Background())
	require.NoError(t, sb.Stop(ctx))
	require.NoError(t, sb.Start(ctx))
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the restarted standby to show the last commit", func() (bool, error) {
		c, err := sb.Connect(ctx)
		if err != nil {
			return false, nil
		}
		conn = c
		var n int
		err = conn.QueryRow(ctx, "SELECT count(*) FROM "+lab.LoadTable+" WHERE id = $1", last).Scan(&n)
		return n == 1, err
	}))

	t.Run("hand-outs", func(t *testing.T) { liveHandOuts(t, ctx, r, sb) })

	// Failover after live feeding: nothing acknowledged is lost.
	crashAndPromote(t, ctx, r, sb, []string{"--dsn", sb.DSN()}, crash{})
	st = status(t, "--spool", r.spool, "--standby-dsn", sb.DSN())
	require.Contains(t, st.StandbyError, "not in recovery")
	require.Empty(t, st.StandbyReplay)
}

// liveHandOuts checks walship restore --live against a crafted spool holding a
// published segment's first bytes as its partial, for the running standby sb.
func liveHandOuts(t *testing.T, ctx context.Context, r *rig, sb *lab.Cluster) {
	seg, b, rec := recordToTear(t, r.spool)
	name := seg.Name(1 << 20)
	craft := func(data []byte) string {
		dir := t.TempDir()
		id, err := os.ReadFile(filepath.Join(r.spool, spool.IdentityFile))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, spool.IdentityFile), id, 0o644))
		grow(t, dir, seg, data)
		return dir
	}
	// The partial ends inside the 20th record: it is handed whole, replayable to the
	// record's start.
	torn := int(uint64(rec.LSN)-uint64(seg.Start(1<<20))) + int(rec.TotLen)/2
	dir := craft(b[:torn])
	target := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	live := func(dir, pgdata string, extra ...string) restoreRun {
		return restoreCmd(t, ctx, append(append([]string{"--live", "--spool", dir, "--pgdata", pgdata}, extra...), name, target)...)
	}
	absent := func() {
		_, err := os.Stat(target)
		require.ErrorIs(t, err, os.ErrNotExist, "nothing may reach %%p")
	}
	res := live(dir, sb.Data)
	require.Equal(t, 0, res.code, res.stderr)
	got, err := os.ReadFile(target)
	require.NoError(t, err)
	require.Len(t, got, 1<<20)
	require.True(t, bytes.Equal(b[:torn], got[:torn]))
	require.True(t, bytes.Count(got[torn:], []byte{0}) == len(got)-torn, "zero-padded")
	require.Contains(t, res.stderr, "replayable="+rec.LSN.String())
	rs, ok, err := spool.ReadLive(dir, sb.Data)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, spool.LiveState{PGData: sb.Data, Postmaster: rs.Postmaster, Segment: name, Bytes: uint64(torn), End: rec.LSN.String(), At: rs.At, ArchiveMode: "off"}, rs)
	require.NotEmpty(t, rs.Postmaster)
	require.NoError(t, os.Remove(target))

	// Not grown: not available, nothing copied. Grown: handed again.
	res = live(dir, sb.Data)
	require.Equal(t, 1, res.code, res.stderr)
	absent()
	grow(t, dir, seg, b[:torn+5000])
	res = live(dir, sb.Data)
	require.Equal(t, 0, res.code, res.stderr)
	require.NoError(t, os.Remove(target))

	// A flipped byte in the header of the record before the torn one (its xl_xid): its
	// CRC fails, the partial is corrupt (3), and nothing is handed.
	bad := slices.Clone(b[:torn])
	bad[rec.Prev-seg.Start(1<<20)+4] ^= 0xff
	res = live(craft(bad), sb.Data)
	require.Equal(t, 3, res.code, res.stderr)
	require.Contains(t, res.stderr, "corrupt")
	absent()

	// Archive recovery (no standby.signal; the primary's own directory serves): whole
	// segments only.
	res = live(craft(b[:torn]), r.primary.Data)
	require.Equal(t, 1, res.code, res.stderr)
	require.Contains(t, res.stderr, "not in standby mode")
	absent()

	// A configuration with archive_mode = always (the running standby, which reads it
	// only at a restart, is not restarted): whole segments only, said once per
	// postmaster.
	require.NoError(t, sb.Configure(map[string]string{"archive_mode": "always"}))
	always := craft(b[:torn])
	res = live(always, sb.Data)
	require.Equal(t, 1, res.code, res.stderr)
	require.Contains(t, res.stderr, "archive_mode = always")
	absent()
	res = live(always, sb.Data)
	require.Equal(t, 1, res.code, res.stderr)
	require.NotContains(t, res.stderr, "archive_mode", "said once")
	absent()
	require.NoError(t, sb.Configure(map[string]string{"archive_mode": "off"}))

	res = live(dir, sb.Data, "--wait")
	require.Equal(t, 2, res.code, res.stderr)
	require.Contains(t, res.stderr, "give one")
	absent()
}

// recordToTear finds, in the spool's newest published segment that has one, a record
// that starts at least 4 kB into it, is at least 64 bytes long and follows a record of
// the same segment (liveHandOuts damages that one): the segment, its bytes and the
// record.
func recordToTear(t *testing.T, dir string) (wal.Segment, []byte, wal.Record) {
	t.Helper()
	id, _, err := spool.ReadIdentity(dir)
	require.NoError(t, err)
	_, c := spoolPosition(t, dir)
	for i := len(c.Segments) - 1; i >= 0; i-- {
		seg := c.Segments[i]
		b, err := os.ReadFile(spool.SegmentPath(dir, seg, id.SegSize))
		require.NoError(t, err)
		start := seg.Start(id.SegSize)
		rd := wal.NewReader(id.Stream(), seg.TLI, wal.Bytes{Base: start, Data: b}, start, 0)
		for {
			rec, err := rd.Next()
			if err != nil {
				break
			}
			if rec.LSN >= start+4096 && rec.TotLen >= 64 && rec.End <= start+wal.LSN(len(b)) && rec.Prev >= start {
				return seg, b, rec
			}
		}
	}
	require.Fail(t, "no record to tear in the spool's published segments")
	return wal.Segment{}, nil, wal.Record{}
}

// grow writes data as the partial of seg in the spool dir, durable, as a receiver
// would have received it.
func grow(t *testing.T, dir string, seg wal.Segment, data []byte) {
	t.Helper()
	end, err := spool.PartialEnd(spool.PartialPath(dir, seg, 1<<20), 1<<20)
	if os.IsNotExist(err) {
		end, err = 0, nil
	}
	require.NoError(t, err)
	w := spool.NewWriter(dir, 1<<20)
	defer w.Wait()
	defer func() { assert.NoError(t, w.Close()) }()
	require.NoError(t, w.Use(seg, true))
	require.NoError(t, w.WriteAt(end, data[end:]))
	require.NoError(t, w.Sync())
}
