package wal_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

// pgWAL is WAL captured from a real cluster: the bytes of a run of segments.
type pgWAL struct {
	stream     wal.Stream
	tli        uint32
	first      wal.Segment // the first segment held
	data       []byte      // the segments' bytes, from first on, the last one whole as on disk
	flush      wal.LSN
	dir        string // a copy of the segments, for pg_waldump
	waldumpBin string
}

var lsnRE = regexp.MustCompile(`lsn: ([0-9A-F]+/[0-9A-F]+), prev ([0-9A-F]+/[0-9A-F]+)`)

// capture runs a load with records that cross pages and segments, a pg_switch_wal(),
// and checkpoints that make PostgreSQL recycle old segments as future ones, then copies
// the segments from the one holding start to the one holding the flush position.
func capture(t *testing.T) *pgWAL {
	t.Helper()
	needPrograms(t, "pg_waldump")
	captureOnce.Do(func() { captured = captureWAL(t) })
	if captured == nil {
		t.Fatal("capturing WAL failed in an earlier test")
	}
	return captured
}

var (
	captureOnce sync.Once
	captured    *pgWAL
)

func captureWAL(t *testing.T) *pgWAL {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := lab.NewCluster(ctx, lab.Options{SegSizeMB: 1, Settings: map[string]string{"min_wal_size": "32MB", "max_wal_size": "64MB"}})
	require.NoError(t, err)
	defer func() { assert.NoError(t, c.Close(), "stop the cluster and remove its files") }()
	require.NoError(t, c.Start(ctx))
	conn, err := c.Connect(ctx)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	exec1 := func(sql string) {
		t.Helper()
		_, err := conn.Exec(ctx, sql)
		require.NoError(t, err, sql)
	}
	// Fill and recycle: after these checkpoints the segments ahead are renamed old ones.
	exec1("CREATE TABLE big (id int, pad text)")
	for i := 0; i < 3; i++ {
		exec1("INSERT INTO big SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 20000) g")
		exec1("CHECKPOINT")
	}
	var startText string
	require.NoError(t, conn.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&startText))
	start, err := wal.ParseLSN(startText)
	require.NoError(t, err)
	// Large records (full-page images after the checkpoint, wide rows) cross pages; the
	// volume crosses segments; the switch ends one early.
	exec1("UPDATE big SET pad = pad || 'x' WHERE id % 7 = 0")
	exec1("INSERT INTO big SELECT g, repeat(md5(g::text), 200) FROM generate_series(1, 500) g")
	exec1("SELECT pg_switch_wal()")
	exec1("INSERT INTO big SELECT g, 'small' FROM generate_series(1, 3000) g")
	exec1("INSERT INTO big SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 700) g") // ~22 kB, one record
	var flushText string
	require.NoError(t, conn.QueryRow(ctx, "SELECT pg_current_wal_flush_lsn()::text").Scan(&flushText))
	flush, err := wal.ParseLSN(flushText)
	require.NoError(t, err)

	dir, err := os.MkdirTemp("", "walship-waldump-")
	require.NoError(t, err)
	w := &pgWAL{tli: 1, flush: flush, dir: dir, waldumpBin: filepath.Join(c.BinDir, "pg_waldump")}
	var sysid uint64
	require.NoError(t, conn.QueryRow(ctx, "SELECT system_identifier FROM pg_control_system()").Scan(&sysid))
	w.stream = wal.Stream{SysID: sysid, SegSize: 1 << 20, BlockSize: 8192, Magic: wal.Magics[15]}
	var v string
	require.NoError(t, conn.QueryRow(ctx, "SHOW server_version_num").Scan(&v))
	n, _ := strconv.Atoi(v)
	w.stream.Magic, err = wal.MagicFor(n)
	require.NoError(t, err)
	w.first, _ = wal.SegmentOf(1, start, 1<<20)
	last, _ := wal.SegmentOf(1, flush, 1<<20)
	for s := w.first; s.No <= last.No; s.No++ {
		b, err := os.ReadFile(filepath.Join(c.Data, "pg_wal", s.Name(1<<20)))
		require.NoError(t, err)
		w.data = append(w.data, b...)
		require.NoError(t, os.WriteFile(filepath.Join(w.dir, s.Name(1<<20)), b, 0o644))
	}
	return w
}

// waldump runs pg_waldump over [from, to) and returns the records' start and prev.
func (w *pgWAL) waldump(t *testing.T, from, to wal.LSN) (starts, prevs []wal.LSN) {
	t.Helper()
	out, err := exec.Command(w.waldumpBin, "-p", w.dir, "-s", from.String(), "-e", to.String()).CombinedOutput()
	// pg_waldump exits non-zero when it reaches invalid bytes before -e; the records
	// before that are printed all the same.
	if err != nil && !strings.Contains(string(out), "error in WAL record") && !strings.Contains(string(out), "invalid record length") {
		require.NoError(t, err, "%s", out)
	}
	for _, m := range lsnRE.FindAllStringSubmatch(string(out), -1) {
		s, err := wal.ParseLSN(m[1])
		require.NoError(t, err)
		p, err := wal.ParseLSN(m[2])
		require.NoError(t, err)
		starts, prevs = append(starts, s), append(prevs, p)
	}
	return starts, prevs
}

func TestReaderAgainstWaldump(t *testing.T) {
	w := capture(t)
	src := wal.Bytes{Base: w.first.Start(1 << 20), Data: w.data}
	starts, prevs := w.waldump(t, w.first.Start(1<<20)+wal.LongHeaderSize, w.flush)
	require.Greater(t, len(starts), 1000, "pg_waldump found too few records to mean anything")

	// From the segment start, with pg_waldump's first record and prev.
	r := wal.NewReader(w.stream, 1, src, w.first.Start(1<<20), 0)
	var crossing, switches int
	for i, want := range starts {
		rec, err := r.Next()
		require.NoError(t, err, "record %d at %s", i, want)
		require.Equal(t, want, rec.LSN, "record %d", i)
		if i > 0 {
			require.Equal(t, prevs[i], rec.Prev)
		}
		if uint64(rec.LSN)/8192 != uint64(rec.End-1)/8192 {
			crossing++
		}
		if rec.IsSwitch() {
			switches++
		}
	}
	_, err := r.Next()
	var end *wal.EndError
	require.ErrorAs(t, err, &end, "after the last record pg_waldump shows, the reader must stop")
	require.Equal(t, w.flush, r.Pos(), "the end of valid WAL is the flush position (%s)", end.Reason)
	require.Greater(t, crossing, 10, "records crossing a page")
	require.Equal(t, 1, switches)
	t.Logf("%d records agree with pg_waldump; %d cross a page; end of valid wal %s (%s)", len(starts), crossing, r.Pos(), end.Reason)

	// A recycled segment: PostgreSQL renames an old segment to become a future one, so
	// past the flush position the file holds the old segment's pages at the same offsets.
	// Build exactly that from the captured WAL and check the cut is at the flush position.
	lastStart := len(w.data) - 1<<20
	off := int(uint64(w.flush) % (1 << 20))
	recycled := append([]byte(nil), w.data...)
	copy(recycled[lastStart+off:], w.data[off:1<<20]) // the first segment's bytes, as an old file would hold
	require.False(t, bytes.Equal(recycled[lastStart+off:], make([]byte, 1<<20-off)), "the stale tail must not be zeros")
	end2, _, stop, err := wal.ValidEnd(w.stream, 1, wal.Bytes{Base: w.first.Start(1 << 20), Data: recycled}, w.first.Start(1<<20), 0)
	require.NoError(t, err)
	require.Equal(t, w.flush, end2, "a recycled file's stale tail must not count as valid WAL (stopped: %v)", stop)
	t.Logf("recycled tail cut at %s: %s", end2, stop.Reason)
}

// TestRecordAtOrBefore checks the restart point the drain uses: from any position,
// the record found is one pg_waldump shows, at or before the position, and reading on
// from it passes through every record after it to the end of valid WAL.
func TestRecordAtOrBefore(t *testing.T) {
	w := capture(t)
	base := w.first.Start(1 << 20)
	src := wal.Bytes{Base: base, Data: w.data}
	starts, _ := w.waldump(t, base+wal.LongHeaderSize, w.flush)
	isStart := map[wal.LSN]bool{}
	for _, s := range starts {
		isStart[s] = true
	}
	for i := 0; i < 400; i++ {
		lsn := starts[0] + wal.LSN((uint64(i)*7_919_113)%uint64(w.flush-starts[0]))
		if page := (lsn - base) / 8192 * 8192; bytes.Equal(w.data[page:page+4], []byte{0, 0, 0, 0}) {
			continue // the unwritten rest of the switched segment
		}
		at, err := wal.RecordAtOrBefore(w.stream, 1, src, lsn, base)
		require.NoError(t, err, "from %s", lsn)
		require.LessOrEqual(t, at, lsn)
		require.True(t, isStart[at], "%s (found from %s) is not a record pg_waldump shows", at, lsn)
		next := sort.Search(len(starts), func(i int) bool { return starts[i] > lsn })
		require.Less(t, uint64(lsn-at), uint64(1<<20), "walked back too far")
		if next < len(starts) {
			require.True(t, next == 0 || starts[next-1] >= at, "a record starts between %s and %s", at, lsn)
		}
		end, _, _, err := wal.ValidEnd(w.stream, 1, src, at, 0)
		require.NoError(t, err)
		require.Equal(t, w.flush, end, "reading on from %s", at)
	}
	_, err := wal.RecordAtOrBefore(w.stream, 1, src, base+2*8192+100, base+3*8192)
	require.ErrorContains(t, err, "no record starts")
}

// TestReaderCorruption damages real WAL: a flipped bit in any byte of a record, or in
// the magic or xlp_pageaddr of a page, makes the reader stop at or before that record,
// and it never panics.
func TestReaderCorruption(t *testing.T) {
	w := capture(t)
	base := w.first.Start(1 << 20)
	var recs []wal.Record
	r := wal.NewReader(w.stream, 1, wal.Bytes{Base: base, Data: w.data}, base, 0)
	for {
		rec, err := r.Next()
		if err != nil {
			break
		}
		recs = append(recs, rec)
	}
	require.Greater(t, len(recs), 1000)
	// check reads from a few records before the damage (with their xl_prev), which is
	// what the reader would have validated on its way there anyway.
	check := func(t *testing.T, data []byte, at wal.LSN, what string) {
		j := sort.Search(len(recs), func(i int) bool { return recs[i].LSN >= at })
		start, prev := base, wal.LSN(0)
		if j > 6 {
			start, prev = recs[j-5].LSN, recs[j-6].LSN
		}
		r := wal.NewReader(w.stream, 1, wal.Bytes{Base: base, Data: data}, start, prev)
		for {
			rec, err := r.Next()
			if err != nil {
				require.True(t, errors.Is(err, wal.ErrInvalidRecord) || errors.Is(err, wal.ErrPage) || errors.Is(err, io.EOF), "%s: %v", what, err)
				return
			}
			require.Less(t, rec.LSN, at, "%s: the record at %s, at or past the damage, was called valid", what, rec.LSN)
		}
	}
	for i := 0; i < 300; i++ {
		rec := recs[(i*7919)%len(recs)]
		k := (i * 131) % int(min(rec.TotLen, uint32(8192-uint64(rec.LSN)%8192)))
		data := append([]byte(nil), w.data...)
		data[int(rec.LSN-base)+k] ^= byte(1 << (i % 8))
		check(t, data, rec.LSN, fmt.Sprintf("bit %d of byte %d of the record at %s", i%8, k, rec.LSN))
	}
	for i := 0; i < 50; i++ {
		page := (i * 37 % (len(w.data) / 8192)) * 8192
		field := []int{0, 1, 8, 9, 10, 11}[i%6] // xlp_magic, xlp_pageaddr
		data := append([]byte(nil), w.data...)
		data[page+field] ^= 0x10
		check(t, data, base+wal.LSN(page), fmt.Sprintf("byte %d of the header of the page at %s", field, base+wal.LSN(page)))
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if captured != nil {
		if err := os.RemoveAll(captured.dir); err != nil {
			fmt.Fprintf(os.Stderr, "remove the captured WAL: %v\n", err)
		}
	}
	os.Exit(code)
}

// needPrograms skips the test when the lab's PostgreSQL build lacks one of names.
func needPrograms(t *testing.T, names ...string) {
	t.Helper()
	bin, err := lab.BinDir()
	require.NoError(t, err)
	if missing := lab.Missing(bin, names...); len(missing) > 0 {
		t.Skipf("the PostgreSQL build in %s has no %v (a build of the server alone), which this test compares with", bin, missing)
	}
}
