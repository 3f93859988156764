package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// version is walship's version; a release build sets it with
// -ldflags "-X main.version=1.2.3".
var version = "devel"

// printVersion writes the version, the commit the binary was built from (as go build
// records it in a git checkout; "+modified" when the tree had changes) and the Go
// version and platform.
func printVersion(w io.Writer) {
	commit, when, modified := "unknown", "", false
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				commit = s.Value
			case "vcs.time":
				when = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if modified {
		commit += "+modified"
	}
	if when != "" {
		commit += " of " + when
	}
	fmt.Fprintf(w, "walship %s (commit %s), %s %s/%s\n", version, commit, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
