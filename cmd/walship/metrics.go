package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/rs/zerolog"

	"github.com/walship/walship/receiver"
	"github.com/walship/walship/tail"
)

// metricsFlag adds --metrics, the address to serve the metrics at.
func metricsFlag(fs *flag.FlagSet) *string {
	addr := new(string)
	fs.Func("metrics", "serve positions at http://HOST:PORT/metrics, in Prometheus's text format (e.g. 127.0.0.1:9187; off by default)", func(v string) error {
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

// serveMetrics serves write's output at /metrics on ln (nil: nothing) until ctx ends.
func serveMetrics(ctx context.Context, ln net.Listener, log zerolog.Logger, write func(io.Writer)) {
	if ln == nil {
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		write(w)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error().Err(err).Msg("metrics server stopped")
		}
	}()
	log.Info().Str("addr", ln.Addr().String()).Msg("serving metrics")
}

// gauge writes one gauge with its help text and one sample per label value.
func gauge(w io.Writer, name, help string, samples ...sample) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name)
	for _, s := range samples {
		if s.label == "" {
			fmt.Fprintf(w, "%s %d\n", name, s.value)
		} else {
			fmt.Fprintf(w, "%s{%s} %d\n", name, s.label, s.value)
		}
	}
}

// counter writes one counter with its help text.
func counter(w io.Writer, name, help string, v uint64) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
}

type sample struct {
	label string // name="value" pairs, or empty
	value uint64
}

// receiverMetrics writes where the spool's WAL is durable. Positions are LSNs as byte
// numbers, so that differences are bytes.
func receiverMetrics(r *receiver.Receiver) func(io.Writer) {
	return func(w io.Writer) {
		p, ok := r.Durable()
		known := uint64(0)
		if ok {
			known = 1
		}
		gauge(w, "walship_receiver_position_known", "1 once the spool's durable position is known (it holds WAL, or a session has started)", sample{"", known})
		counter(w, "walship_receiver_fsyncs_total", "fsyncs of received WAL since the receiver started", r.Fsyncs())
		counter(w, "walship_receiver_sessions_total", "sidecar sessions admitted since the receiver started", r.Sessions())
		if ok {
			gauge(w, "walship_receiver_durable_lsn", "position up to which the spool's WAL is fsynced, as a byte number", sample{"", uint64(p.LSN)})
			gauge(w, "walship_receiver_timeline", "timeline of the spool's durable position", sample{"", uint64(p.TLI)})
		}
	}
}

// sidecarMetrics writes, for each receiver, what was shipped and what it acknowledged.
func sidecarMetrics(tailers []*tail.Tailer) func(io.Writer) {
	return func(w io.Writer) {
		var shipped, acked, behind []sample
		for _, t := range tailers {
			l := fmt.Sprintf("receiver=%q", t.Receiver())
			s, a := t.Shipped(), t.Acked()
			shipped = append(shipped, sample{l, uint64(s)})
			acked = append(acked, sample{l, uint64(a)})
			behind = append(behind, sample{l, uint64(max(int64(s)-int64(a), 0))})
		}
		gauge(w, "walship_sidecar_shipped_lsn", "position up to which WAL was sent to the receiver, as a byte number", shipped...)
		gauge(w, "walship_sidecar_acked_lsn", "position the receiver last acknowledged as durable, as a byte number", acked...)
		gauge(w, "walship_sidecar_unacked_bytes", "bytes sent to the receiver and not yet acknowledged as durable", behind...)
	}
}
