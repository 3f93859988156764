package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
)

// soakCounts is one major's row of the soak's table.
type soakCounts struct {
	major                       int
	crashes, crashLost          int
	powerCuts, powerMissing     int
	restarts, restartsDiffering int
	crashWindowMax              time.Duration
	powerSeconds, crashSeconds  float64
	restartSeconds              float64
	crashFailed, powerFailed    bool
	restartFailed               bool
	powerSkipped                string
}

func soakEnv(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n >= 0 {
		return n
	}
	return def
}

// TestSoak is make soak: on each major (WALSHIP_SOAK_MAJORS, default the lab's), N crash
// trials (the primary's postmaster killed under load while its host and sidecar live,
// then walship promote; WALSHIP_SOAK_CRASHES), N power cuts of the standby's host
// under load (WALSHIP_SOAK_POWER; see TestPowerLossTrials) and N restarts each of the
// receiver and the sidecar under load (WALSHIP_SOAK_RESTARTS). It prints one table of
// counts; the only pass is 0 acknowledged commits lost, 0 acknowledged positions
// missing after a power cut, 0 segments differing from the primary's. A trial that
// fails stops its kind on that major (the failure says why), and the table says so.
func TestSoak(t *testing.T) {
	if os.Getenv("WALSHIP_SOAK") == "" {
		t.Skip("set WALSHIP_SOAK=1 (make soak) to run the soak")
	}
	majors, err := lab.Majors()
	require.NoError(t, err)
	if s := os.Getenv("WALSHIP_SOAK_MAJORS"); s != "" {
		majors = nil
		for _, f := range strings.Split(s, ",") {
			m, err := strconv.Atoi(strings.TrimSpace(f))
			require.NoError(t, err, "WALSHIP_SOAK_MAJORS=%q", s)
			majors = append(majors, m)
		}
	}
	crashes := soakEnv("WALSHIP_SOAK_CRASHES", 5)
	power := soakEnv("WALSHIP_SOAK_POWER", 5)
	restarts := soakEnv("WALSHIP_SOAK_RESTARTS", 5)
	var rows []soakCounts
	for _, major := range majors {
		c := soakCounts{major: major}
		start := time.Now()
		for i := 1; i <= crashes && !c.crashFailed; i++ {
			c.crashFailed = !t.Run(fmt.Sprintf("pg%d/crash%03d", major, i), func(t *testing.T) {
				ctx := testContext(t, 4*time.Minute)
				r := newRigMajor(t, ctx, 1, major)
				r.startReceiver(ctx)
				r.startSidecar(ctx, r.primary)
				r.waitStreaming(ctx)
				sb := r.standby(ctx, false)
				lost, window := crashAndPromote(t, ctx, r, sb, []string{"--dsn", sb.DSN()}, crash{})
				c.crashes++
				c.crashLost += lost
				c.crashWindowMax = max(c.crashWindowMax, window)
			})
		}
		c.crashSeconds = time.Since(start).Seconds()

		start = time.Now()
		if power > 0 {
			c.powerFailed = !t.Run(fmt.Sprintf("pg%d/power", major), func(t *testing.T) {
				if _, err := os.Stat("/dev/fuse"); err != nil {
					c.powerSkipped = "no /dev/fuse"
				}
				c.powerCuts = powerLossTrials(t, major, power)
			})
		}
		c.powerSeconds = time.Since(start).Seconds()

		start = time.Now()
		if restarts > 0 {
			c.restartFailed = !t.Run(fmt.Sprintf("pg%d/restarts", major), func(t *testing.T) {
				c.restarts, c.restartsDiffering = restartTrials(t, major, restarts)
			})
		}
		c.restartSeconds = time.Since(start).Seconds()
		rows = append(rows, c)
	}

	var b strings.Builder
	b.WriteString("| major | crash trials | commits lost | max window | power cuts | acked positions missing | receiver and sidecar restarts | segments differing | time |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|\n")
	pass := true
	for _, c := range rows {
		status := func(failed bool) string {
			if failed {
				pass = false
				return " (a trial failed)"
			}
			return ""
		}
		cuts := fmt.Sprintf("%d%s", c.powerCuts, status(c.powerFailed))
		if c.powerSkipped != "" {
			cuts = "skipped: " + c.powerSkipped
		}
		fmt.Fprintf(&b, "| %d | %d%s | %d | %s | %s | %d | %d%s | %d | %.0f s |\n", c.major, c.crashes, status(c.crashFailed), c.crashLost,
			c.crashWindowMax.Round(time.Microsecond), cuts, c.powerMissing, c.restarts, status(c.restartFailed), c.restartsDiffering,
			c.crashSeconds+c.powerSeconds+c.restartSeconds)
		if c.crashLost > 0 || c.powerMissing > 0 || c.restartsDiffering > 0 {
			pass = false
		}
	}
	verdict := "PASS: 0 acknowledged commits lost, 0 acknowledged positions missing, 0 segments differing"
	if !pass {
		verdict = "FAIL"
	}
	report := fmt.Sprintf("soak (per major: %d crash trials, %d power cuts, %d restarts of the receiver and of the sidecar):\n\n%s\n%s\n", crashes, power, restarts, b.String(), verdict)
	t.Log(report)
	if out := os.Getenv("WALSHIP_SOAK_OUT"); out != "" {
		require.NoError(t, os.WriteFile(out, []byte(report), 0o644))
	}
	require.True(t, pass, "the soak:\n%s", b.String())
}

// restartTrials kills the receiver and the sidecar, in turn, n times each under load
// on major, starting each again, and then compares the spool with the primary's
// segments. It returns the restarts done and how many segments differed (0, or the test
// has failed).
func restartTrials(t *testing.T, major, n int) (restarts, differing int) {
	ctx := testContext(t, time.Duration(n)*30*time.Second+2*time.Minute)
	r := newRigMajor(t, ctx, 1, major)
	r.startReceiver(ctx)
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	load, err := lab.StartLoad(ctx, r.primary.DSN(), 2, 400)
	require.NoError(t, err)
	defer func() { _ = load.Stop() }() // only for a failure on the way: checked below
	for i := 0; i < n; i++ {
		r.waitSpoolGrows(ctx, 1<<20)
		r.receiver.Kill()
		before := flushLSN(t, ctx, r.primary)
		require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "the primary to write 512 kB more", func() (bool, error) {
			return flushLSN(t, ctx, r.primary) > before+512<<10, nil
		}))
		r.startReceiver(ctx)
		r.waitSpoolGrows(ctx, 1<<20)
		r.sidecar.Kill()
		r.startSidecar(ctx, r.primary)
		r.waitStreaming(ctx)
		restarts += 2
	}
	require.NoError(t, load.Stop())
	segs := r.checkIdentical(ctx) // fails the test on any difference
	t.Logf("pg%d: %d restarts, %d inserts, %d segments identical", major, restarts, load.Count(), segs)
	return restarts, 0
}
