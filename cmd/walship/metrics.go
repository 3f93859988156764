package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver"
	"github.com/walship/walship/tail"
)

// The metrics are read from the receiver's and the tailers' own counters (sync/atomic
// fields behind methods) by the collectors below, at each scrape: the paths that count,
// once per frame, stay free of allocations and of this package. The one metric observed
// as it happens, the fsync histogram, is fed through receiver.Config.ObserveFsync.
//
// Positions are LSNs as byte numbers, so that differences are bytes; as Prometheus's
// values are float64, they are exact up to 2^53 (8 PiB of WAL).

// metricsFlag adds --metrics, the address to serve the metrics at.
func metricsFlag(fs *flag.FlagSet) *string {
	addr := new(string)
	fs.Func("metrics", "serve metrics at http://HOST:PORT/metrics, for Prometheus (e.g. 127.0.0.1:9187; off by default)", func(v string) error {
		if _, _, err := net.SplitHostPort(v); err != nil {
			return fmt.Errorf("%q: %v", v, err)
		}
		*addr = v
		return nil
	})
	return addr
}

// listenMetrics listens on the address of --metrics, if given (else it returns nil), so
// that a bad or busy address stops the command before it does anything.
func listenMetrics(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics: %w", err)
	}
	return ln, nil
}

// serveMetrics serves the metrics of reg at /metrics on ln (nil: nothing) until ctx
// ends.
func serveMetrics(ctx context.Context, ln net.Listener, log zerolog.Logger, reg *prometheus.Registry) {
	if ln == nil {
		return
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: promLog{log}}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			log.Warn().Err(err).Msg("metrics server: a scrape was still running at the shutdown")
		}
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error().Err(err).Msg("metrics server stopped")
		}
	}()
	log.Info().Str("addr", ln.Addr().String()).Msg("serving metrics")
}

// promLog passes the errors of the metrics handler to the log.
type promLog struct{ log zerolog.Logger }

func (l promLog) Println(v ...any) { l.log.Error().Msg(strings.TrimSuffix(fmt.Sprintln(v...), "\n")) }

// newRegistry is a registry of the process's own (not Prometheus's global one) with cs,
// the Go runtime's metrics (go_*) and the process's (process_*: CPU, memory, open files).
func newRegistry(cs ...prometheus.Collector) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	process := &spared{c: collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), every: processEvery}
	reg.MustRegister(collectors.NewGoCollector(), process)
	reg.MustRegister(cs...)
	return reg
}

// processEvery is how often the process's metrics are read at most (see spared).
const processEvery = 100 * time.Millisecond

// spared is a collector that collects c at most once every `every`, and in between
// hands out what it collected last, which must be constant metrics (as the process
// collector's are). The process collector reads six files of /proc at each collection,
// 0.3ms of CPU on a small host, five times what walship's own metrics cost; the
// benchmarks (bench/lab) read a receiver's durable position from its /metrics every
// millisecond, and a Prometheus server scrapes far less often than `every`.
type spared struct {
	c     prometheus.Collector
	every time.Duration

	mu   sync.Mutex
	at   time.Time // of the last collection
	last []prometheus.Metric
}

func (s *spared) Describe(ch chan<- *prometheus.Desc) { s.c.Describe(ch) }

func (s *spared) Collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	if s.last == nil || time.Since(s.at) >= s.every {
		ms := make(chan prometheus.Metric)
		go func() {
			defer close(ms)
			s.c.Collect(ms)
		}()
		var fresh []prometheus.Metric // a new slice: another Collect may still send the last
		for m := range ms {
			fresh = append(fresh, m)
		}
		s.last, s.at = fresh, time.Now()
	}
	last := s.last
	s.mu.Unlock()
	for _, m := range last {
		ch <- m
	}
}

// fsyncBuckets are the upper bounds of the fsync histogram's buckets, in seconds: from
// 50µs, a fast NVMe's fdatasync, to 1s, a disk in trouble.
var fsyncBuckets = []float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1}

// newFsyncHistogram is the histogram of the receiver's fsyncs of received WAL, and the
// hook that feeds it (receiver.Config.ObserveFsync). Its count is
// walship_receiver_fsyncs_total: the receiver times exactly the fsyncs it counts.
func newFsyncHistogram() (prometheus.Histogram, func(time.Duration)) {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "walship_receiver_fsync_duration_seconds",
		Help:    "Time taken by each fsync of received WAL (a sync of the segment being written, or the publication of a whole one).",
		Buckets: fsyncBuckets,
	})
	return h, func(d time.Duration) { h.Observe(d.Seconds()) }
}

// receiverMetrics is the registry of a receiver's metrics; fsyncs is the histogram its
// Config.ObserveFsync feeds (newFsyncHistogram).
func receiverMetrics(r *receiver.Receiver, fsyncs prometheus.Histogram, more ...prometheus.Collector) *prometheus.Registry {
	return newRegistry(append([]prometheus.Collector{receiverCollector{r}, fsyncs}, more...)...)
}

var (
	recvKnown = prometheus.NewDesc("walship_receiver_position_known",
		"1 once the spool's durable position is known (it holds WAL, or a session has started), else 0.", nil, nil)
	recvDurable = prometheus.NewDesc("walship_receiver_durable_lsn",
		"Position up to which the spool's WAL is fsynced, as a byte number; absent until walship_receiver_position_known is 1.", nil, nil)
	recvTimeline = prometheus.NewDesc("walship_receiver_timeline",
		"Timeline of the spool's durable position; absent until walship_receiver_position_known is 1.", nil, nil)
	recvFsyncs = prometheus.NewDesc("walship_receiver_fsyncs_total",
		"Fsyncs of received WAL since the receiver started.", nil, nil)
	recvSessions = prometheus.NewDesc("walship_receiver_sessions_total",
		"Sidecar sessions admitted since the receiver started.", nil, nil)
	recvReceived = prometheus.NewDesc("walship_receiver_received_bytes_total",
		"Bytes of WAL written into the spool since the receiver started (a resend of bytes the spool held is not counted).", nil, nil)
	recvFrames = prometheus.NewDesc("walship_receiver_frames_total",
		"Frames read in sidecar sessions after their hellos (data, history files, end-of-WAL marks) since the receiver started.", nil, nil)
	recvRefusals = prometheus.NewDesc("walship_receiver_refusals_total",
		"Sessions refused since the receiver started, by reason: cluster (another cluster's spool), version (protocol), checksum (a frame's hash), "+
			"page (a WAL page header), order (a gap, a timeline, conflicting bytes, a misplaced end-of-WAL mark), frozen (promotion), other.",
		[]string{"reason"}, nil)
)

// receiverCollector reads a receiver's counters at each scrape.
type receiverCollector struct{ r *receiver.Receiver }

func (receiverCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{recvKnown, recvDurable, recvTimeline, recvFsyncs, recvSessions, recvReceived, recvFrames, recvRefusals} {
		ch <- d
	}
}

func (c receiverCollector) Collect(ch chan<- prometheus.Metric) {
	r := c.r
	p, known := r.Durable()
	ch <- gauge(recvKnown, boolValue(known))
	if known {
		ch <- gauge(recvDurable, float64(p.LSN))
		ch <- gauge(recvTimeline, float64(p.TLI))
	}
	ch <- counter(recvFsyncs, r.Fsyncs())
	ch <- counter(recvSessions, r.Sessions())
	ch <- counter(recvReceived, r.Received())
	ch <- counter(recvFrames, r.Frames())
	for _, why := range receiver.RefusalReasons() {
		ch <- counter(recvRefusals, r.Refusals(why), why.String())
	}
}

// sidecarMetrics is the registry of a sidecar's metrics: each receiver's session, and
// the replication slot that keeper keeps (nil: --no-slot).
func sidecarMetrics(tailers []*tail.Tailer, keeper *tail.SlotKeeper) *prometheus.Registry {
	return newRegistry(sidecarCollector{tailers, keeper})
}

var (
	sideFlush = prometheus.NewDesc("walship_sidecar_primary_flush_lsn",
		"The primary's flush position as last read, as a byte number; 0 before the first read.", nil, nil)
	sideRetained = prometheus.NewDesc("walship_sidecar_slot_retained_bytes",
		"Bytes of WAL the replication slot held back at its last read (the primary's flush position less the slot's restart_lsn, what --slot-warn is compared with); absent with --no-slot.", nil, nil)
	receiverLabel = []string{"receiver"}
	sideShipped   = prometheus.NewDesc("walship_sidecar_shipped_lsn",
		"Position up to which WAL was sent to the receiver, as a byte number.", receiverLabel, nil)
	sideAcked = prometheus.NewDesc("walship_sidecar_acked_lsn",
		"Position the receiver last acknowledged as durable, as a byte number; 0 until it has said where its spool ends.", receiverLabel, nil)
	sideUnacked = prometheus.NewDesc("walship_sidecar_unacked_bytes",
		"Bytes sent to the receiver and not yet acknowledged as durable.", receiverLabel, nil)
	sideLagBytes = prometheus.NewDesc("walship_sidecar_lag_bytes",
		"Bytes of the primary's flush position, as last read, that the receiver has not acknowledged as durable; absent until it has said where its spool ends.", receiverLabel, nil)
	sideLagSeconds = prometheus.NewDesc("walship_sidecar_lag_seconds",
		"Flush lag, as pg_stat_replication.flush_lag: time from reading a flush position to the receiver's acknowledgement that it is durable; "+
			"0 once every position read is acknowledged, and while some wait, at least the age of the oldest.", receiverLabel, nil)
	sideSentBytes = prometheus.NewDesc("walship_sidecar_shipped_bytes_total",
		"Bytes of WAL sent to the receiver, resends after a reconnect included.", receiverLabel, nil)
	sideFrames = prometheus.NewDesc("walship_sidecar_frames_total",
		"Frames sent to the receiver after the sessions' hellos (data, history files, end-of-WAL marks).", receiverLabel, nil)
	sideReconnects = prometheus.NewDesc("walship_sidecar_reconnects_total",
		"Sessions with the receiver that ended with an error (or could not start) and were started again.", receiverLabel, nil)
	sideDrains = prometheus.NewDesc("walship_sidecar_drains_total",
		"Drains: the server was lost and the WAL left in pg_wal past the last flush position read was sent to the receiver, which recorded the end-of-WAL mark.", receiverLabel, nil)
)

// sidecarCollector reads a sidecar's counters at each scrape.
type sidecarCollector struct {
	tailers []*tail.Tailer
	keeper  *tail.SlotKeeper // nil: --no-slot
}

func (sidecarCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{sideFlush, sideRetained, sideShipped, sideAcked, sideUnacked, sideLagBytes,
		sideLagSeconds, sideSentBytes, sideFrames, sideReconnects, sideDrains} {
		ch <- d
	}
}

func (c sidecarCollector) Collect(ch chan<- prometheus.Metric) {
	if c.keeper != nil {
		ch <- gauge(sideRetained, float64(c.keeper.Retained()))
	}
	// Each receiver's session reads the flush position on its own: the newest read is
	// the latest.
	var flush uint64
	for _, t := range c.tailers {
		flush = max(flush, uint64(t.End()))
		to := t.Receiver()
		s, a := t.Shipped(), t.Acked()
		ch <- gauge(sideShipped, float64(s), to)
		ch <- gauge(sideAcked, float64(a), to)
		ch <- gauge(sideUnacked, float64(max(s, a)-a), to)
		if behind, ok := t.Behind(); ok {
			ch <- gauge(sideLagBytes, float64(behind), to)
		}
		ch <- gauge(sideLagSeconds, t.Lag().Seconds(), to)
		ch <- counter(sideSentBytes, t.SentBytes(), to)
		ch <- counter(sideFrames, t.Frames(), to)
		ch <- counter(sideReconnects, t.Reconnects(), to)
		ch <- counter(sideDrains, t.Drains(), to)
	}
	ch <- gauge(sideFlush, float64(flush))
}

func gauge(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func counter(d *prometheus.Desc, v uint64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
