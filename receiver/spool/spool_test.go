package spool

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
		{name: "empty", files: nil},
		{name: "published and partial", files: map[string]int{name(seg(1, 3)): 1 << 20, name(seg(1, 4)) + PartialSuffix: 500, "00000002.history": 40, "junk": 3},
			pos: wal.Position{TLI: 1, LSN: 4<<20 + 500}},
		{name: "newer timeline wins", files: map[string]int{name(seg(1, 4)) + PartialSuffix: 500, name(seg(2, 4)) + PartialSuffix: 8192},
			pos: wal.Position{TLI: 2, LSN: 4<<20 + 8192}},
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
	st := testID.Stream()
	partial := wal.Segment{TLI: 1, No: 4}
	whole := wal.Segment{TLI: 2, No: 4}
	// A partial whose last page was never written whole (zeros where a header belongs),
	// a whole partial left by a crash before its rename, and a leftover temporary file.
	good := pages(partial, 3)
	require.NoError(t, os.WriteFile(PartialPath(dir, partial, st.SegSize), append(good, make([]byte, 8192)...), 0o644))
	require.NoError(t, os.WriteFile(PartialPath(dir, whole, st.SegSize), pages(whole, 128), 0o644))
	temp := filepath.Join(dir, durable.TempPrefix+"x")
	require.NoError(t, os.WriteFile(temp, []byte("half"), 0o644))

	c, err := Recover(dir, st, zerolog.Nop())
	require.NoError(t, err)
	require.NoFileExists(t, temp)
	got, err := PartialBytes(PartialPath(dir, partial, st.SegSize), st.SegSize)
	require.NoError(t, err)
	require.Equal(t, good, got, "the partial is cut back to its last good page")
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
	require.Equal(t, wal.Position{TLI: 2, LSN: 5 << 20}, pos)
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
	seg := wal.Segment{TLI: 1, No: 2}
	b := pages(seg, 128)
	st := testID.Stream()
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
			// Recovery left one slot: a second look at the file agrees without falling back.
			end, err := PartialEnd(path, st.SegSize)
			require.NoError(t, err)
			require.Equal(t, c.end, end)

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
