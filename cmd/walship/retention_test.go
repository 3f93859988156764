package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// slotLSN reads the restart_lsn of the sidecar's replication slot; ok is false while
// the slot does not exist or has none.
func slotLSN(t *testing.T, ctx context.Context, c *lab.Cluster) (wal.LSN, bool) {
	t.Helper()
	s, err := c.QueryString(ctx, "SELECT coalesce((SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'), '')")
	require.NoError(t, err)
	if s == "" {
		return 0, false
	}
	lsn, err := wal.ParseLSN(s)
	require.NoError(t, err)
	return lsn, true
}

// fillSegments writes about n segments of WAL on the primary and checkpoints twice, so
// that without a slot the segments before them are removed or recycled.
func fillSegments(t *testing.T, ctx context.Context, c *lab.Cluster, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		require.NoError(t, c.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT -3, repeat('f', 900) FROM generate_series(1, 1000)"))
	}
	for i := 0; i < 2; i++ {
		require.NoError(t, c.Exec(ctx, "SELECT pg_switch_wal()"))
		require.NoError(t, c.Exec(ctx, "CHECKPOINT"))
	}
}

// inPGWAL says whether the primary's pg_wal still holds the segment where lsn falls.
func inPGWAL(c *lab.Cluster, lsn wal.LSN) (string, bool) {
	seg, _ := wal.SegmentOf(1, lsn, 1<<20)
	name := seg.Name(1 << 20)
	_, err := os.Stat(filepath.Join(c.Data, "pg_wal", name))
	return name, err == nil
}

// watchSpool scans the spool every 20 ms for as long as the test runs and fails it if a
// scan ever finds a published segment of the wrong size (spool.Scan refuses one) or
// a damaged spool; the final checks compare the contents.
func watchSpool(t *testing.T, ctx context.Context, spoolDir string) {
	t.Helper()
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		for {
			select {
			case <-wctx.Done():
				done <- nil
				return
			case <-time.After(20 * time.Millisecond):
			}
			id, ok, err := spool.ReadIdentity(spoolDir)
			if err != nil || !ok {
				continue
			}
			if _, err := spool.Scan(spoolDir, id.SegSize); err != nil {
				done <- err
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done, "the spool %s was seen damaged", spoolDir)
	})
}

func createLoadTable(t *testing.T, ctx context.Context, c *lab.Cluster) {
	t.Helper()
	require.NoError(t, c.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+lab.LoadTable+" (id bigserial PRIMARY KEY, client int, payload text)"))
}

// TestReceiverDown stops the receiver while the primary writes several segments and
// checkpoints: the slot keeps them in pg_wal, the sidecar warns that the slot holds back
// more than --slot-warn, and the receiver catches up when it is back, byte-identical to
// the archive.
func TestReceiverDown(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1, "--slot-warn", "2000000")
	watchSpool(t, ctx, r.spool)
	createLoadTable(t, ctx, r.primary)
	r.checkIdentical(ctx)
	r.receiver.Kill()
	pos, _ := spoolPosition(t, r.spool)
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the slot at the stopped receiver's position", func() (bool, error) {
		lsn, ok := slotLSN(t, ctx, r.primary)
		return ok && lsn == pos.LSN, nil
	}))
	fillSegments(t, ctx, r.primary, 6)
	name, ok := inPGWAL(r.primary, pos.LSN)
	require.True(t, ok, "the slot must keep %s, which the receiver still needs", name)
	lsn, _ := slotLSN(t, ctx, r.primary)
	require.Equal(t, pos.LSN, lsn, "the slot must not move while the receiver is down")
	// The warning is what is tested; no metric reports the slot.
	require.NoError(t, r.sidecar.WaitLog(ctx, "holds back more WAL than --slot-warn"))

	r.startReceiver(ctx)
	n := r.checkIdentical(ctx)
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the slot to follow the receiver", func() (bool, error) {
		lsn, _ := slotLSN(t, ctx, r.primary)
		return lsn > pos.LSN+5<<20, nil
	}))
	t.Logf("receiver down from %s while 6 segments were written; caught up, %d segments identical", pos.LSN, n)
}

// TestGapWithoutSlot runs the sidecar with --no-slot through the same outage: the
// segment it needs is gone, which it reports by name, shipping nothing; restarted with
// --archive-dir it takes the archived copies and catches up.
func TestGapWithoutSlot(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	r := streamingRig(t, ctx, 1, "--no-slot")
	watchSpool(t, ctx, r.spool)
	createLoadTable(t, ctx, r.primary)
	r.checkIdentical(ctx)
	r.receiver.Kill()
	pos, _ := spoolPosition(t, r.spool)
	fillSegments(t, ctx, r.primary, 6)
	name, ok := inPGWAL(r.primary, pos.LSN)
	require.False(t, ok, "without a slot, the checkpoints must have removed or recycled %s", name)
	_, ok = slotLSN(t, ctx, r.primary)
	require.False(t, ok, "--no-slot must create no slot")
	before := snapshot(t, r.spool)

	r.startReceiver(ctx)
	// The report naming the segment is what is tested; no metric reports a gap.
	require.NoError(t, r.sidecar.WaitLog(ctx, "gap in the WAL: segment "+name+" is gone"))
	require.Equal(t, before, snapshot(t, r.spool), "nothing may be shipped across a gap")

	r.sidecar.Kill()
	r.sidecarArgs = []string{"--no-slot", "--archive-dir", r.archive}
	r.startSidecar(ctx, r.primary)
	n := r.checkIdentical(ctx)
	require.Contains(t, r.sidecar.Log(), "shipping the archived copy")
	t.Logf("gap at %s reported; with --archive-dir caught up, %d segments identical", name, n)
}

// TestTwoReceivers streams to two receivers and stops one: the other stays current, and
// the slot stays at the stopped one's position until it is back and has caught up.
func TestTwoReceivers(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	a := newRig(t, ctx, 1)
	watchSpool(t, ctx, a.spool)
	b := a.sibling("b")
	watchSpool(t, ctx, b.spool)
	a.startReceiver(ctx)
	b.startReceiver(ctx)
	a.sidecarTo = []string{a.addr, b.addr}
	a.startSidecar(ctx, a.primary)
	createLoadTable(t, ctx, a.primary)
	a.checkIdentical(ctx)
	b.checkIdentical(ctx)

	b.receiver.Kill()
	posB, _ := spoolPosition(t, b.spool)
	fillSegments(t, ctx, a.primary, 4)
	n := a.checkIdentical(ctx)
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the slot at the stopped receiver's position", func() (bool, error) {
		lsn, ok := slotLSN(t, ctx, a.primary)
		return ok && lsn == posB.LSN, nil
	}))
	posA, _ := spoolPosition(t, a.spool)
	require.Greater(t, posA.LSN, posB.LSN+3<<20, "the running receiver must have gone on without the stopped one")

	b.startReceiver(ctx)
	m := b.checkIdentical(ctx)
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "the slot to move on", func() (bool, error) {
		lsn, _ := slotLSN(t, ctx, a.primary)
		return lsn > posB.LSN+3<<20, nil
	}))
	t.Logf("receiver b stopped at %s; a went on to %s (%d segments identical); b caught up (%d identical)", posB.LSN, posA.LSN, n, m)
}

// TestLossyLink streams through a proxy that drops, duplicates and reorders datagrams,
// 5 percent for half the run and 20 percent for the other, under load.
func TestLossyLink(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	r := newRig(t, ctx, 1)
	watchSpool(t, ctx, r.spool)
	r.startReceiver(ctx)
	proxy, err := lab.StartProxy(r.addr, lab.Faults{Drop: 0.05, Dup: 0.05, Reorder: 0.05, Delay: time.Millisecond})
	require.NoError(t, err)
	defer proxy.Close()
	r.sidecarTo = []string{proxy.Addr()}
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	load, err := lab.StartLoad(ctx, r.primary.DSN(), 2, 400)
	require.NoError(t, err)
	time.Sleep(15 * time.Second) // the length of each phase is the experiment's input
	proxy.SetFaults(lab.Faults{Drop: 0.20, Dup: 0.20, Reorder: 0.20, Delay: time.Millisecond})
	time.Sleep(15 * time.Second)
	require.NoError(t, load.Stop())
	proxy.SetFaults(lab.Faults{Drop: 0.05, Dup: 0.05, Reorder: 0.05, Delay: time.Millisecond})
	n := r.checkIdentical(ctx)
	s := proxy.Stats()
	require.Greater(t, s.Dropped, int64(100))
	require.Greater(t, s.Reordered, int64(100))
	t.Logf("%d commits over a lossy link; %d segments identical; proxy: %+v", load.Count(), n, s)
}

// TestDiskFull fills the receiver's disk (a small tmpfs): it says so, publishes no short
// segment, keeps what it published, and resumes once space is freed.
func TestDiskFull(t *testing.T) {
	if uid := os.Geteuid(); uid != 0 {
		// CI runs as root, so there the test runs, and a failing mount fails it.
		t.Skipf("needs root to mount the small tmpfs that is the receiver's disk; running as uid %d", uid)
	}
	ctx := testContext(t, 3*time.Minute)
	r := newRig(t, ctx, 1)
	mnt := filepath.Join(r.dir, "small-disk")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", mnt).CombinedOutput()
	require.NoError(t, err, "mount a small tmpfs: %s", out)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", mnt).CombinedOutput(); err != nil {
			t.Errorf("unmount the small tmpfs: %v: %s", err, out)
		}
	})
	filler := filepath.Join(mnt, "filler")
	require.NoError(t, os.WriteFile(filler, make([]byte, 6<<20), 0o644))
	r.spool = filepath.Join(mnt, "spool")
	watchSpool(t, ctx, r.spool)
	r.startReceiver(ctx)
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	createLoadTable(t, ctx, r.primary)
	for i := 0; i < 5; i++ {
		require.NoError(t, r.primary.Exec(ctx, "INSERT INTO "+lab.LoadTable+" (client, payload) SELECT -4, repeat('d', 900) FROM generate_series(1, 1000)"))
	}
	// That the receiver says why is what is tested; no metric reports the error.
	require.NoError(t, r.receiver.WaitLog(ctx, "no space left on device"))
	// Whatever is published meanwhile is whole and right (Scan refuses a short one).
	pos, c := spoolPosition(t, r.spool)
	for _, seg := range c.Segments {
		r.waitArchived(ctx, seg.Name(1<<20))
	}
	t.Logf("disk full at %s with %d published segments", pos, len(c.Segments))
	require.Less(t, pos.LSN, flushLSN(t, ctx, r.primary), "the receiver cannot have kept up")
	require.NoError(t, os.Remove(filler))
	n := r.checkIdentical(ctx)
	t.Logf("space freed: caught up, %d segments identical", n)
	require.Contains(t, r.sidecar.Log(), "no space left on device", "the sidecar hears why")
}

// TestRelayChain runs primary, standby node, disaster-recovery node: the standby's
// receiver relays its spool to the third node's. Both spools are byte-identical to the
// primary's archive; then the primary is killed, the drain's end-of-WAL mark travels
// down the chain, and a standby fed by the last spool is promoted with every
// acknowledged commit, the partial tail included.
func TestRelayChain(t *testing.T) {
	ctx := testContext(t, 4*time.Minute)
	a := newRig(t, ctx, 1)
	watchSpool(t, ctx, a.spool)
	dr := a.sibling("dr")
	watchSpool(t, ctx, dr.spool)
	dr.startReceiver(ctx)
	a.receiverArgs = []string{"--relay-to", dr.addr}
	a.startReceiver(ctx)
	a.startSidecar(ctx, a.primary)
	a.waitStreaming(ctx)
	createLoadTable(t, ctx, a.primary)
	fillSegments(t, ctx, a.primary, 3)
	n := a.checkIdentical(ctx)
	m := dr.checkIdentical(ctx)
	require.Equal(t, n, m, "the relayed spool has the same segments")
	// a's spool records what the relay's receiver still needs: the segment being
	// written, so that restore --cleanup keeps it and what follows.
	pos, _ := spoolPosition(t, dr.spool)
	seg, _ := wal.SegmentOf(pos.TLI, pos.LSN, 1<<20)
	require.NoError(t, lab.Wait(ctx, 20*time.Millisecond, "a's spool to record the relay's need", func() (bool, error) {
		h, ok, err := spool.ReadRelayHolds(a.spool)
		return ok && h.Needs[dr.addr] == seg.Name(1<<20), err
	}))
	require.NotEmpty(t, spool.Held(a.spool, seg.Name(1<<20)))
	_, ca := spoolPosition(t, a.spool)
	require.Empty(t, spool.Held(a.spool, ca.Segments[0].Name(1<<20)), "what the relay's receiver has may go")

	sb := dr.standbyVia(ctx, false, a) // the copy through a: a relay's sidecar takes no base backup
	// The relay is up: the dr node's spool holds what a's holds.
	require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, "the relay to pass on what a holds", func() (bool, error) {
		ma, err := lab.Metrics(a.recvMetrics)
		if err != nil {
			return false, err
		}
		md, err := lab.Metrics(dr.recvMetrics)
		if err != nil {
			return false, err
		}
		return ma["walship_receiver_position_known"] == 1 && md["walship_receiver_durable_lsn"] == ma["walship_receiver_durable_lsn"], nil
	}))
	a.sidecar, dr.sidecar = nil, a.sidecar // crashAndPromote kills a's primary and promotes dr's standby
	dr.primary = a.primary
	lost, window := crashAndPromote(t, ctx, dr, sb, []string{"--dsn", sb.DSN()}, crash{})
	require.Zero(t, lost)
	// The drain's end-of-WAL mark was recorded at a and passed on down the chain.
	ma, ok, err := spool.ReadEnd(a.spool)
	require.NoError(t, err)
	require.True(t, ok, "no end-of-WAL mark in a's spool")
	md, ok, err := spool.ReadEnd(dr.spool)
	require.NoError(t, err)
	require.True(t, ok, "no end-of-WAL mark in dr's spool")
	require.Equal(t, ma.Position, md.Position, "the relay passes the mark on as it is")
	t.Logf("relay chain: %d segments identical at both nodes; promoted at the end of the chain, 0 lost (window %s)", m, window)
}
