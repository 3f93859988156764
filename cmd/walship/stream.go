package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver"
	"github.com/walship/walship/receiver/archive"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

func runTail(args []string) int {
	fs := newFlags("tail", "--dsn DSN --to HOST:PORT [--to HOST:PORT ...] --tls-dir DIR [flags]", `
Stream the primary's WAL to walship receivers, as it is flushed. Run it next to the
primary, as a user that can read the data directory's pg_wal (the postgres user).

It reads the flush position every --poll, reads the new bytes from pg_wal (never a byte
past the flush position) and sends them over QUIC with TLS 1.3, authenticated both ways
by the certificates in --tls-dir. It resumes where the receiver's spool ends, after any
reconnect or restart. Started beside a standby, it waits for the promotion and then
ships the new timeline, its history file first.

Several standbys: give --to once for each receiver. Each has its own session and its
own position; a slow or dead one never holds back the others.

WAL retention: the sidecar keeps a physical replication slot (--slot, created if
missing) at the lowest position every receiver has acknowledged as durable, so the
primary never removes or recycles a segment a standby still needs; it warns when the
slot holds back more than --slot-warn. The role needs REPLICATION for that. With
--no-slot, a segment gone from pg_wal before it was shipped is a gap error naming it,
unless --archive-dir holds an archived copy; wrong bytes are never shipped.

When the server is lost (its connection fails and no new one is taken), the sidecar
keeps its receiver session open and waits until every process of the server has exited
(postmaster.pid gone, or the postmaster dead and its shared memory detached by all).
Then it drains: it sends every valid record left in pg_wal past the last flush position
it read (whole records whose CRCs and chain hold, what crash recovery would replay),
then an end-of-WAL mark that the receiver records and walship promote waits for. So a
crash of the server alone loses no commit. The check needs to see the server's processes
and System V shared memory (same host, or the same PID and IPC namespaces); elsewhere
use --no-drain.

Through its receivers, the sidecar also serves walship standby init (a base backup of
the primary over the link; its role then needs the backup functions, and this user
must read the whole data directory and the tablespaces) and, with --allow-switchover,
walship switchover: a receiver's host may then ask it to stop the primary with a fast
shutdown (it signals the postmaster, so it must run as the server's user or root).

Polling: the poll interval bounds how late a flushed commit leaves for the standby,
and so what a lost host can lose. While the flush position moves (or WAL is inserted
and not yet flushed) it is read every --poll (2ms: up to 500 trivial queries a
second). Each poll that finds new WAL is one round of work on both hosts (a query, a
burst of packets, an fsync and an acknowledgement), so a longer poll costs less and
loses more: on a 2-core test host under pgbench at 11 MiB/s of WAL, sidecar and
receiver spent 16-20% less CPU per MiB of WAL with --poll 5ms than with 2ms, and the
standby's copy was about 2 ms further behind at the median; see the README's
benchmarks. Once it stands still, the sidecar waits:
  --wake inotify (the default): after 50ms, for the server to write to pg_wal, which
    wakes it at once, and it reads the position every 5 seconds anyway. An idle
    primary then costs a query every 5 seconds. Where inotify cannot be had (it says
    so), it polls as below.
  --wake poll: after a second, it reads the position every --idle-poll (10ms: 100
    queries a second, about 5% of a core for the sidecar and 1.4% for its backend on
    a small host), which then bounds the first commit after the quiet spell.

Alerts: with --alert-command, the sidecar runs the command once on each change of a
condition's state, never waiting for it: a receiver without a session for longer than
--alert-after (critical, with the error that ended the last; ok once it streams again),
a drain of a lost server (critical), the slot holding back more than --slot-warn
(warning). The command runs as /bin/sh -c COMMAND with the level (ok, warning,
critical) as $1 and a one-line message as $2, also in WALSHIP_ALERT_LEVEL,
WALSHIP_ALERT_MESSAGE and WALSHIP_ALERT_CONDITION; its failures are logged. Every
change is logged as well.`)
	alertCommand, alertAfter := alertFlags(fs)
	dsn := fs.String("dsn", "", "connection string of the primary, e.g. 'host=/var/run/postgresql user=postgres' (required)")
	var to addrList
	fs.Var(&to, "to", "a receiver's address, HOST:PORT (required; repeat it for several standbys)")
	tlsDir := fs.String("tls-dir", "", "directory with ca.crt, sidecar.crt and sidecar.key, as made by 'walship certs' (required)")
	pgdata := fs.String("pgdata", "", "the primary's data directory as seen from here (default: the server's data_directory)")
	poll := fs.Duration("poll", tail.DefaultPoll, "how often to read the flush position while it moves")
	idlePoll := fs.Duration("idle-poll", tail.DefaultIdlePoll, "with --wake poll: how often to read it once it has stood still for a second (at least --poll)")
	wake := fs.String("wake", string(tail.WakeInotify), "how an idle sidecar learns of new WAL: inotify or poll (see above)")
	slot := fs.String("slot", tail.DefaultSlot, "name of the physical replication slot that keeps WAL for the receivers")
	noSlot := fs.Bool("no-slot", false, "keep no replication slot (a receiver down for long can then miss WAL: see --archive-dir)")
	slotWarn := fs.Uint64("slot-warn", tail.DefaultSlotWarn, "warn when the slot holds back more than this many bytes of WAL")
	archive := fs.String("archive-dir", "", "the primary's WAL archive, for segments gone from pg_wal before they were shipped")
	noDrain := fs.Bool("no-drain", false, "when the server is lost, do not drain pg_wal past the last flush position read")
	allowSwitchover := fs.Bool("allow-switchover", false, "let walship switchover on a receiver's host stop this primary (a fast shutdown) over the link")
	metrics := metricsFlag(fs)
	logger := logFlags(fs)
	profile := profileFlag(fs)
	if rc := parse(fs, args); rc >= 0 {
		return rc
	}
	switch {
	case *dsn == "":
		return usageError(fs, "--dsn is required")
	case len(to) == 0:
		return usageError(fs, "--to is required")
	case *tlsDir == "":
		return usageError(fs, "--tls-dir is required")
	case *poll <= 0:
		return usageError(fs, "--poll %s: want a positive duration such as 2ms", *poll)
	case *wake != string(tail.WakeInotify) && *wake != string(tail.WakePoll):
		return usageError(fs, "--wake %q: want inotify or poll", *wake)
	case *idlePoll < *poll:
		return usageError(fs, "--idle-poll %s is shorter than --poll %s", *idlePoll, *poll)
	case *slot == "" && !*noSlot:
		return usageError(fs, "--slot is empty: give a name, or --no-slot")
	}
	log, err := logger()
	if err != nil {
		return usageError(fs, "%v", err)
	}
	metricsLn, err := listenMetrics(*metrics)
	if err != nil {
		return fail("%v", err)
	}
	tailers, err := newTailers(to, *tlsDir, "receiver", log,
		tail.Primary{DSN: *dsn, PGData: *pgdata, Poll: *poll, IdlePoll: *idlePoll, Wake: tail.Wake(*wake), ArchiveDir: *archive, NoDrain: *noDrain, AllowSwitchover: *allowSwitchover})
	if err != nil {
		return fail("%v", err)
	}
	ctx, stop, err := runContext(profile)
	if err != nil {
		return fail("%v", err)
	}
	defer stop()
	var keeper *tail.SlotKeeper
	if !*noSlot {
		if keeper, err = tail.NewSlotKeeper(tail.SlotConfig{DSN: *dsn, Name: *slot, Warn: *slotWarn, Logger: log}, tailers); err != nil {
			return fail("%v", err)
		}
	}
	serveMetrics(ctx, metricsLn, log, sidecarMetrics(tailers, keeper))
	warn := *slotWarn
	if warn == 0 {
		warn = tail.DefaultSlotWarn
	}
	alerts, stopAlerts := startAlerts(ctx, *alertCommand, log, func(ctx context.Context, a *alerter) {
		watchSidecar(ctx, a, tailers, keeper, warn, *alertAfter)
	})
	defer stopAlerts()
	kctx, stopKeeper := context.WithCancel(ctx)
	var keeperDone chan struct{}
	if keeper != nil {
		keeperDone = make(chan struct{})
		go func() {
			defer close(keeperDone)
			if err := keeper.Run(kctx); err != nil {
				log.Error().Err(err).Msg("replication slot keeper stopped")
			}
		}()
	}
	// Each receiver runs on its own; one that stops for good (another cluster's spool)
	// leaves the others running, and its position keeps holding the slot.
	rc := exitOK
	if !runTailers(ctx, tailers, "receiver", log, alerts)() {
		rc = exitError
	}
	stopKeeper()
	if keeperDone != nil {
		<-keeperDone
	}
	return rc
}

func runReceive(args []string) int {
	fs := newFlags("receive", "--listen HOST:PORT --spool DIR --tls-dir DIR [flags]", `
Receive WAL from a walship sidecar into a spool directory, next to the standby.

Completed segments appear in the spool under their own names, whole and fsynced; the
segment in progress is <name>.partial: pre-sized to a whole segment, as PostgreSQL's
own WAL files are, with an end block after it that records exactly how many bytes
were received and made durable (walship verify and restore read it). Every page
is checked on arrival (version, position, cluster), every frame against its checksum,
and bytes are acknowledged to the sidecar only once fsynced. A spool belongs to the
first cluster that streams into it; any other is refused. The receiver resumes from
what the spool holds after a restart.

Relay: with --relay-to, the receiver also ships its spool onwards to another receiver
(a disaster-recovery node), as a sidecar ships a primary's WAL: only what it holds
durably, history files first, published segments and the partial tail, resuming where
that spool ends, and it passes the sidecar's end-of-WAL mark on. It authenticates as a
sidecar, so --tls-dir must also hold sidecar.crt and sidecar.key.

Archive: with --archive-url s3://BUCKET/PREFIX, the receiver also uploads each history
file and each published segment, once durable, in order, to S3-compatible storage,
under their PostgreSQL names, each with a SHA-256 the server checks; after a promotion
from the spool, the partial segment it used, as <segment>.partial. It lists what the
archive holds when it starts and never sends that again; an object there with other
bytes is refused, logged and left alone; other failures are retried with a growing
pause, while WAL keeps being received. The prefix belongs to the first cluster that
uploads into it. walship restore --archive-url fetches from it.

Alerts: with --alert-command, the receiver runs the command once on each change of a
condition's state, never waiting for it: no sidecar connected for longer than
--alert-after (critical; ok once one is), a refused session (critical, with the
reason), the spool's file system full (critical below two segments' free space), a
promotion from the spool (warning while frozen, critical once promoted). The command
runs as /bin/sh -c COMMAND with the level (ok, warning, critical) as $1 and a one-line
message as $2, also in WALSHIP_ALERT_LEVEL, WALSHIP_ALERT_MESSAGE and
WALSHIP_ALERT_CONDITION; its failures are logged. Every change is logged as well.`)
	alertCommand, alertAfter := alertFlags(fs)
	openArchive := archiveFlags(fs, "upload every published segment and history file, once durable, to")
	listen := fs.String("listen", "", "UDP address to listen on, HOST:PORT (required)")
	spoolDir := fs.String("spool", "", "spool directory; created if missing (required)")
	tlsDir := fs.String("tls-dir", "", "directory with ca.crt, receiver.crt and receiver.key, as made by 'walship certs' (required)")
	var relayTo addrList
	fs.Var(&relayTo, "relay-to", "ship the spool onwards to the receiver at HOST:PORT (may be repeated)")
	poll := fs.Duration("poll", tail.DefaultRelayCheck, "with --relay-to: how often to read the spool's durable position anyway (a relay wakes at once when it moves)")
	metrics := metricsFlag(fs)
	logger := logFlags(fs)
	profile := profileFlag(fs)
	if rc := parse(fs, args); rc >= 0 {
		return rc
	}
	switch {
	case *listen == "":
		return usageError(fs, "--listen is required")
	case *spoolDir == "":
		return usageError(fs, "--spool is required")
	case *tlsDir == "":
		return usageError(fs, "--tls-dir is required")
	}
	if _, _, err := net.SplitHostPort(*listen); err != nil {
		return usageError(fs, "--listen %q: %v", *listen, err)
	}
	log, err := logger()
	if err != nil {
		return usageError(fs, "%v", err)
	}
	metricsLn, err := listenMetrics(*metrics)
	if err != nil {
		return fail("%v", err)
	}
	tlsConf, err := transport.ServerTLS(*tlsDir)
	if err != nil {
		return fail("%v", err)
	}
	fsyncs, observeFsync := newFsyncHistogram()
	r, err := receiver.New(receiver.Config{Listen: *listen, Spool: *spoolDir, TLS: tlsConf, Logger: log, ObserveFsync: observeFsync})
	if err != nil {
		return fail("%v", err)
	}
	relays, err := newTailers(relayTo, *tlsDir, "relay_to", log, tail.Spool{Dir: *spoolDir, Durable: r.Durable, Moved: r.Moved, Poll: *poll})
	if err != nil {
		return fail("--relay-to: %v", err)
	}
	ctx, stop, err := runContext(profile)
	if err != nil {
		return fail("%v", err)
	}
	defer stop()
	arch, err := openArchive(ctx)
	if err != nil {
		return fail("%v", err)
	}
	var uploader *archive.Uploader
	var more []prometheus.Collector
	if arch != nil {
		uploader = &archive.Uploader{Spool: *spoolDir, Archive: arch, Logger: log}
		more = uploadMetrics(uploader)
	} else if err := spool.ClearArchiveState(*spoolDir); err != nil {
		return fail("%v", err)
	}
	serveMetrics(ctx, metricsLn, log, receiverMetrics(r, fsyncs, more...))
	ctx, cancel := context.WithCancel(ctx)
	alerts, stopAlerts := startAlerts(ctx, *alertCommand, log, func(ctx context.Context, a *alerter) {
		watchReceiver(ctx, a, r, uploader, *spoolDir, *alertAfter)
	})
	defer stopAlerts()
	if uploader != nil {
		done := make(chan struct{})
		go func() {
			defer close(done)
			if err := uploader.Run(ctx); err != nil {
				log.Error().Err(err).Msg("archive: uploads stopped")
				alerts.Alert("archive", alertCritical, "uploads to the archive stopped: "+err.Error())
			}
		}()
		defer func() { <-done }()
	}
	go holdForRelays(ctx, *spoolDir, relays, log)
	defer runTailers(ctx, relays, "relay_to", log, alerts)()
	defer cancel() // before the wait: the relays end with the receiver
	if err := r.Run(ctx); err != nil {
		log.Error().Err(err).Msg("receiver stopped")
		alerts.Alert("receiver", alertCritical, "the receiver stopped: "+err.Error())
		return exitError
	}
	return exitOK
}

func runCerts(args []string) int {
	fs := newFlags("certs", "--dir DIR [--host NAME ...]", `
Make a CA and, signed by it, a certificate for the receiver (valid for localhost,
127.0.0.1, ::1 and every --host) and one for the sidecar. Copy ca.crt with
receiver.crt and receiver.key to the standby's host, and ca.crt with sidecar.crt and
sidecar.key to the primary's host; keep ca.key offline. Existing files are never
overwritten.`)
	dir := fs.String("dir", "", "directory to write the files into; created if missing (required)")
	var hosts multiFlag
	fs.Var(&hosts, "host", "a name or IP address the receiver is reached by (repeatable)")
	if rc := parse(fs, args); rc >= 0 {
		return rc
	}
	if *dir == "" {
		return usageError(fs, "--dir is required")
	}
	if err := transport.GenerateCerts(*dir, transport.CertOptions{Hosts: hosts}); err != nil {
		return fail("%v", err)
	}
	return exitOK
}

// addrList is a repeatable flag of HOST:PORT addresses, each given once.
type addrList []string

func (a *addrList) String() string { return strings.Join(*a, ",") }
func (a *addrList) Set(v string) error {
	if _, _, err := net.SplitHostPort(v); err != nil {
		return fmt.Errorf("%q: %v", v, err)
	}
	if slices.Contains(*a, v) {
		return fmt.Errorf("%s is given twice", v)
	}
	*a = append(*a, v)
	return nil
}

// newTailers makes a Tailer for each receiver address, each shipping from src on its
// own; role names the receivers in the logs.
func newTailers(addrs []string, tlsDir, role string, log zerolog.Logger, src tail.Source) ([]*tail.Tailer, error) {
	var tailers []*tail.Tailer
	for _, addr := range addrs {
		host, _, _ := net.SplitHostPort(addr)
		tlsConf, err := transport.ClientTLS(tlsDir, strings.Trim(host, "[]"))
		if err != nil {
			return nil, err
		}
		t, err := tail.New(tail.Config{To: addr, TLS: tlsConf, Logger: log.With().Str(role, addr).Logger()}, src)
		if err != nil {
			return nil, err
		}
		tailers = append(tailers, t)
	}
	return tailers, nil
}

// runTailers runs each Tailer until ctx ends or it stops for good (a critical alert,
// if alerts is not nil), and returns a wait for them all, which says whether every
// one ended without an error.
func runTailers(ctx context.Context, tailers []*tail.Tailer, role string, log zerolog.Logger, alerts *alerter) (wait func() bool) {
	errs := make(chan error, len(tailers))
	for _, t := range tailers {
		go func() {
			err := t.Run(ctx)
			if err != nil {
				log.Error().Err(err).Str(role, t.Receiver()).Msg("shipping to this receiver stopped")
				alerts.Alert("receiver "+t.Receiver(), alertCritical, "shipping to receiver "+t.Receiver()+" stopped for good: "+err.Error())
			}
			errs <- err
		}()
	}
	return func() bool {
		ok := true
		for range tailers {
			if err := <-errs; err != nil {
				ok = false
			}
		}
		return ok
	}
}

type multiFlag []string

func (m *multiFlag) String() string { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error {
	if v == "" {
		return errors.New("empty value")
	}
	*m = append(*m, v)
	return nil
}

// holdForRelays records in the spool, for restore --cleanup (spool.Held), the oldest
// segment that each relay's receiver may still need: at once, then each second if it
// changed, until ctx ends. A relay not heard from yet keeps what an earlier run
// recorded for it, or holds everything.
func holdForRelays(ctx context.Context, dir string, relays []*tail.Tailer, log zerolog.Logger) {
	if len(relays) == 0 {
		if err := spool.ClearRelayHolds(dir); err != nil {
			log.Warn().Err(err).Msg("cannot remove an earlier run's relay holds")
		}
		return
	}
	before, _, err := spool.ReadRelayHolds(dir)
	if err != nil {
		log.Warn().Err(err).Msg("an earlier run's relay holds cannot be read; holding everything until each relay is heard from")
	}
	var last map[string]string
	for {
		needs := map[string]string{}
		id, haveID, _ := spool.ReadIdentity(dir)
		for _, t := range relays {
			pos, known := t.DurableAt()
			if known && haveID && pos.TLI != 0 {
				seg, _ := wal.SegmentOf(pos.TLI, pos.LSN, id.SegSize)
				needs[t.Receiver()] = seg.Name(id.SegSize)
			} else {
				needs[t.Receiver()] = before.Needs[t.Receiver()]
			}
		}
		if !maps.Equal(needs, last) {
			if err := spool.WriteRelayHolds(dir, spool.RelayHolds{Needs: needs}); err != nil {
				log.Warn().Err(err).Msg("cannot record what the relays still need; restore --cleanup keeps what the last record says")
			} else {
				last = needs
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}
