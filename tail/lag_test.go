package tail

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/tail/wal"
)

func TestLagTracker(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	// step is one call: a read of the source's end, an ack, or a look at the lag.
	type step struct {
		read, ack wal.LSN
		at        int // ms after t0
		want      time.Duration
	}
	read := func(lsn wal.LSN, at int) step { return step{read: lsn, at: at} }
	ack := func(lsn wal.LSN, at int) step { return step{ack: lsn, at: at} }
	lag := func(at int, want time.Duration) step { return step{at: at, want: want} }
	cases := []struct {
		name  string
		steps []step
	}{
		{"nothing read", []step{lag(5, 0)}},
		{"caught up is 0", []step{read(100, 0), ack(100, 3), lag(10, 0)}},
		{"waiting shows the oldest's age", []step{read(100, 0), read(200, 4), lag(10, 10*time.Millisecond)}},
		{"an ack measures from its newest sample", []step{read(100, 0), read(200, 4), read(300, 6), ack(250, 9), lag(9, 5*time.Millisecond)}},
		{"the last ack's lag, when longer than the oldest's age", []step{read(100, 0), read(200, 7), ack(150, 8), lag(9, 8*time.Millisecond)}},
		{"the oldest's age, when longer than the last ack's lag", []step{read(100, 0), read(200, 1), ack(150, 8), lag(30, 29*time.Millisecond)}},
		{"an ack short of every sample measures nothing", []step{read(100, 0), ack(50, 20), lag(20, 20*time.Millisecond)}},
		{"an ack past the end read (a drain) clears all", []step{read(100, 0), read(200, 5), ack(900, 7), lag(50, 0)}},
		{"a read that does not move records nothing", []step{read(100, 0), ack(100, 2), read(100, 40), lag(50, 0)}},
		{"a read the receiver holds records nothing", []step{ack(500, 0), read(400, 1), lag(50, 0)}},
		{"a read behind the samples starts over", []step{read(100, 0), read(50, 30), lag(35, 5*time.Millisecond)}},
		{"a session's welcome behind the samples keeps them", []step{read(100, 0), ack(100, 1), read(200, 2), ack(20, 10), lag(12, 10*time.Millisecond)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var l lagTracker
			for i, s := range c.steps {
				switch {
				case s.read != 0:
					l.read(s.read, ms(s.at))
				case s.ack != 0:
					l.ack(s.ack, ms(s.at))
				default:
					got := l.lag(ms(s.at))
					require.Equal(t, s.want, got, "step %d: got %s, want %s", i, got, s.want)
				}
			}
		})
	}
}

// TestLagTrackerFull: a receiver that stops acking fills the ring; the oldest sample
// stays, so the lag keeps growing, and an ack of everything clears it.
func TestLagTrackerFull(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var l lagTracker
	for i := range 10 * lagSamples {
		l.read(wal.LSN(100*(i+1)), t0.Add(time.Duration(i)*time.Millisecond))
	}
	require.Equal(t, lagSamples, l.n)
	now := t0.Add(time.Hour)
	require.Equal(t, time.Hour, l.lag(now), "the oldest sample is the first read")
	l.ack(wal.LSN(100*10*lagSamples), now)
	require.Zero(t, l.lag(now))
	require.Equal(t, time.Hour-time.Duration(10*lagSamples-1)*time.Millisecond, l.last, "the newest sample is the last read")
}
