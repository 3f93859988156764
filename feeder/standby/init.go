// Package standby makes a warm standby's data directory from a base backup of the
// primary taken over the walship link: walship standby init.
package standby

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/walship/walship/receiver"
	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// Options configures Init.
type Options struct {
	// Spool is the spool of the receiver that the primary's sidecar is connected to.
	Spool string
	// PGData is the standby's data directory: absent, empty, or an earlier copy of the
	// same cluster, which is refreshed.
	PGData string
	// Walship is the absolute path of the walship binary that restore_command runs.
	Walship string
	// Live makes the standby's restore_command hand it the segment being received
	// (walship restore --live), with wal_retrieve_retry_interval = 200ms.
	Live bool
	// Tablespaces maps a tablespace's location on the primary to its location here; a
	// tablespace not named keeps its location.
	Tablespaces map[string]string
	// Fast asks the primary for an immediate checkpoint at the backup's start.
	Fast bool
	// WaitWAL bounds the wait for the spool to hold the backup's WAL after it ends.
	WaitWAL time.Duration
	// Progress, if set, is told how far the copy has got.
	Progress func(done, total int64)
	Log      zerolog.Logger
}

// Result is what Init did.
type Result struct {
	Refresh     bool     // PGData held an earlier copy
	Start, Stop wal.LSN  // the backup's WAL
	TLI         uint32   // its timeline
	Total       int64    // bytes of files in the backup
	Sent        int64    // bytes the sidecar sent
	Same        int64    // bytes the earlier copy already held
	Files       int      // files in the copy
	Config      []string // what Init wrote besides the files, for the report
}

// suffixes of the directories Init builds and replaces.
const (
	newSuffix = ".walship-new"
)

// Init copies the primary's cluster into o.PGData over the walship link and makes it a
// warm standby fed from o.Spool. Nothing in o.PGData changes until the copy is whole,
// fsynced and the spool holds the WAL from the backup's start to its end; then the copy
// takes the directory's place. On an error o.PGData is as it was.
func Init(ctx context.Context, o Options) (Result, error) {
	var res Result
	id, ok, err := spool.ReadIdentity(o.Spool)
	if err != nil {
		return res, err
	}
	if !ok {
		return res, fmt.Errorf("spool %s has taken no WAL yet: start the receiver on it and walship tail beside the primary first", o.Spool)
	}
	dst, err := filepath.Abs(o.PGData)
	if err != nil {
		return res, err
	}
	if real, err := filepath.EvalSymlinks(dst); err == nil {
		dst = real // the copy replaces the directory, not a link to it
	}
	if err := notMountPoint(dst); err != nil {
		return res, err
	}
	old, err := inspect(dst, id.SysID)
	if err != nil {
		return res, err
	}
	res.Refresh = old
	unlock, err := lockBeside(dst)
	if err != nil {
		return res, err
	}
	defer unlock()
	owner, err := ownerFor(dst)
	if err != nil {
		return res, err
	}
	var haves []*transport.BackupHave
	held := map[string]string{} // a held file's path in the backup: where it is here
	if old {
		if haves, err = listHaves(dst, held); err != nil {
			return res, fmt.Errorf("read the earlier copy in %s: %w", dst, err)
		}
	}

	uc, err := receiver.DialControl(o.Spool)
	if err != nil {
		return res, err
	}
	defer uc.Close()
	stop := context.AfterFunc(ctx, func() { uc.Close() })
	defer stop()
	bc := transport.NewControlConn(uc)
	for _, h := range haves {
		if err := bc.Send(h); err != nil {
			return res, err
		}
	}
	host, _ := os.Hostname()
	if err := bc.Send(&transport.BackupRequest{Label: "walship standby init on " + host, Fast: o.Fast}); err != nil {
		return res, err
	}
	if err := bc.Flush(); err != nil {
		return res, fmt.Errorf("ask for the backup: %w", err)
	}
	b := &builder{o: o, owner: owner, main: root{final: dst, old: old}, held: held}
	defer b.cleanUp()
	if err := b.receive(ctx, bc, id); err != nil {
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		return res, err
	}
	res.Start, res.Stop, res.TLI = b.start, b.stop, b.tli
	res.Total, res.Sent, res.Same, res.Files = b.begin.Total, b.done.Sent, b.done.Same, b.files
	if res.Config, err = b.configure(id); err != nil {
		return res, err
	}
	if err := b.syncAll(); err != nil {
		return res, err
	}
	if err := waitWAL(ctx, o, id, b.tli, b.start, b.stop); err != nil {
		return res, err
	}
	if err := b.swap(); err != nil {
		return res, err
	}
	return res, nil
}

// inspect says whether dir holds an earlier copy of the cluster sysID (true), or is
// absent or empty (false); anything else is refused.
func inspect(dir string, sysID uint64) (bool, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if len(ents) == 0 {
		return false, nil
	}
	if pid, ok := runningServer(dir); ok {
		return false, fmt.Errorf("a server is running in %s (postmaster.pid names PID %d): stop it before walship standby init replaces its files", dir, pid)
	}
	ctl, err := wal.ReadControl(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, fmt.Errorf("%s is neither empty nor a PostgreSQL data directory (no global/pg_control): walship standby init copies only into an empty directory or an earlier copy of the same cluster", dir)
		}
		return false, err
	}
	if ctl.SysID != sysID {
		return false, fmt.Errorf("%s holds cluster %d, not %d, whose WAL the spool takes: walship standby init does not overwrite another cluster", dir, ctl.SysID, sysID)
	}
	return true, nil
}

// runningServer says whether dir's postmaster.pid names a live process.
func runningServer(dir string) (int, bool) {
	b, err := os.ReadFile(filepath.Join(dir, "postmaster.pid"))
	if err != nil {
		return 0, false
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || pid <= 0 {
		return 0, false
	}
	err = unix.Kill(pid, 0)
	return pid, err == nil || errors.Is(err, unix.EPERM)
}

// owner is who the copy's files belong to: root gives them the owner of the data
// directory, or of the directory it is made in; anyone else makes them its own.
type owner struct {
	uid, gid int
	chown    bool
}

func ownerFor(dir string) (owner, error) {
	if os.Geteuid() != 0 {
		return owner{}, nil
	}
	st, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		st, err = os.Stat(filepath.Dir(dir))
	}
	if err != nil {
		return owner{}, err
	}
	sys := st.Sys().(*syscall.Stat_t)
	if sys.Uid == 0 {
		return owner{}, fmt.Errorf("the files would belong to root (the owner of %s), and PostgreSQL does not start as root: make %s owned by the server's user first, or run walship standby as that user", st.Name(), dir)
	}
	return owner{uid: int(sys.Uid), gid: int(sys.Gid), chown: true}, nil
}

// notMountPoint refuses a directory that is a mount point: the copy is built beside it
// and renamed into its place, which cannot cross file systems.
func notMountPoint(dir string) error {
	st, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	parent, err := os.Stat(filepath.Dir(dir))
	if err != nil {
		return err
	}
	if st.Sys().(*syscall.Stat_t).Dev != parent.Sys().(*syscall.Stat_t).Dev {
		return fmt.Errorf("%s is a mount point: the copy is built beside it and moved into its place, which cannot cross file systems; use a directory inside it", dir)
	}
	return nil
}

func (o owner) apply(path string) error {
	if !o.chown {
		return nil
	}
	return os.Lchown(path, o.uid, o.gid)
}

// listHaves reads the earlier copy in dir, and the tablespaces its pg_tblspc links
// to: each file's size and the SHA-256 of each of its blocks.
func listHaves(dir string, held map[string]string) ([]*transport.BackupHave, error) {
	var haves []*transport.BackupHave
	walk := func(root, prefix string) error {
		return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.Type().IsRegular() {
				return nil
			}
			rel, err := filepath.Rel(root, p)
			if err != nil {
				return err
			}
			h, err := sums(p)
			if err != nil {
				return err
			}
			h.Path = path.Join(prefix, filepath.ToSlash(rel))
			haves = append(haves, h)
			held[h.Path] = p
			return nil
		})
	}
	if err := walk(dir, ""); err != nil {
		return nil, err
	}
	links, err := os.ReadDir(filepath.Join(dir, "pg_tblspc"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, l := range links {
		target, err := os.Readlink(filepath.Join(dir, "pg_tblspc", l.Name()))
		if err != nil {
			continue // not a link: its files, if any, were listed above
		}
		if _, err := os.Stat(target); err != nil {
			continue
		}
		if err := walk(target, path.Join("pg_tblspc", l.Name())); err != nil {
			return nil, err
		}
	}
	return haves, nil
}

func sums(p string) (*transport.BackupHave, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read only
	h := &transport.BackupHave{}
	buf := make([]byte, transport.BlockSize)
	for {
		n, err := io.ReadFull(f, buf)
		if n > 0 {
			h.Sums = append(h.Sums, sha256.Sum256(buf[:n]))
			h.Size += int64(n)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return h, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// root is a directory tree the copy makes: the data directory, or a tablespace.
type root struct {
	final string // where it ends up
	old   bool   // final holds an earlier copy, whose unchanged blocks are copied
	made  bool   // final+newSuffix has been made
}

func (r *root) tmp() string { return r.final + newSuffix }

// builder makes the copy from the sidecar's messages.
type builder struct {
	o      Options
	owner  owner
	held   map[string]string // files of the earlier copy, as listHaves found them
	main   root
	tbs    map[string]*root // by "pg_tblspc/OID"
	begin  transport.BackupBegin
	done   transport.BackupDone
	start  wal.LSN
	stop   wal.LSN
	tli    uint32
	files  int
	copied int64 // bytes done, for the progress

	f     *os.File // the file being written
	fname string
	from  *os.File // its earlier copy, or nil
	size  int64    // its size in the backup
	at    int64    // bytes of it written
	swapd bool
}

// receive reads the backup from bc into the new trees.
func (b *builder) receive(ctx context.Context, bc *transport.ControlConn, id spool.Identity) error {
	m, err := bc.Recv()
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = errors.New("the stream ended before the backup began (did the sidecar's session end? run standby init again once it streams)")
		}
		return fmt.Errorf("base backup: %w", err)
	}
	begin, ok := m.(*transport.BackupBegin)
	if !ok {
		return fmt.Errorf("base backup: %T before its beginning", m)
	}
	b.begin = *begin
	if begin.SysID != id.SysID {
		return fmt.Errorf("the sidecar backs up cluster %d, but the spool takes cluster %d", begin.SysID, id.SysID)
	}
	if b.start, err = wal.ParseLSN(begin.Start); err != nil {
		return fmt.Errorf("base backup start: %w", err)
	}
	b.tbs = map[string]*root{}
	for _, t := range begin.Tablespaces {
		loc := t.Location
		if m, ok := b.o.Tablespaces[loc]; ok {
			loc = m
		}
		if !filepath.IsAbs(loc) {
			return fmt.Errorf("tablespace %d: location %q is not absolute", t.OID, loc)
		}
		if real, err := filepath.EvalSymlinks(loc); err == nil {
			loc = real
		}
		if err := notMountPoint(loc); err != nil {
			return fmt.Errorf("tablespace %d: %w", t.OID, err)
		}
		if loc == b.main.final || strings.HasPrefix(loc, b.main.final+"/") || strings.HasPrefix(b.main.final, loc+"/") {
			return fmt.Errorf("tablespace %d: its location %s overlaps the data directory %s: map it elsewhere with --tablespace-mapping", t.OID, loc, b.main.final)
		}
		old, err := b.inspectTablespace(loc, t.OID)
		if err != nil {
			return err
		}
		b.tbs[path.Join("pg_tblspc", strconv.FormatUint(uint64(t.OID), 10))] = &root{final: loc, old: old}
	}
	if err := b.mkroot(&b.main); err != nil {
		return err
	}
	for {
		m, err := bc.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("the stream ended before the backup did (did the sidecar's session end? run standby init again once it streams)")
			}
			return fmt.Errorf("base backup: %w", err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch m := m.(type) {
		case *transport.BackupEntry:
			if err := b.finishFile(); err != nil {
				return err
			}
			if err := b.entry(m); err != nil {
				return err
			}
		case *transport.BackupBlock:
			if err := b.block(m); err != nil {
				return err
			}
		case *transport.BackupDone:
			if err := b.finishFile(); err != nil {
				return err
			}
			b.done = *m
			if b.stop, err = wal.ParseLSN(m.Stop); err != nil {
				return fmt.Errorf("base backup stop: %w", err)
			}
			if b.tli, err = labelTimeline(m.Label); err != nil {
				return err
			}
			b.progress()
			return nil
		default:
			return fmt.Errorf("base backup: unexpected %T", m)
		}
	}
}

// inspectTablespace applies inspect's rules to a tablespace's location: absent, empty,
// or the earlier copy of the same tablespace (it holds the server version's directory).
func (b *builder) inspectTablespace(loc string, oid uint32) (bool, error) {
	ents, err := os.ReadDir(loc)
	if errors.Is(err, fs.ErrNotExist) || err == nil && len(ents) == 0 {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if b.main.old {
		if target, err := os.Readlink(filepath.Join(b.main.final, "pg_tblspc", strconv.FormatUint(uint64(oid), 10))); err == nil && filepath.Clean(target) == filepath.Clean(loc) {
			return true, nil
		}
	}
	return false, fmt.Errorf("tablespace %d: %s is neither empty nor this copy's earlier tablespace: map it elsewhere with --tablespace-mapping OLD=NEW", oid, loc)
}

func (b *builder) mkroot(r *root) error {
	if err := os.RemoveAll(r.tmp()); err != nil { // left by an earlier init that failed
		return err
	}
	if err := os.MkdirAll(filepath.Dir(r.final), 0o755); err != nil {
		return err
	}
	if err := os.Mkdir(r.tmp(), 0o700); err != nil {
		return err
	}
	r.made = true
	return b.owner.apply(r.tmp())
}

// place says where the entry named name goes: the root, and the path under its new
// tree; a name that is not a clean relative path is refused.
func (b *builder) place(name string) (*root, string, error) {
	if name == "" || path.IsAbs(name) || path.Clean(name) != name || name == ".." || strings.HasPrefix(name, "../") {
		return nil, "", fmt.Errorf("base backup: entry %q is not a clean relative path", name)
	}
	if strings.HasPrefix(name, "pg_tblspc/") {
		parts := strings.SplitN(name, "/", 3)
		if len(parts) == 3 {
			r, ok := b.tbs[parts[0]+"/"+parts[1]]
			if !ok {
				return nil, "", fmt.Errorf("base backup: entry %q of an unknown tablespace", name)
			}
			return r, parts[2], nil
		}
	}
	return &b.main, name, nil
}

func (b *builder) entry(e *transport.BackupEntry) error {
	r, rel, err := b.place(e.Path)
	if err != nil {
		return err
	}
	p := filepath.Join(r.tmp(), filepath.FromSlash(rel))
	mode := fs.FileMode(e.Mode).Perm() & 0o750
	switch e.Type {
	case transport.EntryDir:
		if err := os.Mkdir(p, mode|0o700); err != nil {
			return err
		}
		return b.owner.apply(p)
	case transport.EntryTablespace:
		t := b.tbs[e.Path]
		if t == nil {
			return fmt.Errorf("base backup: tablespace link %q without its tablespace", e.Path)
		}
		if err := b.mkroot(t); err != nil {
			return err
		}
		if err := os.Symlink(t.final, p); err != nil {
			return err
		}
		return b.owner.apply(p)
	case transport.EntryFile:
		if e.Size < 0 {
			return fmt.Errorf("base backup: file %q of %d bytes", e.Path, e.Size)
		}
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode|0o600)
		if err != nil {
			return err
		}
		b.f, b.fname, b.size, b.at = f, p, e.Size, 0
		b.files++
		if local, ok := b.held[e.Path]; ok {
			if from, err := os.Open(local); err == nil {
				b.from = from
			}
		}
		return b.owner.apply(p)
	}
	return fmt.Errorf("base backup: entry %q of unknown type %q", e.Path, e.Type)
}

// block writes a block the sidecar sent, after the blocks before it that the earlier
// copy holds.
func (b *builder) block(m *transport.BackupBlock) error {
	if b.f == nil {
		return errors.New("base backup: a block outside a file")
	}
	if m.Offset < b.at || m.Offset%transport.BlockSize != 0 || m.Offset+int64(len(m.Data)) > b.size {
		return fmt.Errorf("base backup: block at %d of %d bytes in %s (%d bytes, %d written)", m.Offset, len(m.Data), b.fname, b.size, b.at)
	}
	if err := b.copyOld(m.Offset); err != nil {
		return err
	}
	if _, err := b.f.WriteAt(m.Data, m.Offset); err != nil {
		return err
	}
	b.at += int64(len(m.Data))
	b.copied += int64(len(m.Data))
	b.progress()
	return nil
}

// copyOld copies the earlier copy's bytes of the current file up to offset to.
func (b *builder) copyOld(to int64) error {
	if to == b.at {
		return nil
	}
	if b.from == nil {
		return fmt.Errorf("base backup: %s: bytes %d to %d were not sent and there is no earlier copy of them", b.fname, b.at, to)
	}
	n, err := io.Copy(io.NewOffsetWriter(b.f, b.at), io.NewSectionReader(b.from, b.at, to-b.at))
	if err == nil && n != to-b.at {
		err = fmt.Errorf("the earlier copy holds %d bytes there, not %d: it changed while it was refreshed", n, to-b.at)
	}
	if err != nil {
		return fmt.Errorf("copy %s from the earlier copy: %w", b.fname, err)
	}
	b.at = to
	b.copied += n
	b.progress()
	return nil
}

// finishFile completes the file being written and makes it durable.
func (b *builder) finishFile() error {
	if b.f == nil {
		return nil
	}
	err := b.copyOld(b.size)
	if err == nil {
		err = b.f.Sync()
	}
	if cerr := b.f.Close(); err == nil {
		err = cerr
	}
	if b.from != nil {
		_ = b.from.Close() // read only
	}
	b.f, b.from = nil, nil
	return err
}

func (b *builder) progress() {
	if b.o.Progress != nil {
		b.o.Progress(b.copied, b.begin.Total)
	}
}

// labelTimeline reads the START TIMELINE line of a backup label.
func labelTimeline(label string) (uint32, error) {
	for _, line := range strings.Split(label, "\n") {
		if v, ok := strings.CutPrefix(line, "START TIMELINE: "); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
			if err != nil {
				break
			}
			return uint32(n), nil
		}
	}
	return 0, fmt.Errorf("base backup: the backup label has no START TIMELINE line:\n%s", label)
}

// configure writes what makes the copy a standby fed from the spool: the backup label
// and tablespace map, restore_command in postgresql.auto.conf, and standby.signal.
func (b *builder) configure(id spool.Identity) ([]string, error) {
	dir := b.main.tmp()
	var wrote []string
	write := func(name string, content []byte) error {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, content, 0o600); err != nil {
			return err
		}
		wrote = append(wrote, name)
		return b.owner.apply(p)
	}
	if err := write("backup_label", []byte(b.done.Label)); err != nil {
		return nil, err
	}
	if m := b.tablespaceMap(); m != "" {
		if err := write("tablespace_map", []byte(m)); err != nil {
			return nil, err
		}
	}
	auto, err := os.ReadFile(filepath.Join(dir, "postgresql.auto.conf"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if err := write("postgresql.auto.conf", []byte(AutoConf(string(auto), "walship standby init: recovery takes WAL from the spool",
		RestoreCommand(b.o.Walship, b.o.Spool, b.o.Live), LiveSettings(b.o.Live)...))); err != nil {
		return nil, err
	}
	wrote[len(wrote)-1] = "restore_command in postgresql.auto.conf"
	if b.o.Live {
		wrote[len(wrote)-1] = "restore_command (--live) and wal_retrieve_retry_interval = 200ms in postgresql.auto.conf"
	}
	if err := write("standby.signal", nil); err != nil {
		return nil, err
	}
	return wrote, nil
}

// tablespaceMap is the server's tablespace map with each location mapped to its place
// here.
func (b *builder) tablespaceMap() string {
	var out []string
	for _, line := range strings.Split(b.done.TablespaceMap, "\n") {
		oid, loc, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		if t, ok := b.tbs[path.Join("pg_tblspc", oid)]; ok {
			loc = t.final
		}
		out = append(out, oid+" "+loc)
	}
	if len(out) == 0 {
		return ""
	}
	return strings.Join(out, "\n") + "\n"
}

// RestoreCommand is the restore_command that feeds recovery from spoolDir with the
// walship binary at bin (both made absolute), quoted for postgresql.conf; live adds
// --live.
func RestoreCommand(bin, spoolDir string, live bool) string {
	if abs, err := filepath.Abs(spoolDir); err == nil {
		spoolDir = abs
	}
	cmd := shellQuote(bin) + " restore "
	if live {
		cmd += "--live "
	}
	return cmd + "--spool " + shellQuote(spoolDir) + " %f %p %r"
}

// LiveSettings are the settings a live standby needs besides restore_command (name,
// value pairs for AutoConf): a retry interval short enough to keep it close behind.
func LiveSettings(live bool) []string {
	if !live {
		return nil
	}
	return []string{"wal_retrieve_retry_interval", "200ms"}
}

// shellQuote quotes s for the shell that runs restore_command, where it needs quoting.
func shellQuote(s string) string {
	if strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._-+:,@", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'"'"'`) + "'"
}

// AutoConf is postgresql.auto.conf's content with restore_command set to cmd, and the
// settings of more (name, value pairs) too: lines that set any of them before are
// dropped. why heads the lines added, as a comment.
func AutoConf(content, why, cmd string, more ...string) string {
	set := append([]string{"restore_command", cmd}, more...)
	names := map[string]bool{}
	for i := 0; i < len(set); i += 2 {
		names[set[i]] = true
	}
	var out []string
	for _, line := range strings.Split(strings.TrimRight(content, "\n"), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), "=")
		if names[strings.TrimSpace(name)] || line == "" && len(out) == 0 {
			continue
		}
		out = append(out, line)
	}
	out = append(out, "# "+why)
	for i := 0; i < len(set); i += 2 {
		out = append(out, set[i]+" = '"+strings.ReplaceAll(set[i+1], "'", "''")+"'")
	}
	return strings.Join(out, "\n") + "\n"
}

// syncAll fsyncs every directory of the new trees (their files were fsynced as they
// were closed, configure's are here).
func (b *builder) syncAll() error {
	roots := []*root{&b.main}
	for _, t := range b.tbs {
		roots = append(roots, t)
	}
	for _, r := range roots {
		err := filepath.WalkDir(r.tmp(), func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.Type()&fs.ModeSymlink != 0 {
				return nil
			}
			return syncPath(p)
		})
		if err != nil {
			return fmt.Errorf("fsync the copy: %w", err)
		}
	}
	return nil
}

func syncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }() // read only: the fsync is what counts, and its error is returned
	return f.Sync()
}

// waitWAL waits until the spool holds the backup's WAL, from the segment of start to
// stop, and checks that it holds every segment between.
func waitWAL(ctx context.Context, o Options, id spool.Identity, tli uint32, start, stop wal.LSN) error {
	wait := o.WaitWAL
	if wait == 0 {
		wait = 5 * time.Minute
	}
	err := waitFor(ctx, wait, func() (bool, error) {
		c, err := spool.Scan(o.Spool, id.SegSize)
		if err != nil {
			return false, err
		}
		pos, ok := c.Position(id.SegSize)
		if !ok || pos.TLI < tli || pos.TLI == tli && pos.LSN < stop {
			return false, nil
		}
		if first := c.OldestRun(tli, stop, id.SegSize); first > start {
			seg, _ := wal.SegmentOf(tli, start, id.SegSize)
			return false, fmt.Errorf("the spool lacks segment %s and maybe later ones, which recovery from the backup needs (its WAL starts at %s; the spool's unbroken run starts at %s)",
				seg.Name(id.SegSize), start, first)
		}
		return true, nil
	})
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("the spool has not taken the backup's WAL up to %s within %s: is the sidecar still shipping? %w", stop, wait, err)
	}
	return err
}

// swap puts each new tree in its final place: an earlier copy is exchanged with it
// atomically and then removed; an empty directory is replaced.
func (b *builder) swap() error {
	if pid, ok := runningServer(b.main.final); ok {
		return fmt.Errorf("a server started in %s while the copy was made (postmaster.pid names PID %d): stop it and run walship standby init again", b.main.final, pid)
	}
	// The tablespaces first, the data directory last: until it moves, no server starts
	// from the new copy.
	var roots []*root
	for _, t := range b.tbs {
		roots = append(roots, t)
	}
	roots = append(roots, &b.main)
	for i, r := range roots {
		if err := r.swap(); err != nil {
			if i > 0 && b.main.old {
				// Some tablespaces are new and the data directory is old: keep a server
				// from starting on the mix.
				ctl := filepath.Join(b.main.final, "global", "pg_control")
				if rerr := os.Rename(ctl, ctl+".walship-incomplete"); rerr == nil {
					return fmt.Errorf("%w; part of the copy took its place, so %s was renamed to keep a server from starting on the mix: run walship standby init again", err, ctl)
				}
			}
			return err
		}
	}
	b.swapd = true
	for _, r := range roots {
		if r.old {
			if err := os.RemoveAll(r.tmp()); err != nil {
				return fmt.Errorf("remove the earlier copy, now at %s: %w", r.tmp(), err)
			}
		}
	}
	return nil
}

func (r *root) swap() error {
	if r.old {
		err := unix.Renameat2(unix.AT_FDCWD, r.tmp(), unix.AT_FDCWD, r.final, unix.RENAME_EXCHANGE)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
			// No atomic exchange here: the old copy steps aside, then the new one moves in.
			aside := r.final + ".walship-old"
			if err = os.Rename(r.final, aside); err == nil {
				if err = os.Rename(r.tmp(), r.final); err != nil {
					// Put the old copy back; if that fails too, say where it is.
					if rerr := os.Rename(aside, r.final); rerr != nil {
						err = fmt.Errorf("%w; and the earlier copy could not be put back: it is at %s (%w)", err, aside, rerr)
					}
				} else {
					err = os.Rename(aside, r.tmp())
				}
			}
		}
		if err != nil {
			return fmt.Errorf("exchange %s with the new copy: %w", r.final, err)
		}
	} else {
		if err := os.Remove(r.final); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("replace the empty %s: %w", r.final, err)
		}
		if err := os.Rename(r.tmp(), r.final); err != nil {
			return err
		}
	}
	r.made = false
	return syncUp(filepath.Dir(r.final))
}

// syncUp fsyncs dir and each directory above it, so that directories made on the way
// (MkdirAll) are durable too.
func syncUp(dir string) error {
	for {
		if err := durable.SyncDir(dir); err != nil {
			return err
		}
		up := filepath.Dir(dir)
		if up == dir {
			return nil
		}
		dir = up
	}
}

// lockBeside takes an exclusive lock on the directory that holds dir, or fails at once:
// two commands building copies beside each other would remove each other's work.
func lockBeside(dir string) (unlock func(), err error) {
	parent := filepath.Dir(dir)
	f, err := os.Open(parent)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s does not exist: make it first, owned by the server's user", parent)
	}
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = f.Close() // read only; the lock's error is the one returned
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another walship standby init or rejoin is at work in %s: wait for it to end", parent)
		}
		return nil, fmt.Errorf("lock %s: %w", parent, err)
	}
	return func() { _ = f.Close() }, nil // releases the lock; the directory was opened read only
}

// cleanUp removes the new trees of a copy that did not take its place.
func (b *builder) cleanUp() {
	// The copy did not take its place (an error says why): the file being written is
	// no part of anything, and its tree is removed below.
	if b.f != nil {
		_ = b.f.Close()
	}
	if b.from != nil {
		_ = b.from.Close() // read only
	}
	if b.swapd {
		return
	}
	roots := []*root{&b.main}
	for _, t := range b.tbs {
		roots = append(roots, t)
	}
	for _, r := range roots {
		if r.made {
			if err := os.RemoveAll(r.tmp()); err != nil {
				b.o.Log.Warn().Err(err).Str("dir", r.tmp()).Msg("could not remove the unfinished copy; remove it by hand")
			}
		}
	}
}
