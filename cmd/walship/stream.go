package main

import (
	"errors"
	"net"
	"strings"

	"github.com/walship/walship/receiver"
	"github.com/walship/walship/tail"
	"github.com/walship/walship/transport"
)

func runTail(args []string) int {
	fs := newFlags("tail", "--dsn DSN --to HOST:PORT --tls-dir DIR [flags]", `
Stream the primary's WAL to a walship receiver, as it is flushed. Run it next to the
primary, as a user that can read the data directory's pg_wal (the postgres user).

It reads the flush position every --poll, reads the new bytes from pg_wal (never a byte
past the flush position) and sends them over QUIC with TLS 1.3, authenticated both ways
by the certificates in --tls-dir. It resumes where the receiver's spool ends, after any
reconnect or restart. Started beside a standby, it waits for the promotion and then
ships the new timeline, its history file first.

When the server is lost (its connection fails and no new one is taken), the sidecar
keeps its receiver session open and waits until every process of the server has exited
(postmaster.pid gone, or the postmaster dead and its shared memory detached by all).
Then it drains: it sends every valid record left in pg_wal past the last flush position
it read (whole records whose CRCs and chain hold, what crash recovery would replay),
then an end-of-WAL mark that the receiver records and walship promote waits for. So a
crash of the server alone loses no commit. The check needs to see the server's processes
and System V shared memory (same host, or the same PID and IPC namespaces); elsewhere
use --no-drain.

Poll cost: each poll is one trivial query. At the default 10ms that is 100 queries a
second, well under 1% of a core on the primary and on this host; the poll interval is
what bounds how late a flushed commit leaves for the standby.`)
	dsn := fs.String("dsn", "", "connection string of the primary, e.g. 'host=/var/run/postgresql user=postgres' (required)")
	to := fs.String("to", "", "the receiver's address, HOST:PORT (required)")
	tlsDir := fs.String("tls-dir", "", "directory with ca.crt, sidecar.crt and sidecar.key, as made by 'walship certs' (required)")
	pgdata := fs.String("pgdata", "", "the primary's data directory as seen from here (default: the server's data_directory)")
	poll := fs.Duration("poll", tail.DefaultPoll, "how often to read the flush position")
	noDrain := fs.Bool("no-drain", false, "when the server is lost, do not drain pg_wal past the last flush position read")
	logger := logFlags(fs)
	if rc := parse(fs, args); rc >= 0 {
		return rc
	}
	switch {
	case *dsn == "":
		return usageError(fs, "--dsn is required")
	case *to == "":
		return usageError(fs, "--to is required")
	case *tlsDir == "":
		return usageError(fs, "--tls-dir is required")
	case *poll <= 0:
		return usageError(fs, "--poll %s: want a positive duration such as 10ms", *poll)
	}
	host, _, err := net.SplitHostPort(*to)
	if err != nil {
		return usageError(fs, "--to %q: %v", *to, err)
	}
	log, err := logger()
	if err != nil {
		return usageError(fs, "%v", err)
	}
	tlsConf, err := transport.ClientTLS(*tlsDir, strings.Trim(host, "[]"))
	if err != nil {
		return fail("%v", err)
	}
	t, err := tail.New(tail.Config{DSN: *dsn, PGData: *pgdata, To: *to, TLS: tlsConf, Poll: *poll, NoDrain: *noDrain, Logger: log})
	if err != nil {
		return fail("%v", err)
	}
	ctx, stop := signalContext()
	defer stop()
	if err := t.Run(ctx); err != nil {
		log.Error().Err(err).Msg("sidecar stopped")
		return exitError
	}
	return exitOK
}

func runReceive(args []string) int {
	fs := newFlags("receive", "--listen HOST:PORT --spool DIR --tls-dir DIR [flags]", `
Receive WAL from a walship sidecar into a spool directory, next to the standby.

Completed segments appear in the spool under their own names, whole and fsynced; the
segment in progress is <name>.partial and holds exactly the bytes received. Every page
is checked on arrival (version, position, cluster), every frame against its checksum,
and bytes are acknowledged to the sidecar only once fsynced. A spool belongs to the
first cluster that streams into it; any other is refused. The receiver resumes from
what the spool holds after a restart.`)
	listen := fs.String("listen", "", "UDP address to listen on, HOST:PORT (required)")
	spool := fs.String("spool", "", "spool directory; created if missing (required)")
	tlsDir := fs.String("tls-dir", "", "directory with ca.crt, receiver.crt and receiver.key, as made by 'walship certs' (required)")
	logger := logFlags(fs)
	if rc := parse(fs, args); rc >= 0 {
		return rc
	}
	switch {
	case *listen == "":
		return usageError(fs, "--listen is required")
	case *spool == "":
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
	tlsConf, err := transport.ServerTLS(*tlsDir)
	if err != nil {
		return fail("%v", err)
	}
	r, err := receiver.New(receiver.Config{Listen: *listen, Spool: *spool, TLS: tlsConf, Logger: log})
	if err != nil {
		return fail("%v", err)
	}
	ctx, stop := signalContext()
	defer stop()
	if err := r.Run(ctx); err != nil {
		log.Error().Err(err).Msg("receiver stopped")
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

type multiFlag []string

func (m *multiFlag) String() string { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error {
	if v == "" {
		return errors.New("empty value")
	}
	*m = append(*m, v)
	return nil
}
