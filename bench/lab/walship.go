package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/walship/walship/feeder/standby"
	"github.com/walship/walship/tail/wal"
)

// Walship is a walship receiver and sidecar run from the binary Bin, with their
// certificates, spool and logs under Dir.
type Walship struct {
	Bin, Dir, TLSDir, Spool, Addr string
	MetricsAddr                   string // the receiver's --metrics
	// Env is added to the receiver's and the sidecar's environment (KEY=value entries,
	// GOMAXPROCS=2 say); nil: they inherit the lab's.
	Env               []string
	Receiver, Sidecar *Proc
}

// NewWalship makes the certificates and picks a port; it starts nothing.
func NewWalship(bin, dir string) (*Walship, error) {
	w := &Walship{Bin: bin, Dir: dir, TLSDir: filepath.Join(dir, "tls"), Spool: filepath.Join(dir, "spool")}
	if out, err := exec.Command(bin, "certs", "--dir", w.TLSDir).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("walship certs: %v\n%s", err, out)
	}
	port, err := FreeUDPPort()
	if err != nil {
		return nil, err
	}
	w.Addr = "127.0.0.1:" + strconv.Itoa(port)
	if port, err = FreePort(); err != nil {
		return nil, err
	}
	w.MetricsAddr = "127.0.0.1:" + strconv.Itoa(port)
	return w, nil
}

// StartReceiver starts the receiver and waits until it listens.
func (w *Walship) StartReceiver(ctx context.Context, args ...string) error {
	p, err := StartProcEnv("receiver", filepath.Join(w.Dir, "receiver.log"), w.Bin, w.Env,
		append([]string{"receive", "--listen", w.Addr, "--spool", w.Spool, "--tls-dir", w.TLSDir, "--metrics", w.MetricsAddr}, args...)...)
	if err != nil {
		return err
	}
	w.Receiver = p
	return p.WaitLog(ctx, "receiver ready")
}

// StartSidecar starts the sidecar on primary and waits until it streams.
func (w *Walship) StartSidecar(ctx context.Context, primary *Cluster, args ...string) error {
	p, err := StartProcEnv("sidecar", filepath.Join(w.Dir, "sidecar.log"), w.Bin, w.Env,
		append([]string{"tail", "--dsn", primary.DSN(), "--to", w.Addr, "--tls-dir", w.TLSDir}, args...)...)
	if err != nil {
		return err
	}
	w.Sidecar = p
	return p.WaitLog(ctx, "streaming")
}

// Durable is where the running receiver's spool is durable, from its metrics (0 while
// it holds no WAL).
func (w *Walship) Durable() (wal.LSN, error) {
	m, err := Metrics(w.MetricsAddr)
	if err != nil {
		return 0, err
	}
	return wal.LSN(m["walship_receiver_durable_lsn"]), nil
}

// Fsyncs is how many times the running receiver has fsynced received WAL since it
// started, from its metrics (walship_receiver_fsyncs_total). A receiver that does not
// count them is ErrNoMetric.
func (w *Walship) Fsyncs() (uint64, error) {
	m, err := Metrics(w.MetricsAddr)
	if err != nil {
		return 0, err
	}
	n, ok := m["walship_receiver_fsyncs_total"]
	if !ok {
		return 0, fmt.Errorf("receiver at %s: walship_receiver_fsyncs_total: %w", w.MetricsAddr, ErrNoMetric)
	}
	return n, nil
}

// ErrNoMetric is a metric that a walship process does not export (one built before
// the metric was added, say).
var ErrNoMetric = errors.New("no such metric")

// Metrics reads the samples of a walship process's /metrics at addr, by name with its
// labels, as the text shows them.
func Metrics(addr string) (map[string]uint64, error) {
	resp, err := metricsClient.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/metrics: %s", addr, resp.Status)
	}
	out := map[string]uint64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, value, ok := strings.Cut(line, " ")
		v, err := strconv.ParseUint(value, 10, 64)
		if !ok || err != nil {
			return nil, fmt.Errorf("GET %s/metrics: bad line %q", addr, line)
		}
		out[name] = v
	}
	return out, sc.Err()
}

var metricsClient = &http.Client{Timeout: 5 * time.Second}

// Kill kills whichever of the two runs.
func (w *Walship) Kill() {
	for _, p := range []*Proc{w.Sidecar, w.Receiver} {
		if p != nil && p.Running() {
			p.Kill()
		}
	}
}

// Standby makes a standby of c from a base backup without WAL, fed by restoreCommand
// in standby mode. It does not start it.
func (c *Cluster) Standby(ctx context.Context, restoreCommand string) (*Cluster, error) {
	sb, err := c.BaseBackup(ctx, "none")
	if err != nil {
		return nil, err
	}
	if err := sb.Configure(map[string]string{
		"restore_command":             "'" + restoreCommand + "'",
		"archive_mode":                "off",
		"wal_retrieve_retry_interval": "'100ms'",
	}); err != nil {
		sb.Close()
		return nil, err
	}
	if err := sb.WriteFile("standby.signal", nil); err != nil {
		sb.Close()
		return nil, err
	}
	return sb, nil
}

// FlushLSN reads the server's flush position.
func (c *Cluster) FlushLSN(ctx context.Context) (wal.LSN, error) {
	s, err := c.QueryString(ctx, "SELECT pg_current_wal_flush_lsn()::text")
	if err != nil {
		return 0, err
	}
	return wal.ParseLSN(s)
}

// MkdirShared makes a temporary directory that the server's user can use too.
func MkdirShared(pattern string) (string, error) {
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		return "", err
	}
	return dir, os.Chmod(dir, 0o755)
}

// StandbyInit makes a standby of primary with walship standby init from this pair's
// spool (the receiver and the sidecar running), beside primary on this host: its own
// port, archive_mode off, restoreCommand as its restore_command, standby.signal. It
// does not start it. Unlike Standby, it needs no pg_basebackup.
func (w *Walship) StandbyInit(ctx context.Context, primary *Cluster, restoreCommand string) (*Cluster, error) {
	sb, err := primary.Empty()
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Cluster, error) {
		sb.Close()
		return nil, err
	}
	if err := os.Mkdir(sb.Data, 0o700); err != nil {
		return fail(err)
	}
	if err := sb.Own(sb.Data); err != nil {
		return fail(err)
	}
	out, err := exec.CommandContext(ctx, w.Bin, "standby", "init", "--spool", w.Spool, "--pgdata", sb.Data).CombinedOutput()
	if err != nil {
		return fail(fmt.Errorf("walship standby init: %v\n%s", err, out))
	}
	if err := sb.Adopt(); err != nil {
		return fail(err)
	}
	auto, err := os.ReadFile(filepath.Join(sb.Data, "postgresql.auto.conf"))
	if err != nil {
		return fail(err)
	}
	if err := sb.WriteFile("postgresql.auto.conf", []byte(standby.AutoConf(string(auto), "the lab's restore_command", restoreCommand))); err != nil {
		return fail(err)
	}
	if err := sb.Configure(map[string]string{"archive_mode": "off", "wal_retrieve_retry_interval": "'100ms'"}); err != nil {
		return fail(err)
	}
	return sb, nil
}
