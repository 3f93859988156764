package feeder

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// TestCheckDrained checks the last check before a switchover promotes the standby: a
// mark before the reported flush position, or a flush position that does not parse,
// stops the promotion.
func TestCheckDrained(t *testing.T) {
	mark := spool.EndMark{Position: wal.Position{TLI: 1, LSN: 0x3000100}}
	for _, c := range []struct {
		name  string
		flush string
		says  string // "" when the check passes
	}{
		{"mark past flush", "0/3000000", ""},
		{"mark at flush", "0/3000100", ""},
		{"mark before flush", "0/3000200", "before the flush position 0/3000200"},
		{"empty flush", "", "does not parse"},
		{"malformed flush", "0/zz", "does not parse"},
		{"flush without a slash", "3000000", "does not parse"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := checkDrained(mark, c.flush)
			if c.says == "" {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			require.Contains(t, err.Error(), c.says)
			require.Contains(t, err.Error(), "the standby was not promoted")
		})
	}
}
