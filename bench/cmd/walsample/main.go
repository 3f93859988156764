// Command walsample captures a small sample of real WAL from the PostgreSQL binaries in
// --bindir, for the WAL reader's tests of every major version (tail/wal/testdata). It
// starts a cluster with 1 MB segments, writes rows, full-page images after a checkpoint
// and a record of about 30 kB, and keeps the two segments that hold the last of it,
// gzipped, with the bytes past the flush position zeroed, beside a sample.json that says
// where the valid WAL ends.
//
//	go run ./bench/cmd/walsample --bindir /path/to/postgresql/bin --out tail/wal/testdata
package main

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail/wal"
)

// Sample describes one captured sample; tail/wal's tests read it.
type Sample struct {
	ServerVersion string   `json:"server_version"`
	VersionNum    int      `json:"server_version_num"`
	SysID         uint64   `json:"system_identifier,string"`
	SegSize       uint64   `json:"wal_segment_size"`
	Segments      []string `json:"segments"`
	Flush         string   `json:"flush_lsn"`
	MadeBy        string   `json:"made_by"`
}

func main() {
	bindir := flag.String("bindir", "", "directory with initdb, pg_ctl and postgres (required)")
	out := flag.String("out", "tail/wal/testdata", "where the pgNN directory is written")
	flag.Parse()
	if *bindir == "" {
		fmt.Fprintln(os.Stderr, "walsample: --bindir is required")
		os.Exit(2)
	}
	if err := run(*bindir, *out); err != nil {
		fmt.Fprintln(os.Stderr, "walsample:", err)
		os.Exit(1)
	}
}

func run(bindir, out string) error {
	if err := os.Setenv(lab.BinDirEnv, bindir); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := lab.NewCluster(ctx, lab.Options{SegSizeMB: 1})
	if err != nil {
		return err
	}
	defer func() {
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "walsample: remove the cluster:", err)
		}
	}()
	if err := c.Start(ctx); err != nil {
		return err
	}
	for _, sql := range []string{
		"CREATE TABLE t (id int, pad text)",
		"INSERT INTO t SELECT g, repeat('walship', 10 + g % 40) FROM generate_series(1, 6000) g",
		"CHECKPOINT",
		// After the checkpoint, the first change of each page logs a full-page image.
		"UPDATE t SET pad = pad || 'x' WHERE id % 5 = 0",
		"SELECT pg_logical_emit_message(true, 'walship', repeat('a record across pages ', 1400))",
		"INSERT INTO t SELECT g, 'small' FROM generate_series(1, 4000) g",
	} {
		if err := c.Exec(ctx, sql); err != nil {
			return fmt.Errorf("%s: %w", sql, err)
		}
	}
	var s Sample
	q := func(sql string) string {
		v, qerr := c.QueryString(ctx, sql)
		if err == nil {
			err = qerr
		}
		return v
	}
	flushText := q("SELECT pg_current_wal_flush_lsn()::text")
	s.ServerVersion = q("SHOW server_version")
	num := q("SHOW server_version_num")
	sysid := q("SELECT system_identifier::text FROM pg_control_system()")
	if err != nil {
		return err
	}
	flush, err := wal.ParseLSN(flushText)
	if err != nil {
		return err
	}
	s.VersionNum, _ = strconv.Atoi(num)
	s.SysID, _ = strconv.ParseUint(sysid, 10, 64)
	s.SegSize, s.Flush = 1<<20, flush.String()
	s.MadeBy = "go run ./bench/cmd/walsample --bindir <PostgreSQL " + s.ServerVersion + " binaries>"

	dir := filepath.Join(out, fmt.Sprintf("pg%d", s.VersionNum/10000))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	last, off := wal.SegmentOf(1, flush, s.SegSize)
	for _, seg := range []wal.Segment{{TLI: 1, No: last.No - 1}, last} {
		b, err := os.ReadFile(filepath.Join(c.Data, "pg_wal", seg.Name(s.SegSize)))
		if err != nil {
			return err
		}
		if seg == last {
			clear(b[off:]) // what was written after the flush position is not part of the sample
		}
		name := seg.Name(s.SegSize) + ".gz"
		if err := writeGzip(filepath.Join(dir, name), b); err != nil {
			return err
		}
		s.Segments = append(s.Segments, name)
	}
	js, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sample.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf("%s: PostgreSQL %s, flush %s, segments %v\n", dir, s.ServerVersion, s.Flush, s.Segments)
	return nil
}

func writeGzip(path string, b []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	zw, err := gzip.NewWriterLevel(f, gzip.BestCompression)
	if err == nil {
		_, err = zw.Write(b)
	}
	if err == nil {
		err = zw.Close()
	}
	if err != nil {
		_ = f.Close() // the error returned is the one above; the sample is not whole
		return err
	}
	return f.Close()
}
