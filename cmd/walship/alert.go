package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver"
	"github.com/walship/walship/receiver/archive"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail"
)

// Alert levels, as the alert command receives them.
const (
	alertOK       = "ok"
	alertWarning  = "warning"
	alertCritical = "critical"
)

// alertTimeout bounds one run of the alert command, alertFlush the runs of what is
// still queued when the process stops.
const (
	alertTimeout = 10 * time.Second
	alertFlush   = 10 * time.Second
)

// alertFlags adds --alert-command and --alert-after.
func alertFlags(fs *flag.FlagSet) (command *string, after *time.Duration) {
	command = fs.String("alert-command", "", "run this shell command on each change of a condition's state, with the level (ok, warning or critical) and a one-line message as its arguments $1 and $2 (see above)")
	after = fs.Duration("alert-after", 30*time.Second, "with --alert-command: how long a peer may stay unreachable or away before it is a change of state")
	return command, after
}

// alerter runs the alert command once for each change of a condition's level, in the
// order of the changes, one at a time, and never blocks the caller: a change that
// finds the queue full is logged and dropped (the queue holds 64). A condition's first
// report is a change unless it is ok: a command hears "ok" only after a problem.
type alerter struct {
	command string
	log     zerolog.Logger
	queue   chan alert

	mu     sync.Mutex
	levels map[string]string // each condition's last level
}

type alert struct{ condition, level, message string }

// newAlerter returns an alerter that runs command (none: only the logs) until ctx ends
// and what is queued then; wait returns once it has.
func newAlerter(ctx context.Context, command string, log zerolog.Logger) (a *alerter, wait func()) {
	a = &alerter{command: command, log: log, queue: make(chan alert, 64), levels: map[string]string{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case al := <-a.queue:
				a.run(context.Background(), al)
			case <-ctx.Done():
				// What is queued still runs, for alertFlush at most: the last changes
				// (shipping stopped for good) matter most.
				last, cancel := context.WithTimeout(context.Background(), alertFlush)
				defer cancel()
				for {
					select {
					case al := <-a.queue:
						a.run(last, al)
					default:
						return
					}
				}
			}
		}
	}()
	return a, func() { <-done }
}

// Alert records condition's level now; if it changed, it queues a run of the command.
// It is safe for concurrent use and returns at once. A nil alerter does nothing.
func (a *alerter) Alert(condition, level, message string) {
	if a == nil {
		return
	}
	a.mu.Lock()
	last, seen := a.levels[condition]
	a.levels[condition] = level
	a.mu.Unlock()
	if last == level || !seen && level == alertOK {
		return
	}
	ev := a.log.Warn()
	switch level {
	case alertOK:
		ev = a.log.Info()
	case alertCritical:
		ev = a.log.Error()
	}
	ev.Str("condition", condition).Str("alert", level).Msg(message)
	if a.command == "" {
		return
	}
	select {
	case a.queue <- alert{condition, level, message}:
	default:
		a.log.Error().Str("condition", condition).Str("alert", level).Str("message", message).Msg("alert dropped: the alert command is too slow for the changes")
	}
}

// run runs the command for one alert: sh -c COMMAND sh LEVEL MESSAGE, with the
// condition, level and message also in WALSHIP_ALERT_CONDITION, _LEVEL and _MESSAGE.
func (a *alerter) run(ctx context.Context, al alert) {
	ctx, cancel := context.WithTimeout(ctx, alertTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", a.command, "sh", al.level, al.message)
	cmd.Env = append(os.Environ(), "WALSHIP_ALERT_CONDITION="+al.condition, "WALSHIP_ALERT_LEVEL="+al.level, "WALSHIP_ALERT_MESSAGE="+al.message)
	out, err := cmd.CombinedOutput()
	if err != nil {
		a.log.Error().Err(err).Str("condition", al.condition).Str("alert", al.level).Bytes("output", out).Msg("the alert command failed")
		return
	}
	a.log.Debug().Str("condition", al.condition).Str("alert", al.level).Msg("alert sent")
}

// startAlerts runs watch with an alerter of command until stop, which returns once the
// alerts queued by then have run; without a command it runs nothing, costs nothing,
// and the alerter is nil.
func startAlerts(ctx context.Context, command string, log zerolog.Logger, watch func(context.Context, *alerter)) (a *alerter, stop func()) {
	if command == "" {
		return nil, func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	a, wait := newAlerter(ctx, command, log)
	done := make(chan struct{})
	go func() {
		defer close(done)
		watch(ctx, a)
	}()
	return a, func() {
		cancel()
		<-done
		wait()
	}
}

// alertTick is how often the watchers look at the state they alert on.
const alertTick = time.Second

// watchSidecar reports, every alertTick until ctx ends, each receiver's session (a
// critical alert once it has had none for longer than after, with the error that
// ended the last), drains of a lost server, and the slot's retention against warn
// (keeper nil: no slot).
func watchSidecar(ctx context.Context, a *alerter, tailers []*tail.Tailer, keeper *tail.SlotKeeper, warn uint64, after time.Duration) {
	drains := make([]uint64, len(tailers))
	tick := time.NewTicker(alertTick)
	defer tick.Stop()
	for {
		for i, t := range tailers {
			to := t.Receiver()
			streaming, since, lastErr := t.State()
			switch {
			case streaming:
				a.Alert("receiver "+to, alertOK, "streaming to receiver "+to)
			case time.Since(since) > after:
				msg := fmt.Sprintf("no session with receiver %s for %s", to, roundAge(time.Since(since)))
				if lastErr != nil {
					msg += ": " + lastErr.Error()
				}
				a.Alert("receiver "+to, alertCritical, msg)
			}
			if n := t.Drains(); n > drains[i] {
				drains[i] = n
				a.Alert("drain "+to, alertCritical, "the primary's server is gone; its WAL was drained to receiver "+to+" (walship promote on its host fails over losing nothing)")
			} else if streaming {
				a.Alert("drain "+to, alertOK, "streaming to receiver "+to+" again after a drain")
			}
		}
		if keeper != nil {
			if held := keeper.Retained(); held > warn {
				a.Alert("slot", alertWarning, fmt.Sprintf("the replication slot holds back %d bytes of WAL on the primary (--slot-warn %d): a receiver is behind or down, and pg_wal grows", held, warn))
			} else {
				a.Alert("slot", alertOK, fmt.Sprintf("the replication slot holds back %d bytes of WAL, no more than --slot-warn", held))
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// watchReceiver reports, every alertTick until ctx ends, the receiver's sidecar (a
// critical alert once it has had none for longer than after), refusals, the spool's
// free space (critical below two segments), a promotion from the spool, and with an
// uploader (else nil) the archive: uploads failing for longer than after, and objects
// it refused to overwrite.
func watchReceiver(ctx context.Context, a *alerter, r *receiver.Receiver, u *archive.Uploader, dir string, after time.Duration) {
	var refusals uint64
	tick := time.NewTicker(alertTick)
	defer tick.Stop()
	for {
		peer, since, lastRefusal := r.State()
		switch {
		case peer != "":
			a.Alert("sidecar", alertOK, "a sidecar is connected from "+peer)
		case time.Since(since) > after:
			a.Alert("sidecar", alertCritical, fmt.Sprintf("no sidecar connected for %s", roundAge(time.Since(since))))
		}
		var n uint64
		for _, why := range receiver.RefusalReasons() {
			n += r.Refusals(why)
		}
		if n > refusals {
			refusals = n
			a.Alert("refusal", alertCritical, "refused a sidecar's session: "+lastRefusal)
		} else if peer != "" {
			a.Alert("refusal", alertOK, "a sidecar's session is admitted")
		}
		var fs syscall.Statfs_t
		if err := syscall.Statfs(dir, &fs); err == nil {
			free, need := fs.Bavail*uint64(fs.Bsize), uint64(32<<20)
			if id, ok, err := spool.ReadIdentity(dir); err == nil && ok {
				need = 2 * id.SegSize
			}
			if free < need {
				a.Alert("disk", alertCritical, fmt.Sprintf("the spool's file system is full: %d bytes free, less than two segments", free))
			} else {
				a.Alert("disk", alertOK, fmt.Sprintf("the spool's file system has room again: %d bytes free", free))
			}
		}
		frozen, _ := spool.Frozen(dir)
		_, promoted, _ := spool.ReadTrigger(dir)
		switch {
		case promoted:
			a.Alert("promotion", alertCritical, "the standby was promoted from the spool: a failover happened, and the spool takes no more WAL")
		case frozen:
			a.Alert("promotion", alertWarning, "the spool is frozen: a promotion from it is in progress")
		default:
			a.Alert("promotion", alertOK, "the spool takes WAL")
		}
		if u != nil {
			watchUploads(a, u, after)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// watchUploads reports the uploads to the archive: critical once they have failed for
// longer than after, while the archive holds other bytes than the spool under a name
// (it is not overwritten; walship archive verify tells more), and once a segment left
// the spool before it was uploaded.
func watchUploads(a *alerter, u *archive.Uploader, after time.Duration) {
	st, failingSince := u.State()
	switch {
	case failingSince.IsZero():
		a.Alert("archive", alertOK, "uploads to the archive "+st.URL+" succeed")
	case time.Since(failingSince) > after:
		a.Alert("archive", alertCritical, fmt.Sprintf("uploads to the archive %s have failed for %s: %s", st.URL, roundAge(time.Since(failingSince)), st.LastError))
	}
	if n := len(st.Missing); n > 0 {
		a.Alert("archive gap", alertCritical, fmt.Sprintf("%d segment(s) left the spool before they were uploaded to the archive %s, %s the last: the archive lacks them", n, st.URL, st.Missing[n-1]))
	}
	if n := len(st.Refused); n > 0 {
		a.Alert("archive conflict", alertCritical, fmt.Sprintf("the archive %s holds other bytes than the spool under %d name(s), %s the last; they are not overwritten (see walship archive verify)", st.URL, n, st.Refused[n-1]))
	}
}

// roundAge rounds a duration for a message: to 100ms under a minute, to seconds above.
func roundAge(d time.Duration) time.Duration {
	if d < time.Minute {
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(time.Second)
}
