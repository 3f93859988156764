package archive

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/tail/wal"
)

// TestGaps: the segments neither the spool nor the archive holds, between the oldest
// and the newest of each timeline that one of them does.
func TestGaps(t *testing.T) {
	const mb = 1 << 20
	seg := func(tli uint32, no uint64) wal.Segment { return wal.Segment{TLI: tli, No: no} }
	name := func(tli uint32, no uint64) string { return seg(tli, no).Name(mb) }
	for _, tc := range []struct {
		name string
		segs []wal.Segment
		have []string
		want []string
	}{
		{"nothing", nil, nil, nil},
		{"spool alone, whole", []wal.Segment{seg(1, 3), seg(1, 4)}, nil, nil},
		{"archive then spool, touching", []wal.Segment{seg(1, 5), seg(1, 6)}, []string{name(1, 3), name(1, 4)}, nil},
		{"a segment gone between", []wal.Segment{seg(1, 6), seg(1, 7)}, []string{name(1, 3), name(1, 4)}, []string{name(1, 5)}},
		{"inside the spool", []wal.Segment{seg(1, 3), seg(1, 6)}, []string{name(1, 3)}, []string{name(1, 4), name(1, 5)}},
		{"timelines apart", []wal.Segment{seg(1, 3), seg(2, 5)}, []string{"00000002.history", name(1, 2)}, nil},
		{"history files and partials are no segments", nil, []string{"00000002.history", name(1, 3) + ".partial", name(1, 5)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			have := map[string]bool{}
			for _, h := range tc.have {
				have[h] = true
			}
			require.Equal(t, tc.want, gaps(tc.segs, have, mb))
		})
	}
}
