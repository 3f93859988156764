package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/tail"
	"github.com/walship/walship/tail/wal"
)

// The shippers compared, as the output and RESULTS.md name them: results are kept and
// grouped by these names, so changing one breaks the comparison with earlier runs.
const (
	walshipDrain = "walship (sidecar alive)"
	walshipLost  = "walship (host lost)"
	// walshipLiveDrain is walship (sidecar alive) with the standby fed by
	// walship restore --live.
	walshipLiveDrain = "walship --live (sidecar alive)"
	receivewal       = "pg_receivewal --synchronous"
	archive5         = "archive_timeout = 5s"
	archive60        = "archive_timeout = 60s"
	none             = "no shipper"
	walshipName      = "walship"
	// walshipProcs2 is walship with its sidecar and receiver on two processors, where
	// walship tail and receive choose one unless GOMAXPROCS says otherwise: the pgbench
	// rounds run it beside walshipName to judge that choice.
	walshipProcs2 = "walship GOMAXPROCS=2"
)

// walshipSlow is walship with compare's --poll-variant as its sidecar's --poll, named
// once the flag is read; the pgbench rounds run it beside walshipName to show what a
// slower poll trades (CPU against lag).
var walshipSlow = "walship --poll variant"

// A shipper is one way of getting a primary's WAL off its host, run beside one node's
// primary. It keeps the state of what it runs, so each node needs a new one.
type shipper interface {
	// name is the shipper as the output names it.
	name() string
	// settings are what it needs in the primary's configuration; the node asks before
	// it makes the primary.
	settings(n *node) map[string]string
	// serverDirs are the directories under n.dir that the server's user writes for it;
	// the node makes them and hands them to that user before the primary starts.
	serverDirs(n *node) []string
	// start starts it, or starts it again after stop with what it had received.
	start(ctx context.Context, n *node) error
	// stop kills whatever of it runs.
	stop()
	// streams says whether it takes the WAL as the server flushes it, with a durable
	// position to wait on. archive_command takes whole segments and has none.
	streams() bool
	// durable is where its copy of the WAL is durable, for a shipper that streams.
	durable(ctx context.Context, n *node) (wal.LSN, error)
	// pids are its running processes by name, for their CPU time and memory.
	pids() map[string]int
	// backends are the processes of the primary's server that work for it, by name:
	// walship's sessions, pg_receivewal's walsender. It waits until the server lists
	// them all.
	backends(ctx context.Context, n *node) (map[string]int, error)
	// profile makes its processes write CPU profiles as they stop, if they can.
	profile(n *node)
	// writeProfiles stops the processes that profile set up and writes each profile's
	// top functions to pprof-<scenario>-<process>.txt in the output directory.
	writeProfiles(ctx context.Context, n *node, scenario, during string) error
}

// A failoverShipper is a shipper that a standby can be fed from, as the crash trials
// need: "no shipper" is not one.
type failoverShipper interface {
	shipper
	// restoreCommand is the standby's restore_command, reading the shipper's copy.
	restoreCommand(n *node) string
	// crash kills what of the shipper dies with the primary, as its postmaster is
	// killed.
	crash()
	// promote ends the standby's recovery as a failover with this shipper would.
	promote(ctx context.Context, n *node, sb *lab.Cluster) error
}

func shipperNames[S shipper](ss []S) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.name())
	}
	return out
}

// walship is walship's sidecar, tailing the primary, and its receiver.
type walship struct {
	label string
	// hostLost: in a crash trial the sidecar dies with the primary, as when the host is
	// lost, so that the standby has only what the receiver already held.
	hostLost bool
	ws       *lab.Walship // from the first start on, so that a restart keeps the spool
	// sidecarArgs and receiverArgs are added to walship tail's and receive's flags.
	sidecarArgs, receiverArgs []string
	// env is added to the sidecar's and the receiver's environment.
	env []string
	// tag goes into the names of a variant's profile files, beside walshipName's.
	tag string
	// spawned, if set, is called with the receiver's pid once it listens, before the
	// sidecar starts.
	spawned func(pid int)
	// live: the standby's restore hands it the segment being received (--live).
	live bool
}

func (w *walship) name() string                     { return w.label }
func (w *walship) settings(*node) map[string]string { return nil }
func (w *walship) serverDirs(*node) []string        { return nil }
func (w *walship) streams() bool                    { return true }

func (w *walship) start(ctx context.Context, n *node) error {
	var err error
	if w.ws == nil {
		if w.ws, err = lab.NewWalship(n.c.bin, n.dir); err != nil {
			return err
		}
		w.ws.Env = w.env
	}
	if err := w.ws.StartReceiver(ctx, w.receiverArgs...); err != nil {
		return err
	}
	if w.spawned != nil {
		w.spawned(w.ws.Receiver.Pid())
	}
	return w.ws.StartSidecar(ctx, n.primary, append([]string{"--poll", n.c.poll.String()}, w.sidecarArgs...)...)
}

func (w *walship) stop() {
	if w.ws != nil {
		w.ws.Kill()
	}
}

// durable reads the receiver's --metrics, which count a byte once it is fsynced.
func (w *walship) durable(context.Context, *node) (wal.LSN, error) { return w.ws.Durable() }

func (w *walship) pids() map[string]int {
	if w.ws == nil || w.ws.Sidecar == nil {
		return nil
	}
	return map[string]int{"walship sidecar": w.ws.Sidecar.Pid(), "walship receiver": w.ws.Receiver.Pid()}
}

// backends are the sidecar's two sessions, which it names (tail/server.go): the one
// that reads the server's positions and the slot keeper's.
func (w *walship) backends(ctx context.Context, n *node) (map[string]int, error) {
	return n.backendPIDs(ctx, map[string]string{"walship tail backend": tail.AppTail, "walship slot backend": tail.AppSlot})
}

func (w *walship) receiverPID() int {
	if w.ws == nil || w.ws.Receiver == nil || !w.ws.Receiver.Running() {
		return 0
	}
	return w.ws.Receiver.Pid()
}

func (w *walship) onSpawn(f func(pid int)) { w.spawned = f }

// fsyncs is the receiver's own count, from its --metrics.
func (w *walship) fsyncs() (uint64, error) {
	if w.ws == nil || w.ws.Receiver == nil {
		return 0, errors.New("no receiver runs")
	}
	return w.ws.Fsyncs()
}

func (w *walship) profile(n *node) {
	w.sidecarArgs = append(w.sidecarArgs, "--cpu-profile", filepath.Join(n.dir, "sidecar.pprof"))
	w.receiverArgs = append(w.receiverArgs, "--cpu-profile", filepath.Join(n.dir, "receiver.pprof"))
}

// writeProfiles stops the sidecar and the receiver, which write their CPU profiles as
// they stop.
func (w *walship) writeProfiles(ctx context.Context, n *node, scenario, during string) error {
	if w.tag != "" {
		scenario += "-" + w.tag
	}
	for name, p := range map[string]*lab.Proc{"sidecar": w.ws.Sidecar, "receiver": w.ws.Receiver} {
		if err := p.Stop(ctx); err != nil {
			return err
		}
		text := fmt.Sprintf("# CPU profile of the %s %s during %s\n", w.label, name, during)
		for _, sort := range []string{"-flat", "-cum"} {
			out, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", sort, "-nodecount=30", n.c.bin, filepath.Join(n.dir, name+".pprof")).CombinedOutput()
			if err != nil {
				return fmt.Errorf("go tool pprof: %v\n%s", err, out)
			}
			text += fmt.Sprintf("\n# go tool pprof -top %s -nodecount=30\n\n%s", sort, out)
		}
		if err := os.WriteFile(filepath.Join(n.c.out, "pprof-"+scenario+"-"+name+".txt"), []byte(text), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func (w *walship) restoreCommand(n *node) string {
	live := ""
	if w.live {
		live = "--live "
	}
	return fmt.Sprintf("%s restore %s--spool %s %%f %%p %%r", n.c.bin, live, w.ws.Spool)
}

func (w *walship) crash() {
	if w.hostLost {
		w.ws.Sidecar.Kill()
	}
}

func (w *walship) promote(ctx context.Context, n *node, sb *lab.Cluster) error {
	args := []string{"promote", "--spool", w.ws.Spool, "--dsn", sb.DSN(), "--timeout", "2m"}
	if w.hostLost {
		args = append(args, "--force") // as a DBA whose primary's host is lost runs it
	}
	out, err := exec.CommandContext(ctx, n.c.bin, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("walship promote: %v\n%s", err, out)
	}
	return nil
}

// pgReceivewal is pg_receivewal --synchronous with a physical slot.
type pgReceivewal struct {
	cmd *exec.Cmd // while it runs
	// spawned, if set, is called with pg_receivewal's pid as soon as it is started.
	spawned func(pid int)
}

func (r *pgReceivewal) name() string                     { return receivewal }
func (r *pgReceivewal) settings(*node) map[string]string { return nil }
func (r *pgReceivewal) serverDirs(n *node) []string      { return []string{r.dir(n)} }
func (r *pgReceivewal) streams() bool                    { return true }
func (r *pgReceivewal) dir(n *node) string               { return filepath.Join(n.dir, "receivewal") }

// start runs pg_receivewal as the server's user (its files are 0600) and waits until
// the server lists it streaming.
func (r *pgReceivewal) start(ctx context.Context, n *node) error {
	dsn := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres", n.primary.Port)
	create := n.primary.Command(ctx, "pg_receivewal", "-d", dsn, "--slot", "receivewal", "--create-slot", "--if-not-exists")
	if out, err := create.CombinedOutput(); err != nil {
		return fmt.Errorf("pg_receivewal --create-slot: %v\n%s", err, out)
	}
	cmd := n.primary.Command(context.Background(), "pg_receivewal", "-d", dsn, "-D", r.dir(n), "--slot", "receivewal",
		"--synchronous", "--no-loop", "--no-password")
	log, err := os.OpenFile(filepath.Join(n.dir, "receivewal.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		_ = log.Close() // nothing was written through it
		return err
	}
	go func() {
		// Its exit status is not used: it ends when stop kills it or its server dies,
		// and what it said is in its log, written through its own descriptor.
		_ = cmd.Wait()
		_ = log.Close()
	}()
	r.cmd = cmd
	if r.spawned != nil {
		r.spawned(cmd.Process.Pid)
	}
	return lab.Wait(ctx, 20*time.Millisecond, "pg_receivewal to stream", func() (bool, error) {
		s, err := n.primary.QueryString(ctx, "SELECT count(*)::text FROM pg_stat_replication WHERE state = 'streaming'")
		return err == nil && s == "1", nil
	})
}

func (r *pgReceivewal) stop() {
	if r.cmd != nil && r.cmd.Process != nil {
		// A process that has exited already needs neither; the goroutine of start
		// waits for it too.
		_ = r.cmd.Process.Kill()
		_, _ = r.cmd.Process.Wait()
		r.cmd = nil
	}
}

// durable reads pg_stat_replication.flush_lsn, which pg_receivewal reports after each
// fsync with --synchronous.
func (r *pgReceivewal) durable(ctx context.Context, n *node) (wal.LSN, error) {
	return n.queryLSN(ctx, "SELECT coalesce((SELECT flush_lsn::text FROM pg_stat_replication LIMIT 1), '0/0')")
}

func (r *pgReceivewal) pids() map[string]int {
	if r.cmd == nil {
		return nil
	}
	return map[string]int{"pg_receivewal": r.cmd.Process.Pid}
}

// backends is its walsender, which carries the application_name pg_receivewal gives
// its connections (fallback_application_name, src/bin/pg_basebackup/streamutil.c).
func (r *pgReceivewal) backends(ctx context.Context, n *node) (map[string]int, error) {
	return n.backendPIDs(ctx, map[string]string{"pg_receivewal walsender": "pg_receivewal"})
}

func (r *pgReceivewal) receiverPID() int {
	if r.cmd == nil {
		return 0
	}
	return r.cmd.Process.Pid
}

func (r *pgReceivewal) onSpawn(f func(pid int)) { r.spawned = f }

func (r *pgReceivewal) profile(*node)                                              {}
func (r *pgReceivewal) writeProfiles(context.Context, *node, string, string) error { return nil }

func (r *pgReceivewal) restoreCommand(n *node) string { return copyRestore(r.dir(n)) }
func (r *pgReceivewal) crash()                        {}

// promote takes the .partial segment that pg_receivewal leaves (padded to the segment
// size) as a whole one, as a failover with it does.
func (r *pgReceivewal) promote(ctx context.Context, n *node, sb *lab.Cluster) error {
	// pg_receivewal ends when its server dies.
	if err := waitExit(ctx, r.cmd); err != nil {
		return err
	}
	parts, _ := filepath.Glob(filepath.Join(r.dir(n), "*.partial"))
	for _, p := range parts {
		if err := os.Rename(p, strings.TrimSuffix(p, ".partial")); err != nil {
			return err
		}
	}
	return promoteStandby(ctx, sb)
}

func waitExit(ctx context.Context, cmd *exec.Cmd) error {
	return lab.Wait(ctx, 20*time.Millisecond, "pg_receivewal to exit", func() (bool, error) {
		return cmd.ProcessState != nil || syscall.Kill(cmd.Process.Pid, 0) != nil, nil
	})
}

// archiveCommand is archive_command copying each finished segment, with
// archive_timeout forcing a segment switch.
type archiveCommand struct {
	noProcess
	label   string
	timeout string // archive_timeout, in seconds
}

func (a archiveCommand) name() string                { return a.label }
func (a archiveCommand) dir(n *node) string          { return filepath.Join(n.dir, "archive") }
func (a archiveCommand) serverDirs(n *node) []string { return []string{a.dir(n)} }

func (a archiveCommand) settings(n *node) map[string]string {
	return map[string]string{
		"archive_mode":    "on",
		"archive_command": fmt.Sprintf("'test ! -f %[1]s/%%f && cp %%p %[1]s/%%f'", a.dir(n)),
		"archive_timeout": a.timeout,
	}
}

func (a archiveCommand) restoreCommand(n *node) string { return copyRestore(a.dir(n)) }
func (a archiveCommand) crash()                        {}

func (a archiveCommand) promote(ctx context.Context, _ *node, sb *lab.Cluster) error {
	return promoteStandby(ctx, sb)
}

// noShipper is the primary alone, the baseline of the primary's TPS.
type noShipper struct{ noProcess }

func (noShipper) name() string                     { return none }
func (noShipper) settings(*node) map[string]string { return nil }
func (noShipper) serverDirs(*node) []string        { return nil }

// noProcess is what a shipper without processes of its own does: archive_command runs
// inside the server.
type noProcess struct{}

func (noProcess) start(context.Context, *node) error { return nil }
func (noProcess) stop()                              {}
func (noProcess) streams() bool                      { return false }
func (noProcess) pids() map[string]int               { return nil }

func (noProcess) backends(context.Context, *node) (map[string]int, error) { return nil, nil }
func (noProcess) profile(*node)                                           {}

func (noProcess) durable(context.Context, *node) (wal.LSN, error) { return 0, errNoDurable }

func (noProcess) writeProfiles(context.Context, *node, string, string) error { return nil }

var errNoDurable = errors.New("the shipper does not stream: it has no durable position")

func copyRestore(dir string) string { return fmt.Sprintf("cp %s/%%f %%p", dir) }

// promoteStandby promotes sb with pg_promote, which first has it restore every segment
// there is.
func promoteStandby(ctx context.Context, sb *lab.Cluster) error {
	if err := sb.Exec(ctx, "SELECT pg_promote(true, 120)"); err != nil {
		return fmt.Errorf("pg_promote: %w", err)
	}
	return nil
}
