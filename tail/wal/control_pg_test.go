package wal_test

import (
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

// TestReadControl reads a real cluster's control file, running and stopped, and
// compares it with what pg_controldata says.
func TestReadControl(t *testing.T) {
	needPrograms(t, "pg_controldata", "pg_basebackup")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := lab.NewCluster(ctx, lab.Options{SegSizeMB: 1})
	require.NoError(t, err)
	defer func() { assert.NoError(t, c.Close(), "stop the cluster and remove its files") }()
	require.NoError(t, c.Start(ctx))
	require.NoError(t, c.Exec(ctx, "CHECKPOINT"))
	// A standby, stopped: its control file sets a minimum recovery point.
	sb, err := c.BaseBackup(ctx, "stream")
	require.NoError(t, err)
	defer func() { assert.NoError(t, sb.Close(), "stop the standby and remove its files") }()
	require.NoError(t, sb.WriteFile("standby.signal", nil))
	require.NoError(t, sb.Start(ctx))
	require.NoError(t, c.Exec(ctx, "CREATE TABLE t AS SELECT generate_series(1, 10000) AS n"))
	require.NoError(t, c.Exec(ctx, "CHECKPOINT"))
	require.NoError(t, sb.Exec(ctx, "CHECKPOINT"))
	require.NoError(t, sb.Stop(ctx))
	for _, state := range []wal.DBState{wal.DBInProduction, wal.DBShutdowned, wal.DBShutdownedInRecov} {
		dir := c.Data
		switch state {
		case wal.DBShutdowned:
			require.NoError(t, c.Stop(ctx))
		case wal.DBShutdownedInRecov:
			dir = sb.Data
		}
		out, err := c.Command(ctx, "pg_controldata", "-D", dir).CombinedOutput()
		require.NoError(t, err, "%s", out)
		field := func(name string) string {
			m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `:\s+(.*)$`).FindStringSubmatch(string(out))
			require.NotNil(t, m, "pg_controldata shows no %q:\n%s", name, out)
			return m[1]
		}
		got, err := wal.ReadControl(dir)
		require.NoError(t, err)
		require.Equal(t, field("Database system identifier"), strconv.FormatUint(got.SysID, 10))
		require.Equal(t, field("Database cluster state"), got.State.String())
		require.Equal(t, state, got.State)
		if state == wal.DBShutdownedInRecov {
			require.NotZero(t, got.MinRecovery, "a stopped standby has a minimum recovery point")
			require.Equal(t, uint32(1), got.MinRecoveryTLI)
		}
		require.Equal(t, field("Latest checkpoint location"), got.CheckPoint.String())
		require.Equal(t, field("Latest checkpoint's TimeLineID"), strconv.FormatUint(uint64(got.TLI), 10))
		require.Equal(t, field("pg_control version number"), strconv.FormatUint(uint64(got.Version), 10))
		require.Equal(t, field("Minimum recovery ending location"), got.MinRecovery.String())
		require.Equal(t, field("Min recovery ending loc's timeline"), strconv.FormatUint(uint64(got.MinRecoveryTLI), 10))
	}
}
