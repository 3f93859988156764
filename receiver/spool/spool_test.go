package spool

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
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
		{name: "partial longer than a segment", files: map[string]int{name(seg(1, 3)) + PartialSuffix: 1<<20 + 1}, err: "more than a 1048576-byte segment"},
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
	got, err := os.ReadFile(PartialPath(dir, partial, st.SegSize))
	require.NoError(t, err)
	require.Equal(t, good, got, "the partial is cut back to its last good page")
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
	defer w.Close()
	require.NoError(t, w.Use(seg, true))
	require.NoError(t, w.WriteAt(0, b[:9000]))
	require.NoError(t, w.Sync())
	require.NoError(t, w.Check(100, b[100:9000]), "a resend of the same bytes")
	other := append([]byte(nil), b[100:200]...)
	other[5] ^= 1
	require.ErrorIs(t, w.Check(100, other), ErrConflict)
	require.NoError(t, w.WriteAt(9000, b[9000:]))
	require.NoError(t, w.Publish())
	got, err := os.ReadFile(SegmentPath(dir, seg, testID.SegSize))
	require.NoError(t, err)
	require.Equal(t, b, got)
	require.NoFileExists(t, PartialPath(dir, seg, testID.SegSize))
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
	b.Close()
}
