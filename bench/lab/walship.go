package lab

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/walship/walship/feeder/standby"
	"github.com/walship/walship/receiver/spool"
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

// Durable is where the receiver's spool is durable (0 while it holds no WAL), read
// from the spool itself: the newest end slot of its partial, which the receiver writes
// with each fsync. Reading it costs the receiver nothing, where asking its metrics every
// millisecond, as the lag runs do, would add their cost to the receiver's CPU.
//
// Scan counts a partial's bytes only once they are certainly durable, which is a sync
// behind the receiver under load and, once the stream goes quiet, until the receiver
// settles its last sync: the lag runs time the receiver's fsyncs themselves, so the
// partial's end is read from its newest slot.
func (w *Walship) Durable() (wal.LSN, error) {
	id, ok, err := spool.ReadIdentity(w.Spool)
	if err != nil || !ok {
		return 0, err
	}
scan:
	for {
		c, err := spool.Scan(w.Spool, id.SegSize)
		if err != nil {
			return 0, err
		}
		for tli, p := range c.Partials {
			end, err := spool.PartialEnd(spool.PartialPath(w.Spool, p.Seg, id.SegSize), id.SegSize)
			if errors.Is(err, os.ErrNotExist) {
				continue scan // published meanwhile
			}
			if err != nil {
				return 0, err
			}
			p.Size = end
			c.Partials[tli] = p
		}
		pos, _ := c.Position(id.SegSize)
		return pos.LSN, nil
	}
}

// Fsyncs is how many times the running receiver has fsynced received WAL since it
// started, from its metrics (walship_receiver_fsyncs_total). A receiver that does not
// count them is ErrNoMetric.
func (w *Walship) Fsyncs() (uint64, error) {
	m, err := metrics(w.MetricsAddr, "walship_receiver_fsyncs_total")
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
// labels as the text shows them: name, or name{label="value",...} with the labels in
// the order of their names (walship_sidecar_acked_lsn{receiver="127.0.0.1:5433"}). A
// histogram or a summary gives name_count and name_sum; its buckets and quantiles are
// left out. Values are truncated to whole numbers, and a value that no uint64 holds
// (negative, NaN) is left out: see MetricValues for the values as they are.
func Metrics(addr string) (map[string]uint64, error) { return metrics(addr) }

// metrics is Metrics of the families named (none: all).
func metrics(addr string, names ...string) (map[string]uint64, error) {
	vs, err := metricValues(addr, names...)
	if err != nil {
		return nil, err
	}
	out := make(map[string]uint64, len(vs))
	for k, v := range vs {
		if v >= 0 && v < 1<<64 {
			out[k] = uint64(v)
		}
	}
	return out, nil
}

// MetricValues is Metrics with each value as the process gave it.
func MetricValues(addr string) (map[string]float64, error) { return metricValues(addr) }

// metricValues is MetricValues of the families named (none: all). The benchmarks read
// a receiver's durable position every millisecond: asking for that family alone, and
// uncompressed, spares the receiver most of the work of a scrape.
func metricValues(addr string, names ...string) (map[string]float64, error) {
	u := url.URL{Scheme: "http", Host: addr, Path: "/metrics", RawQuery: url.Values{"name[]": names}.Encode()}
	req, err := http.NewRequest(http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := metricsClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }() // read only
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/metrics: %s", addr, resp.Status)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	families, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("GET %s/metrics: %w", addr, err)
	}
	out := map[string]float64{}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			key := metricKey(m.GetLabel())
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				out[name+key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[name+key] = m.GetGauge().GetValue()
			case dto.MetricType_UNTYPED:
				out[name+key] = m.GetUntyped().GetValue()
			case dto.MetricType_HISTOGRAM:
				out[name+"_count"+key] = float64(m.GetHistogram().GetSampleCount())
				out[name+"_sum"+key] = m.GetHistogram().GetSampleSum()
			case dto.MetricType_SUMMARY:
				out[name+"_count"+key] = float64(m.GetSummary().GetSampleCount())
				out[name+"_sum"+key] = m.GetSummary().GetSampleSum()
			}
		}
	}
	return out, nil
}

// metricKey is the {label="value",...} part of a sample's key, "" without labels.
func metricKey(labels []*dto.LabelPair) string {
	if len(labels) == 0 {
		return ""
	}
	labels = slices.SortedFunc(slices.Values(labels), func(a, b *dto.LabelPair) int { return strings.Compare(a.GetName(), b.GetName()) })
	pairs := make([]string, len(labels))
	for i, l := range labels {
		pairs[i] = l.GetName() + "=" + strconv.Quote(l.GetValue())
	}
	return "{" + strings.Join(pairs, ",") + "}"
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
		_ = sb.Close() // the error returned says what failed; this only cleans up
		return nil, err
	}
	if err := sb.WriteFile("standby.signal", nil); err != nil {
		_ = sb.Close() // the error returned says what failed; this only cleans up
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
		_ = sb.Close() // the error returned says what failed; this only cleans up
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
