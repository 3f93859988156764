package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is a program the lab runs in the background, walship's sidecar or receiver,
// with its output kept in a log file.
type Proc struct {
	Name    string
	LogFile string
	logFrom int64 // where this process's output starts in LogFile
	cmd     *exec.Cmd
	done    chan struct{}
	mu      sync.Mutex
	err     error
}

// running holds every Proc started and not yet exited, so that a test suite can check
// at its end that it left none behind (see RunningProcs).
var running struct {
	sync.Mutex
	procs map[*Proc]struct{}
}

// RunningProcs returns the Procs started in this process that have not exited yet.
func RunningProcs() []*Proc {
	running.Lock()
	defer running.Unlock()
	procs := make([]*Proc, 0, len(running.procs))
	for p := range running.procs {
		procs = append(procs, p)
	}
	return procs
}

// StartProc starts bin with args, its output appended to logFile.
func StartProc(name, logFile, bin string, args ...string) (*Proc, error) {
	return StartProcEnv(name, logFile, bin, nil, args...)
}

// StartProcEnv is StartProc with env (KEY=value entries) added to the environment the
// process inherits; an entry overrides an inherited variable of the same name.
func StartProcEnv(name, logFile, bin string, env []string, args ...string) (*Proc, error) {
	f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	info, err := f.Stat()
	if err != nil {
		_ = f.Close() // nothing was written through it
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	if len(env) > 0 {
		// exec uses the last of duplicate keys, so env wins over the inherited ones.
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		_ = f.Close() // nothing was written through it
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, LogFile: logFile, logFrom: info.Size(), cmd: cmd, done: make(chan struct{})}
	running.Lock()
	if running.procs == nil {
		running.procs = map[*Proc]struct{}{}
	}
	running.procs[p] = struct{}{}
	running.Unlock()
	go func() {
		err := cmd.Wait()
		_ = f.Close() // the process wrote its log through its own descriptor: this one wrote nothing
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		running.Lock()
		delete(running.procs, p)
		running.Unlock()
		close(p.done)
	}()
	return p, nil
}

// String names the process by its name, pid and command line.
func (p *Proc) String() string {
	return fmt.Sprintf("%s (pid %d): %s", p.Name, p.Pid(), strings.Join(p.cmd.Args, " "))
}

// Pid is the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is the process's exit error, once Done.
func (p *Proc) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Kill sends SIGKILL and waits for the exit.
func (p *Proc) Kill() {
	// The signal fails only for a process that was waited for: p.done is closed then.
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// Stop sends SIGTERM and waits for the exit, killing the process if ctx ends first.
func (p *Proc) Stop(ctx context.Context) error {
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("stop %s: %w", p.Name, err)
	}
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		p.Kill()
		return fmt.Errorf("%s did not stop on SIGTERM: %w", p.Name, ctx.Err())
	}
}

// Running says whether the process has not exited yet.
func (p *Proc) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Log returns this process's output so far (the log file may hold earlier runs too).
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.LogFile)
	if int64(len(b)) < p.logFrom {
		return ""
	}
	return string(b[p.logFrom:])
}

// WaitMetrics waits until the process serves its --metrics at addr and they satisfy
// cond; what says what that means, for the error ("to serve its metrics").
func (p *Proc) WaitMetrics(ctx context.Context, addr, what string, cond func(map[string]uint64) bool) error {
	return Wait(ctx, 10*time.Millisecond, p.Name+" "+what, func() (bool, error) {
		if !p.Running() {
			return false, fmt.Errorf("%w: %s exited: %v\n%s", ErrNever, p.Name, p.Err(), p.Log())
		}
		m, err := Metrics(addr)
		if err != nil {
			return false, err // not serving yet
		}
		return cond(m), nil
	})
}

// WaitLog waits until the process's output contains s.
func (p *Proc) WaitLog(ctx context.Context, s string) error {
	return Wait(ctx, 20*time.Millisecond, fmt.Sprintf("%s to log %q", p.Name, s), func() (bool, error) {
		if !p.Running() && !strings.Contains(p.Log(), s) {
			return false, fmt.Errorf("%w: %s exited: %v\n%s", ErrNever, p.Name, p.Err(), p.Log())
		}
		return strings.Contains(p.Log(), s), nil
	})
}
