package wal_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/tail/wal"
)

// sample is real WAL of one major version, captured by bench/cmd/walsample (see
// testdata/README.md): two consecutive 1 MB segments, zeros past the flush position.
type sample struct {
	name   string
	major  int
	stream wal.Stream
	base   wal.LSN
	flush  wal.LSN
	data   []byte
}

func loadSamples(t testing.TB) []sample {
	t.Helper()
	dirs, err := filepath.Glob("testdata/pg*/sample.json")
	require.NoError(t, err)
	var out []sample
	for _, meta := range dirs {
		var m struct {
			VersionNum int      `json:"server_version_num"`
			SysID      uint64   `json:"system_identifier,string"`
			SegSize    uint64   `json:"wal_segment_size"`
			Segments   []string `json:"segments"`
			Flush      string   `json:"flush_lsn"`
		}
		b, err := os.ReadFile(meta)
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(b, &m), meta)
		s := sample{name: filepath.Base(filepath.Dir(meta)), major: m.VersionNum / 10000}
		magic, err := wal.MagicFor(m.VersionNum)
		require.NoError(t, err)
		s.stream = wal.Stream{SysID: m.SysID, SegSize: m.SegSize, BlockSize: 8192, Magic: magic}
		s.flush, err = wal.ParseLSN(m.Flush)
		require.NoError(t, err)
		for i, name := range m.Segments {
			f, err := os.Open(filepath.Join(filepath.Dir(meta), name))
			require.NoError(t, err)
			zr, err := gzip.NewReader(f)
			require.NoError(t, err)
			seg, err := io.ReadAll(zr)
			_ = f.Close() // read only
			require.NoError(t, err)
			require.Len(t, seg, int(m.SegSize), name)
			if i == 0 {
				sg, err := wal.ParseSegmentName(name[:24], m.SegSize)
				require.NoError(t, err)
				s.base = sg.Start(m.SegSize)
			}
			s.data = append(s.data, seg...)
		}
		out = append(out, s)
	}
	require.Len(t, out, 6, "a sample of each major version 13 to 18")
	return out
}

// TestSamples reads real WAL of PostgreSQL 13 to 18: the first page's magic is the one
// walship knows for the version, its long header names the cluster, and the records
// run without a break across pages and the segment boundary to the flush position.
func TestSamples(t *testing.T) {
	for _, s := range loadSamples(t) {
		t.Run(s.name, func(t *testing.T) {
			h, err := wal.ParsePageHeader(s.data)
			require.NoError(t, err)
			require.Equal(t, wal.Magics[s.major], h.Magic, "XLOG_PAGE_MAGIC of PostgreSQL %d", s.major)
			require.Equal(t, s.stream.SysID, h.SysID)
			require.NoError(t, s.stream.CheckPages(s.data[:s.flush-s.base-s.flush%8192], s.base, 1))

			r := wal.NewReader(s.stream, 1, wal.Bytes{Base: s.base, Data: s.data}, s.base, 0)
			var n, crossPage, crossSeg int
			for {
				rec, err := r.Next()
				var end *wal.EndError
				if errors.As(err, &end) {
					require.Equal(t, s.flush, r.Pos(), "the valid WAL ends at the flush position (stopped: %s)", end.Reason)
					break
				}
				require.NoError(t, err)
				n++
				if rec.LSN/8192 != (rec.End-1)/8192 {
					crossPage++
				}
				if rec.LSN < s.base+1<<20 && rec.End > s.base+1<<20 {
					crossSeg++
				}
			}
			require.Greater(t, n, 1000)
			require.Greater(t, crossPage, 50)
			t.Logf("PostgreSQL %d: %d records, %d across pages, %d across the segment boundary, end %s", s.major, n, crossPage, crossSeg, s.flush)

			// Another version's magic is refused on the first page.
			other := s.stream
			other.Magic = wal.Magics[13+(s.major-12)%6]
			_, _, stop, err := wal.ValidEnd(other, 1, wal.Bytes{Base: s.base, Data: s.data}, s.base, 0)
			require.NoError(t, err)
			require.Equal(t, s.base, stop.At)
			require.ErrorIs(t, stop, wal.ErrPage)
		})
	}
}

// FuzzReader flips bytes of real WAL of every major version. The reader must never
// panic, every record it returns must be one the clean WAL has (same start and end),
// and none may hold a flipped byte inside its checked bytes.
func FuzzReader(f *testing.F) {
	samples := loadSamples(f)
	clean := make([]map[wal.LSN]wal.LSN, len(samples))
	for i, s := range samples {
		clean[i] = map[wal.LSN]wal.LSN{}
		r := wal.NewReader(s.stream, 1, wal.Bytes{Base: s.base, Data: s.data}, s.base, 0)
		for {
			rec, err := r.Next()
			if err != nil {
				break
			}
			clean[i][rec.LSN] = rec.End
		}
	}
	f.Add(uint8(0), uint32(20), byte(1), uint32(0), byte(0))
	f.Add(uint8(2), uint32(8192+40), byte(0x80), uint32(100_000), byte(0xff))
	f.Add(uint8(5), uint32(1<<20+16), byte(4), uint32(300_000), byte(3))
	f.Fuzz(func(t *testing.T, which uint8, at1 uint32, x1 byte, at2 uint32, x2 byte) {
		s := samples[int(which)%len(samples)]
		span := uint32(s.flush - s.base)
		at1, at2 = at1%span, at2%span
		data := bytes.Clone(s.data)
		data[at1] ^= x1
		data[at2] ^= x2
		if bytes.Equal(data, s.data) {
			return
		}
		r := wal.NewReader(s.stream, 1, wal.Bytes{Base: s.base, Data: data}, s.base, 0)
		for {
			rec, err := r.Next()
			if err != nil {
				var end *wal.EndError
				if !errors.As(err, &end) {
					t.Fatalf("not an end of WAL: %v", err)
				}
				return
			}
			end, ok := clean[int(which)%len(samples)][rec.LSN]
			if !ok || end != rec.End {
				t.Fatalf("record at %s (end %s) is not in the clean WAL", rec.LSN, rec.End)
			}
			for _, at := range []uint32{at1, at2} {
				if lsn := s.base + wal.LSN(at); data[at] != s.data[at] && recordHolds(rec, lsn, s.stream.SegSize) {
					t.Fatalf("record at %s holds the flipped byte at %s and was called valid", rec.LSN, lsn)
				}
			}
		}
	})
}

// recordHolds says whether lsn is one of rec's own bytes (the CRC covers them all),
// walking its pieces across pages and skipping the page headers between them.
func recordHolds(rec wal.Record, lsn wal.LSN, segSize uint64) bool {
	pos, left := rec.LSN, uint64(rec.TotLen)
	for left > 0 {
		if pos%8192 == 0 {
			pos += wal.LSN(wal.HeaderSize(pos, segSize))
		}
		n := min(8192-uint64(pos%8192), left)
		if lsn >= pos && lsn < pos+wal.LSN(n) {
			return true
		}
		pos, left = pos+wal.LSN(n), left-n
	}
	return false
}
