package tail

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// errNothingYet is the retryable error of a relay whose spool holds no WAL yet.
var errNothingYet = errors.New("the spool holds no WAL yet")

// relaySession ships a receiver's spool onward, as a sidecar ships pg_wal: its durable
// position takes the place of the flush position, its published segments and partial
// that of pg_wal's files, and its end-of-WAL mark is passed on once everything before
// it has been sent.
func (t *Tailer) relaySession(ctx context.Context) error {
	dir := t.cfg.Spool
	id, ok, err := spool.ReadIdentity(dir)
	if err != nil {
		return err
	}
	pos, have := t.cfg.SpoolDurable()
	if !ok || !have {
		return errNothingYet
	}
	tli, durable := pos.TLI, pos.LSN
	hello := &transport.Hello{Version: transport.Version, SysID: id.SysID, SegSize: uint32(id.SegSize),
		BlockSize: uint32(id.BlockSize), Magic: id.Magic, TLI: tli, ServerVersion: id.ServerVersion}
	c, welcome, from, err := t.open(ctx, hello, durable, dir)
	if err != nil {
		return err
	}
	defer c.Close("relay stopping")
	if welcome.Empty {
		// An empty spool downstream gets all this one holds of the timeline, not just
		// the segment being written: the two nodes then serve the same base backups.
		c, err := spool.Scan(dir, id.SegSize)
		if err != nil {
			return err
		}
		from = c.OldestRun(tli, from, id.SegSize)
	}
	t.log.Info().Str("spool", dir).Uint32("timeline", tli).Stringer("from", from).Stringer("durable", durable).Msg("relaying")
	t.shipped.Store(uint64(from))
	t.acked.Store(uint64(from))
	t.known.Store(true)

	acks := make(chan error, 1)
	ends := make(chan wal.LSN, 1)
	go func() { acks <- t.readAcks(c, ends) }()
	sh := &shipper{dir: dir, spool: true, stream: hello.Stream(), tli: tli, conn: c, log: t.log}
	defer sh.close()
	tick := time.NewTicker(t.cfg.Poll)
	defer tick.Stop()
	var endSent wal.LSN
	for {
		if durable > from {
			if err := sh.ship(from, durable); err != nil {
				return err
			}
			from = durable
			t.shipped.Store(uint64(from))
		}
		// The mark goes on once the WAL before it has: the next receiver checks that it
		// sits where its spool ends.
		if m, ok, err := spool.ReadEnd(dir); err == nil && ok && m.Position == (wal.Position{TLI: tli, LSN: from}) && endSent != from {
			if err := c.Send(&transport.End{TLI: tli, LSN: from}); err != nil {
				return err
			}
			endSent = from
			t.log.Info().Stringer("end", from).Msg("passed the end-of-WAL mark on")
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-acks:
			return err
		case <-ends:
		case <-tick.C:
		}
		pos, _ := t.cfg.SpoolDurable()
		if pos.TLI != tli {
			return fmt.Errorf("the spool moved from timeline %d to %d", tli, pos.TLI)
		}
		durable = pos.LSN
	}
}
