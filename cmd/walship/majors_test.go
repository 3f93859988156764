package main

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
)

// TestMajors runs walship's whole job on every PostgreSQL major of the lab (13 to 18;
// PG_MAJORS limits them): streaming under load, byte-identical to the primary's
// archived segments; standby init; a switchover and the old primary's rejoin; then a
// kill -9 of the new primary and walship promote, with no acknowledged commit lost.
// The builds from the npm registry hold only initdb, pg_ctl and postgres: nothing here
// needs another PostgreSQL program.
func TestMajors(t *testing.T) {
	majors, err := lab.Majors()
	require.NoError(t, err)
	for _, major := range majors {
		t.Run(fmt.Sprintf("pg%d", major), func(t *testing.T) {
			ctx := testContext(t, 5*time.Minute)
			r := newRigMajor(t, ctx, 1, major)
			r.sidecarArgs = []string{"--allow-switchover"}
			r.startReceiver(ctx)
			r.startSidecar(ctx, r.primary)
			r.waitStreaming(ctx)
			v := mustQuery(t, ctx, r.primary, "SHOW server_version_num")
			n, err := strconv.Atoi(v)
			require.NoError(t, err)
			require.Equal(t, major, n/10000, "the server's major")

			// Streaming under load, byte-identical.
			load, err := lab.StartLoad(ctx, r.primary.DSN(), 2, 300)
			require.NoError(t, err)
			r.waitSpoolGrows(ctx, 3<<20)
			require.NoError(t, load.Stop())
			require.NoError(t, r.primary.Exec(ctx, "SELECT pg_switch_wal()"))
			segs := r.checkIdentical(ctx)
			require.GreaterOrEqual(t, segs, 3)

			// standby init, then a switchover under load and the old primary's rejoin.
			sb := emptyStandby(t, r)
			r.initOK(ctx, sb.Data)
			adoptStandby(t, ctx, sb)
			load, err = lab.StartLoad(ctx, r.primary.DSN(), 2, 100)
			require.NoError(t, err)
			require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "100 commits", func() (bool, error) { return load.Count() >= 100, nil }))
			out, err := exec.CommandContext(ctx, walshipBin, "switchover", "--spool", r.spool, "--dsn", sb.DSN()).CombinedOutput()
			_ = load.Stop() // its errors are expected: the server stopped
			require.NoError(t, err, "walship switchover:\n%s", out)
			t.Logf("walship switchover: %s", strings.TrimSpace(string(out)))
			require.Contains(t, string(out), "promoted: timeline 2,")
			loss, err := lab.MeasureLoss(ctx, sb, load.Acks(), time.Now())
			require.NoError(t, err)
			require.Empty(t, loss.Lost, "lost in the switchover")

			old := r.primary
			require.NoError(t, r.sidecar.Stop(ctx))
			require.NoError(t, r.receiver.Stop(ctx))
			next := r.follow(ctx, "back", old, sb)

			// A kill -9 of the new primary, and the old one promoted again.
			crashAndPromote(t, ctx, next, old, []string{"--dsn", old.DSN()}, crash{tli: 3})
		})
	}
}
