package feeder

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/receiver/spool"
)

func ptr[T any](v T) *T { return &v }

// TestCheck judges spool states at each level, with the defaults walship check uses.
func TestCheck(t *testing.T) {
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	th := Thresholds{
		LagBytes:  Limit[int64]{Warn: 16 << 20, Crit: 128 << 20},
		Lag:       Limit[time.Duration]{Warn: 10 * time.Second, Crit: time.Minute},
		NoSidecar: Limit[time.Duration]{Warn: 30 * time.Second, Crit: 5 * time.Minute},
		SlotBytes: Limit[int64]{Warn: 1 << 30, Crit: 8 << 30},

		ArchiveFailing: Limit[time.Duration]{Warn: time.Minute, Crit: 10 * time.Minute},
	}
	th.Free.Warn, th.Free.Crit = Space{Percent: 20}, Space{Percent: 10}
	healthy := func() Status {
		return Status{
			SystemID: 7, Timeline: 1, Durable: "0/3000000", ReceiverRunning: true,
			SidecarConnected: true, SidecarSince: now.Add(-time.Hour).Format(time.RFC3339Nano),
			FreeBytes: 50 << 30, TotalBytes: 100 << 30,
			LagBytes: ptr(uint64(0)), LagSeconds: ptr(0.0), Slot: "walship", SlotRetained: ptr(uint64(1 << 20)),
		}
	}
	for _, c := range []struct {
		name   string
		change func(*Status)
		level  Level
		says   string
	}{
		{"healthy", func(*Status) {}, OK, "durable to 0/3000000 on timeline 1, sidecar connected since"},
		{"lag bytes warning", func(s *Status) { s.LagBytes = ptr(uint64(20 << 20)) }, Warning, "20.0 MiB behind the primary"},
		{"lag bytes critical", func(s *Status) { s.LagBytes = ptr(uint64(200 << 20)) }, Critical, "200.0 MiB behind the primary"},
		{"lag seconds warning", func(s *Status) { s.LagSeconds = ptr(12.0) }, Warning, "behind the primary for 12s"},
		{"lag seconds critical", func(s *Status) { s.LagSeconds = ptr(61.0) }, Critical, "behind the primary for 1m1s"},
		{"no sidecar, briefly", func(s *Status) {
			s.SidecarConnected, s.NoSidecarSince = false, now.Add(-10*time.Second).Format(time.RFC3339Nano)
		}, OK, "no sidecar connected for 10s"},
		{"no sidecar warning", func(s *Status) {
			s.SidecarConnected, s.NoSidecarSince = false, now.Add(-time.Minute).Format(time.RFC3339Nano)
		}, Warning, "no sidecar connected for 1m0s"},
		{"no sidecar critical", func(s *Status) {
			s.SidecarConnected, s.NoSidecarSince = false, now.Add(-time.Hour).Format(time.RFC3339Nano)
		}, Critical, "no sidecar connected for 1h0m0s"},
		{"slot warning", func(s *Status) { s.SlotRetained = ptr(uint64(2 << 30)) }, Warning, "slot walship holds back 2.0 GiB"},
		{"slot critical", func(s *Status) { s.SlotRetained = ptr(uint64(9 << 30)) }, Critical, "slot walship holds back 9.0 GiB"},
		{"free warning", func(s *Status) { s.FreeBytes = 15 << 30 }, Warning, "15.0 GiB free on the spool's file system (below 20%)"},
		{"free critical", func(s *Status) { s.FreeBytes = 5 << 30 }, Critical, "5.0 GiB free on the spool's file system (below 10%)"},
		{"receiver down", func(s *Status) { s.ReceiverRunning, s.SidecarConnected = false, false }, Critical, "no receiver runs on the spool"},
		{"promoted", func(s *Status) { s.Frozen, s.Promoted = true, true }, Critical, "promoted from"},
		{"frozen", func(s *Status) { s.Frozen = true }, Critical, "frozen by a promotion in progress"},
		{"drained", func(s *Status) { s.EndOfWAL = "0/3000100" }, Critical, "the primary's server is gone (drained to 0/3000100)"},
		{"empty spool", func(s *Status) {
			*s = Status{ReceiverRunning: true, SidecarConnected: true, FreeBytes: 1 << 40, TotalBytes: 1 << 40}
		}, Warning, "the spool holds no WAL yet"},
		{"no sidecar since unknown", func(s *Status) { s.SidecarConnected = false }, Unknown, "no sidecar connected, since when unknown"},
		{"archive uploading", func(s *Status) { s.Archive = &spool.ArchiveState{URL: "s3://b/p", Pending: 3} }, OK, "durable to"},
		{"archive failing, briefly", func(s *Status) {
			s.Archive = &spool.ArchiveState{URL: "s3://b/p", FailingSince: now.Add(-5 * time.Second).Format(time.RFC3339Nano), LastError: "connection refused"}
		}, OK, "uploads to the archive have failed for 5s: connection refused"},
		{"archive failing warning", func(s *Status) {
			s.Archive = &spool.ArchiveState{URL: "s3://b/p", FailingSince: now.Add(-2 * time.Minute).Format(time.RFC3339Nano), LastError: "connection refused"}
		}, Warning, "uploads to the archive have failed for 2m0s: connection refused"},
		{"archive failing critical", func(s *Status) {
			s.Archive = &spool.ArchiveState{URL: "s3://b/p", FailingSince: now.Add(-time.Hour).Format(time.RFC3339Nano), LastError: "connection refused"}
		}, Critical, "uploads to the archive have failed for 1h0m0s"},
		{"archive refused", func(s *Status) {
			s.Archive = &spool.ArchiveState{URL: "s3://b/p", Refused: []string{"000000010000000000000003", "000000010000000000000004"}}
		}, Critical, "the archive holds other bytes than the spool for 2 file(s), 000000010000000000000004 the last (not overwritten)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			st := healthy()
			c.change(&st)
			v := Check(st, th, now)
			require.Equal(t, c.level, v.Level, v.Line())
			require.Contains(t, v.Message, c.says)
			line := v.Line()
			require.True(t, strings.HasPrefix(line, "WALSHIP "+c.level.String()+" - "), line)
			require.NotContains(t, line, "\n")
			require.Contains(t, v.Perf, "free_bytes=")
		})
	}

	// Two problems: the worse one is the verdict and comes first.
	st := healthy()
	st.LagBytes, st.ReceiverRunning, st.SidecarConnected = ptr(uint64(20<<20)), false, false
	v := Check(st, th, now)
	require.Equal(t, Critical, v.Level)
	require.Equal(t, "no receiver runs on the spool; 20.0 MiB behind the primary", v.Message)

	// Performance data in Nagios's form: label=value[unit];warn;crit;min[;max].
	v = Check(healthy(), th, now)
	require.Equal(t, "lag_bytes=0B;16777216;134217728;0 lag_seconds=0.000s;10;60;0 slot_retained_bytes=1048576B;1073741824;8589934592;0 free_bytes=53687091200B;21474836480;10737418240;0;107374182400", v.Perf)
	st = healthy()
	st.Archive = &spool.ArchiveState{URL: "s3://b/p", Pending: 3}
	require.Contains(t, Check(st, th, now).Perf, " archive_pending_files=3;;;0 ")

	// A threshold at 0 is off.
	off := th
	off.LagBytes = Limit[int64]{}
	st = healthy()
	st.LagBytes = ptr(uint64(1 << 40))
	require.Equal(t, OK, Check(st, off, now).Level)
}

func TestParseSizes(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "1048576": 1 << 20, "16MB": 16 << 20, "16MiB": 16 << 20, "2GB": 2 << 30, "1.5GiB": 3 << 29, "8kB": 8 << 10, "1TB": 1 << 40, "100B": 100} {
		got, err := ParseBytes(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "MB", "-1", "12XB", "ten", "1e", "5 parsecs"} {
		_, err := ParseBytes(in)
		require.Error(t, err, in)
		require.Contains(t, err.Error(), "want a size such as", in)
	}
	s, err := ParseSpace("15%")
	require.NoError(t, err)
	require.Equal(t, uint64(15<<20), s.bytes(100<<20))
	s, err = ParseSpace("1GB")
	require.NoError(t, err)
	require.Equal(t, uint64(1<<30), s.bytes(100<<40))
	for _, in := range []string{"101%", "-5%", "x%"} {
		_, err := ParseSpace(in)
		require.ErrorContains(t, err, "want a percentage", in)
	}
}

// TestSplitOpts reads postmaster.opts as the server writes it.
func TestSplitOpts(t *testing.T) {
	require.Equal(t, []string{"/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/15/main", "-c", "config_file=/etc/postgresql/15/main/postgresql.conf"},
		splitOpts(`/usr/lib/postgresql/15/bin/postgres "-D" "/var/lib/postgresql/15/main" "-c" "config_file=/etc/postgresql/15/main/postgresql.conf"`))
	require.Equal(t, []string{"/opt/pg/bin/postgres"}, splitOpts("/opt/pg/bin/postgres"))
	require.Equal(t, []string{"/opt/pg/bin/postgres", "-D", "/data with space"}, splitOpts(`/opt/pg/bin/postgres "-D" "/data with space"`))
}
