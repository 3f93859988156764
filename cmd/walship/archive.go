package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/feeder"
	"github.com/walship/walship/receiver/archive"
	"github.com/walship/walship/tail/wal"
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
		// The SDK never logs them; neither may an error that quotes one.
		keepSecretValue(os.Getenv("AWS_SECRET_ACCESS_KEY"))
		keepSecretValue(os.Getenv("AWS_SESSION_TOKEN"))
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
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "walship_archive_pending_files",
			Help: "Files the spool holds and the archive lacks, as of the uploader's last look (refused ones left out)."},
			func() float64 { st, _ := u.State(); return float64(st.Pending) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "walship_archive_refused_files",
			Help: "Files the archive holds with other bytes than the spool's: not overwritten, not uploaded."},
			func() float64 { st, _ := u.State(); return float64(len(st.Refused)) }),
	}
}

const archiveUsage = `Usage:
  walship archive verify --archive-url s3://BUCKET/PREFIX [flags]   check every object of the archive
  walship archive expire --archive-url s3://BUCKET/PREFIX (--keep N | --before SEGMENT | --older-than DURATION) [--dry-run]

Run 'walship archive verify --help' or 'walship archive expire --help' for the flags.`

func runArchive(args []string) int {
	if len(args) > 0 {
		switch args[0] {
		case "verify":
			return runArchiveVerify(args[1:])
		case "expire":
			return runArchiveExpire(args[1:])
		case "-h", "--help", "help":
			fmt.Println(archiveUsage)
			return exitOK
		}
	}
	fmt.Fprintln(stderr, "walship archive: want 'walship archive verify' or 'walship archive expire'\n\n"+archiveUsage)
	return exitUsage
}

func runArchiveVerify(args []string) int {
	fs := newFlags("archive verify", "--archive-url s3://BUCKET/PREFIX [flags]", `
Check every object of an archive that walship receive --archive-url fills: each
segment's size, its SHA-256 against the one stored with it, its page headers, record
chain and CRCs (a promotion's <segment>.partial as far as its records go); no gap
between a timeline's first and last segment; a history file for every timeline after
the first; nothing else under the prefix. It prints one line per problem, then a
summary; the exit status is 0 when there is none, 1 when there are, 2 for a usage
error, 3 when the archive cannot be read. It reads every object: it costs the
archive's whole size in downloads.`)
	openArchive := archiveFlags(fs, "check")
	if rc := parse(fs, args); rc >= 0 {
		return rc
	}
	ctx, stop := signalContext()
	defer stop()
	a, err := openArchive(ctx)
	if err != nil || a == nil {
		return usageError(fs, "--archive-url is required%s", errSuffix(err))
	}
	problems, checked, err := feeder.VerifyArchive(ctx, a)
	for _, p := range problems {
		fmt.Println(p)
	}
	if err != nil {
		fmt.Fprintf(stderr, "walship archive verify: %v\n", err)
		return 3
	}
	fmt.Printf("%s: %d segments checked, %d problems\n", a, checked, len(problems))
	if len(problems) > 0 {
		return exitError
	}
	return exitOK
}

func runArchiveExpire(args []string) int {
	fs := newFlags("archive expire", "--archive-url s3://BUCKET/PREFIX (--keep N | --before SEGMENT | --older-than DURATION) [--dry-run]", `
Remove old segments from an archive: all but the newest --keep N, those before
--before SEGMENT (on any timeline, as pg_archivecleanup does: give the oldest segment
your oldest base backup needs), or those stored more than --older-than ago. History
files and the archive's identity are never removed; a promotion's partial segment goes
with the segments of its position. It prints each name it removes (with --dry-run,
each it would).`)
	openArchive := archiveFlags(fs, "expire segments of")
	keep := fs.Int("keep", 0, "keep the newest N segments, remove the older ones")
	before := fs.String("before", "", "remove the segments before this one (a WAL file name)")
	older := fs.Duration("older-than", 0, "remove the segments stored longer ago than this, e.g. 720h")
	dryRun := fs.Bool("dry-run", false, "only list what would be removed")
	if rc := parse(fs, args); rc >= 0 {
		return rc
	}
	n := 0
	for _, set := range []bool{*keep != 0, *before != "", *older != 0} {
		if set {
			n++
		}
	}
	if n != 1 {
		return usageError(fs, "give one of --keep, --before and --older-than")
	}
	if *keep < 0 || *older < 0 {
		return usageError(fs, "--keep and --older-than must be positive")
	}
	ctx, stop := signalContext()
	defer stop()
	a, err := openArchive(ctx)
	if err != nil || a == nil {
		return usageError(fs, "--archive-url is required%s", errSuffix(err))
	}
	rule := feeder.ExpireRule{Keep: *keep}
	if *older > 0 {
		rule.Older = time.Now().Add(-*older)
	}
	if *before != "" {
		// The segment size only matters for the number; the archive's is checked below.
		id, ok, err := a.Identity(ctx)
		if err != nil || !ok {
			return fail("archive %s: %v", a, orNothing(err))
		}
		if rule.Before, err = wal.ParseSegmentName(*before, id.SegSize); err != nil {
			return usageError(fs, "--before: %v", err)
		}
	}
	gone, err := feeder.ExpireArchive(ctx, a, rule, *dryRun)
	verb := "removed"
	if *dryRun {
		verb = "would remove"
	}
	for _, name := range gone {
		fmt.Printf("%s %s\n", verb, name)
	}
	if err != nil {
		return fail("%v", err)
	}
	fmt.Printf("%s: %s %d segments\n", a, verb, len(gone))
	return exitOK
}

func errSuffix(err error) string {
	if err == nil {
		return ""
	}
	return ": " + err.Error()
}

func orNothing(err error) error {
	if err == nil {
		return errors.New("it holds nothing")
	}
	return err
}
