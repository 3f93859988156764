// Command walship ships PostgreSQL WAL record by record from a primary to a warm standby.
//
// Only this package exits; the packages it calls return errors, which are mapped here
// to exit statuses.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// Exit statuses. restore_command has its own meanings for 1 (see the restore command);
// everything stays far below 126, which PostgreSQL takes as fatal.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

type command struct {
	summary string
	run     func(args []string) int
}

// commands is set by init, for the config file's check (commandFlags) runs them.
var commands map[string]command

func init() {
	commands = map[string]command{
		"tail":       {"stream the primary's WAL to a receiver (the sidecar on the primary's host)", runTail},
		"receive":    {"receive WAL into a spool directory (on the standby's host)", runReceive},
		"certs":      {"make a CA and certificates for a sidecar and a receiver", runCerts},
		"restore":    {"the standby's restore_command: hand spool segments to recovery", runRestore},
		"promote":    {"fail over: freeze the spool, feed the partial tail, promote the standby", runPromote},
		"verify":     {"check the WAL in a spool or in files: page headers, record chain, CRCs", runVerify},
		"standby":    {"standby init | rejoin: make a standby over the link, or an old primary one", runStandby},
		"switchover": {"swap primary and standby losing nothing: stop the primary, drain, promote", runSwitchover},
		"status":     {"a spool's state: cluster, position, segments, receiver, sidecar, marks, lag", runStatus},
		"archive":    {"archive verify | expire: check or thin the WAL archive in S3-compatible storage", runArchive},
		"check":      {"check a spool for Nagios or Icinga: OK, WARNING, CRITICAL or UNKNOWN, with performance data", runCheck},
	}
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(os.Stdout)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	if args[0] == "--version" || args[0] == "-version" || args[0] == "version" {
		printVersion(os.Stdout)
		return exitOK
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "walship: unknown command %q\n\n", args[0])
		usage(os.Stderr)
		return exitUsage
	}
	return cmd.run(args[1:])
}

func usage(w io.Writer) {
	fmt.Fprintln(w, `walship ships PostgreSQL WAL to a warm standby byte range by byte range, so that a
failover loses milliseconds of commits instead of a whole archive_timeout.

Usage: walship COMMAND [flags]

Commands:`)
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'walship COMMAND --help' for a command's flags, 'walship --version' for the version.")
}

// newFlags makes a flag set whose --help prints the command's synopsis and text.
func newFlags(name, synopsis, text string) *flag.FlagSet {
	fs := flag.NewFlagSet("walship "+name, flag.ContinueOnError)
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintf(out, "Usage: walship %s %s\n\n%s\n\nFlags:\n", name, synopsis, strings.TrimSpace(text))
		fs.PrintDefaults()
	}
	fs.String("config", "", configHelp)
	return fs
}

// parse parses args, which must be flags only; it returns a non-negative exit status
// when the command should stop now (help asked for, or a usage error already reported).
func parse(fs *flag.FlagSet, args []string) int {
	if rc := parseWithArgs(fs, args); rc >= 0 {
		return rc
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected argument %q", fs.Arg(0))
	}
	return -1
}

// parseWithArgs is parse for commands that take arguments after their flags.
func parseWithArgs(fs *flag.FlagSet, args []string) int {
	if listing != nil {
		listing[strings.TrimPrefix(fs.Name(), "walship ")] = fs
		return exitOK
	}
	fs.SetOutput(io.Discard) // errors are reported below, in one line
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fs.SetOutput(os.Stdout)
		fs.Usage()
		return exitOK
	case err != nil:
		return usageError(fs, "%v", err)
	}
	if err := applySettings(fs, strings.TrimPrefix(fs.Name(), "walship ")); err != nil {
		return usageError(fs, "%v", err)
	}
	for _, name := range []string{"dsn", "standby-dsn"} {
		if f := fs.Lookup(name); f != nil && f.Value.String() != "" {
			keepSecret(f.Value.String())
		}
	}
	return -1
}

func usageError(fs *flag.FlagSet, format string, a ...any) int {
	fmt.Fprintf(stderr, "%s: %s\nRun '%s --help' for usage.\n", fs.Name(), fmt.Sprintf(format, a...), fs.Name())
	return exitUsage
}

// logFlags adds --log-level and --log-format and returns a function that builds the logger.
func logFlags(fs *flag.FlagSet) func() (zerolog.Logger, error) {
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	format := fs.String("log-format", "text", "log format: text (for people) or json (for log collectors)")
	return func() (zerolog.Logger, error) {
		lvl, err := zerolog.ParseLevel(*level)
		if err != nil || *level == "" {
			return zerolog.Nop(), fmt.Errorf("--log-level %q: want debug, info, warn or error", *level)
		}
		var w io.Writer
		switch *format {
		case "json":
			w = stderr
		case "text":
			w = zerolog.ConsoleWriter{Out: stderr, TimeFormat: time.RFC3339Nano, NoColor: !isTerminal(os.Stderr)}
		default:
			return zerolog.Nop(), fmt.Errorf("--log-format %q: want text or json", *format)
		}
		return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
	}
}

func isTerminal(f *os.File) bool {
	info, err := f.Stat()
	return err == nil && info.Mode()&os.ModeCharDevice != 0
}

// oneProc runs the long-running commands' Go code on one processor (GOMAXPROCS=1)
// unless the GOMAXPROCS environment variable says otherwise. They do little work per
// wake-up and much waiting, beside a database server on the same few cores: with a
// processor per core, Go's scheduler spends much of their CPU handing goroutines from
// thread to thread and waking idle threads (findRunnable, futex in the profiles in
// bench/results). Blocking system calls (fsync, reads) still run on threads of their
// own, so one processor does not serialise the I/O.
func oneProc() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
}

// signalContext is cancelled by SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func fail(format string, a ...any) int {
	fmt.Fprintf(stderr, "walship: "+format+"\n", a...)
	return exitError
}

// profileFlag adds --cpu-profile; the returned function starts the profile (if asked
// for) and returns the function that writes it out.
func profileFlag(fs *flag.FlagSet) func() (stop func(), err error) {
	path := fs.String("cpu-profile", "", "write a CPU profile of this process to FILE when it stops (for go tool pprof)")
	return func() (func(), error) {
		if *path == "" {
			return func() {}, nil
		}
		f, err := os.Create(*path)
		if err != nil {
			return nil, fmt.Errorf("--cpu-profile: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			_ = f.Close() // nothing was written to it; the error returned is the profile's
			return nil, fmt.Errorf("--cpu-profile: %w", err)
		}
		return func() {
			pprof.StopCPUProfile()
			if err := f.Close(); err != nil {
				fmt.Fprintf(os.Stderr, "walship: --cpu-profile: the profile may be incomplete: %v\n", err)
			}
		}, nil
	}
}

// runContext is a long-running command's context: cancelled by SIGINT or SIGTERM, with
// the CPU profile of --cpu-profile running until stop. It also sets the scheduler's
// size (see oneProc).
func runContext(profile func() (func(), error)) (context.Context, func(), error) {
	oneProc()
	ctx, cancel := signalContext()
	stopProfile, err := profile()
	if err != nil {
		cancel()
		return nil, nil, err
	}
	return ctx, func() { stopProfile(); cancel() }, nil
}
