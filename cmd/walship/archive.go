package main

import (
	"context"
	"flag"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/receiver/archive"
)

// archiveFlags adds the flags that say where the archive is; the returned function
// opens it, or returns nil without --archive-url.
func archiveFlags(fs *flag.FlagSet, what string) func(context.Context) (*archive.Archive, error) {
	var cfg archive.Config
	fs.StringVar(&cfg.URL, "archive-url", "", what+" the archive in S3-compatible storage at s3://BUCKET/PREFIX (credentials from the AWS SDK's standard chain: AWS_ACCESS_KEY_ID, ~/.aws, instance roles)")
	fs.StringVar(&cfg.Endpoint, "archive-endpoint", "", "with --archive-url: the S3 server's URL, e.g. https://minio.example.com:9000 (default: AWS, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
	fs.StringVar(&cfg.Region, "archive-region", "", "with --archive-url: the region (default: AWS_REGION or the shared config's, else us-east-1)")
	fs.BoolVar(&cfg.PathStyle, "archive-path-style", false, "with --archive-url: address the bucket as ENDPOINT/BUCKET, as most S3-compatible servers want")
	return func(ctx context.Context) (*archive.Archive, error) {
		if cfg.URL == "" {
			return nil, nil
		}
		return archive.Open(ctx, cfg)
	}
}

// uploadMetrics is the archive uploader's metrics.
func uploadMetrics(u *archive.Uploader) []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "walship_archive_uploaded_files_total",
			Help: "Files (segments, history files, a promotion's partial) uploaded to the archive since the receiver started."},
			func() float64 { n, _ := u.Uploaded(); return float64(n) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "walship_archive_uploaded_bytes_total",
			Help: "Bytes uploaded to the archive since the receiver started."},
			func() float64 { _, b := u.Uploaded(); return float64(b) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "walship_archive_failures_total",
			Help: "Failed uploads to the archive since the receiver started, objects refused for holding other bytes included."},
			func() float64 { n, _ := u.Failures(); return float64(n) }),
	}
}
