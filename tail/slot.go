package tail

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/walship/walship/tail/wal"
)

// Defaults of SlotConfig.
const (
	DefaultSlot     = "walship"
	DefaultSlotWarn = 1 << 30
	slotEvery       = time.Second
	// slotCheck is how often the slot is read while no receiver's position moves.
	slotCheck = 10 * time.Second
)

// SlotConfig configures a SlotKeeper.
type SlotConfig struct {
	// DSN is the primary's connection string. The role needs the REPLICATION attribute
	// (or superuser) to create and advance a slot.
	DSN string
	// Name is the physical replication slot's name. Empty means DefaultSlot.
	Name string
	// Warn is how many bytes of WAL the slot may hold back before a warning; zero means
	// DefaultSlotWarn.
	Warn uint64
	// Every is how often the slot is advanced. Zero means one second.
	Every time.Duration
	// Logger receives progress and warnings. The zero value logs nothing.
	Logger zerolog.Logger
}

// SlotKeeper keeps a physical replication slot on the primary at the lowest position
// every receiver has acknowledged as durable, so that the primary never removes or
// recycles a segment that a standby still needs. Until every receiver has said where
// its spool ends, the slot does not move.
type SlotKeeper struct {
	cfg     SlotConfig
	log     zerolog.Logger
	tailers []*Tailer
	acked   chan struct{} // a receiver acknowledged more
	held    atomic.Uint64 // bytes the slot held back at its last read, for Retained
}

// Retained is how many bytes of WAL the slot held back when the keeper last read it:
// the primary's flush position less the slot's restart_lsn, what --slot-warn is
// compared with. It is 0 until the first read.
func (k *SlotKeeper) Retained() uint64 { return k.held.Load() }

// NewSlotKeeper returns a keeper for the receivers of tailers.
func NewSlotKeeper(cfg SlotConfig, tailers []*Tailer) (*SlotKeeper, error) {
	if cfg.DSN == "" {
		return nil, errors.New("slot: no --dsn")
	}
	if len(tailers) == 0 {
		return nil, errors.New("slot: no receivers")
	}
	if cfg.Name == "" {
		cfg.Name = DefaultSlot
	}
	if cfg.Warn == 0 {
		cfg.Warn = DefaultSlotWarn
	}
	if cfg.Every == 0 {
		cfg.Every = slotEvery
	}
	k := &SlotKeeper{cfg: cfg, log: cfg.Logger, tailers: tailers, acked: make(chan struct{}, 1)}
	for _, t := range tailers {
		t.ackedTo(k.acked)
	}
	return k, nil
}

// Run keeps the slot until ctx is done. Lost connections are retried; a slot the server
// has invalidated (max_slot_wal_keep_size) is an error, logged at each attempt.
func (k *SlotKeeper) Run(ctx context.Context) error {
	for {
		err := k.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		k.log.Error().Err(err).Str("slot", k.cfg.Name).Msg("replication slot")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(5 * k.cfg.Every):
		}
	}
}

func (k *SlotKeeper) session(ctx context.Context) error {
	pg, err := connect(ctx, k.cfg.DSN, AppSlot)
	if err != nil {
		return fmt.Errorf("connect to the primary: %w", err)
	}
	defer pg.Close(context.Background())
	if err := k.ensure(ctx, pg); err != nil {
		return err
	}
	var lastWarn time.Time
	for {
		pos, current, status, err := k.read(ctx, pg)
		if err != nil {
			return err
		}
		if status == "lost" {
			return fmt.Errorf("the server invalidated slot %q (wal_status lost, see max_slot_wal_keep_size): WAL the receivers needed may be gone", k.cfg.Name)
		}
		target, slowest, known := k.target()
		if known && target > pos {
			if _, err := pg.Exec(ctx, "SELECT pg_replication_slot_advance($1, $2::pg_lsn)", k.cfg.Name, target); err != nil {
				return fmt.Errorf("advance slot %q to %s: %w", k.cfg.Name, target, err)
			}
			pos = target
		}
		held := uint64(0)
		if current > pos {
			held = uint64(current - pos)
		}
		k.held.Store(held)
		if held > k.cfg.Warn && time.Since(lastWarn) > time.Minute {
			ev := k.log.Warn().Str("slot", k.cfg.Name).Uint64("held_bytes", held).Stringer("restart_lsn", pos).Stringer("current", current)
			if known {
				ev = ev.Str("slowest_receiver", slowest)
			} else {
				ev = ev.Str("waiting_for", slowest)
			}
			ev.Msg("the replication slot holds back more WAL than --slot-warn: a receiver is behind or down, and pg_wal grows")
			lastWarn = time.Now()
		}
		// Read the slot again once a receiver acknowledges more, at most every Every,
		// and every slotCheck anyway, for the warning: an idle primary is not asked
		// once a second.
		if !sleep(ctx, k.cfg.Every, nil) || !sleep(ctx, slotCheck-k.cfg.Every, k.acked) {
			return nil
		}
	}
}

// sleep waits d or until wake is ready (nil: never); false means ctx ended.
func sleep(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
	case <-wake:
	}
	return true
}

// ensure creates the slot when it does not exist, reserving WAL at once.
func (k *SlotKeeper) ensure(ctx context.Context, pg *pgx.Conn) error {
	var n int
	if err := pg.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", k.cfg.Name).Scan(&n); err != nil {
		return fmt.Errorf("look for slot %q: %w", k.cfg.Name, err)
	}
	if n > 0 {
		return nil
	}
	_, err := pg.Exec(ctx, "SELECT pg_create_physical_replication_slot($1, true)", k.cfg.Name)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42710" {
		return nil // created meanwhile by another sidecar
	}
	if err != nil {
		return fmt.Errorf("create slot %q (the sidecar's role needs REPLICATION; max_replication_slots must leave one free): %w", k.cfg.Name, err)
	}
	k.log.Info().Str("slot", k.cfg.Name).Msg("created the physical replication slot that keeps WAL for the receivers")
	return nil
}

// read reads the slot's restart_lsn (zero while the slot reserves none), the primary's
// flush position and the slot's wal_status.
func (k *SlotKeeper) read(ctx context.Context, pg *pgx.Conn) (restart, current wal.LSN, status string, err error) {
	var r *wal.LSN
	var st *string
	err = pg.QueryRow(ctx, `SELECT restart_lsn, pg_current_wal_flush_lsn(), wal_status
		FROM pg_replication_slots WHERE slot_name = $1`, k.cfg.Name).Scan(&r, &current, &st)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, 0, "", fmt.Errorf("slot %q was dropped", k.cfg.Name)
	}
	if err != nil {
		return 0, 0, "", fmt.Errorf("read slot %q: %w", k.cfg.Name, err)
	}
	if r != nil {
		restart = *r
	}
	if st != nil {
		status = *st
	}
	return restart, current, status, nil
}

// target is the lowest position every receiver holds durably, and the receiver that
// sets it; known is false while some receiver has not yet said where its spool ends.
func (k *SlotKeeper) target() (lsn wal.LSN, who string, known bool) {
	for i, t := range k.tailers {
		acked, ok := t.Durable()
		if !ok {
			return 0, t.cfg.To, false
		}
		if i == 0 || acked < lsn {
			lsn, who = acked, t.cfg.To
		}
	}
	return lsn, who, true
}
