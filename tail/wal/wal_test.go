package wal

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestLSN(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want LSN
	}{
		{"0/0", 0},
		{"16/B374D848", 0x16_B374D848},
		{"FFFFFFFF/FFFFFFFF", ^LSN(0)},
		{"0/1000028", 0x1000028},
		{"a/b", 0xA_0000000B},
	} {
		got, err := ParseLSN(tc.in)
		require.NoError(t, err, tc.in)
		require.Equal(t, tc.want, got, "ParseLSN(%q)", tc.in)
		back, err := ParseLSN(got.String())
		require.NoError(t, err)
		require.Equal(t, got, back, "round trip of %q through %q", tc.in, got.String())
	}
	for _, bad := range []string{"", "/", "0/", "/0", "00", "1/2/3", "G/0", "123456789/0", "0/-1", " 0/1"} {
		_, err := ParseLSN(bad)
		require.Error(t, err, "ParseLSN(%q) must fail", bad)
	}
}

// TestLSNEncodings: an LSN is written as PostgreSQL prints it in JSON and read back
// from JSON, from a query's text or pg_lsn column, and a position compares as numbers.
func TestLSNEncodings(t *testing.T) {
	type doc struct {
		At  LSN      `json:"at"`
		Pos Position `json:"pos"`
	}
	in := doc{At: 0x16_B374D848, Pos: Position{TLI: 2, LSN: 0x1000028}}
	b, err := json.Marshal(in)
	require.NoError(t, err)
	require.JSONEq(t, `{"at":"16/B374D848","pos":{"timeline":2,"lsn":"0/1000028"}}`, string(b))
	var out doc
	require.NoError(t, json.Unmarshal(b, &out))
	require.Equal(t, in, out)
	require.Error(t, json.Unmarshal([]byte(`{"at":"16-B374D848"}`), &out), "a malformed position is refused")
	require.Error(t, json.Unmarshal([]byte(`{"at":12}`), &out), "a number is not a position")

	var l LSN
	require.NoError(t, l.Scan("0/3000000"))
	require.Equal(t, LSN(0x3000000), l)
	require.NoError(t, l.Scan([]byte("1/0")))
	require.Equal(t, LSN(1<<32), l)
	require.ErrorContains(t, l.Scan(nil), "NULL")
	require.ErrorContains(t, l.Scan(int64(5)), "int64")
	v, err := LSN(0x16_B374D848).Value()
	require.NoError(t, err)
	require.Equal(t, "16/B374D848", v)
}

func TestSegmentNames(t *testing.T) {
	for _, tc := range []struct {
		name    string
		segSize uint64
		lsn     LSN
		tli     uint32
		want    string
	}{
		// 16 MB: 256 segments per 4 GiB log id.
		{"16MB first", 16 << 20, 0x1000028, 1, "000000010000000000000001"},
		{"16MB log id 2", 16 << 20, 0x2_05000000, 3, "000000030000000200000005"},
		{"1MB", 1 << 20, 0x1_00300000, 1, "000000010000000100000003"},
		{"1GB", 1 << 30, 0x1_80000000, 2, "000000020000000100000002"},
		{"exact boundary is the next segment", 16 << 20, 0x3000000, 1, "000000010000000000000003"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seg, _ := SegmentOf(tc.tli, tc.lsn, tc.segSize)
			require.Equal(t, tc.want, seg.Name(tc.segSize))
			back, err := ParseSegmentName(tc.want, tc.segSize)
			require.NoError(t, err)
			require.Equal(t, seg, back)
		})
	}
	for _, bad := range []string{
		"", "00000001000000000000000", "0000000100000000000000011", "00000001000000000000000g",
		"000000010000000000000001.partial", "../00000001000000000000", "000000000000000000000001",
		"000000010000000000000100", // segment 0x100 does not exist with 16 MB segments
	} {
		_, err := ParseSegmentName(bad, 16<<20)
		require.ErrorIs(t, err, ErrBadName, "ParseSegmentName(%q)", bad)
	}
}

func TestHistoryNames(t *testing.T) {
	tli, err := ParseHistoryName("0000000A.history")
	require.NoError(t, err)
	require.Equal(t, uint32(10), tli)
	require.Equal(t, "0000000A.history", HistoryName(10))
	for _, bad := range []string{"00000001.history", "0000000a.history", "2.history", "00000002.history.tmp", "00000002"} {
		_, err := ParseHistoryName(bad)
		require.ErrorIs(t, err, ErrBadName, bad)
	}
}

func TestParseHistory(t *testing.T) {
	h, err := ParseHistory([]byte("1\t0/3000160\tno recovery target specified\n\n2\t0/5000000\tat restore point\n"))
	require.NoError(t, err)
	require.Equal(t, []HistoryEntry{{1, 0x3000160}, {2, 0x5000000}}, h)
	for _, bad := range []string{"", "# only a comment\n", "1\n", "x\t0/1\n", "2\t0/1\n1\t0/2\n", "1\tzz\n"} {
		_, err := ParseHistory([]byte(bad))
		require.Error(t, err, "%q", bad)
	}
}

func TestCheckSegSize(t *testing.T) {
	for _, ok := range []uint64{1 << 20, 16 << 20, 1 << 30} {
		require.NoError(t, CheckSegSize(ok))
	}
	for _, bad := range []uint64{0, 1 << 19, 3 << 20, 2 << 30} {
		require.Error(t, CheckSegSize(bad))
	}
}

// page builds a page header as PostgreSQL writes it.
func page(s Stream, lsn LSN, tli uint32) []byte {
	long := uint64(lsn)%s.SegSize == 0
	b := make([]byte, s.BlockSize)
	binary.LittleEndian.PutUint16(b[0:], s.Magic)
	var info uint16
	if long {
		info = FlagLongHeader
	}
	binary.LittleEndian.PutUint16(b[2:], info)
	binary.LittleEndian.PutUint32(b[4:], tli)
	binary.LittleEndian.PutUint64(b[8:], uint64(lsn))
	if long {
		binary.LittleEndian.PutUint64(b[24:], s.SysID)
		binary.LittleEndian.PutUint32(b[32:], uint32(s.SegSize))
		binary.LittleEndian.PutUint32(b[36:], uint32(s.BlockSize))
	}
	return b
}

var testStream = Stream{SysID: 7311111111111111111, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110}

func TestCheckPage(t *testing.T) {
	s := testStream
	first, mid := LSN(3<<20), LSN(3<<20+8192)
	require.NoError(t, s.CheckPage(page(s, first, 1), first, 1))
	require.NoError(t, s.CheckPage(page(s, mid, 1), mid, 2), "a page of the parent timeline is fine on a child's stream")
	other := s
	other.SysID++
	for name, tc := range map[string]struct {
		b      []byte
		at     LSN
		tli    uint32
		reason string
	}{
		"wrong magic":       {page(Stream{s.SysID, s.SegSize, s.BlockSize, 0xD113}, mid, 1), mid, 1, "magic"},
		"stale page":        {page(s, mid-1<<20, 1), mid, 1, "xlp_pageaddr"},
		"another cluster":   {page(other, first, 1), first, 1, "system identifier"},
		"newer timeline":    {page(s, mid, 3), mid, 2, "timeline"},
		"long header flag":  {page(s, first, 1), first + 8192, 1, "xlp_pageaddr"},
		"short header only": {page(s, first, 1)[:20], first, 1, "want at least"},
	} {
		t.Run(name, func(t *testing.T) {
			err := s.CheckPage(tc.b, tc.at, tc.tli)
			require.ErrorIs(t, err, ErrPage)
			require.Contains(t, err.Error(), tc.reason)
			var pe *PageError
			require.True(t, errors.As(err, &pe))
			require.Equal(t, tc.at, pe.At, "the error names the page")
		})
	}
	bad := page(s, mid, 1)
	binary.LittleEndian.PutUint16(bad[2:], 0x0010)
	require.ErrorContains(t, s.CheckPage(bad, mid, 1), "unknown info bits")
	noLong := page(s, mid, 1)
	require.ErrorContains(t, s.CheckPage(noLong[:ShortHeaderSize], first, 1), "xlp_pageaddr")
}

func TestCheckPagesRange(t *testing.T) {
	s := testStream
	seg := make([]byte, 0, 4*8192)
	for i := 0; i < 4; i++ {
		seg = append(seg, page(s, LSN(2<<20+i*8192), 1)...)
	}
	start := LSN(2 << 20)
	require.NoError(t, s.CheckPages(seg, start, 1))
	require.NoError(t, s.CheckPages(seg[100:20000], start+100, 1), "a range starting mid-page checks the pages that start in it")
	require.ErrorContains(t, s.CheckPages(seg[:8192+10], start, 1), "inside the page header")
	corrupt := append([]byte(nil), seg...)
	corrupt[2*8192+8] ^= 0xFF
	err := s.CheckPages(corrupt, start, 1)
	var pe *PageError
	require.True(t, errors.As(err, &pe))
	require.Equal(t, start+2*8192, pe.At)
}

func FuzzParseSegmentName(f *testing.F) {
	for _, s := range []string{"000000010000000000000001", "0000000A00000001000000FF", "x", ""} {
		f.Add(s, uint8(4))
	}
	f.Fuzz(func(t *testing.T, name string, shift uint8) {
		segSize := uint64(1<<20) << (shift % 11)
		seg, err := ParseSegmentName(name, segSize)
		if err != nil {
			return
		}
		// Whatever parses must print back to the same name.
		if got := seg.Name(segSize); got != name {
			t.Fatalf("ParseSegmentName(%q) = %+v, which names %q", name, seg, got)
		}
	})
}

func FuzzParseLSN(f *testing.F) {
	for _, s := range []string{"0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "1/", "/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		lsn, err := ParseLSN(s)
		if err != nil {
			return
		}
		back, err := ParseLSN(lsn.String())
		if err != nil || back != lsn {
			t.Fatalf("%q parsed to %v, which does not round-trip: %v %v", s, lsn, back, err)
		}
	})
}

func FuzzCheckPages(f *testing.F) {
	s := testStream
	good := append(page(s, 1<<20, 1), page(s, 1<<20+8192, 1)...)
	f.Add(good, uint16(0), uint16(len(good)))
	f.Fuzz(func(t *testing.T, b []byte, from, to uint16) {
		if int(to) > len(b) || from > to {
			return
		}
		// Never panics, and accepts only ranges whose page headers all check.
		err := s.CheckPages(b[from:to], LSN(1<<20)+LSN(from), 1)
		if err == nil {
			for p := (uint64(from) + 8191) / 8192 * 8192; p < uint64(to); p += 8192 {
				if p+uint64(HeaderSize(LSN(1<<20+p), s.SegSize)) > uint64(to) {
					t.Fatalf("accepted a range that ends inside the header of page %d", p)
				}
			}
		}
	})
}

// TestSwitchPaddingRealPage reads a real page: testdata/pg15-switch-page-0702E000.bin is
// the page at 0/72E000 of a PostgreSQL 15.18 cluster made with initdb --wal-segsize=1,
// after "insert into t select g from generate_series(1,3000) g; select pg_switch_wal()".
// pg_waldump shows its last record: "rmgr: XLOG len (rec/tot): 24/24, lsn: 0/0072F688,
// desc: SWITCH", and the pages after it in the segment were left as zeros.
func TestSwitchPaddingRealPage(t *testing.T) {
	page, err := os.ReadFile("testdata/pg15-switch-page-0702E000.bin")
	require.NoError(t, err)
	st := Stream{SysID: 0, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110}
	h, err := ParsePageHeader(page)
	require.NoError(t, err)
	st.SysID = 1 // not checked on a page that is not a segment's first
	require.NoError(t, st.CheckPage(page, 0x72E000, h.TLI))
	pad, ok := SwitchPadding(st, h.TLI, Bytes{Base: 0x72E000, Data: page}, 0x72E000)
	require.True(t, ok)
	require.Equal(t, LSN(0x730000), pad)

	// A page whose last record is not a switch says so.
	other := append([]byte(nil), page...)
	other[0x1688+17] = 10 // rmid of the switch record changed to Heap
	_, ok = SwitchPadding(st, h.TLI, Bytes{Base: 0x72E000, Data: other}, 0x72E000)
	require.False(t, ok)
	// A record running off the page is no switch either.
	cut := append([]byte(nil), page...)
	binary.LittleEndian.PutUint32(cut[0x1688:], 9000)
	_, ok = SwitchPadding(st, h.TLI, Bytes{Base: 0x72E000, Data: cut}, 0x72E000)
	require.False(t, ok)
}

func FuzzSwitchPadding(f *testing.F) {
	page, err := os.ReadFile("testdata/pg15-switch-page-0702E000.bin")
	if err != nil {
		f.Fatal(err)
	}
	st := Stream{SysID: 1, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110}
	f.Add(page, uint16(0), byte(0))
	f.Fuzz(func(t *testing.T, b []byte, at uint16, x byte) {
		if len(b) > 0 {
			b[int(at)%len(b)] ^= x
		}
		pad, ok := SwitchPadding(st, 1, Bytes{Base: 0x72E000, Data: b}, 0x72E000)
		if ok && pad != 0x730000 {
			t.Fatalf("padding from %s, want the next page", pad)
		}
	})
}

// BenchmarkCheckPages checks the page headers of a 1 MB segment.
func BenchmarkCheckPages(b *testing.B) {
	s := testStream
	seg := make([]byte, 0, s.SegSize)
	for p := uint64(0); p < s.SegSize; p += s.BlockSize {
		seg = append(seg, page(s, LSN(1<<20+p), 1)...)
	}
	b.SetBytes(int64(len(seg)))
	for b.Loop() {
		if err := s.CheckPages(seg, 1<<20, 1); err != nil {
			b.Fatal(err)
		}
	}
}
