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
// (where systemd-analyze is installed), their hardening, and that every flag their
// ExecStart gives is one the command takes.
func TestServiceUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed here: the units in deploy/ are not verified")
	}
	deploy := filepath.Join("..", "..", "deploy")
	for _, c := range []struct {
		unit, command, env string
		writes             bool
	}{
		{"walship-receive.service", "receive", "receive.env", true},
		{"walship-tail.service", "tail", "tail.env", false},
	} {
		b, err := os.ReadFile(filepath.Join(deploy, c.unit))
		require.NoError(t, err)
		unit := string(b)
		for _, want := range []string{"Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
			"User=postgres", "EnvironmentFile=/etc/walship/" + c.env} {
			require.Contains(t, unit, "\n"+want, "%s: %s", c.unit, want)
		}
		require.Contains(t, unit, " --tls-dir /etc/walship/tls ", "%s: the certificates", c.unit)
		rw := regexp.MustCompile(`(?m)^ReadWritePaths=(.*)$`).FindAllStringSubmatch(unit, -1)
		if c.writes {
			require.Len(t, rw, 1, "%s: one writable path", c.unit)
			require.Equal(t, "/var/lib/walship", rw[0][1], "%s: the spool's directory is the one writable path", c.unit)
		} else {
			require.Empty(t, rw, "%s writes nothing", c.unit)
		}
		_, err = os.Stat(filepath.Join(deploy, c.env))
		require.NoError(t, err, "the example settings of %s", c.unit)

		// Every flag of ExecStart is one the command knows.
		exe := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/walship (\S+) (.*)$`).FindStringSubmatch(unit)
		require.NotNil(t, exe, "%s: ExecStart runs /usr/local/bin/walship", c.unit)
		require.Equal(t, c.command, exe[1])
		help := runOK(t, c.command, "--help")
		for _, f := range regexp.MustCompile(`--([a-z-]+)`).FindAllStringSubmatch(exe[2], -1) {
			require.Contains(t, help, "  -"+f[1]+" ", "%s: walship %s has no --%s", c.unit, c.command, f[1])
		}

		// systemd's verifier, on a copy that runs this binary and reads the example
		// settings (it checks that both exist); it prints what it finds wrong.
		dir := t.TempDir()
		abs, err := filepath.Abs(filepath.Join(deploy, c.env))
		require.NoError(t, err)
		copied := strings.NewReplacer("/usr/local/bin/walship", walshipBin, "EnvironmentFile=/etc/walship/"+c.env, "EnvironmentFile="+abs).Replace(unit)
		path := filepath.Join(dir, c.unit)
		require.NoError(t, os.WriteFile(path, []byte(copied), 0o644))
		out, err := exec.Command(analyze, "verify", path).CombinedOutput()
		require.NoError(t, err, "systemd-analyze verify %s:\n%s", c.unit, out)
		require.Empty(t, strings.TrimSpace(string(out)), "systemd-analyze verify %s", c.unit)
	}
}
