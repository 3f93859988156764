package tail

import (
	"sync"
	"time"

	"github.com/walship/walship/tail/wal"
)

// lagSamples is how many (position, time read) samples a lagTracker keeps: with acks
// after every poll only a few are ever waiting, and a receiver that is down leaves a
// full ring that still knows its oldest sample.
const lagSamples = 64

// lagTracker measures the flush lag: the time from reading a position at the source (a
// primary's flush position) to the receiver's acknowledgement that it holds everything
// before it durably, as PostgreSQL's walsender measures pg_stat_replication.flush_lag
// (walsender.c: LagTrackerWrite, LagTrackerRead). Each read that moves the position
// records a sample; an ack takes off every sample it covers and measures the lag as the
// age of the newest of them. It keeps no clock: its callers pass the time.
//
// read, ack and lag may be called from different goroutines.
type lagTracker struct {
	mu    sync.Mutex
	ring  [lagSamples]lagSample
	head  int           // the oldest sample
	n     int           // samples waiting for an ack
	acked wal.LSN       // the last ack's position
	last  time.Duration // the lag the last ack that covered a sample measured
}

type lagSample struct {
	lsn wal.LSN
	at  time.Time
}

// read records that the source's end was lsn at time at. A position the receiver
// already acknowledged, or one that is not past the last sample, records nothing. A
// position behind the last sample (a new timeline branches off before it, or another
// primary) drops the samples, which no ack of this stream can cover now.
func (l *lagTracker) read(lsn wal.LSN, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n > 0 {
		newest := l.ring[(l.head+l.n-1)%lagSamples].lsn
		switch {
		case lsn == newest:
			return
		case lsn < newest:
			l.n = 0
		}
	}
	if lsn <= l.acked && l.n == 0 {
		return
	}
	if l.n == lagSamples {
		// Full: overwrite the newest sample, as LagTrackerWrite does. The oldest stays,
		// so the lag still shows at least its age; acks of the positions in between
		// measure from a later read, a little short.
		l.n--
	}
	l.ring[(l.head+l.n)%lagSamples] = lagSample{lsn: lsn, at: at}
	l.n++
}

// ack records that the receiver acknowledged everything before lsn as durable at time
// at.
func (l *lagTracker) ack(lsn wal.LSN, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.acked = lsn
	covered := false
	var newest time.Time
	for l.n > 0 && l.ring[l.head].lsn <= lsn {
		newest, covered = l.ring[l.head].at, true
		l.head = (l.head + 1) % lagSamples
		l.n--
	}
	if covered {
		l.last = max(at.Sub(newest), 0)
	}
}

// lag is the flush lag at time now: zero when every position read has been
// acknowledged; else the lag the last ack measured, or the age of the oldest position
// still waiting for one if that is longer (a receiver that stopped acking shows a lag
// that grows).
func (l *lagTracker) lag(now time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n == 0 {
		return 0
	}
	return max(l.last, now.Sub(l.ring[l.head].at))
}
