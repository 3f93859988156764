package spool

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/tail/wal"
)

var testID = Identity{SysID: 7311111111111111111, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110, ServerVersion: 150018}

// pages returns n pages of seg with headers as the server writes them.
func pages(seg wal.Segment, n int) []byte {
	st := testID.Stream()
	b := make([]byte, n*int(st.BlockSize))
	for p := 0; p < n; p++ {
		h := b[p*int(st.BlockSize):]
		binary.LittleEndian.PutUint16(h[0:], st.Magic)
		binary.LittleEndian.PutUint32(h[4:], seg.TLI)
		binary.LittleEndian.PutUint64(h[8:], uint64(seg.Start(st.SegSize))+uint64(p)*st.BlockSize)
		if p == 0 {
			binary.LittleEndian.PutUint16(h[2:], wal.FlagLongHeader)
			binary.LittleEndian.PutUint64(h[24:], st.SysID)
			binary.LittleEndian.PutUint32(h[32:], uint32(st.SegSize))
			binary.LittleEndian.PutUint32(h[36:], uint32(st.BlockSize))
		}
	}
	return b
}

// sample returns real WAL: segment 000000010000000000000008 of the PostgreSQL 15
// sample in tail/wal/testdata/pg15 (see its README.md), whole, and the identity of the
// cluster that wrote it. Its first page continues a record from the segment before; its
// last whole record ends at 0/8FE0F0, and the record after it runs on into the next
// segment. Recovery checks records, which synthetic pages (pages) do not hold.
func sample(t testing.TB) (Identity, wal.Segment, []byte) {
	t.Helper()
	const dir = "../../tail/wal/testdata/pg15"
	meta, err := os.ReadFile(filepath.Join(dir, "sample.json"))
	require.NoError(t, err)
	var m struct {
		VersionNum uint32 `json:"server_version_num"`
		SysID      uint64 `json:"system_identifier,string"`
		SegSize    uint64 `json:"wal_segment_size"`
	}
	require.NoError(t, json.Unmarshal(meta, &m))
	magic, err := wal.MagicFor(int(m.VersionNum))
	require.NoError(t, err)
	id := Identity{SysID: m.SysID, SegSize: m.SegSize, BlockSize: 8192, Magic: magic, ServerVersion: m.VersionNum}
	const name = "000000010000000000000008"
	seg, err := wal.ParseSegmentName(name, id.SegSize)
	require.NoError(t, err)
	f, err := os.Open(filepath.Join(dir, name+".gz"))
	require.NoError(t, err)
	defer func() { require.NoError(t, f.Close()) }()
	zr, err := gzip.NewReader(f)
	require.NoError(t, err)
	b, err := io.ReadAll(zr)
	require.NoError(t, err)
	require.Len(t, b, int(id.SegSize))
	return id, seg, b
}

func TestBind(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, Bind(dir, testID))
	require.NoError(t, Bind(dir, testID), "binding again to the same cluster")
	before, err := os.ReadFile(filepath.Join(dir, IdentityFile))
	require.NoError(t, err)
	for name, other := range map[string]Identity{
		"system identifier": {SysID: 1, SegSize: testID.SegSize, BlockSize: testID.BlockSize, Magic: testID.Magic},
		"segment size":      {SysID: testID.SysID, SegSize: 2 << 20, BlockSize: testID.BlockSize, Magic: testID.Magic},
		"major version":     {SysID: testID.SysID, SegSize: testID.SegSize, BlockSize: testID.BlockSize, Magic: 0xD113},
	} {
		err := Bind(dir, other)
		require.ErrorIs(t, err, ErrWrongCluster, name)
		require.ErrorContains(t, err, dir, name)
	}
	after, err := os.ReadFile(filepath.Join(dir, IdentityFile))
	require.NoError(t, err)
	require.Equal(t, before, after, "a refused bind changes nothing")
	id, ok, err := ReadIdentity(dir)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, testID, id)

	require.NoError(t, os.WriteFile(filepath.Join(dir, IdentityFile), []byte(`{"system_identifier":"7"`), 0o644))
	_, _, err = ReadIdentity(dir)
	require.ErrorContains(t, err, IdentityFile, "a damaged identity names its file")
}

func TestScan(t *testing.T) {
	seg := func(tli uint32, no uint64) wal.Segment { return wal.Segment{TLI: tli, No: no} }
	name := func(s wal.Segment) string { return s.Name(testID.SegSize) }
	cases := []struct {
		name  string
		files map[string]int // name: size
		err   string
		pos   wal.Position
	}{
		// Partials of the old kind (no end block) count none of their bytes: nothing
		// vouches for them before Recover has checked their records.
		{name: "empty", files: nil},
		{name: "published and partial", files: map[string]int{name(seg(1, 3)): 1 << 20, name(seg(1, 4)) + PartialSuffix: 500, "00000002.history": 40, "junk": 3},
			pos: wal.Position{TLI: 1, LSN: 4 << 20}},
		{name: "newer timeline wins", files: map[string]int{name(seg(1, 4)) + PartialSuffix: 500, name(seg(2, 4)) + PartialSuffix: 8192},
			pos: wal.Position{TLI: 2, LSN: 4 << 20}},
		{name: "published of the wrong size", files: map[string]int{name(seg(1, 3)): 1000}, err: "holds 1000 bytes, want 1048576"},
		{name: "partial longer than a segment", files: map[string]int{name(seg(1, 3)) + PartialSuffix: 1<<20 + 1}, err: "neither a pre-sized partial (1052672) nor at most a 1048576-byte segment"},
		{name: "pre-sized partial with no end slot", files: map[string]int{name(seg(1, 3)): 1 << 20, name(seg(1, 4)) + PartialSuffix: 1<<20 + EndBlockSize},
			pos: wal.Position{TLI: 1, LSN: 4 << 20}},
		{name: "two partials of a timeline", files: map[string]int{name(seg(1, 3)) + PartialSuffix: 1, name(seg(1, 4)) + PartialSuffix: 1}, err: "two partial segments on timeline 1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			for n, size := range c.files {
				require.NoError(t, os.WriteFile(filepath.Join(dir, n), make([]byte, size), 0o644))
			}
			got, err := Scan(dir, testID.SegSize)
			if c.err != "" {
				require.ErrorContains(t, err, c.err)
				return
			}
			require.NoError(t, err)
			pos, ok := got.Position(testID.SegSize)
			require.Equal(t, c.pos != wal.Position{}, ok)
			require.Equal(t, c.pos, pos, "got %s, want %s", pos, c.pos)
		})
	}
}

func TestRecover(t *testing.T) {
	dir := t.TempDir()
	id, seg, b := sample(t)
	st := id.Stream()
	partial := seg
	whole := wal.Segment{TLI: 2, No: seg.No} // pages of timeline 1 may be on timeline 2
	// A partial of the old kind whose last page was never written whole (zeros where a
	// header belongs), a whole partial left by a crash between its publish's sync and
	// its rename, and a leftover temporary file.
	good := append([]byte(nil), b[:3*8192]...)
	require.NoError(t, os.WriteFile(PartialPath(dir, partial, st.SegSize), append(good, make([]byte, 8192)...), 0o644))
	f, err := os.OpenFile(PartialPath(dir, whole, st.SegSize), os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	_, err = f.WriteAt(b, 0)
	require.NoError(t, err)
	require.NoError(t, writeEndBlock(f, st.SegSize, b, 1))
	require.NoError(t, f.Close())
	temp := filepath.Join(dir, durable.TempPrefix+"x")
	require.NoError(t, os.WriteFile(temp, []byte("half"), 0o644))

	c, err := Recover(dir, st, zerolog.Nop())
	require.NoError(t, err)
	require.NoFileExists(t, temp)
	got, err := PartialBytes(PartialPath(dir, partial, st.SegSize), st.SegSize)
	require.NoError(t, err)
	// Cut back before the bad page, to the end of the last whole record: in a file of
	// the old kind, nothing vouches for the bytes of a record not yet whole.
	start := partial.Start(st.SegSize)
	end, _, _, err := wal.ValidEnd(st, partial.TLI, wal.Bytes{Base: start, Data: good}, start, 0)
	require.NoError(t, err)
	require.Equal(t, good[:end-start], got, "the partial is cut back to its last whole record before the bad page")
	info, err := os.Stat(PartialPath(dir, partial, st.SegSize))
	require.NoError(t, err)
	require.Equal(t, int64(st.SegSize+EndBlockSize), info.Size(), "a partial of the old kind is pre-sized")
	c2, err := Recover(dir, st, zerolog.Nop())
	require.NoError(t, err)
	require.Equal(t, c, c2, "a second recovery finds nothing to do")
	require.FileExists(t, SegmentPath(dir, whole, st.SegSize), "the whole partial is published")
	require.NoFileExists(t, PartialPath(dir, whole, st.SegSize))
	require.Equal(t, []wal.Segment{whole}, c.Segments)
	pos, _ := c.Position(st.SegSize)
	require.Equal(t, wal.Position{TLI: 2, LSN: 9 << 20}, pos)
}

func TestWriter(t *testing.T) {
	dir := t.TempDir()
	seg := wal.Segment{TLI: 1, No: 2}
	b := pages(seg, 128)
	w := NewWriter(dir, testID.SegSize)
	defer func() { assert.NoError(t, w.Close()) }()
	require.NoError(t, w.Use(seg, true))
	require.NoError(t, w.WriteAt(0, b[:9000]))
	require.NoError(t, w.Sync())
	require.NoError(t, w.Check(100, b[100:9000]), "a resend of the same bytes")
	other := append([]byte(nil), b[100:200]...)
	other[5] ^= 1
	require.ErrorIs(t, w.Check(100, other), ErrConflict)
	require.ErrorContains(t, w.WriteAt(9001, b[9001:9100]), "the partial holds 9000 bytes", "a write that leaves a hole")
	for at := 9000; at < len(b); at += 8192 { // synced a page at a time: not a bulk stream
		require.NoError(t, w.WriteAt(uint64(at), b[at:min(at+8192, len(b))]))
		if at+8192 < len(b) {
			require.NoError(t, w.Sync())
		}
	}
	require.NoError(t, w.Publish())
	got, err := os.ReadFile(SegmentPath(dir, seg, testID.SegSize))
	require.NoError(t, err)
	require.Equal(t, b, got)
	require.NoFileExists(t, PartialPath(dir, seg, testID.SegSize))
	info, err := os.Stat(SegmentPath(dir, seg, testID.SegSize))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o644), info.Mode().Perm(), "the server's user reads the spool")

	// The segment after it is made from the spare made meanwhile, and a new spare follows.
	w.Wait()
	require.FileExists(t, filepath.Join(dir, spareName))
	next := wal.Segment{TLI: 1, No: 3}
	require.NoError(t, w.Use(next, true))
	w.Wait()
	require.FileExists(t, filepath.Join(dir, spareName))
	c, err := Scan(dir, testID.SegSize)
	require.NoError(t, err)
	require.Equal(t, map[uint32]Partial{1: {Seg: next, Size: 0}}, c.Partials, "the spare is no part of the spool's WAL")

	// A segment written in one sync is a bulk stream's: the next partial takes the spare
	// that is there, and no new spare is made; the one after is a hole, made at once.
	nb := pages(next, 128)
	require.NoError(t, w.WriteAt(0, nb))
	require.NoError(t, w.Publish())
	for no := uint64(4); no <= 5; no++ {
		s := wal.Segment{TLI: 1, No: no}
		require.NoError(t, w.Use(s, true))
		w.Wait()
		require.NoFileExists(t, filepath.Join(dir, spareName))
		require.NoError(t, w.WriteAt(0, pages(s, 128)))
		require.NoError(t, w.Publish())
		got, err := os.ReadFile(SegmentPath(dir, s, testID.SegSize))
		require.NoError(t, err)
		require.Equal(t, pages(s, 128), got)
	}
}

// TestWriterCrash cuts a writer's syncs short in each way a crash of the host can, on
// the file, and checks that the partial's end is the last one made durable, that
// recovery settles there, and that writing goes on from there to a whole segment.
func TestWriterCrash(t *testing.T) {
	id, seg, b := sample(t)
	st := id.Stream()
	// write makes a partial holding two synced groups, [0, 20000) and [20000, 50000), and
	// 10000 bytes written past them but not synced.
	write := func(t *testing.T) (dir, path string) {
		dir = t.TempDir()
		w := NewWriter(dir, st.SegSize)
		require.NoError(t, w.Use(seg, true))
		require.NoError(t, w.WriteAt(0, b[:20000]))
		require.NoError(t, w.Sync())
		require.NoError(t, w.WriteAt(20000, b[20000:50000]))
		require.NoError(t, w.Sync())
		require.NoError(t, w.WriteAt(50000, b[50000:60000]))
		require.NoError(t, w.Close())
		w.Wait()
		return dir, PartialPath(dir, seg, st.SegSize)
	}
	slotOf := func(seq uint64) int64 { return int64(st.SegSize + seq%2*slotSize) }
	cases := []struct {
		name  string
		crash func(t *testing.T, f *os.File) // what the crash left on the disk
		end   uint64
		fell  bool
	}{
		{name: "every sync completed", crash: func(*testing.T, *os.File) {}, end: 50000},
		{name: "the last sync's bytes did not all land", crash: func(t *testing.T, f *os.File) {
			_, err := f.WriteAt(make([]byte, 512), 32768) // a sector of zeros where a page header belongs
			require.NoError(t, err)
		}, end: 20000, fell: true},
		{name: "the last sync's slot is torn", crash: func(t *testing.T, f *os.File) {
			_, err := f.WriteAt([]byte{0xff}, slotOf(2)+20)
			require.NoError(t, err)
		}, end: 20000, fell: true},
		{name: "the last sync's slot never landed", crash: func(t *testing.T, f *os.File) {
			_, err := f.WriteAt(make([]byte, slotSize), slotOf(2))
			require.NoError(t, err)
		}, end: 20000},
		{name: "no sync landed", crash: func(t *testing.T, f *os.File) {
			_, err := f.WriteAt(make([]byte, 2*slotSize), slotOf(0))
			require.NoError(t, err)
		}, end: 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir, path := write(t)
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			require.NoError(t, err)
			c.crash(t, f)
			ps, err := readPartialState(f, st.SegSize)
			require.NoError(t, f.Close())
			require.NoError(t, err)
			require.Equal(t, c.end, ps.end, "the end")
			require.Equal(t, c.fell, ps.fellBack, "fell back to the slot before")

			w := NewWriter(dir, st.SegSize)
			defer func() { assert.NoError(t, w.Close()) }()
			if c.fell {
				require.ErrorContains(t, w.Use(seg, false), "has not been recovered", "a writer refuses a partial that recovery has not settled")
			}
			rc, err := Recover(dir, st, zerolog.Nop())
			require.NoError(t, err)
			require.Equal(t, map[uint32]Partial{1: {Seg: seg, Size: c.end}}, rc.Partials)
			got, err := PartialBytes(path, st.SegSize)
			require.NoError(t, err)
			require.Equal(t, b[:c.end], got)
			// Recovery left two slots that agree: a second look at the file finds the same
			// end, without falling back, and counts it for certain.
			f, err = os.Open(path)
			require.NoError(t, err)
			ps, err = readPartialState(f, st.SegSize)
			require.NoError(t, f.Close())
			require.NoError(t, err)
			require.Equal(t, partialState{end: c.end, certain: c.end, seq: ps.seq}, ps)

			require.NoError(t, w.Use(seg, false))
			if c.end > 0 {
				require.ErrorIs(t, w.Check(0, append([]byte{b[0] ^ 1}, b[1:c.end]...)), ErrConflict, "the bytes held are checked")
			}
			require.NoError(t, w.WriteAt(c.end, b[c.end:]))
			require.NoError(t, w.Publish())
			w.Wait()
			whole, err := os.ReadFile(SegmentPath(dir, seg, st.SegSize))
			require.NoError(t, err)
			require.Equal(t, b, whole)
		})
	}
}

func TestMarks(t *testing.T) {
	dir := t.TempDir()
	_, ok, err := ReadEnd(dir)
	require.NoError(t, err)
	require.False(t, ok)
	pos := wal.Position{TLI: 3, LSN: 0x16B374D848}
	require.NoError(t, WriteEnd(dir, pos))
	m, ok, err := ReadEnd(dir)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, pos, m.Position)
	raw, err := os.ReadFile(filepath.Join(dir, EndFile))
	require.NoError(t, err)
	require.Contains(t, string(raw), `"lsn": "16/B374D848"`, "positions are written as PostgreSQL prints them")
	require.NoError(t, ClearEnd(dir))
	require.NoFileExists(t, filepath.Join(dir, EndFile))
	require.NoError(t, ClearEnd(dir), "clearing no mark")

	// A trigger whose segment name needs escaping in JSON round-trips.
	trig := Trigger{TLI: 1, Segment: `00000001000000000000000"\`, Bytes: 9, Hash: HashTail([]byte("x"))}
	require.NoError(t, Freeze(dir))
	require.NoError(t, WriteTrigger(dir, trig))
	got, ok, err := ReadTrigger(dir)
	require.NoError(t, err)
	require.True(t, ok)
	require.NotEmpty(t, got.At)
	trig.At = got.At
	require.Equal(t, trig, got)
	frozen, err := Frozen(dir)
	require.NoError(t, err)
	require.True(t, frozen)
	require.NoError(t, Unfreeze(dir))
	frozen, err = Frozen(dir)
	require.NoError(t, err)
	require.False(t, frozen)
	_, ok, err = ReadTrigger(dir)
	require.NoError(t, err)
	require.False(t, ok)
}

func TestLocks(t *testing.T) {
	dir := t.TempDir()
	a, err := LockWriter(dir)
	require.NoError(t, err)
	_, err = LockWriter(dir)
	require.ErrorIs(t, err, ErrLocked)
	require.True(t, strings.Contains(err.Error(), "a receiver session or a promotion"), err.Error())
	require.NoError(t, a.Close())
	b, err := LockWriter(dir)
	require.NoError(t, err, "the lock is free once closed")
	require.NoError(t, b.Close())
}

// TestPublishSyncsFirst: a publish makes the segment's bytes durable while the end
// block still says how many are held, and only then cuts the end block off. A truncate
// first could reach the disk before the bytes (any fsync on the file system may commit
// the new size), leaving a file that reads as an old-style partial, whole by its size,
// with zeros where the bytes never landed.
func TestPublishSyncsFirst(t *testing.T) {
	dir := t.TempDir()
	seg := wal.Segment{TLI: 1, No: 2}
	b := pages(seg, 128)
	w := NewWriter(dir, testID.SegSize)
	defer func() { _ = w.Close() }() // closed already, or the test has failed
	require.NoError(t, w.Use(seg, true))
	require.NoError(t, w.WriteAt(0, b[:9000]))
	require.NoError(t, w.Sync())
	require.NoError(t, w.WriteAt(9000, b[9000:]))
	synced := 0
	w.datasync = func(f *os.File) error {
		info, err := f.Stat()
		require.NoError(t, err)
		require.Equal(t, int64(testID.SegSize+EndBlockSize), info.Size(), "the end block is still there")
		st, err := readPartialState(f, testID.SegSize)
		require.NoError(t, err)
		require.Equal(t, testID.SegSize, st.end, "the end slot being synced says the segment is whole")
		synced++
		return fdatasync(f)
	}
	require.NoError(t, w.Publish())
	require.Equal(t, 1, synced, "the bytes and the end slot were fdatasynced before the truncate")
	got, err := os.ReadFile(SegmentPath(dir, seg, testID.SegSize))
	require.NoError(t, err)
	require.Equal(t, b, got)
}

// TestRecoverPowerCut writes the states in which losing power can leave a partial,
// with real WAL, and checks that recovery counts as held only bytes that reached the
// disk: it settles at the end of the last record whose CRC holds, or earlier, and never
// publishes a segment with bytes missing.
func TestRecoverPowerCut(t *testing.T) {
	id, seg, b := sample(t)
	st := id.Stream()
	start := seg.Start(st.SegSize)
	zeroed := func(from, to int) []byte {
		c := append([]byte(nil), b...)
		clear(c[from:to])
		return c
	}
	cases := []struct {
		name    string
		file    []byte // the partial's bytes as the disk holds them
		presize bool   // pre-sized, with end slots vouching for claim (file if nil)
		claim   []byte
		atMost  uint64 // the most that may be held afterwards
		publish bool
	}{
		{name: "a publish's truncate reached the disk, the bytes after the last sync did not",
			file: zeroed(0x40000+4096, len(b)), atMost: 0x40000 + 4096},
		{name: "a publish's truncate reached the disk, the power went before its rename",
			// Publish synced every byte before it truncated: the file is whole and is
			// published. Cutting the record that runs on into the next segment would take
			// the spool back behind what it acknowledged, and the primary may no longer
			// hold those bytes (a slot advanced to the acknowledgement).
			file: b, atMost: st.SegSize, publish: true},
		{name: "a block in the middle never reached the disk",
			file: zeroed(0x60000+4096, 0x60000+8192), atMost: 0x60000 + 4096},
		{name: "the tail of the record running on into the next segment never reached the disk",
			// Only a walship that truncated before it synced could leave this, and it
			// cannot be told from the case above: a record that runs on past the
			// segment has no CRC to check here. It is taken whole, as restore takes a
			// published segment; recovery stops at the record, and walship verify names it.
			file: zeroed(len(b)-4096, len(b)), atMost: st.SegSize, publish: true},
		{name: "a pre-sized partial whose end slots claim bytes that never reached the disk",
			// Counting them cannot happen: a slot's hash is of the bytes it claims, read
			// back from the file, so a slot that landed without its bytes never holds.
			file: zeroed(0x40000+4096, len(b)), presize: true, claim: b[:0x50000], atMost: 0},
		{name: "a publish's sync completed before the power went",
			file: b, presize: true, atMost: st.SegSize, publish: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path := PartialPath(dir, seg, st.SegSize)
			if c.presize {
				f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
				require.NoError(t, err)
				_, err = f.WriteAt(c.file, 0)
				require.NoError(t, err)
				claim := c.claim
				if claim == nil {
					claim = c.file
				}
				require.NoError(t, writeEndBlock(f, st.SegSize, claim, 1))
				require.NoError(t, f.Close())
			} else {
				require.NoError(t, os.WriteFile(path, c.file, 0o644))
			}
			sc, err := Scan(dir, st.SegSize)
			require.NoError(t, err)
			require.LessOrEqual(t, sc.Partials[seg.TLI].Size, c.atMost, "before recovery, Scan counts no more than reached the disk")
			rc, err := Recover(dir, st, zerolog.Nop())
			require.NoError(t, err)
			if c.publish {
				require.Equal(t, []wal.Segment{seg}, rc.Segments)
				got, err := os.ReadFile(SegmentPath(dir, seg, st.SegSize))
				require.NoError(t, err)
				require.True(t, bytes.Equal(c.file, got), "published as it was on the disk")
				return
			}
			require.Empty(t, rc.Segments, "a segment with bytes missing is not published")
			require.NoFileExists(t, SegmentPath(dir, seg, st.SegSize))
			p, ok := rc.Partials[seg.TLI]
			require.True(t, ok)
			require.LessOrEqual(t, p.Size, c.atMost, "held %d bytes, but only %d reached the disk", p.Size, c.atMost)
			got, err := PartialBytes(path, st.SegSize)
			require.NoError(t, err)
			require.Equal(t, b[:p.Size], got, "what is held is what the primary wrote")
			end, _, stop, err := wal.ValidEnd(st, seg.TLI, wal.Bytes{Base: start, Data: got}, start, 0)
			require.NoError(t, err)
			require.Equal(t, start+wal.LSN(p.Size), end, "held bytes end with a whole record (stopped: %s)", stop.Reason)
			if c.atMost > 0 {
				require.Greater(t, p.Size, c.atMost-64<<10, "recovery keeps the records before the damage")
			}
		})
	}
}

// TestRecoverKeepsVouchedRecords: a pre-sized partial's end slot vouches for its bytes
// (the hash is of what reached the disk), so records that do not check in them are
// the ones the sidecar sent, not the mark of a crash. Recovery keeps them: cutting
// would only have them sent again, or lose them with the primary.
func TestRecoverKeepsVouchedRecords(t *testing.T) {
	id, seg, b := sample(t)
	st := id.Stream()
	dir := t.TempDir()
	held := append([]byte(nil), b[:0x50000]...)
	held[0x30000+100] ^= 1 // inside a record, not a page header
	f, err := os.OpenFile(PartialPath(dir, seg, st.SegSize), os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(int64(st.SegSize+EndBlockSize)))
	_, err = f.WriteAt(held, 0)
	require.NoError(t, err)
	require.NoError(t, writeEndBlock(f, st.SegSize, held, 1))
	require.NoError(t, f.Close())

	c, err := Recover(dir, st, zerolog.Nop())
	require.NoError(t, err)
	require.Equal(t, map[uint32]Partial{seg.TLI: {Seg: seg, Size: uint64(len(held))}}, c.Partials)
	got, err := PartialBytes(PartialPath(dir, seg, st.SegSize), st.SegSize)
	require.NoError(t, err)
	require.Equal(t, held, got)
}

// TestWriterSyncFails injects an EIO into an fdatasync. As PostgreSQL has held since
// its fsync fix, a failed fdatasync leaves nothing written since the last good one
// held (the kernel may have dropped the pages it could not write, and reports the
// error once): the writer claims none of those bytes, now or on a retried Sync, and
// every later call fails until the partial is recovered, which settles at the last
// good sync.
func TestWriterSyncFails(t *testing.T) {
	id, seg, b := sample(t)
	st := id.Stream()
	dir := t.TempDir()
	path := PartialPath(dir, seg, st.SegSize)
	w := NewWriter(dir, st.SegSize)
	defer w.Wait()
	defer func() { _ = w.Close() }() // closed already, or the test has failed
	require.NoError(t, w.Use(seg, true))
	require.NoError(t, w.WriteAt(0, b[:20000]))
	require.NoError(t, w.Sync())
	require.NoError(t, w.WriteAt(20000, b[20000:50000]))
	fail := true
	w.datasync = func(f *os.File) error {
		if fail {
			fail = false
			return fmt.Errorf("fdatasync %s: %w", f.Name(), unix.EIO)
		}
		return fdatasync(f)
	}
	require.ErrorIs(t, w.Sync(), unix.EIO)

	end, err := PartialEnd(path, st.SegSize)
	require.NoError(t, err)
	require.Equal(t, uint64(20000), end, "the bytes since the last good sync are not held")
	require.ErrorIs(t, w.Sync(), unix.EIO, "a retried sync does not succeed")
	end, err = PartialEnd(path, st.SegSize)
	require.NoError(t, err)
	require.Equal(t, uint64(20000), end, "nor does a retried sync claim them")
	require.ErrorIs(t, w.WriteAt(50000, b[50000:60000]), unix.EIO)
	require.ErrorIs(t, w.Check(0, b[:100]), unix.EIO)
	require.ErrorIs(t, w.Publish(), unix.EIO)
	require.ErrorIs(t, w.Use(wal.Segment{TLI: seg.TLI, No: seg.No + 1}, true), unix.EIO)
	require.True(t, w.Dirty(), "what was written is not durable")
	require.NoError(t, w.Close())

	c, err := Recover(dir, st, zerolog.Nop())
	require.NoError(t, err)
	require.Equal(t, map[uint32]Partial{seg.TLI: {Seg: seg, Size: 20000}}, c.Partials)
	w2 := NewWriter(dir, st.SegSize)
	defer func() { _ = w2.Close() }() // closed already, or the test has failed
	require.NoError(t, w2.Use(seg, false))
	require.NoError(t, w2.WriteAt(20000, b[20000:]))
	require.NoError(t, w2.Publish())
	w2.Wait()
	got, err := os.ReadFile(SegmentPath(dir, seg, st.SegSize))
	require.NoError(t, err)
	require.Equal(t, b, got)
}

// TestScanCountsDurable: Scan is how walship status, walship check and walship standby
// init learn how much a partial holds, without the writer lock and without syncing. The
// writer writes an end slot before its fdatasync, so the newest slot may claim bytes
// that are not durable yet (or never will be: see TestWriterSyncFails). Scan counts
// only what is certain: the end of a slot that a newer one follows, for the writer
// writes a slot only once the sync of the one before has succeeded.
func TestScanCountsDurable(t *testing.T) {
	id, seg, b := sample(t)
	st := id.Stream()
	dir := t.TempDir()
	w := NewWriter(dir, st.SegSize)
	defer w.Wait()
	defer func() { _ = w.Close() }() // closed already, or the test has failed
	require.NoError(t, w.Use(seg, true))
	var during []uint64 // what Scan says while each sync is under way
	w.datasync = func(f *os.File) error {
		c, err := Scan(dir, st.SegSize)
		require.NoError(t, err)
		during = append(during, c.Partials[seg.TLI].Size)
		return fdatasync(f)
	}
	require.NoError(t, w.WriteAt(0, b[:20000]))
	require.NoError(t, w.Sync())
	require.NoError(t, w.WriteAt(20000, b[20000:50000]))
	require.NoError(t, w.Sync())
	require.Equal(t, []uint64{0, 20000}, during, "while a sync is under way, only what the one before made durable counts")
	scan := func() uint64 {
		c, err := Scan(dir, st.SegSize)
		require.NoError(t, err)
		return c.Partials[seg.TLI].Size
	}
	require.Equal(t, uint64(20000), scan(), "readers cannot know that a sync returned")

	// Settling a quiet stream's last sync makes it count; bytes written and not synced
	// are not settled.
	require.NoError(t, w.WriteAt(50000, b[50000:60000]))
	require.NoError(t, w.Settle())
	require.Equal(t, uint64(20000), scan(), "nothing is settled while bytes wait for a sync")
	require.NoError(t, w.Sync())
	require.NoError(t, w.Settle())
	require.Equal(t, uint64(60000), scan(), "settled")
	require.Equal(t, []uint64{0, 20000, 50000, 60000}, during)
	require.NoError(t, w.Settle())
	require.Len(t, during, 4, "settling twice syncs once")

	// A writer gone without settling leaves its last sync uncounted until Recover, which
	// settles it.
	require.NoError(t, w.WriteAt(60000, b[60000:70000]))
	require.NoError(t, w.Sync())
	require.NoError(t, w.Close())
	require.Equal(t, uint64(60000), scan())
	c, err := Recover(dir, st, zerolog.Nop())
	require.NoError(t, err)
	require.Equal(t, uint64(70000), c.Partials[seg.TLI].Size)
	require.Equal(t, uint64(70000), scan())

	// A partial of the old kind, as a publish cut short by a power cut leaves it (whole
	// by its size, its tail never written): nothing vouches for its bytes until
	// Recover has walked its records.
	other := t.TempDir()
	legacy := append(append([]byte(nil), b[:0x40000]...), make([]byte, len(b)-0x40000)...)
	require.NoError(t, os.WriteFile(PartialPath(other, seg, st.SegSize), legacy, 0o644))
	c, err = Scan(other, st.SegSize)
	require.NoError(t, err)
	require.Equal(t, uint64(0), c.Partials[seg.TLI].Size, "a partial of the old kind counts nothing before Recover")
}

// TestPublishHistory: a timeline history file is parsed before it is published, as
// recovery will read it (timeline.c: readTimeLineHistory): a malformed one is refused
// with an error naming it, and nothing is published.
func TestPublishHistory(t *testing.T) {
	good := "1\t0/3000160\tno recovery target specified\n"
	cases := []struct {
		name, file, content, err string
	}{
		{name: "not a line of history", file: "00000002.history", content: "garbage\n", err: "history line 1"},
		{name: "no switch point", file: "00000002.history", content: "1\n", err: "want a timeline and a switch point"},
		{name: "a bad switch point", file: "00000002.history", content: "1\tnowhere\treason\n", err: "history line 1"},
		{name: "timelines that do not ascend", file: "00000003.history", content: "2\t0/5000000\tx\n1\t0/3000160\ty\n", err: "does not ascend"},
		{name: "its own timeline as a parent", file: "00000002.history", content: good + "2\t0/5000000\tx\n", err: "timeline 2 in the history of timeline 2"},
		{name: "empty", file: "00000002.history", content: "", err: "no entries"},
		{name: "not a history file's name", file: "00000002.historyx", content: good, err: "not a WAL file name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			err := PublishOnce(dir, c.file, []byte(c.content))
			require.ErrorContains(t, err, c.err)
			require.ErrorContains(t, err, c.file, "the error names the file")
			ents, err := os.ReadDir(dir)
			require.NoError(t, err)
			require.Empty(t, ents, "nothing published")
		})
	}
	dir := t.TempDir()
	require.NoError(t, PublishOnce(dir, "00000002.history", []byte(good)))
	require.NoError(t, PublishOnce(dir, "00000002.history", []byte(good)), "the same again")
	require.ErrorIs(t, PublishOnce(dir, "00000002.history", []byte("1\t0/3000168\tother\n")), ErrConflict)
	got, err := os.ReadFile(filepath.Join(dir, "00000002.history"))
	require.NoError(t, err)
	require.Equal(t, good, string(got))
}
