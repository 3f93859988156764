package wal_test

import (
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

// TestReadControl reads a real cluster's control file, running and stopped, and
// compares it with what pg_controldata says.
func TestReadControl(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := lab.NewCluster(ctx, lab.Options{SegSizeMB: 1})
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.Start(ctx))
	require.NoError(t, c.Exec(ctx, "CHECKPOINT"))
	for _, state := range []wal.DBState{wal.DBInProduction, wal.DBShutdowned} {
		if state == wal.DBShutdowned {
			require.NoError(t, c.Stop(ctx))
		}
		out, err := c.Command(ctx, "pg_controldata", "-D", c.Data).CombinedOutput()
		require.NoError(t, err, "%s", out)
		field := func(name string) string {
			m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `:\s+(.*)$`).FindStringSubmatch(string(out))
			require.NotNil(t, m, "pg_controldata shows no %q:\n%s", name, out)
			return m[1]
		}
		got, err := wal.ReadControl(c.Data)
		require.NoError(t, err)
		require.Equal(t, field("Database system identifier"), strconv.FormatUint(got.SysID, 10))
		require.Equal(t, field("Database cluster state"), got.State.String())
		require.Equal(t, state, got.State)
		require.Equal(t, field("Latest checkpoint location"), got.CheckPoint.String())
		require.Equal(t, field("Latest checkpoint's TimeLineID"), strconv.FormatUint(uint64(got.TLI), 10))
	}
}
