// Command pgbuilds fetches the PostgreSQL builds the lab tests with (PG_MAJORS, or 13 to
// 18) and builds the S3-compatible server the archive tests store into (versitygw) in
// the lab's cache, where they are not there yet, and prints where each is. .ci/run runs
// it before the tests, so that their time is not the download's.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/walship/walship/bench/lab"
)

func main() {
	majors, err := lab.Majors()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgbuilds:", err)
		os.Exit(2)
	}
	for _, m := range majors {
		d, err := lab.BinDirFor(context.Background(), m)
		if err != nil {
			fmt.Fprintln(os.Stderr, "pgbuilds:", err)
			os.Exit(1)
		}
		fmt.Printf("PostgreSQL %d: %s\n", m, d)
	}
	bin, err := lab.VersityGWBin(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgbuilds:", err)
		os.Exit(1)
	}
	fmt.Printf("versitygw %s: %s\n", lab.VersityGWVersion, bin)
}
