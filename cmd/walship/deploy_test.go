package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestServiceUnits checks the systemd units in deploy/ with systemd's own verifier
// (where systemd-analyze is installed), their hardening, and that the example config
// file they read gives each command valid settings.
func TestServiceUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed here: the units in deploy/ are not verified")
	}
	deploy := filepath.Join("..", "..", "deploy")
	conf := filepath.Join(deploy, "walship.conf")
	for _, c := range []struct {
		unit, command string
		writes        bool
	}{
		{"walship-receive.service", "receive", true},
		{"walship-tail.service", "tail", false},
	} {
		b, err := os.ReadFile(filepath.Join(deploy, c.unit))
		require.NoError(t, err)
		unit := string(b)
		for _, want := range []string{"Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "User=postgres",
			"ExecStart=/usr/local/bin/walship " + c.command + " --config /etc/walship/walship.conf\n"} {
			require.Contains(t, unit, "\n"+want, "%s: %s", c.unit, want)
		}
		rw := regexp.MustCompile(`(?m)^ReadWritePaths=(.*)$`).FindAllStringSubmatch(unit, -1)
		if c.writes {
			require.Len(t, rw, 1, "%s: one writable path", c.unit)
			require.Equal(t, "/var/lib/walship", rw[0][1], "%s: the spool's directory is the one writable path", c.unit)
		} else {
			require.Empty(t, rw, "%s writes nothing", c.unit)
		}

		// The example settings are the command's: its section and the common ones
		// parse, and give what the command requires.
		fs := commandFlags()[c.command]
		require.NotNil(t, fs)
		require.NoError(t, fs.Set("config", conf))
		require.NoError(t, applySettings(fs, c.command), "%s in %s", c.command, conf)
		for _, required := range map[string][]string{"tail": {"dsn", "to", "tls-dir"}, "receive": {"listen", "spool", "tls-dir"}}[c.command] {
			require.NotEmpty(t, fs.Lookup(required).Value.String(), "%s: [%s] sets --%s", conf, c.command, required)
		}
		require.Equal(t, "json", fs.Lookup("log-format").Value.String(), "for the journal")

		// systemd's verifier, on a copy that runs this binary and reads the example
		// settings (it checks that both exist); it prints what it finds wrong.
		dir := t.TempDir()
		abs, err := filepath.Abs(conf)
		require.NoError(t, err)
		copied := strings.NewReplacer("/usr/local/bin/walship", walshipBin, "/etc/walship/walship.conf", abs).Replace(unit)
		path := filepath.Join(dir, c.unit)
		require.NoError(t, os.WriteFile(path, []byte(copied), 0o644))
		out, err := exec.Command(analyze, "verify", path).CombinedOutput()
		require.NoError(t, err, "systemd-analyze verify %s:\n%s", c.unit, out)
		require.Empty(t, strings.TrimSpace(string(out)), "systemd-analyze verify %s", c.unit)
	}
}
