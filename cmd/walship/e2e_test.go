package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// walshipBin is the binary under test, built once by TestMain.
var walshipBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "walship-bin-")
	if err != nil {
		panic(err)
	}
	walshipBin = filepath.Join(dir, "walship")
	if out, err := exec.Command("go", "build", "-o", walshipBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build walship: %v\n%s", err, out)
		os.Exit(2)
	}
	// Everything must be reachable by the postgres user the lab runs servers as.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "make the walship build reachable by the servers' user: %v\n", err)
		os.Exit(2)
	}
	code := m.Run()
	// Every walship the tests run in the background is a lab.Proc, and each must end
	// with the test that started it: one still running now has leaked.
	if left := lab.RunningProcs(); len(left) > 0 {
		fmt.Fprintln(os.Stderr, "FAIL: processes the tests started are still running (now killed):")
		for _, p := range left {
			fmt.Fprintf(os.Stderr, "\t%s\n", p)
			p.Kill()
		}
		code = 1
	}
	if err := os.RemoveAll(dir); err != nil {
		fmt.Fprintf(os.Stderr, "remove the walship build: %v\n", err)
	}
	os.Exit(code)
}

// rig is a primary with archiving into a check directory, a receiver and a sidecar.
type rig struct {
	t        *testing.T
	primary  *lab.Cluster
	dir      string // holds certs, the spool, the archive and the logs
	tlsDir   string
	spool    string
	archive  string
	addr     string
	receiver *lab.Proc
	sidecar  *lab.Proc

	// recvMetrics and sideMetrics are the --metrics of the receiver and of the sidecar.
	recvMetrics, sideMetrics string
	// procs is every process the rig and its siblings started; the rig's cleanup ends
	// them all, whichever rig field holds them by then.
	procs *[]*lab.Proc
	// sidecarTo replaces addr as the sidecar's --to list; sidecarArgs are added flags.
	sidecarTo    []string
	sidecarArgs  []string
	receiverArgs []string // added flags of the receiver
	// restoreArgs are added flags of the standbys' walship restore; restorePrefix is
	// shell put before it in restore_command.
	restoreArgs   []string
	restorePrefix string
}

func newRig(t *testing.T, ctx context.Context, segMB int) *rig {
	t.Helper()
	return newRigMajor(t, ctx, segMB, 0)
}

// newRigMajor is newRig on PostgreSQL major (lab.BinDirFor); 0 means the lab's default.
func newRigMajor(t *testing.T, ctx context.Context, segMB, major int) *rig {
	t.Helper()
	dir, err := os.MkdirTemp("", "walship-rig-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	r := &rig{t: t, dir: dir, tlsDir: filepath.Join(dir, "tls"), spool: filepath.Join(dir, "spool"), archive: filepath.Join(dir, "archive"),
		recvMetrics: freeTCPAddr(t), sideMetrics: freeTCPAddr(t), procs: new([]*lab.Proc)}
	t.Cleanup(func() {
		// Stopped first, so that the logs shown below hold what each process wrote up to
		// the failure, its last lines included.
		for _, p := range *r.procs {
			if p.Running() {
				p.Kill()
			}
		}
		if t.Failed() {
			// A log file holds every run of its process; the first run's Log shows them all.
			shown := map[string]bool{}
			for _, p := range *r.procs {
				if !shown[p.LogFile] {
					shown[p.LogFile] = true
					name, _ := filepath.Rel(dir, p.LogFile)
					t.Logf("--- %s:\n%s", name, lastBytes(p.Log(), 6000))
				}
			}
			if r.primary != nil {
				t.Logf("--- primary log:\n%s", lastBytes(r.primary.Log(), 4000))
			}
		}
		if r.primary != nil {
			assert.NoError(t, r.primary.Close(), "stop the primary and remove its files")
		}
		assert.NoError(t, os.RemoveAll(dir))
	})
	require.NoError(t, os.Mkdir(r.archive, 0o755))
	r.primary, err = lab.NewCluster(ctx, lab.Options{SegSizeMB: segMB, Major: major, Settings: map[string]string{
		"archive_mode":    "on",
		"archive_command": fmt.Sprintf("'test ! -f %[1]s/%%f && cp %%p %[1]s/%%f'", r.archive),
	}})
	require.NoError(t, err)
	require.NoError(t, r.primary.Own(r.archive))
	require.NoError(t, r.primary.Start(ctx))
	runOK(t, "certs", "--dir", r.tlsDir)
	port, err := lab.FreeUDPPort()
	require.NoError(t, err)
	r.addr = "127.0.0.1:" + strconv.Itoa(port)
	return r
}

// sibling is a second receiver's rig beside r: the same primary, certificates and
// archive, its own directory, spool and ports. r's cleanup ends its processes too.
func (r *rig) sibling(name string) *rig {
	r.t.Helper()
	s := &rig{t: r.t, primary: r.primary, dir: filepath.Join(r.dir, name), tlsDir: r.tlsDir, archive: r.archive,
		recvMetrics: freeTCPAddr(r.t), sideMetrics: freeTCPAddr(r.t), procs: r.procs}
	require.NoError(r.t, os.Mkdir(s.dir, 0o755))
	s.spool = filepath.Join(s.dir, "spool")
	port, err := lab.FreeUDPPort()
	require.NoError(r.t, err)
	s.addr = "127.0.0.1:" + strconv.Itoa(port)
	return s
}

// streamingRig is a rig whose sidecar, with sidecarArgs added, is streaming to its
// receiver.
func streamingRig(t *testing.T, ctx context.Context, segMB int, sidecarArgs ...string) *rig {
	t.Helper()
	r := newRig(t, ctx, segMB)
	r.sidecarArgs = sidecarArgs
	r.startReceiver(ctx)
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	return r
}

func lastBytes(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// runOK runs the walship binary and requires success.
func runOK(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(walshipBin, args...).CombinedOutput()
	require.NoError(t, err, "walship %v:\n%s", args, out)
	return string(out)
}

// start starts walship with args as the rig's process name, logging to name.log in the
// rig's directory.
func (r *rig) start(name string, args ...string) *lab.Proc {
	r.t.Helper()
	p, err := lab.StartProc(name, filepath.Join(r.dir, name+".log"), walshipBin, args...)
	require.NoError(r.t, err)
	*r.procs = append(*r.procs, p)
	return p
}

// startReceiver starts the receiver and waits until it serves its metrics, which it
// does only once its spool is open and it listens (walship receive: receiver.New,
// then serveMetrics).
func (r *rig) startReceiver(ctx context.Context) {
	r.t.Helper()
	args := []string{"receive", "--listen", r.addr, "--spool", r.spool, "--tls-dir", r.tlsDir, "--metrics", r.recvMetrics, "--log-level", "debug"}
	r.receiver = r.start("receiver", append(args, r.receiverArgs...)...)
	require.NoError(r.t, r.receiver.WaitMetrics(ctx, r.recvMetrics, "to serve its metrics", func(map[string]uint64) bool { return true }))
}

// sidecarTargets is the sidecar's --to list.
func (r *rig) sidecarTargets() []string {
	if len(r.sidecarTo) == 0 {
		return []string{r.addr}
	}
	return r.sidecarTo
}

func (r *rig) startSidecar(ctx context.Context, c *lab.Cluster) *lab.Proc {
	r.t.Helper()
	args := []string{"tail", "--dsn", c.DSN(), "--tls-dir", r.tlsDir, "--metrics", r.sideMetrics, "--poll", "10ms", "--log-level", "debug"}
	for _, a := range r.sidecarTargets() {
		args = append(args, "--to", a)
	}
	r.sidecar = r.start("sidecar", append(args, r.sidecarArgs...)...)
	return r.sidecar
}

// waitStreaming waits until the sidecar has a session with each of its receivers: its
// metrics show a receiver's acknowledged position from the receiver's welcome on, and 0
// before.
func (r *rig) waitStreaming(ctx context.Context) {
	r.t.Helper()
	to := r.sidecarTargets()
	require.NoError(r.t, r.sidecar.WaitMetrics(ctx, r.sideMetrics, fmt.Sprintf("to have a session with each of %v", to), func(m map[string]uint64) bool {
		for _, a := range to {
			if m[fmt.Sprintf("walship_sidecar_acked_lsn{receiver=%q}", a)] == 0 {
				return false
			}
		}
		return true
	}))
}

// flush reads the primary's flush position.
func flushLSN(t *testing.T, ctx context.Context, c *lab.Cluster) wal.LSN {
	t.Helper()
	s, err := c.QueryString(ctx, "SELECT pg_current_wal_flush_lsn()::text")
	require.NoError(t, err)
	lsn, err := wal.ParseLSN(s)
	require.NoError(t, err)
	return lsn
}

// spoolPosition is where the spool's WAL ends.
func spoolPosition(t *testing.T, dir string) (wal.Position, spool.Contents) {
	t.Helper()
	id, ok, err := spool.ReadIdentity(dir)
	require.NoError(t, err)
	if !ok {
		return wal.Position{}, spool.Contents{}
	}
	c, err := spool.Scan(dir, id.SegSize)
	require.NoError(t, err)
	pos, _ := c.Position(id.SegSize)
	return pos, c
}

// waitSpoolAt waits until the spool holds the primary's WAL up to lsn.
func (r *rig) waitSpoolAt(ctx context.Context, lsn wal.LSN) {
	r.t.Helper()
	err := lab.Wait(ctx, 10*time.Millisecond, "spool at "+lsn.String(), func() (bool, error) {
		id, ok, _ := spool.ReadIdentity(r.spool)
		if !ok {
			return false, nil
		}
		pos, c := spoolPosition(r.t, r.spool)
		for _, p := range c.Partials {
			if p.Size == id.SegSize {
				return false, nil // whole, and being published: not settled yet
			}
		}
		return pos.LSN >= lsn, nil
	})
	require.NoError(r.t, err)
}

// waitArchived waits until the primary has archived segment name.
func (r *rig) waitArchived(ctx context.Context, name string) {
	r.t.Helper()
	require.NoError(r.t, lab.Wait(ctx, 20*time.Millisecond, "archive of "+name, func() (bool, error) {
		_, err := os.Stat(filepath.Join(r.archive, name))
		return err == nil, nil
	}))
}

// checkIdentical checks the spool against the primary: every published segment is
// byte-identical to the primary's archived copy, the published segments have no gap, and
// the partial equals the primary's current segment up to the flush position, which the
// spool must have reached. It returns how many segments it compared.
func (r *rig) checkIdentical(ctx context.Context) int {
	t := r.t
	t.Helper()
	// Settle: the spool at a flush position that is still the primary's (background
	// WAL, a checkpoint or autovacuum, may move it while we look).
	var flush wal.LSN
	var pos wal.Position
	var c spool.Contents
	require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "the spool to settle at the flush position", func() (bool, error) {
		flush = flushLSN(t, ctx, r.primary)
		r.waitSpoolAt(ctx, flush)
		pos, c = spoolPosition(t, r.spool)
		return pos.LSN == flush && flushLSN(t, ctx, r.primary) == flush, nil
	}))
	id, ok, err := spool.ReadIdentity(r.spool)
	require.NoError(t, err)
	require.True(t, ok, "spool has no identity")
	for i, seg := range c.Segments {
		if i > 0 {
			prev := c.Segments[i-1]
			require.Equal(t, prev.No+1, seg.No, "gap between published segments %s and %s", prev.Name(id.SegSize), seg.Name(id.SegSize))
		}
		name := seg.Name(id.SegSize)
		r.waitArchived(ctx, name)
		got, err := os.ReadFile(filepath.Join(r.spool, name))
		require.NoError(t, err)
		want, err := os.ReadFile(filepath.Join(r.archive, name))
		require.NoError(t, err)
		require.True(t, bytes.Equal(got, want), "segment %s differs from the primary's archived copy", name)
	}
	if p, ok := c.Partials[pos.TLI]; ok {
		name := p.Seg.Name(id.SegSize)
		got, err := spool.PartialBytes(filepath.Join(r.spool, name+spool.PartialSuffix), id.SegSize)
		require.NoError(t, err)
		f, err := os.Open(filepath.Join(r.primary.Data, "pg_wal", name))
		require.NoError(t, err)
		defer func() { _ = f.Close() }() // read only
		want := make([]byte, len(got))
		_, err = f.ReadAt(want, 0)
		require.NoError(t, err)
		require.True(t, bytes.Equal(got, want), "partial %s differs from the primary's segment in its first %d bytes", name, len(got))
		// The primary may write a little more (a background record) after the spool
		// settled: the partial holds at least what was flushed then, and never more
		// than what is flushed now.
		start := p.Seg.Start(id.SegSize)
		require.GreaterOrEqual(t, uint64(len(got)), uint64(flush-start), "partial %s length", name)
		require.LessOrEqual(t, uint64(len(got)), uint64(flushLSN(t, ctx, r.primary)-start), "partial %s: past the primary's flush position", name)
	}
	return len(c.Segments)
}

// helloFor is the hello a sidecar of the spool's cluster sends, for tests that speak
// the protocol themselves.
func helloFor(id spool.Identity) *transport.Hello {
	return &transport.Hello{Version: transport.Version, SysID: id.SysID, SegSize: uint32(id.SegSize),
		BlockSize: uint32(id.BlockSize), Magic: id.Magic, TLI: 1, ServerVersion: id.ServerVersion}
}

func testContext(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestStreamUnderLoad is the foundation: load on a primary until the spool has
// published loadSegments segments, and the spool is an exact copy of the primary's WAL.
// Both processes serve --metrics, which must agree with the spool once it has settled.
func TestStreamUnderLoad(t *testing.T) {
	const loadSegments = 50 // about 15 s of this load on a 2-core machine
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1)

	load, err := lab.StartLoad(ctx, r.primary.DSN(), 4, 400)
	require.NoError(t, err)
	// Only for a test that fails on the way: the test checks the load's error where it
	// stops it.
	defer func() { _ = load.Stop() }()
	require.NoError(t, lab.Wait(ctx, 100*time.Millisecond, fmt.Sprintf("%d segments published under load", loadSegments), func() (bool, error) {
		_, c := spoolPosition(t, r.spool)
		return len(c.Segments) >= loadSegments, nil
	}))
	require.NoError(t, load.Stop())
	n := r.checkIdentical(ctx)
	t.Logf("%d inserts committed, %d whole segments compared byte for byte", load.Count(), n)
	require.GreaterOrEqual(t, n, loadSegments, "too few segments to mean anything")

	// The spool has settled at the flush position; the metrics must say so too (the
	// sidecar's once the last ack is in).
	pos, c := spoolPosition(t, r.spool)
	id, _, err := spool.ReadIdentity(r.spool)
	require.NoError(t, err)
	label := fmt.Sprintf("{receiver=%q}", r.addr)
	var side map[string]float64
	require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "the sidecar's metrics to show the last ack, and no lag", func() (bool, error) {
		side, err = lab.MetricValues(r.sideMetrics)
		return err == nil && side["walship_sidecar_acked_lsn"+label] >= float64(pos.LSN) &&
			side["walship_sidecar_lag_bytes"+label] == 0 && side["walship_sidecar_lag_seconds"+label] == 0, err
	}))
	recv, err := lab.Metrics(r.recvMetrics)
	require.NoError(t, err)
	fsyncs := recv["walship_receiver_fsyncs_total"]
	require.Positive(t, fsyncs, "the receiver counts its fsyncs")
	t.Logf("%d fsyncs for %d segments", fsyncs, n)
	for name, want := range map[string]uint64{
		"walship_receiver_position_known": 1,
		"walship_receiver_durable_lsn":    uint64(pos.LSN),
		"walship_receiver_timeline":       uint64(pos.TLI),
		"walship_receiver_sessions_total": 1,
		// Every fsync counted is timed.
		"walship_receiver_fsync_duration_seconds_count": fsyncs,
		// One session into an empty spool, which starts at a segment's start: every byte
		// from there was written once.
		"walship_receiver_received_bytes_total": uint64(pos.LSN - c.Segments[0].Start(id.SegSize)),
	} {
		require.Contains(t, recv, name)
		require.Equal(t, want, recv[name], "receiver's %s: got %d, want %d", name, recv[name], want)
	}
	require.Positive(t, recv["walship_receiver_frames_total"], "the receiver counts its frames")
	for _, why := range receiver.RefusalReasons() {
		name := fmt.Sprintf("walship_receiver_refusals_total{reason=%q}", why)
		require.Zero(t, recv[name], "receiver's %s", name)
	}
	require.Contains(t, recv, "process_cpu_seconds_total", "the process collector is registered")
	require.Contains(t, recv, "go_goroutines", "the Go collector is registered")

	for name, want := range map[string]float64{
		"walship_sidecar_shipped_lsn" + label:      float64(pos.LSN),
		"walship_sidecar_acked_lsn" + label:        float64(pos.LSN),
		"walship_sidecar_unacked_bytes" + label:    0,
		"walship_sidecar_primary_flush_lsn":        float64(pos.LSN),
		"walship_sidecar_lag_bytes" + label:        0,
		"walship_sidecar_lag_seconds" + label:      0,
		"walship_sidecar_reconnects_total" + label: 0,
		"walship_sidecar_drains_total" + label:     0,
		// What one session sent, the receiver read and wrote: no byte was sent twice.
		"walship_sidecar_shipped_bytes_total" + label: float64(recv["walship_receiver_received_bytes_total"]),
		"walship_sidecar_frames_total" + label:        float64(recv["walship_receiver_frames_total"]),
	} {
		require.Contains(t, side, name)
		require.Equal(t, want, side[name], "sidecar's %s: got %v, want %v", name, side[name], want)
	}
	require.Contains(t, side, "walship_sidecar_slot_retained_bytes", "the sidecar keeps a slot")
	require.Contains(t, side, "process_cpu_seconds_total", "the process collector is registered")
}

// TestFlagErrors: a malformed --metrics is a usage error, a busy one an error, and
// either stops the command before it creates its spool; an --idle-poll below --poll is a
// usage error.
func TestFlagErrors(t *testing.T) {
	dir := t.TempDir()
	spoolDir := filepath.Join(dir, "spool")
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer busy.Close()
	for _, c := range []struct {
		addr, want string
		code       int
	}{
		{"nonsense", "invalid value \"nonsense\" for flag -metrics", 2},
		{busy.Addr().String(), "address already in use", 1},
	} {
		for _, args := range [][]string{
			{"receive", "--listen", "127.0.0.1:1", "--spool", spoolDir, "--tls-dir", dir, "--metrics", c.addr},
			{"tail", "--dsn", "host=/nonexistent", "--to", "127.0.0.1:1", "--tls-dir", dir, "--metrics", c.addr},
		} {
			out, err := exec.Command(walshipBin, args...).CombinedOutput()
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit, "%v: %s", args, out)
			require.Equal(t, c.code, exit.ExitCode(), "%v: %s", args, out)
			require.Contains(t, string(out), c.want, args)
			require.NoDirExists(t, spoolDir)
		}
	}
	out, err := exec.Command(walshipBin, "tail", "--dsn", "host=/nonexistent", "--to", "127.0.0.1:1", "--tls-dir", dir,
		"--poll", "5ms", "--idle-poll", "1ms").CombinedOutput()
	var exit *exec.ExitError
	require.ErrorAs(t, err, &exit, "%s", out)
	require.Equal(t, 2, exit.ExitCode(), "%s", out)
	require.Contains(t, string(out), "--idle-poll 1ms is shorter than --poll 5ms")
}

// freeTCPAddr is a loopback address with a port free at the time of asking.
func freeTCPAddr(t *testing.T) string {
	t.Helper()
	port, err := lab.FreePort()
	require.NoError(t, err)
	return "127.0.0.1:" + strconv.Itoa(port)
}

// TestIdleKeepsSession: a sidecar whose primary writes nothing waits on inotify, wakes
// once a second to read the flush position, and keeps its one session with the
// receiver all the while; the first commit after the quiet spell reaches the spool.
func TestIdleKeepsSession(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	r := streamingRig(t, ctx, 1)
	require.NoError(t, r.primary.Exec(ctx, "CHECKPOINT"))
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))
	// The quiet spell is what is tested: past the second of busy polling after the last
	// move, and through several of the idle sidecar's safety reads.
	time.Sleep(4 * time.Second)
	require.NoError(t, r.primary.Exec(ctx, "CREATE TABLE after_quiet (i int); INSERT INTO after_quiet VALUES (1)"))
	r.waitSpoolAt(ctx, flushLSN(t, ctx, r.primary))
	m, err := lab.Metrics(r.recvMetrics)
	require.NoError(t, err)
	require.Equal(t, uint64(1), m["walship_receiver_sessions_total"], "the idle sidecar lost its session:\n%s", lastBytes(r.sidecar.Log(), 3000))
	require.NotContains(t, r.sidecar.Log(), "cannot watch pg_wal", "the sidecar must wait on inotify here")
}

// TestVersion: walship --version names the version, the commit and the Go version.
func TestVersion(t *testing.T) {
	for _, arg := range []string{"--version", "version"} {
		out := runOK(t, arg)
		require.Regexp(t, `^walship \S+ \(commit [^)]+\), go1\.\d+(\.\d+)? linux/\w+\n$`, out)
	}
}
