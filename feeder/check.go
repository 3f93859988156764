package feeder

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Level is a check's verdict, numbered as Nagios and Icinga number their plugins'
// exit statuses.
type Level int

const (
	OK Level = iota
	Warning
	Critical
	Unknown
)

func (l Level) String() string {
	return [...]string{"OK", "WARNING", "CRITICAL", "UNKNOWN"}[l]
}

// Limit is a threshold's warning and critical values; 0 turns one off.
type Limit[T int64 | time.Duration] struct{ Warn, Crit T }

// Space is a free-space threshold: bytes, or a percentage of the file system.
type Space struct {
	Bytes   uint64
	Percent float64
}

// ParseSpace reads "10%", "512MiB", "2GB", "1048576".
func ParseSpace(s string) (Space, error) {
	if p, ok := strings.CutSuffix(s, "%"); ok {
		v, err := strconv.ParseFloat(p, 64)
		if err != nil || v < 0 || v > 100 {
			return Space{}, fmt.Errorf("%q: want a percentage from 0%% to 100%%", s)
		}
		return Space{Percent: v}, nil
	}
	n, err := ParseBytes(s)
	return Space{Bytes: uint64(n)}, err
}

// bytes returns the threshold in bytes of a file system of total bytes.
func (s Space) bytes(total uint64) uint64 {
	if s.Percent > 0 {
		return uint64(s.Percent / 100 * float64(total))
	}
	return s.Bytes
}

func (s Space) String() string {
	if s.Percent > 0 {
		return strconv.FormatFloat(s.Percent, 'f', -1, 64) + "%"
	}
	return formatBytes(s.Bytes)
}

// ParseBytes reads a size: a number of bytes, or one with a unit (kB, MB, GB, TB as
// PostgreSQL means them, powers of 1024, and KiB, MiB, GiB, TiB alike).
func ParseBytes(s string) (int64, error) {
	num := strings.TrimRight(s, "kKMGTiBb ")
	unit := strings.TrimSpace(s[len(num):])
	v, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q: want a size such as 1048576, 512MB or 2GiB", s)
	}
	shift := map[string]uint{"": 0, "B": 0, "kB": 10, "KB": 10, "KiB": 10, "MB": 20, "MiB": 20, "GB": 30, "GiB": 30, "TB": 40, "TiB": 40}
	sh, ok := shift[unit]
	if !ok {
		return 0, fmt.Errorf("%q: unknown unit %q (want kB, MB, GB or TB)", s, unit)
	}
	return int64(v * float64(uint64(1)<<sh)), nil
}

func formatBytes(n uint64) string {
	for _, u := range []struct {
		shift uint
		name  string
	}{{40, "TiB"}, {30, "GiB"}, {20, "MiB"}, {10, "KiB"}} {
		if n >= 1<<u.shift {
			return strconv.FormatFloat(float64(n)/float64(uint64(1)<<u.shift), 'f', 1, 64) + " " + u.name
		}
	}
	return strconv.FormatUint(n, 10) + " B"
}

// Thresholds are what walship check compares a spool's Status with.
type Thresholds struct {
	LagBytes  Limit[int64]         // bytes behind the primary (needs the primary)
	Lag       Limit[time.Duration] // time behind the primary (needs the primary)
	NoSidecar Limit[time.Duration] // the receiver without a sidecar for longer
	SlotBytes Limit[int64]         // WAL the slot holds back on the primary (needs the primary)
	Free      struct{ Warn, Crit Space }
	// ArchiveFailing is how long uploads to the archive may fail (with one).
	ArchiveFailing Limit[time.Duration]
}

// CheckResult is walship check's result: the level, one line that says why, and Nagios
// performance data.
type CheckResult struct {
	Level   Level
	Message string
	Perf    string
}

// Line is the check's output, as Nagios plugins print it: one line (a message of
// several lines, as some errors are, is joined with semicolons).
func (v CheckResult) Line() string {
	msg := strings.Join(strings.FieldsFunc(v.Message, func(r rune) bool { return r == '\n' }), "; ")
	line := "WALSHIP " + v.Level.String() + " - " + strings.ReplaceAll(msg, "\t", "")
	if v.Perf != "" {
		line += " | " + v.Perf
	}
	return line
}

// Check judges st by th at time now. The problems of the worst level come first in the
// message, then what is fine.
func Check(st Status, th Thresholds, now time.Time) CheckResult {
	var problems [4][]string
	raise := func(l Level, format string, a ...any) { problems[l] = append(problems[l], fmt.Sprintf(format, a...)) }
	var perf []string
	metric := func(label string, v any, unit string, warn, crit any) {
		perf = append(perf, fmt.Sprintf("%s=%v%s;%v;%v;0", label, v, unit, orEmpty(warn), orEmpty(crit)))
	}

	switch {
	case st.Promoted:
		raise(Critical, "promoted from: the spool takes no more WAL")
	case st.Frozen:
		raise(Critical, "frozen by a promotion in progress")
	}
	if st.EndOfWAL != "" {
		raise(Critical, "the primary's server is gone (drained to %s)", st.EndOfWAL)
	}
	if !st.ReceiverRunning {
		raise(Critical, "no receiver runs on the spool")
	}
	if st.SystemID == 0 {
		raise(Warning, "the spool holds no WAL yet")
	}

	if st.ReceiverRunning && !st.SidecarConnected {
		since, err := time.Parse(time.RFC3339Nano, st.NoSidecarSince)
		if err != nil {
			raise(Unknown, "no sidecar connected, since when unknown")
		} else {
			d := max(now.Sub(since), 0)
			lvl := overDuration(d, th.NoSidecar)
			raise(lvl, "no sidecar connected for %s", d.Round(100*time.Millisecond))
			metric("no_sidecar_seconds", strconv.FormatFloat(d.Seconds(), 'f', 3, 64), "s", secs(th.NoSidecar.Warn), secs(th.NoSidecar.Crit))
		}
	}

	if st.LagBytes != nil {
		lag := *st.LagBytes
		lvl := overBytes(lag, th.LagBytes)
		if lvl > OK {
			raise(lvl, "%s behind the primary", formatBytes(lag))
		}
		metric("lag_bytes", lag, "B", bytesOrEmpty(th.LagBytes.Warn), bytesOrEmpty(th.LagBytes.Crit))
	}
	if st.LagSeconds != nil {
		d := time.Duration(*st.LagSeconds * float64(time.Second))
		lvl := overDuration(d, th.Lag)
		if lvl > OK {
			raise(lvl, "behind the primary for %s", d.Round(100*time.Millisecond))
		}
		metric("lag_seconds", strconv.FormatFloat(*st.LagSeconds, 'f', 3, 64), "s", secs(th.Lag.Warn), secs(th.Lag.Crit))
	}
	if st.SlotRetained != nil {
		n := *st.SlotRetained
		lvl := overBytes(n, th.SlotBytes)
		if lvl > OK {
			raise(lvl, "slot %s holds back %s on the primary", st.Slot, formatBytes(n))
		}
		metric("slot_retained_bytes", n, "B", bytesOrEmpty(th.SlotBytes.Warn), bytesOrEmpty(th.SlotBytes.Crit))
	}

	if a := st.Archive; a != nil {
		if n := len(a.Missing); n > 0 {
			raise(Critical, "%d segment(s) left the spool before they were uploaded, %s the last: the archive lacks them", n, a.Missing[n-1])
		}
		if n := len(a.Refused); n > 0 {
			raise(Critical, "the archive holds other bytes than the spool for %d file(s), %s the last (not overwritten)", n, a.Refused[n-1])
		}
		if a.FailingSince != "" {
			since, err := time.Parse(time.RFC3339Nano, a.FailingSince)
			if err != nil {
				raise(Unknown, "uploads to the archive fail, since when unknown: %s", a.LastError)
			} else {
				d := max(now.Sub(since), 0)
				raise(overDuration(d, th.ArchiveFailing), "uploads to the archive have failed for %s: %s", d.Round(100*time.Millisecond), a.LastError)
			}
		}
		metric("archive_pending_files", a.Pending, "", "", "")
	}

	warnFree, critFree := th.Free.Warn.bytes(st.TotalBytes), th.Free.Crit.bytes(st.TotalBytes)
	switch {
	case critFree > 0 && st.FreeBytes < critFree:
		raise(Critical, "%s free on the spool's file system (below %s)", formatBytes(st.FreeBytes), th.Free.Crit)
	case warnFree > 0 && st.FreeBytes < warnFree:
		raise(Warning, "%s free on the spool's file system (below %s)", formatBytes(st.FreeBytes), th.Free.Warn)
	}
	perf = append(perf, fmt.Sprintf("free_bytes=%dB;%v;%v;0;%d", st.FreeBytes, bytesOrEmpty(int64(warnFree)), bytesOrEmpty(int64(critFree)), st.TotalBytes))

	// The worst level is the verdict, a critical one worse than not knowing.
	v := CheckResult{Perf: strings.Join(perf, " ")}
	var parts []string
	for _, l := range []Level{Critical, Unknown, Warning} {
		if len(problems[l]) > 0 && v.Level == OK {
			v.Level = l
		}
		parts = append(parts, problems[l]...)
	}
	if v.Level == OK {
		parts = append(parts, fine(st))
	}
	parts = append(parts, problems[OK]...) // what is worth saying, yet fine
	v.Message = strings.Join(parts, "; ")
	return v
}

// fine says what an OK spool is doing.
func fine(st Status) string {
	s := "durable to " + st.Durable
	if st.Durable == "" {
		s = "no WAL"
	} else {
		s += fmt.Sprintf(" on timeline %d", st.Timeline)
	}
	if st.SidecarConnected {
		s += ", sidecar connected since " + st.SidecarSince
	}
	if st.LagBytes != nil {
		s += fmt.Sprintf(", %s behind the primary", formatBytes(*st.LagBytes))
	}
	return s
}

func overBytes(v uint64, l Limit[int64]) Level {
	switch {
	case l.Crit > 0 && v >= uint64(l.Crit):
		return Critical
	case l.Warn > 0 && v >= uint64(l.Warn):
		return Warning
	}
	return OK
}

func overDuration(v time.Duration, l Limit[time.Duration]) Level {
	switch {
	case l.Crit > 0 && v >= l.Crit:
		return Critical
	case l.Warn > 0 && v >= l.Warn:
		return Warning
	}
	return OK
}

func secs(d time.Duration) any {
	if d <= 0 {
		return ""
	}
	return strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
}

func bytesOrEmpty(n int64) any {
	if n <= 0 {
		return ""
	}
	return n
}

func orEmpty(v any) any {
	if v == nil {
		return ""
	}
	return v
}
