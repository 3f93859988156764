package main

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// configFlags makes a command's flag set as newFlags does, with flags of each kind.
func configFlags(t *testing.T, name string) (*flag.FlagSet, *string, *addrList, *bool, *time.Duration) {
	fs := newFlags(name, "", "")
	spool := fs.String("spool", "", "")
	var to addrList
	fs.Var(&to, "to", "")
	json := fs.Bool("json", false, "")
	timeout := fs.Duration("timeout", time.Minute, "")
	return fs, spool, &to, json, timeout
}

func writeConfig(t *testing.T, text string) string {
	path := filepath.Join(t.TempDir(), "walship.conf")
	require.NoError(t, os.WriteFile(path, []byte(text), 0o600))
	return path
}

// TestConfigPrecedence: a flag wins over the environment, which wins over the file; in
// the environment the command's own variable wins, in the file the command's section.
func TestConfigPrecedence(t *testing.T) {
	conf := writeConfig(t, `
# the standby's settings
spool = /from/file           # a comment
to = a.example:1
to = b.example:2
json = on
timeout = 5s
[status]
spool = '/from/status''s # section'
`)
	parse := func(name string, args ...string) (string, []string, bool, time.Duration) {
		fs, spool, to, json, timeout := configFlags(t, name)
		require.Equal(t, -1, parseWithArgs(fs, append([]string{"--config", conf}, args...)))
		return *spool, *to, *json, *timeout
	}

	spool, to, json, timeout := parse("tail")
	require.Equal(t, "/from/file", spool)
	require.Equal(t, []string{"a.example:1", "b.example:2"}, to)
	require.True(t, json)
	require.Equal(t, 5*time.Second, timeout)

	spool, _, _, _ = parse("status")
	require.Equal(t, "/from/status's # section", spool, "the command's section wins, a quoted value keeps its '#'")

	t.Setenv("WALSHIP_SPOOL", "/from/env")
	t.Setenv("WALSHIP_TO", "c.example:3, d.example:4")
	spool, to, _, _ = parse("status")
	require.Equal(t, "/from/env", spool, "the environment wins over the file")
	require.Equal(t, []string{"c.example:3", "d.example:4"}, to, "a repeatable flag's values, comma-separated")

	t.Setenv("WALSHIP_STATUS_SPOOL", "/from/status/env")
	spool, _, _, _ = parse("status")
	require.Equal(t, "/from/status/env", spool, "the command's own variable wins")
	spool, _, _, _ = parse("tail")
	require.Equal(t, "/from/env", spool, "another command's variable does not apply")

	spool, to, json, _ = parse("status", "--spool", "/from/flag", "--to", "e.example:5", "--json=false")
	require.Equal(t, "/from/flag", spool, "a flag wins")
	require.Equal(t, []string{"e.example:5"}, to, "a repeatable flag given replaces the others")
	require.False(t, json)

	// WALSHIP_CONFIG names the file when --config does not.
	require.NoError(t, os.Unsetenv("WALSHIP_SPOOL"))
	require.NoError(t, os.Unsetenv("WALSHIP_STATUS_SPOOL"))
	t.Setenv("WALSHIP_CONFIG", conf)
	fs, sp, _, _, _ := configFlags(t, "tail")
	require.Equal(t, -1, parseWithArgs(fs, nil))
	require.Equal(t, "/from/file", *sp)
}

// TestConfigErrors: each bad setting is a usage error naming where it is; nothing is
// half applied that the command would then run with.
func TestConfigErrors(t *testing.T) {
	for _, c := range []struct{ name, text, env, want string }{
		{"unknown setting", "spool = /x\nbogus = 1\n", "", `walship.conf:2: walship command has no setting "bogus"`},
		{"another command's setting in this command's section", "[status]\nlisten = 127.0.0.1:1\n", "", `walship.conf:2: walship status has no setting "listen"`},
		{"unknown section", "[stauts]\n", "", "walship.conf:1: [stauts] is no walship command"},
		{"bad section line", "[status\n", "", "walship.conf:1: want [command]"},
		{"no equals sign", "spool /x\n", "", "walship.conf:1: want name = value"},
		{"unterminated quote", "spool = '/x\n", "", "walship.conf:1: spool: no closing quote"},
		{"text after the quote", "spool = '/x' y\n", "", `walship.conf:1: spool: "y" after the closing quote`},
		{"set twice", "spool = /x\nspool = /y\n", "", "walship.conf:2: spool is already set on line 1"},
		{"bad boolean", "json = maybe\n", "", `walship.conf:1: json: "maybe": want true or false`},
		{"bad duration", "timeout = soon\n", "", `walship.conf:1: timeout: "soon": want a duration such as 500ms`},
		{"bad address", "to = nowhere\n", "", `walship.conf:1: to: "nowhere"`},
		{"config names config", "config = /etc/x\n", "", "walship.conf:1: a config file cannot name another"},
		{"bad environment", "", "WALSHIP_JSON=perhaps", `WALSHIP_JSON: "perhaps": want true or false`},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.env != "" {
				k, v, _ := strings.Cut(c.env, "=")
				t.Setenv(k, v)
			}
			conf := writeConfig(t, c.text)
			fs, _, _, _, _ := configFlags(t, "status")
			out := captureStderr(t, func() {
				require.Equal(t, exitUsage, parseWithArgs(fs, []string{"--config", conf}))
			})
			require.Contains(t, out, c.want)
			require.Contains(t, out, "Run 'walship status --help' for usage.")
		})
	}
	// A password every user can read.
	conf := writeConfig(t, "dsn = 'host=db password=pw'\n")
	require.NoError(t, os.Chmod(conf, 0o644))
	fs := newFlags("status", "", "")
	fs.String("dsn", "", "")
	out := captureStderr(t, func() {
		require.Equal(t, exitUsage, parseWithArgs(fs, []string{"--config", conf}))
	})
	require.Contains(t, out, "walship.conf:1: dsn holds a password and every user can read the file: chmod o-r")
	require.NotContains(t, out, "pw\n")
	require.NoError(t, os.Chmod(conf, 0o640))
	fs = newFlags("status", "", "")
	dsn := fs.String("dsn", "", "")
	require.Equal(t, -1, parseWithArgs(fs, []string{"--config", conf}))
	require.Equal(t, "host=db password=pw", *dsn)

	fs, _, _, _, _ = configFlags(t, "status")
	out = captureStderr(t, func() {
		require.Equal(t, exitUsage, parseWithArgs(fs, []string{"--config", "/nonexistent/walship.conf"}))
	})
	require.Contains(t, out, "--config: open /nonexistent/walship.conf: no such file or directory")
}

// captureStderr returns what f writes to walship's standard error.
func captureStderr(t *testing.T, f func()) string {
	t.Helper()
	var b strings.Builder
	old := stderr
	stderr = redactor{&b}
	defer func() { stderr = old }()
	f()
	return b.String()
}

// TestRedact: passwords in connection strings, and those a DSN carries, are hidden.
func TestRedact(t *testing.T) {
	keepSecret("host=db user=walship password='hunter2 x'")
	keepSecret("postgres://walship:s3cr%40t@db/postgres")
	for in, want := range map[string]string{
		"connect to host=db password=pw1234 user=x":              "connect to host=db password=******** user=x",
		"connect to host=db PASSWORD = 'a b c' user=x":           "connect to host=db PASSWORD = ******** user=x",
		"postgres://u:topsecret@db:5432/x?sslmode=require":       "postgres://u:********@db:5432/x?sslmode=require",
		"postgresql://u:p@db/x?password=inquery&sslmode=disable": "postgresql://u:********@db/x?password=********&sslmode=disable",
		"the server said: hunter2 x is wrong":                    "the server said: ******** is wrong",
		"decoded s3cr@t appears":                                 "decoded ******** appears",
		"nothing secret here":                                    "nothing secret here",
	} {
		require.Equal(t, want, redact(in), in)
	}
}
