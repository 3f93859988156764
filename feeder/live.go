package feeder

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/walship/walship/receiver/durable"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// restoreLive answers, in standby mode, recovery's request for the segment the spool
// is still receiving: its durable bytes, checked, zero-padded to a segment. Recovery
// replays to the zeros, asks again after wal_retrieve_retry_interval, and goes on
// from where it stopped; a record torn at the end is not replayed until it is whole.
// The partial is handed again only once it has grown (a quiet primary costs nothing):
// otherwise the answer is ErrNotAvailable, and recovery reads what it was handed last,
// which it keeps in its pg_wal. A spool without the partial is errNotInSpool.
//
// It hands nothing outside standby mode: in archive recovery the end of a partial
// would be the end of recovery, a promotion at a point the primary has gone past.
// And nothing to a standby whose configuration sets archive_mode = always: it would
// archive what it is handed, and a zero-padded partial must not reach an archive under
// a whole segment's name. Either way the request is answered ErrNotAvailable, and the
// reason logged once per postmaster.
func restoreLive(ctx context.Context, cfg RestoreConfig, id spool.Identity, seg wal.Segment) error {
	pgdata, err := filepath.Abs(cmp.Or(cfg.PGData, "."))
	if err != nil {
		return err
	}
	path := spool.PartialPath(cfg.Spool, seg, id.SegSize)
	held, err := spool.PartialEnd(path, id.SegSize)
	if errors.Is(err, fs.ErrNotExist) {
		// Not begun, or being published as the segment: restoreSegment looks again.
		return fmt.Errorf("restore %s: %w yet", cfg.File, errNotInSpool)
	}
	if err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	if held == 0 {
		return fmt.Errorf("restore %s: the partial segment holds no bytes yet: %w", cfg.File, ErrNotAvailable)
	}
	rec := spool.LiveState{PGData: pgdata, Postmaster: postmasterOf(pgdata), Segment: cfg.File}
	last, ok, err := spool.ReadLive(cfg.Spool, pgdata)
	if err != nil {
		return err
	}
	samePostmaster := ok && last.Postmaster == rec.Postmaster
	if samePostmaster && last.Segment == cfg.File && last.Bytes >= held && last.Refused == "" {
		return fmt.Errorf("restore %s: the partial segment has not grown past the %d bytes handed last: %w", cfg.File, last.Bytes, ErrNotAvailable)
	}
	if samePostmaster {
		rec.ArchiveMode = last.ArchiveMode
	}
	if rec.Refused = liveRefusal(ctx, pgdata, &rec.ArchiveMode); rec.Refused != "" {
		if samePostmaster && last.Refused == rec.Refused {
			cfg.Logger.Debug().Str("file", cfg.File).Msg("live: not handing the partial segment: " + rec.Refused)
		} else {
			cfg.Logger.Warn().Str("file", cfg.File).Msg("live: not handing the partial segment, whole segments only: " + rec.Refused)
			if err := spool.WriteLive(cfg.Spool, rec); err != nil {
				cfg.Logger.Warn().Err(err).Msg("live: cannot record the refusal")
			}
		}
		return fmt.Errorf("restore %s: being received, and not handed: %s: %w", cfg.File, rec.Refused, ErrNotAvailable)
	}
	b, err := spool.PartialBytes(path, id.SegSize)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("restore %s: %w yet", cfg.File, errNotInSpool)
	}
	if err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	// What was read may end at a slot the receiver has written and not yet synced:
	// nothing that is not durable in the spool may reach recovery.
	if err := spool.SyncPartial(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	end, err := checkRecords(id, seg, b)
	if err != nil {
		return fmt.Errorf("restore %s: %w: the partial segment: %w", cfg.File, ErrCorrupt, err)
	}
	if err := durable.WritePadded(cfg.Target, b, int64(id.SegSize), 0o600); err != nil {
		return fmt.Errorf("restore %s: %w", cfg.File, err)
	}
	// Recorded after the hand-out: lost, the next call hands the same bytes again.
	rec.Bytes, rec.End = uint64(len(b)), end.String()
	if err := spool.WriteLive(cfg.Spool, rec); err != nil {
		cfg.Logger.Warn().Err(err).Msg("live: cannot record the hand-out; the next request gets the partial again")
	}
	cfg.Logger.Info().Str("file", cfg.File).Int("bytes", len(b)).Stringer("replayable", end).Msg("restored the partial segment being received, zero-padded")
	return nil
}

// liveRefusal says why the standby in pgdata must not be handed a partial segment, or
// "" if it may. mode is its archive_mode, read from its configuration if empty.
func liveRefusal(ctx context.Context, pgdata string, mode *string) string {
	if _, err := os.Stat(filepath.Join(pgdata, "standby.signal")); err != nil {
		return "the server is not in standby mode (no standby.signal in " + pgdata + "): in archive recovery a partial segment would end recovery early"
	}
	if *mode == "" {
		m, err := archiveMode(ctx, pgdata)
		if err != nil {
			return "cannot tell the standby's archive_mode: " + err.Error()
		}
		*mode = m
	}
	if *mode == "always" {
		return "archive_mode = always: the standby would archive the zero-padded partial as a whole segment"
	}
	return ""
}

// archiveMode asks the standby's server binary what archive_mode its configuration
// sets (postgres -C), with the options its postmaster was started with, which
// postmaster.opts keeps (a config_file elsewhere, for one), and its data directory. As
// root, it runs as the data directory's owner: the server refuses to run as root.
// archive_mode takes a restart to change, so what the configuration says is what the
// running server does, unless the file was edited since the server started.
func archiveMode(ctx context.Context, pgdata string) (string, error) {
	b, err := os.ReadFile(filepath.Join(pgdata, "postmaster.opts"))
	if err != nil {
		return "", err
	}
	args := splitOpts(strings.TrimSpace(string(b)))
	if len(args) == 0 {
		return "", fmt.Errorf("%s is empty", filepath.Join(pgdata, "postmaster.opts"))
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], append(args[1:], "-D", pgdata, "-C", "archive_mode")...)
	cmd.Dir = pgdata
	if os.Geteuid() == 0 {
		var st syscall.Stat_t
		if err := syscall.Stat(pgdata, &st); err != nil {
			return "", err
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: st.Uid, Gid: st.Gid}}
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s -C archive_mode: %w: %s", args[0], err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}

// splitOpts splits postmaster.opts: the program's path, then each argument in double
// quotes (postmaster.c, CreateOptsFile).
func splitOpts(s string) []string {
	prog, rest, _ := strings.Cut(s, ` "`)
	args := []string{prog}
	if rest == "" {
		return args
	}
	return append(args, strings.Split(strings.TrimSuffix(rest, `"`), `" "`)...)
}

// postmasterOf identifies the standby's running postmaster: the process id and start
// time on the first and third lines of its postmaster.pid, "" if it cannot be read.
func postmasterOf(pgdata string) string {
	b, err := os.ReadFile(filepath.Join(pgdata, "postmaster.pid"))
	if err != nil {
		return ""
	}
	lines := strings.SplitN(string(b), "\n", 4)
	if len(lines) < 3 {
		return ""
	}
	return lines[0] + " " + lines[2]
}
