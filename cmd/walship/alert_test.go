package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/feeder"
	"github.com/walship/walship/receiver/spool"
)

// recordingCommand is an alert command that appends "condition|$1|level|$2" to file
// and then exits with status rc.
func recordingCommand(file string, rc int) string {
	return fmt.Sprintf(`printf '%%s|%%s|%%s|%%s\n' "$WALSHIP_ALERT_CONDITION" "$1" "$WALSHIP_ALERT_LEVEL" "$2" >> %s; exit %d`, file, rc)
}

// alertLines reads the alerts recorded in file, as "condition|level|message".
func alertLines(t *testing.T, file string) []string {
	b, err := os.ReadFile(file)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	// Only whole lines: the command may be writing the next one.
	text := string(b[:bytes.LastIndexByte(b, '\n')+1])
	var out []string
	for _, l := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		if l == "" {
			continue
		}
		f := strings.SplitN(l, "|", 4)
		require.Len(t, f, 4, l)
		require.Equal(t, f[1], f[2], "the level as $1 and in WALSHIP_ALERT_LEVEL: %s", l)
		out = append(out, f[0]+"|"+f[1]+"|"+f[3])
	}
	return out
}

// waitAlert waits until file holds n alerts, the last with the given prefix.
func waitAlert(t *testing.T, ctx context.Context, file string, n int, prefix string) []string {
	t.Helper()
	var lines []string
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "alert "+prefix, func() (bool, error) {
		lines = alertLines(t, file)
		return len(lines) >= n, nil
	}), "%q", lines)
	require.Len(t, lines, n, "one alert per change: %q", lines)
	require.True(t, strings.HasPrefix(lines[n-1], prefix), "%q", lines)
	return lines
}

// TestAlerts: the receiver's and the sidecar's alert commands run once per change of a
// condition's state, and a command that fails is logged and holds nothing up.
func TestAlerts(t *testing.T) {
	ctx := testContext(t, time.Minute)
	r := newRig(t, ctx, 1)
	recvFile, sideFile := filepath.Join(r.dir, "receiver.alerts"), filepath.Join(r.dir, "sidecar.alerts")
	// The receiver's command fails after recording; the sidecar's succeeds.
	r.receiverArgs = []string{"--alert-command", recordingCommand(recvFile, 7), "--alert-after", "300ms"}
	// The sidecar's DSN carries a password (the server trusts, so it is not checked),
	// which must show nowhere (the last --dsn wins over the rig's).
	const password = "NeverShown4242"
	r.sidecarArgs = []string{"--alert-command", recordingCommand(sideFile, 0), "--alert-after", "300ms",
		"--dsn", r.primary.DSN() + " password=" + password}

	// A receiver without a sidecar: critical after --alert-after, ok once one comes.
	r.startReceiver(ctx)
	waitAlert(t, ctx, recvFile, 1, "sidecar|critical|no sidecar connected for")
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	waitAlert(t, ctx, recvFile, 2, "sidecar|ok|a sidecar is connected from 127.0.0.1:")
	require.Contains(t, r.receiver.Log(), "the alert command failed", "its failure is logged")

	// The receiver gone: the sidecar alerts once, with the error, and once again when
	// it streams again.
	require.NoError(t, r.receiver.Stop(ctx))
	to := "receiver " + r.addr
	waitAlert(t, ctx, sideFile, 1, to+"|critical|no session with receiver "+r.addr+" for ")
	r.startReceiver(ctx)
	r.waitStreaming(ctx)
	waitAlert(t, ctx, sideFile, 2, to+"|ok|streaming to receiver "+r.addr)

	// A failing alert command held nothing up: WAL still flows.
	createLoadTable(t, ctx, r.primary)
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))

	// The password, in no log, metric or status; status takes its settings from a
	// config file, the environment winning over it.
	res, err := http.Get("http://" + r.sideMetrics + "/metrics")
	require.NoError(t, err)
	body, err := io.ReadAll(res.Body)
	require.NoError(t, res.Body.Close())
	require.NoError(t, err)
	require.Contains(t, string(body), "walship_sidecar_lag_seconds")
	conf := filepath.Join(r.dir, "walship.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf("[status]\nspool = %s\ndsn = '%s password=%s'\njson = on\n", r.dir+"/nope", r.primary.DSN(), password)), 0o600))
	cmd := exec.Command(walshipBin, "status", "--config", conf)
	cmd.Env = append(os.Environ(), "WALSHIP_STATUS_SPOOL="+r.spool)
	shown, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", shown)
	var st feeder.Status
	require.NoError(t, json.Unmarshal(shown, &st), "%s", shown)
	require.Equal(t, r.spool, st.Spool, "the environment wins over the file")
	require.NotNil(t, st.LagBytes, "the file's DSN was used")
	require.NoError(t, os.Chmod(conf, 0o644))
	out, err := exec.Command(walshipBin, "status", "--config", conf).CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "walship.conf:3: dsn holds a password and every user can read the file")
	for what, text := range map[string]string{"the sidecar's log": r.sidecar.Log(), "its metrics": string(body), "status": string(shown), "the refusal": string(out)} {
		require.NotContains(t, text, password, what)
	}

	// A promotion (the spool frozen): a warning, the session refused, for good: the
	// sidecar stops shipping to this receiver and says why.
	n := len(alertLines(t, recvFile))
	require.NoError(t, spool.Freeze(r.spool))
	require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) VALUES (1, 'after the freeze')"))
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the frozen spool's alerts", func() (bool, error) {
		l := strings.Join(alertLines(t, recvFile)[n:], "\n")
		return strings.Contains(l, "promotion|warning|the spool is frozen") && strings.Contains(l, "refusal|critical|refused a sidecar's session: spool is frozen for promotion"), nil
	}), "%q", alertLines(t, recvFile))
	waitAlert(t, ctx, sideFile, 3, to+"|critical|shipping to receiver "+r.addr+" stopped for good: refused by receiver: spool is frozen for promotion")
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the sidecar to stop: its only receiver refused it for good", func() (bool, error) {
		return !r.sidecar.Running(), nil
	}))
	require.NoError(t, spool.Unfreeze(r.spool))
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the alert of the spool taking WAL again", func() (bool, error) {
		return strings.Contains(strings.Join(alertLines(t, recvFile)[n:], "\n"), "promotion|ok|the spool takes WAL"), nil
	}), "%q", alertLines(t, recvFile))

	// Each condition changed level at every line: no alert repeats its condition's last.
	for _, file := range []string{recvFile, sideFile} {
		last := map[string]string{}
		for _, l := range alertLines(t, file) {
			f := strings.SplitN(l, "|", 3)
			require.NotEqual(t, last[f[0]], f[1], "%s: %q repeats its level", file, l)
			last[f[0]] = f[1]
		}
	}
}

// TestAlerter: one run per change of a condition's level, none for a first ok, none
// without a command, in order.
func TestAlerter(t *testing.T) {
	file := filepath.Join(t.TempDir(), "alerts")
	ctx, cancel := context.WithCancel(context.Background())
	a, wait := newAlerter(ctx, recordingCommand(file, 0), zerolog.Nop())
	a.Alert("disk", alertOK, "fine")             // a first ok: nothing
	a.Alert("disk", alertCritical, "full")       // 1
	a.Alert("disk", alertCritical, "still full") // same level: nothing
	a.Alert("slot", alertWarning, "behind")      // 2
	a.Alert("disk", alertOK, "room again")       // 3
	a.Alert("slot", alertCritical, "far behind") // 4
	require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "four alerts", func() (bool, error) {
		return len(alertLines(t, file)) >= 4, nil
	}))
	cancel()
	wait()
	require.Equal(t, []string{"disk|critical|full", "slot|warning|behind", "disk|ok|room again", "slot|critical|far behind"}, alertLines(t, file))

	// Without a command the changes are logged only.
	var log strings.Builder
	ctx, cancel = context.WithCancel(context.Background())
	a, wait = newAlerter(ctx, "", zerolog.New(&log))
	a.Alert("sidecar", alertCritical, "no sidecar connected for 31s")
	cancel()
	wait()
	require.Equal(t, `{"level":"error","condition":"sidecar","alert":"critical","message":"no sidecar connected for 31s"}`+"\n", log.String())
}
