package feeder

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/receiver/spool"
)

// TestFailureEndsRecovery: which data directories take a failed restore_command for
// the end of the WAL.
func TestFailureEndsRecovery(t *testing.T) {
	plain, triggered := t.TempDir(), t.TempDir()
	require.NoError(t, spool.WriteTrigger(triggered, spool.Trigger{TLI: 1, Segment: "000000010000000000000003"}))
	dir := func(files ...string) string {
		d := t.TempDir()
		for _, f := range files {
			require.NoError(t, os.WriteFile(filepath.Join(d, f), nil, 0o600))
		}
		return d
	}
	for _, tc := range []struct {
		name   string
		pgdata string
		spool  string
		ends   bool
	}{
		{"archive recovery", dir("PG_VERSION", "recovery.signal"), plain, true},
		{"no signal file: not in recovery", dir("PG_VERSION"), plain, false},
		{"standby mode", dir("PG_VERSION", "standby.signal"), plain, false},
		{"standby mode beside recovery.signal", dir("PG_VERSION", "standby.signal", "recovery.signal"), plain, false},
		{"standby mode, promotion under way", dir("PG_VERSION", "standby.signal"), triggered, true},
		{"standby mode, spool unknown", dir("PG_VERSION", "standby.signal"), "", false},
		{"no data directory", dir("recovery.signal"), plain, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			why := FailureEndsRecovery(tc.pgdata, tc.spool)
			require.Equal(t, tc.ends, why != "", "reason %q", why)
		})
	}
}
