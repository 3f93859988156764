package main

import (
	"io"
	"os"
	"regexp"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5/pgconn"
)

// A password never reaches the logs, an error or an output: every text walship writes
// to standard error goes through redact, which hides a password in a connection string
// (password=..., postgres://user:password@...) and every password the command's --dsn
// settings carry or lead to (PGPASSWORD, the password file), wherever it appears
// (those of four characters or more: shorter ones would hide pieces of every message).
var (
	passwordSetting = regexp.MustCompile(`(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)`)
	passwordInURL   = regexp.MustCompile(`(?i)(\bpostgres(?:ql)?://[^:/@\s]*:)([^@\s]*)@`)

	secretsMu sync.Mutex
	secrets   []string // passwords to hide wherever they appear
)

const hidden = "********"

// stderr is standard error with passwords hidden.
var stderr io.Writer = redactor{os.Stderr}

// keepSecret records the password of a connection string (or the one libpq's rules
// find for it), to be hidden from everything written.
func keepSecret(dsn string) {
	var found []string
	if cfg, err := pgconn.ParseConfig(dsn); err == nil && cfg.Password != "" {
		found = append(found, cfg.Password)
	}
	for _, m := range passwordSetting.FindAllStringSubmatch(dsn, -1) {
		found = append(found, strings.Trim(m[2], "'"))
	}
	secretsMu.Lock()
	defer secretsMu.Unlock()
	for _, s := range found {
		// Shorter ones would hide pieces of every message; their connection
		// strings are hidden by the patterns above all the same.
		if len(s) >= 4 {
			secrets = append(secrets, s)
		}
	}
}

// keepSecretValue records a secret that is not a connection string (an AWS secret
// key), to be hidden from everything written.
func keepSecretValue(v string) {
	if len(v) < 4 {
		return
	}
	secretsMu.Lock()
	defer secretsMu.Unlock()
	secrets = append(secrets, v)
}

// redact hides the passwords in s.
func redact(s string) string {
	s = passwordSetting.ReplaceAllString(s, "${1}"+hidden)
	s = passwordInURL.ReplaceAllString(s, "${1}"+hidden+"@")
	secretsMu.Lock()
	defer secretsMu.Unlock()
	for _, p := range secrets {
		s = strings.ReplaceAll(s, p, hidden)
	}
	return s
}

// redactor writes through redact. zerolog writes each event in one Write, so a
// password is never split between two.
type redactor struct{ w io.Writer }

func (r redactor) Write(p []byte) (int, error) {
	if _, err := io.WriteString(r.w, redact(string(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}
