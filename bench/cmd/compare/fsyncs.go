package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// syncs is a count of fsyncs over a window, or why there is none.
type syncs struct {
	n      uint64
	window time.Duration
	why    string // empty when counted
}

func (s syncs) ok() bool { return s.why == "" && s.window > 0 }

func (s syncs) perSec() float64 { return float64(s.n) / s.window.Seconds() }

// A receiving shipper has a process of its own that writes and fsyncs the WAL it
// receives (walship's receiver, pg_receivewal), which perf stat can watch.
type receiving interface {
	// receiverPID is that process's pid, 0 while none runs.
	receiverPID() int
	// onSpawn has f called with that process's pid as soon as start has spawned it,
	// before start waits for it to stream; nil: nothing is called.
	onSpawn(f func(pid int))
}

// A selfCounting shipper's receiver counts its own fsyncs.
type selfCounting interface {
	fsyncs() (uint64, error)
}

var errNoOwnCount = errors.New("it keeps no count of its own")

// syncEvents are the system calls counted as fsyncs: Go's File.Sync is fsync, and
// PostgreSQL's pg_fsync is fsync or fdatasync (src/port, src/backend/storage/file/fd.c).
var syncEvents = []string{"syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync"}

// perfAvailable says why perf stat cannot count fsyncs here, or "" if it may try.
func perfAvailable(enabled bool) string {
	if !enabled {
		return "--perf=false"
	}
	if _, err := exec.LookPath("perf"); err != nil {
		return "perf is not installed (Debian: linux-perf)"
	}
	return ""
}

// A syncCount counts one process's fsync and fdatasync calls with perf stat. perf
// attaches to the running process (-p) with its counters off (--delay=-1), and they are
// switched on and off through its control pipe (--control), each command answered with
// an ack, so that the count covers the window measured and no more. The kernel counts
// at the syscall tracepoints and the process runs on: it is not stopped at each call
// as under ptrace (strace), which would slow it and skew what is measured. Enabling a
// syscall tracepoint does put every task's system calls on the kernel's slower path,
// the primary's too, so a scenario counts with perf for all its shippers alike or for
// none (the TPS runs count with none).
type syncCount struct {
	pid    int
	cmd    *exec.Cmd
	ctl    *os.File // perf reads its commands from the other end
	ackF   *os.File // perf writes "ack" to the other end after each command
	ack    *bufio.Reader
	out    string // perf's -o file
	stderr bytes.Buffer
	done   chan struct{}
	on     time.Time // when the count was switched on
	closer sync.Once
}

// startSyncCount starts perf stat on pid, its count off, writing its result to out.
func startSyncCount(pid int, out string) (*syncCount, error) {
	perf, err := exec.LookPath("perf")
	if err != nil {
		return nil, fmt.Errorf("perf is not installed (Debian: linux-perf): %w", err)
	}
	ctlR, ctlW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	ackR, ackW, err := os.Pipe()
	if err != nil {
		// Pipes that nothing used: the error returned is the one above.
		_ = ctlR.Close()
		_ = ctlW.Close()
		return nil, err
	}
	s := &syncCount{pid: pid, ctl: ctlW, ackF: ackR, ack: bufio.NewReader(ackR), out: out, done: make(chan struct{})}
	// ExtraFiles are the child's fds 3, 4, ...
	s.cmd = exec.Command(perf, "stat", "--delay=-1", "--control=fd:3,4", "-x", ",", "-o", out,
		"-e", strings.Join(syncEvents, ","), "-p", strconv.Itoa(pid))
	s.cmd.ExtraFiles = []*os.File{ctlR, ackW}
	s.cmd.Stdout, s.cmd.Stderr = &s.stderr, &s.stderr
	err = s.cmd.Start()
	// perf's ends of the pipes, now its own (or nobody's): closing ours cannot fail
	// on what perf does with them.
	_ = ctlR.Close()
	_ = ackW.Close()
	if err != nil {
		_ = ctlW.Close()
		_ = ackR.Close()
		return nil, fmt.Errorf("start perf stat: %w", err)
	}
	go func() {
		// perf's exit status says nothing that its output and its acks do not: what
		// it printed is kept in s.stderr for the errors.
		_ = s.cmd.Wait()
		close(s.done)
	}()
	return s, nil
}

// perfAckTimeout is how long perf may take to answer a command: the first one waits
// for it to start and attach.
const perfAckTimeout = 15 * time.Second

// command sends perf a control command and waits for its ack.
func (s *syncCount) command(cmd string) error {
	if _, err := s.ctl.WriteString(cmd + "\n"); err != nil {
		return s.failed(cmd, err)
	}
	if err := s.ackF.SetReadDeadline(time.Now().Add(perfAckTimeout)); err != nil {
		return s.failed(cmd, err)
	}
	for {
		// perf writes "ack\n" and its terminating NUL: the next ack starts with it.
		line, err := s.ack.ReadString('\n')
		if strings.Contains(line, "ack") {
			return nil
		}
		if err != nil {
			return s.failed(cmd, err)
		}
	}
}

// failed is the error of a command perf did not ack, with what perf said about it.
func (s *syncCount) failed(cmd string, err error) error {
	select {
	case <-s.done:
	case <-time.After(time.Second):
	}
	said, _, _ := strings.Cut(strings.TrimSpace(s.said()), "\n")
	return fmt.Errorf("perf stat -p %d: %s: %v: %s", s.pid, cmd, err, said)
}

// said is what perf printed, once it has exited.
func (s *syncCount) said() string {
	select {
	case <-s.done:
		return s.stderr.String()
	default:
		return "(perf still runs)"
	}
}

// enable switches the count on.
func (s *syncCount) enable() error {
	if err := s.command("enable"); err != nil {
		return err
	}
	s.on = time.Now()
	return nil
}

// stop switches the count off, ends perf and returns its count since enable.
func (s *syncCount) stop() syncs {
	defer s.kill()
	if err := s.command("disable"); err != nil {
		return syncs{why: err.Error()}
	}
	off := time.Now()
	if err := s.cmd.Process.Signal(os.Interrupt); err != nil { // perf writes its counts as it ends
		return syncs{why: fmt.Sprintf("perf stat -p %d: SIGINT: %v", s.pid, err)}
	}
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		return syncs{why: fmt.Sprintf("perf stat -p %d did not end on SIGINT", s.pid)}
	}
	n, err := readPerfOut(s.out)
	if err != nil {
		return syncs{why: fmt.Sprintf("perf stat -p %d: %v", s.pid, err)}
	}
	return syncs{n: n, window: off.Sub(s.on)}
}

// kill ends perf at once if it still runs and closes its pipes.
func (s *syncCount) kill() {
	s.closer.Do(func() {
		select {
		case <-s.done:
		default:
			// It fails only for a process already waited for: s.done is closed then.
			_ = s.cmd.Process.Kill()
			<-s.done
		}
		// Pipes to a perf that has exited: nothing is left to go through them.
		_ = s.ctl.Close()
		_ = s.ackF.Close()
	})
}

// readPerfOut adds up the counts of syncEvents in perf stat's -x , output: one line per
// event, "count,unit,event,running time,percentage,,"; "<not counted>" is an event that
// was never running, as when the process never ran while the count was on.
func readPerfOut(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	var n uint64
	seen := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(strings.TrimSpace(line), ",")
		if len(f) < 3 || !slices.Contains(syncEvents, f[2]) {
			continue // comments, "Events enabled"
		}
		seen++
		if f[0] == "<not counted>" {
			continue
		}
		v, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %q", f[2], f[0])
		}
		n += v
	}
	if seen != len(syncEvents) {
		return 0, fmt.Errorf("no count of %s in its output:\n%s", strings.Join(syncEvents, ", "), b)
	}
	return n, nil
}

// A pendingCount is a syncCount on a process that is not spawned yet: attach, given to
// the shipper's onSpawn, starts perf in the background, so that the process is not
// held up while perf starts, and switches the count on at once. The count then starts a
// little after the process does (what perf takes to attach, some tens of ms), and its
// window says so.
type pendingCount struct {
	out      string
	once     sync.Once // attach or give up, whichever comes first
	attached chan struct{}
	sc       *syncCount
	err      error
	stopped  sync.Once
	result   syncs
}

func newPendingCount(out string) *pendingCount {
	return &pendingCount{out: out, attached: make(chan struct{})}
}

// attach starts the count on pid; only its first call counts.
func (p *pendingCount) attach(pid int) {
	p.once.Do(func() {
		go func() {
			defer close(p.attached)
			sc, err := startSyncCount(pid, p.out)
			if err == nil {
				if err = sc.enable(); err != nil {
					sc.kill()
					sc = nil
				}
			}
			p.sc, p.err = sc, err
		}()
	})
}

// stop waits for the attach, if there was one, and returns the count; later calls
// return the same.
func (p *pendingCount) stop() syncs {
	p.stopped.Do(func() {
		p.once.Do(func() {
			p.err = errors.New("the receiving process was never spawned")
			close(p.attached)
		})
		<-p.attached
		switch {
		case p.err != nil:
			p.result = syncs{why: p.err.Error()}
		default:
			p.result = p.sc.stop()
		}
	})
	return p.result
}
