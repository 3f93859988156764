package tail

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
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// AppBackup is the application_name of the connection that takes a base backup.
const AppBackup = "walship backup"

// controlSource is a source that answers control streams: a primary, which can take a
// base backup of its cluster and stop its server for a switchover.
type controlSource interface {
	backup(ctx context.Context, bc *transport.ControlConn, first any) error
	switchover(ctx context.Context, bc *transport.ControlConn) error
}

// serveControl answers the control streams the receiver opens during a session, one at
// a time, until the session ends; it returns once the last one has ended.
func (t *Tailer) serveControl(ctx context.Context, c *transport.Conn) {
	for {
		st, err := c.AcceptControl(ctx)
		if err != nil {
			return
		}
		bc := transport.NewControlConn(st)
		start := time.Now()
		what := "base backup"
		first, err := bc.Recv()
		if err == nil {
			cs, ok := t.src.(controlSource)
			_, stop := first.(*transport.SwitchoverRequest)
			switch {
			case stop:
				what = "switchover"
				if !ok {
					err = errors.New("this sidecar relays a spool: a switchover is asked of the sidecar beside the primary")
				} else {
					t.log.Info().Msg("switchover asked for")
					err = cs.switchover(ctx, bc)
				}
			case !ok:
				err = errors.New("this sidecar relays a spool: a base backup is taken by the sidecar beside the primary")
			default:
				t.log.Info().Msg("base backup asked for")
				err = cs.backup(ctx, bc, first)
			}
		}
		if err != nil {
			t.log.Warn().Err(err).Msg(what + " failed")
			if serr := bc.Send(&transport.BackupError{Message: err.Error()}); serr != nil {
				t.log.Warn().Err(serr).Msg("could not tell the receiver why the " + what + " failed")
			}
		} else {
			t.log.Info().Dur("took", time.Since(start)).Msg(what + " done")
		}
		if err := bc.Flush(); err != nil {
			t.log.Warn().Err(err).Msg("could not send the last messages of the " + what)
		}
		if err := transport.CloseStream(st); err != nil {
			t.log.Warn().Err(err).Msg("could not end the stream of the " + what)
		}
	}
}

// backup takes a base backup with the non-exclusive backup API on a connection of its
// own (the backup lasts as long as that session) and sends the data directory's files,
// and the tablespaces', over bc: of a file the command already holds (its BackupHave),
// only the blocks that differ. first is the stream's first message.
func (p *primary) backup(ctx context.Context, bc *transport.ControlConn, first any) error {
	haves := map[string]*transport.BackupHave{}
	var req *transport.BackupRequest
	for m := first; req == nil; {
		switch m := m.(type) {
		case *transport.BackupHave:
			haves[m.Path] = m
		case *transport.BackupRequest:
			req = m
		default:
			return fmt.Errorf("backup request: unexpected %T", m)
		}
		if req == nil {
			var err error
			if m, err = bc.Recv(); err != nil {
				return fmt.Errorf("read the backup request: %w", err)
			}
		}
	}
	pg, err := connect(ctx, p.cfg.DSN, AppBackup)
	if err != nil {
		return fmt.Errorf("connect to the primary: %w", err)
	}
	// Closing the connection ends a backup still in progress.
	defer pg.Close(context.Background())
	srv := p.srv
	var start wal.LSN
	startSQL := "SELECT pg_backup_start($1, $2)"
	if srv.VersionNum < 150000 {
		startSQL = "SELECT pg_start_backup($1, $2, false)"
	}
	if err := pg.QueryRow(ctx, startSQL, req.Label, req.Fast).Scan(&start); err != nil {
		return fmt.Errorf("start the backup (the sidecar's role needs superuser or EXECUTE on the backup functions): %w", err)
	}
	tbs, err := tablespaces(ctx, pg)
	if err != nil {
		return err
	}
	files, err := listBackup(p.pgdata, tbs, srv.VersionNum)
	if err != nil {
		return err
	}
	var total int64
	for _, f := range files {
		total += f.Size
	}
	begin := &transport.BackupBegin{SysID: srv.SysID, ServerVersion: srv.VersionNum, SegSize: srv.SegSize,
		Start: start.String(), Total: total, Tablespaces: tbs}
	if err := bc.Send(begin); err != nil {
		return err
	}
	p.log.Info().Stringer("start", start).Int("files", len(files)).Int64("bytes", total).Msg("base backup started")
	var sent, same int64
	buf := make([]byte, transport.BlockSize)
	for _, f := range files {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if f.Type != transport.EntryFile {
			if err := bc.Send(&f.BackupEntry); err != nil {
				return err
			}
			continue
		}
		s, m, err := sendFile(bc, f, haves[f.Path], buf)
		if err != nil {
			return err
		}
		sent, same = sent+s, same+m
	}
	var done transport.BackupDone
	var stop wal.LSN
	stopSQL := "SELECT lsn, labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(false)"
	if srv.VersionNum < 150000 {
		stopSQL = "SELECT lsn, labelfile, coalesce(spcmapfile, '') FROM pg_stop_backup(false, false)"
	}
	if err := pg.QueryRow(ctx, stopSQL).Scan(&stop, &done.Label, &done.TablespaceMap); err != nil {
		return fmt.Errorf("stop the backup: %w", err)
	}
	done.Stop, done.Sent, done.Same = stop.String(), sent, same
	p.log.Info().Stringer("start", start).Stringer("stop", stop).Int64("sent_bytes", sent).Int64("same_bytes", same).Msg("base backup stopped")
	return bc.Send(&done)
}

// tablespaces lists the primary's tablespaces other than pg_default and pg_global.
func tablespaces(ctx context.Context, pg *pgx.Conn) ([]transport.BackupTablespace, error) {
	rows, err := pg.Query(ctx, `SELECT oid, pg_tablespace_location(oid) FROM pg_tablespace
		WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid`)
	if err != nil {
		return nil, fmt.Errorf("list tablespaces: %w", err)
	}
	var tbs []transport.BackupTablespace
	for rows.Next() {
		var t transport.BackupTablespace
		if err := rows.Scan(&t.OID, &t.Location); err != nil {
			return nil, fmt.Errorf("list tablespaces: %w", err)
		}
		tbs = append(tbs, t)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list tablespaces: %w", err)
	}
	return tbs, nil
}

// backupFile is an entry of the backup and where the sidecar reads it.
type backupFile struct {
	transport.BackupEntry
	local string
}

// What a base backup leaves out, as the server's own (basebackup.c) does: the contents
// of directories the server rebuilds or that belong to the running server, and files of
// the running server or of an earlier backup.
var (
	skipContents = map[string]bool{
		"pg_wal": true, "pg_dynshmem": true, "pg_notify": true, "pg_replslot": true,
		"pg_serial": true, "pg_snapshots": true, "pg_stat_tmp": true, "pg_subtrans": true,
		"pg_wal/archive_status": true,
	}
	skipFiles = map[string]bool{
		"postmaster.pid": true, "postmaster.opts": true, "backup_label": true, "tablespace_map": true,
		"backup_manifest": true, "postgresql.auto.conf.tmp": true, "current_logfiles.tmp": true,
		"standby.signal": true, "recovery.signal": true,
	}
	tempRelation = regexp.MustCompile(`^t[0-9]+_[0-9]+(_(fsm|vm|init))?(\.[0-9]+)?$`)
	relationFile = regexp.MustCompile(`^([0-9]+)(_(fsm|vm|init))?(\.[0-9]+)?$`)
)

// listBackup lists what a base backup of the data directory pgdata and the tablespaces
// tbs sends, in the order it sends them: every directory before what it holds.
func listBackup(pgdata string, tbs []transport.BackupTablespace, versionNum int) ([]backupFile, error) {
	versionDir := fmt.Sprintf("PG_%d_", versionNum/10000)
	var files []backupFile
	if err := walkBackup(pgdata, "", &files); err != nil {
		return nil, err
	}
	for _, t := range tbs {
		name := path.Join("pg_tblspc", strconv.FormatUint(uint64(t.OID), 10))
		files = append(files, backupFile{BackupEntry: transport.BackupEntry{Path: name, Type: transport.EntryTablespace, Mode: 0o700}})
		// Only the server version's directory: an upgrade's older ones, lost+found of a
		// mount point and the like are not this cluster's.
		ents, err := os.ReadDir(t.Location)
		if err != nil {
			return nil, fmt.Errorf("tablespace %d: %w", t.OID, err)
		}
		for _, e := range ents {
			if e.IsDir() && strings.HasPrefix(e.Name(), versionDir) {
				files = append(files, backupFile{BackupEntry: transport.BackupEntry{Path: path.Join(name, e.Name()), Type: transport.EntryDir, Mode: 0o700}})
				if err := walkBackup(filepath.Join(t.Location, e.Name()), path.Join(name, e.Name()), &files); err != nil {
					return nil, err
				}
			}
		}
	}
	return files, nil
}

// walkBackup appends the backup's entries of the tree at root, named under prefix.
func walkBackup(root, prefix string, files *[]backupFile) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && p != root {
				return nil // removed while the backup ran: recovery does not need it
			}
			return fmt.Errorf("read %s: %w", p, err)
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if rel == "." {
			return nil
		}
		name := d.Name()
		dir := path.Dir(rel)
		if prefix == "" && (dir == "pg_tblspc" || skipContents[dir] && !(dir == "pg_wal" && name == "archive_status")) {
			return skipEntry(d) // tablespaces are sent after the data directory
		}
		if strings.HasPrefix(name, "pgsql_tmp") || skipFiles[name] && dir == "." || strings.HasPrefix(name, "pg_internal.init") ||
			tempRelation.MatchString(name) {
			return skipEntry(d)
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		e := transport.BackupEntry{Path: path.Join(prefix, rel), Mode: uint32(info.Mode().Perm())}
		switch {
		case d.IsDir():
			e.Type = transport.EntryDir
		case prefix == "" && rel == "pg_wal" && d.Type()&fs.ModeSymlink != 0:
			// initdb --waldir: the copy gets a directory of its own, as from the server's
			// own base backup.
			e.Type, e.Mode = transport.EntryDir, 0o700
			*files = append(*files, backupFile{BackupEntry: e, local: p},
				backupFile{BackupEntry: transport.BackupEntry{Path: "pg_wal/archive_status", Type: transport.EntryDir, Mode: 0o700}})
			return nil
		case d.Type()&fs.ModeSymlink != 0:
			return fmt.Errorf("%s is a symbolic link, which a base backup does not follow: move what it points to into the data directory, or out of it", p)
		case info.Mode().IsRegular():
			if unloggedMain(p, name) {
				return nil
			}
			e.Type, e.Size = transport.EntryFile, info.Size()
		default:
			return nil // sockets, links other than tablespaces': not part of a cluster
		}
		*files = append(*files, backupFile{BackupEntry: e, local: p})
		return nil
	})
}

func skipEntry(d fs.DirEntry) error {
	if d.IsDir() {
		return fs.SkipDir
	}
	return nil
}

// unloggedMain says whether file name at p is a fork other than the init fork of an
// unlogged relation (one with an _init fork): recovery makes those from the init fork.
func unloggedMain(p, name string) bool {
	m := relationFile.FindStringSubmatch(name)
	if m == nil || m[3] == "init" {
		return false
	}
	_, err := os.Stat(filepath.Join(filepath.Dir(p), m[1]+"_init"))
	return err == nil
}

// sendFile sends f's entry and the blocks of f that have does not hold. A file removed
// since it was listed is left out; of the others, the size is taken as the file is
// opened: one that grows while it is read is cut there, and one that shrinks is padded
// with zeros, as the server's own base backup does (recovery from the backup's WAL
// mends both). It returns the bytes sent and the bytes the copy already held.
func sendFile(bc *transport.ControlConn, f backupFile, have *transport.BackupHave, buf []byte) (sent, same int64, err error) {
	fh, err := os.Open(f.local)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, err
	}
	defer func() { _ = fh.Close() }() // read only
	info, err := fh.Stat()
	if err != nil {
		return 0, 0, err
	}
	f.Size = info.Size()
	if err := bc.Send(&f.BackupEntry); err != nil {
		return 0, 0, err
	}
	for off := int64(0); off < f.Size; off += transport.BlockSize {
		b := buf[:min(transport.BlockSize, f.Size-off)]
		n, err := io.ReadFull(io.NewSectionReader(fh, off, int64(len(b))), b)
		if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
			return sent, same, fmt.Errorf("read %s: %w", f.local, err)
		}
		clear(b[n:])
		if have != nil {
			i := off / transport.BlockSize
			haveLen := min(transport.BlockSize, have.Size-off)
			if i < int64(len(have.Sums)) && haveLen == int64(len(b)) && have.Sums[i] == sha256.Sum256(b) {
				same += int64(len(b))
				continue
			}
		}
		if err := bc.Send(&transport.BackupBlock{Offset: off, Data: b}); err != nil {
			return sent, same, err
		}
		sent += int64(len(b))
	}
	return sent, same, nil
}
