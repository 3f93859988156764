package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/bench/lab/powercut"
	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// The power-loss tests put the spool on a power-cut file system (bench/lab/powercut)
// and cut the standby host's power under the receiver: kill -9 the receiver, drop what
// its file system had not made durable, start it again on what survived. What must
// hold after each cut:
//
//   - every position the receiver acknowledged is still in the spool after recovery,
//     before the sidecar has sent anything again: checked on a copy of the spool as the
//     cut left it, recovered as the receiver recovers it, and by the restarted
//     receiver's welcome;
//   - what recovery keeps is the primary's WAL, byte for byte: no partial claims a
//     byte that did not survive, no published segment holds one, and the segments
//     follow each other without a hole;
//   - the stream resumes, and the spool ends an exact copy of the primary's WAL.

// powerRig is a rig whose spool is the root of a power-cut mount.
type powerRig struct {
	*rig
	fs      *powercut.FS
	segSize uint64
	// checked holds the published segments already compared with the primary's.
	checked map[string]bool
}

// newPowerRig mounts a power-cut file system, points the rig's spool at it, and starts
// the receiver and the sidecar streaming. The mount is made first, so that its cleanup
// (an unmount, which needs every process on it gone) runs after the rig's.
func newPowerRig(t *testing.T, ctx context.Context) *powerRig {
	t.Helper()
	return newPowerRigMajor(t, ctx, 0)
}

// newPowerRigMajor is newPowerRig on PostgreSQL major (0: the lab's default).
func newPowerRigMajor(t *testing.T, ctx context.Context, major int) *powerRig {
	t.Helper()
	pc := powercut.Mount(t, "")
	// The standby's restore_command reads the spool as the postgres user: the
	// directories above the mount point must let it through, and the mount's root (the
	// backing directory's mode) too.
	for d := pc.Dir(); d != filepath.Dir(d) && strings.HasPrefix(d, os.TempDir()+"/"); d = filepath.Dir(d) {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	r := newRigMajor(t, ctx, 1, major)
	r.spool = pc.Dir()
	r.startReceiver(ctx)
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	id, ok, err := spool.ReadIdentity(r.spool)
	require.NoError(t, err)
	require.True(t, ok, "the spool is bound once the sidecar streams")
	return &powerRig{rig: r, fs: pc, segSize: id.SegSize, checked: map[string]bool{}}
}

// acked is the position the sidecar last heard the receiver acknowledge as durable.
func (p *powerRig) acked() wal.LSN {
	p.t.Helper()
	lsn, err := p.readAcked()
	require.NoError(p.t, err)
	return lsn
}

// readAcked is acked for hooks, which must not end their goroutine.
func (p *powerRig) readAcked() (wal.LSN, error) {
	m, err := lab.Metrics(p.sideMetrics)
	return wal.LSN(m[fmt.Sprintf("walship_sidecar_acked_lsn{receiver=%q}", p.addr)]), err
}

// waitAcked waits until the sidecar has heard the receiver acknowledge lsn.
func (p *powerRig) waitAcked(ctx context.Context, lsn wal.LSN) {
	p.t.Helper()
	require.NoError(p.t, lab.Wait(ctx, 10*time.Millisecond, "the receiver to acknowledge "+lsn.String(), func() (bool, error) {
		return p.acked() >= lsn, nil
	}))
}

// claimedEnd is where the bytes that the spool's newest partial claims in the page
// cache end, durable or not (its newest end slot whose hash holds): of what a cut may
// take away, the bytes a sync was claiming (those written after the last slot are not
// counted). Zero without a partial.
func (p *powerRig) claimedEnd() wal.LSN {
	p.t.Helper()
	c, err := spool.Scan(p.spool, p.segSize)
	require.NoError(p.t, err)
	var end wal.LSN
	for _, part := range c.Partials {
		n, err := spool.PartialEnd(spool.PartialPath(p.spool, part.Seg, p.segSize), p.segSize)
		require.NoError(p.t, err)
		end = max(end, part.Seg.Start(p.segSize)+wal.LSN(n))
	}
	return end
}

// cut is a power cut of the standby host: the receiver is dead (the caller killed it
// and it has exited); what the file system had not made durable goes as mode says.
// It returns what the sidecar last heard acknowledged, read once the receiver is gone:
// every ack it ever sent has arrived, or never will.
func (p *powerRig) cut(mode powercut.Mode) (wal.LSN, powercut.CutReport) {
	p.t.Helper()
	require.False(p.t, p.receiver.Running(), "the receiver must be dead before the cut")
	rep, err := p.fs.Cut(mode)
	require.NoError(p.t, err, "cut %s", mode)
	return p.acked(), rep
}

// recovered is a copy of the spool as a cut left it, recovered as the receiver recovers
// a spool before its first session.
type recovered struct {
	dir string
	c   spool.Contents
	pos wal.Position
	log string // what Recover said
}

// recoverCopy copies the spool as it is now (no process may write it) and runs
// spool.Recover on the copy, under its writer lock as a session does. The copy shows
// what the restarted receiver will find, without the sidecar resending anything.
func (p *powerRig) recoverCopy() recovered {
	t := p.t
	t.Helper()
	dir := copySpool(t, p.spool)
	id, ok, err := spool.ReadIdentity(dir)
	require.NoError(t, err)
	require.True(t, ok, "the spool lost its identity")
	lock, err := spool.LockWriter(dir)
	require.NoError(t, err)
	defer func() { _ = lock.Close() }() // releases the lock; nothing is written to the lock file
	var log bytes.Buffer
	c, err := spool.Recover(dir, id.Stream(), zerolog.New(&log))
	require.NoError(t, err, "recover the spool as the cut left it:\n%s", log.String())
	pos, _ := c.Position(id.SegSize)
	return recovered{dir: dir, c: c, pos: pos, log: log.String()}
}

// primaryWAL is the first n bytes of segment name as the primary wrote them: from its
// pg_wal, or once archived and removed from there, from the archive. (pg_wal is read
// first: the archive_command copies into the archive in place. A segment being
// recycled keeps its bytes until the server reaches its new name, long after.)
func (p *powerRig) primaryWAL(name string, n uint64) []byte {
	t := p.t
	t.Helper()
	for _, path := range []string{filepath.Join(p.primary.Data, "pg_wal", name), filepath.Join(p.archive, name)} {
		f, err := os.Open(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		require.NoError(t, err)
		defer func() { _ = f.Close() }() // read only
		b := make([]byte, n)
		_, err = f.ReadAt(b, 0)
		require.NoError(t, err, "read %d bytes of the primary's %s", n, path)
		return b
	}
	require.Failf(t, "no primary segment", "segment %s is neither in the primary's pg_wal nor archived", name)
	return nil
}

// checkRecovered checks a recovered copy against the primary and against acked, what
// the receiver acknowledged before the cut: the copy's WAL reaches acked; its published
// segments and its partial follow each other without a hole; each published segment
// not checked yet (and the newest) is the primary's, byte for byte; and the partial's
// bytes, up to the end recovery kept, are the primary's. what names the crash in every
// failure message (its seed and positions).
func (p *powerRig) checkRecovered(rc recovered, acked wal.LSN, what string) {
	t := p.t
	t.Helper()
	what = fmt.Sprintf("%s: acked %s, durable after recovery %s", what, acked, rc.pos)
	if rc.log != "" {
		t.Logf("%s; recovery said:\n%s", what, strings.TrimSpace(rc.log))
	}
	require.Equal(t, uint32(1), rc.pos.TLI, what)
	require.GreaterOrEqual(t, rc.pos.LSN, acked, "%s: an acknowledged position is missing after the cut", what)
	segs := rc.c.Segments
	for i, seg := range segs {
		name := seg.Name(p.segSize)
		if i > 0 {
			require.Equal(t, segs[i-1].No+1, seg.No, "%s: a hole between published segments %s and %s", what, segs[i-1].Name(p.segSize), name)
		}
		if p.checked[name] && i < len(segs)-1 {
			continue
		}
		got, err := os.ReadFile(filepath.Join(rc.dir, name))
		require.NoError(t, err)
		require.True(t, bytes.Equal(got, p.primaryWAL(name, p.segSize)), "%s: published segment %s differs from the primary's", what, name)
		p.checked[name] = true
	}
	require.LessOrEqual(t, len(rc.c.Partials), 1, "%s: one timeline, one partial at most", what)
	part, ok := rc.c.Partials[1]
	if !ok {
		return
	}
	name := part.Seg.Name(p.segSize)
	if len(segs) > 0 {
		require.Equal(t, segs[len(segs)-1].No+1, part.Seg.No, "%s: a hole between the last published segment %s and the partial %s", what, segs[len(segs)-1].Name(p.segSize), name)
	}
	got, err := spool.PartialBytes(spool.PartialPath(rc.dir, part.Seg, p.segSize), p.segSize)
	require.NoError(t, err)
	require.Equal(t, part.Size, uint64(len(got)), "%s: partial %s: what Scan counts after recovery and what it holds", what, name)
	want := p.primaryWAL(name, uint64(len(got)))
	if i := firstDiff(got, want); i >= 0 {
		require.Failf(t, "the partial claims bytes that are not the primary's",
			"%s: partial %s holds %d bytes after recovery, and differs from the primary's segment at offset %d (LSN %s)",
			what, name, len(got), i, part.Seg.Start(p.segSize)+wal.LSN(i))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// restartReceiver starts the receiver again on the spool and returns the position of
// its first welcome: where its own recovery found the spool's WAL to end, before the
// sidecar sent anything again.
func (p *powerRig) restartReceiver(ctx context.Context) wal.LSN {
	t := p.t
	t.Helper()
	p.startReceiver(ctx)
	return p.welcome(ctx, 0)
}

// welcome waits for the running receiver's session number n (from 0) and returns the
// position its welcome named.
func (p *powerRig) welcome(ctx context.Context, n int) wal.LSN {
	t := p.t
	t.Helper()
	const started = "sidecar session started"
	require.NoError(t, lab.Wait(ctx, 10*time.Millisecond, fmt.Sprintf("session %d of the receiver", n), func() (bool, error) {
		return strings.Count(p.receiver.Log(), started) > n, nil
	}))
	lines := strings.SplitAfter(p.receiver.Log(), "\n")
	for _, line := range lines {
		if !strings.Contains(line, started) {
			continue
		}
		if n--; n < 0 {
			lsn, err := wal.ParseLSN(lastField(line, `position="`))
			require.NoError(t, err, "the welcome's position in %q", line)
			return lsn
		}
	}
	panic("unreachable")
}

// waitResumed waits until the stream has moved on from a restart: the receiver has
// acknowledged n bytes more than its welcome.
func (p *powerRig) waitResumed(ctx context.Context, welcome wal.LSN, n uint64) {
	p.t.Helper()
	p.waitAcked(ctx, welcome+wal.LSN(n))
}

// trialSeed is the seed of the test's random choices (the pauses before the kills, the
// cuts' seeds): WALSHIP_POWERLOSS_SEED, or a new one, which the test logs. The same
// seed draws the same choices; what a cut drops also depends on what was dirty at the
// kill, which timing decides.
func trialSeed(t *testing.T) uint64 {
	t.Helper()
	if s := os.Getenv("WALSHIP_POWERLOSS_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		require.NoError(t, err, "WALSHIP_POWERLOSS_SEED")
		return seed
	}
	seed := rand.Uint64() >> 1
	t.Logf("seed %d (WALSHIP_POWERLOSS_SEED=%d draws the same pauses and cut seeds)", seed, seed)
	return seed
}

// TestPowerLossTrials cuts the standby host's power under a streaming receiver, under
// load, WALSHIP_POWERLOSS_TRIALS times (3 by default), at random moments, with random
// cuts (Random(seed)) and total ones (All) in turn. A hot standby fed by restore from
// the same mount runs throughout; at the end the primary is killed and the standby
// promoted, and no acknowledged commit may be lost.
func TestPowerLossTrials(t *testing.T) {
	n := 3
	if s := os.Getenv("WALSHIP_POWERLOSS_TRIALS"); s != "" {
		var err error
		n, err = strconv.Atoi(s)
		require.NoError(t, err, "WALSHIP_POWERLOSS_TRIALS")
	}
	powerLossTrials(t, 0, n)
}

// powerLossTrials runs n power cuts of the standby's host on major (0: the lab's
// default), as TestPowerLossTrials describes, and returns how many were made; any
// acknowledged position missing after one fails the test.
func powerLossTrials(t *testing.T, major, n int) int {
	ctx := testContext(t, time.Duration(3+n/2)*time.Minute)
	seed := trialSeed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	p := newPowerRigMajor(t, ctx, major)
	sb := p.standby(ctx, false)
	load, err := lab.StartLoad(ctx, p.primary.DSN(), 4, 1500)
	require.NoError(t, err)
	defer func() { _ = load.Stop() }() // only for a failure on the way: checked where it stops

	rows := []string{"| trial | cut | acked before kill | acked at cut | claimed in cache | durable after recovery | welcome | pages kept/dropped | namespace ops kept/undone |", "|---|---|---|---|---|---|---|---|---|"}
	dropped := 0
	welcome := p.acked()
	for i := 1; i <= n; i++ {
		p.waitResumed(ctx, welcome, 256<<10)
		// The moment of the cut is the experiment's random input, not a wait: a random
		// time, then the receiver's next write of WAL, so that the power goes while it
		// works (between its writes and their fdatasync) rather than while it waits for
		// the next frames, which is most of the time.
		time.Sleep(time.Duration(500+rng.IntN(2500)) * time.Millisecond)
		mode := powercut.All
		cutSeed := seed + uint64(i)
		if i%2 == 1 {
			mode = powercut.Random(cutSeed)
		}
		before := p.acked()
		writing, stop := p.nextWrite()
		select {
		case <-writing:
		case <-time.After(2 * time.Second):
		}
		p.receiver.Kill()
		stop()
		claimed := p.claimedEnd()
		acked, rep := p.cut(mode)
		what := fmt.Sprintf("trial %d (cut %s, test seed %d)", i, mode, seed)
		require.GreaterOrEqual(t, acked, before, "%s: the sidecar's acknowledged position went back with no new session", what)
		rc := p.recoverCopy()
		p.checkRecovered(rc, acked, what)
		require.NoError(t, os.RemoveAll(rc.dir))
		welcome = p.restartReceiver(ctx)
		require.Equal(t, rc.pos.LSN, welcome, "%s: the restarted receiver's recovery and the copy's disagree", what)
		t.Logf("%s: acked %s before the kill, %s at the cut; claimed in the page cache %s; durable after recovery %s; welcome %s; cut %+v",
			what, before, acked, claimed, rc.pos.LSN, welcome, rep)
		rows = append(rows, fmt.Sprintf("| %d | %s | %s | %s | %s | %s | %s | %d/%d | %d/%d |", i, mode, before, acked, claimed, rc.pos.LSN, welcome,
			rep.PagesKept, rep.PagesDropped, rep.OpsKept, rep.OpsUndone))
		dropped += rep.PagesDropped + rep.OpsUndone
	}
	t.Logf("power-loss trials (test seed %d):\n%s", seed, strings.Join(rows, "\n"))
	require.Positive(t, dropped, "no cut dropped anything: the trials tested nothing")
	require.NoError(t, load.Stop())
	n = p.checkIdentical(ctx)
	t.Logf("%d inserts; %d segments identical to the primary's after %d power cuts", load.Count(), n, len(rows)-2)

	crashAndPromote(t, ctx, p.rig, sb, []string{"--dsn", sb.DSN()}, crash{})
	return len(rows) - 2
}

// killAt makes the receiver's first file-system call that matches op, glob and when,
// and that accept (if not nil) accepts, a crash point: the hook kills the receiver and
// fails the call with EIO, then hands the call's event on the channel. The receiver's
// thread waits in that call until the hook returns and the kernel delivers SIGKILL as
// it does, so nothing of the receiver runs past that point. (kill(2) does not wait for
// the death, which the waiting call holds back: the test waits for it, after.) The
// returned function removes the hook.
func (p *powerRig) killAt(op powercut.Op, glob string, when powercut.When, accept func(powercut.Event) bool) (<-chan powercut.Event, func()) {
	pid := p.receiver.Pid()
	var fired atomic.Bool
	ch := make(chan powercut.Event, 1)
	remove := p.fs.On(op, glob, when, func(ev powercut.Event) error {
		if accept != nil && !accept(ev) || !fired.CompareAndSwap(false, true) {
			return nil
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			return err
		}
		ch <- ev
		return syscall.EIO
	})
	return ch, remove
}

// nextWrite tells, on the channel, of the receiver's next write into a partial, without
// holding it back. stop removes the hook.
func (p *powerRig) nextWrite() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	stop := p.fs.On(powercut.OpWrite, "*.partial", powercut.After, func(powercut.Event) error {
		select {
		case ch <- struct{}{}:
		default:
		}
		return nil
	})
	return ch, stop
}

// syncs follows the receiver's fsyncs of partials: where each partial's last good sync
// left it, by the end its newest slot claims (its hash holding), read in a hook while
// the receiver waits in the fsync that succeeded.
type syncs struct {
	mu   sync.Mutex
	good map[string]uint64 // partial's path on the mount: bytes from its start
	stop func()
}

func (p *powerRig) trackSyncs() *syncs {
	s := &syncs{good: map[string]uint64{}}
	s.stop = p.fs.On(powercut.OpFsync, "*.partial", powercut.After, func(ev powercut.Event) error {
		if ev.Err != nil {
			return nil
		}
		end, err := spool.PartialEnd(filepath.Join(p.spool, ev.Path), p.segSize)
		if err == nil {
			s.mu.Lock()
			s.good[ev.Path] = end
			s.mu.Unlock()
		}
		return nil
	})
	return s
}

// lastGood is where the last good sync of the partial at path left it: 0 if none (a
// partial is made of zeros, fsynced, before its first byte of WAL).
func (s *syncs) lastGood(path string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.good[path]
}

// waitEvent waits for a crash point's event.
func (p *powerRig) waitEvent(ctx context.Context, ch <-chan powercut.Event, what string) powercut.Event {
	p.t.Helper()
	select {
	case ev := <-ch:
		return ev
	case <-ctx.Done():
		require.FailNow(p.t, "no crash", "%s never came: %v", what, ctx.Err())
	}
	return powercut.Event{}
}

// segmentOf is the segment of a partial's path on the mount.
func (p *powerRig) segmentOf(name string) wal.Segment {
	p.t.Helper()
	seg, err := wal.ParseSegmentName(strings.TrimSuffix(filepath.Base(name), spool.PartialSuffix), p.segSize)
	require.NoError(p.t, err)
	return seg
}

// TestPowerLossCrashPoints crashes the receiver at exact points of its work, by the
// file system's hooks rather than by luck, then cuts the power:
//
//   - after a write of WAL into the partial and before the fdatasync that would make
//     it durable, and in such an fdatasync (failed for the dying receiver), then
//     Cut(All): recovery must settle the partial exactly where its last good sync left
//     it, which must hold everything acknowledged, and claim nothing from the killed
//     write on;
//   - between a publish's truncate (which cuts the end block off the whole partial)
//     and its rename, with Cut(All), Cut(Random), and SyncAll then Cut (the truncation
//     on the disk): recovery must leave the segment published or a partial (its whole
//     records), the primary's bytes in either case, never a hole, and the stream must
//     resume to the primary's flush position.
func TestPowerLossCrashPoints(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	seed := trialSeed(t)
	rng := rand.New(rand.NewPCG(seed, 2))
	p := newPowerRig(t, ctx)
	load, err := lab.StartLoad(ctx, p.primary.DSN(), 4, 1500)
	require.NoError(t, err)
	defer func() { _ = load.Stop() }() // only for a failure on the way: checked where it stops
	welcome := p.acked()
	synced := p.trackSyncs()

	// A write of WAL (not of the end block, past the segment's bytes), a random one of
	// the next few dozen; and an fdatasync of a partial, a random one of the next few
	// (the Before hook fails it, so that it is not carried out for the dying receiver).
	// Cut(All) takes everything written since the last good sync: recovery must settle
	// the partial exactly there, which the acknowledged position must not pass.
	for _, c := range []struct {
		op     powercut.Op
		when   powercut.When
		skip   int64
		accept func(powercut.Event) bool
	}{
		{powercut.OpWrite, powercut.After, int64(rng.IntN(50)), func(ev powercut.Event) bool { return uint64(ev.Off) < p.segSize }},
		// Not the fsync a publish makes after its truncate (every byte synced before).
		{powercut.OpFsync, powercut.Before, int64(rng.IntN(10)), func(ev powercut.Event) bool {
			st, err := os.Stat(filepath.Join(p.spool, ev.Path))
			return err == nil && st.Size() == int64(p.segSize)+spool.EndBlockSize
		}},
	} {
		p.waitResumed(ctx, welcome, 256<<10)
		var calls atomic.Int64
		killed, remove := p.killAt(c.op, "*.partial", c.when, func(ev powercut.Event) bool {
			return (c.accept == nil || c.accept(ev)) && calls.Add(1) > c.skip
		})
		ev := p.waitEvent(ctx, killed, fmt.Sprintf("a %s of a partial", c.op))
		p.receiver.Kill()
		remove()
		good := synced.lastGood(ev.Path)
		acked, rep := p.cut(powercut.All)
		seg := p.segmentOf(ev.Path)
		what := fmt.Sprintf("killed after a write of %d bytes at offset %d of %s and before its fdatasync", ev.Len, ev.Off, seg.Name(p.segSize))
		if c.op == powercut.OpFsync {
			what = fmt.Sprintf("killed in an fdatasync of %s", seg.Name(p.segSize))
		}
		what += fmt.Sprintf(", its last good sync at %s, cut all (test seed %d)", seg.Start(p.segSize)+wal.LSN(good), seed)
		rc := p.recoverCopy()
		p.checkRecovered(rc, acked, what)
		part, ok := rc.c.Partials[1]
		require.True(t, ok, "%s: the partial is gone", what)
		require.Equal(t, seg, part.Seg, "%s: the partial after recovery is another segment's", what)
		require.Equal(t, good, part.Size, "%s: recovery must settle the partial where its last good sync left it", what)
		if c.op == powercut.OpWrite {
			require.LessOrEqual(t, part.Size, uint64(ev.Off), "%s: recovery claims bytes from the write that was never synced on", what)
		}
		welcome = p.restartReceiver(ctx)
		require.Equal(t, rc.pos.LSN, welcome, "%s: the restarted receiver's recovery and the copy's disagree", what)
		t.Logf("%s: acked %s at the cut, durable after recovery %s (the partial holds %d bytes), welcome %s; cut %+v",
			what, acked, rc.pos.LSN, part.Size, welcome, rep)
	}
	synced.stop()

	// Three outcomes of the power cut: nothing of the truncation reached the disk; a
	// random part of what was pending did; all of it did (the file system wrote the new
	// size back before the power went: the partial, cut to the segment's size with
	// every byte on the disk, is an old-style partial to recovery).
	for _, c := range []struct {
		mode     powercut.Mode
		syncAll  bool
		describe string
	}{{powercut.All, false, "cut all"}, {powercut.Random(seed), false, fmt.Sprintf("cut random(%d)", seed)}, {powercut.All, true, "sync all, then cut"}} {
		p.waitResumed(ctx, welcome, 256<<10)
		killed, remove := p.killAt(powercut.OpTruncate, "*.partial", powercut.After, nil)
		ev := p.waitEvent(ctx, killed, "a publish's truncate")
		p.receiver.Kill()
		remove()
		if c.syncAll {
			require.NoError(t, p.fs.SyncAll())
		}
		acked, rep := p.cut(c.mode)
		seg := p.segmentOf(ev.Path)
		name := seg.Name(p.segSize)
		what := fmt.Sprintf("killed between the truncate and the rename of %s's publish, %s (test seed %d)", name, c.describe, seed)
		require.Equal(t, int64(p.segSize), ev.Off, "%s: the truncate is not a publish's", what)
		st, err := os.Stat(filepath.Join(p.spool, ev.Path))
		require.NoError(t, err, "%s: the partial being published is gone before its rename", what)
		kept := st.Size() == int64(p.segSize)
		if kept {
			what += ", which kept the truncation"
		}
		// The file system's part, checked so that each round tries what it says.
		if c.syncAll {
			require.True(t, kept, "%s: the synced truncation did not survive the cut", what)
		} else if c.mode == powercut.All {
			require.False(t, kept, "%s: the truncation survived a cut of all", what)
		}
		rc := p.recoverCopy()
		p.checkRecovered(rc, acked, what)
		state := "published"
		if part, ok := rc.c.Partials[1]; ok && part.Seg == seg {
			state = fmt.Sprintf("a partial of %d bytes", part.Size)
		} else {
			require.Contains(t, rc.c.Segments, seg, "%s: the segment is neither published nor a partial", what)
			require.False(t, ok, "%s: a partial after the segment being published", what)
		}
		welcome = p.restartReceiver(ctx)
		require.Equal(t, rc.pos.LSN, welcome, "%s: the restarted receiver's recovery and the copy's disagree", what)
		flush := flushLSN(t, ctx, p.primary)
		p.waitSpoolAt(ctx, flush)
		t.Logf("%s: %s after recovery; acked %s at the cut, durable after recovery %s, welcome %s; the spool reached the primary's flush position %s again; cut %+v",
			what, state, acked, rc.pos.LSN, welcome, flush, rep)
	}
	require.NoError(t, load.Stop())
	n := p.checkIdentical(ctx)
	t.Logf("%d inserts; %d segments identical to the primary's after the crashes and power cuts", load.Count(), n)
}

// TestPowerLossPublishAckedTail crashes the receiver between a publish's truncate and
// its rename, at a publish whose segment ends inside a record that the receiver has
// already acknowledged in part, and the truncation reaches the disk before the power
// goes. (The primary flushes a long record in pieces while a backend writes it: its
// WAL buffers fill and are written out, and the WAL writer flushes what was written;
// the receiver acknowledges each flush.) Recovery took the partial, cut to the
// segment's size, for one of the old kind, whose bytes nothing vouches for, and kept
// its whole records only: the acknowledged bytes of the unfinished record were dropped,
// and the spool's position went back behind what the receiver acknowledged (seen: 0/6C0000
// acknowledged, 0/600808 kept, where a 1 MB record starts). No commit was lost by it
// (the record is not whole, and its end was not acknowledged), but the acknowledgement
// was not kept. A receiver killed at that point with no power cut at all leaves the
// same file (the truncation in the page cache, which recovery reads), and so does a
// publish whose fsync after its truncate fails.
//
// It failed so until recovery took a partial cut to the segment's size whose records
// chain to its end for the publish it is (Publish syncs before it truncates), and
// published it whole.
func TestPowerLossPublishAckedTail(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	p := newPowerRig(t, ctx)
	id, _, err := spool.ReadIdentity(p.spool)
	require.NoError(t, err)
	stream := id.Stream()
	// Records of 1 MB, one after the other: the WAL writer's flushes land inside them.
	msgs, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		conn, err := p.primary.Connect(msgs)
		if err != nil {
			return
		}
		defer conn.Close(context.Background())
		for msgs.Err() == nil {
			// Fails when the test ends the load (msgs cancelled); nothing to check.
			_, _ = conn.Exec(msgs, "SELECT pg_logical_emit_message(false, 'walship', repeat('x', 1 << 20))")
		}
	}()
	defer func() { cancel(); <-done }()
	// The hook reads the whole partial as the publish cut it (the page cache holds it),
	// and lets the publish go on unless the acknowledged position is past the segment's
	// last whole record.
	var whole, ackedThen atomic.Uint64
	killed, remove := p.killAt(powercut.OpTruncate, "*.partial", powercut.After, func(ev powercut.Event) bool {
		data, err := os.ReadFile(filepath.Join(p.spool, ev.Path))
		if err != nil || uint64(len(data)) != p.segSize {
			return false
		}
		seg, err := wal.ParseSegmentName(strings.TrimSuffix(filepath.Base(ev.Path), spool.PartialSuffix), p.segSize)
		if err != nil {
			return false
		}
		start := seg.Start(p.segSize)
		end, _, _, err := wal.ValidEnd(stream, seg.TLI, wal.Bytes{Base: start, Data: data}, start, 0)
		if err != nil {
			return false
		}
		acked, err := p.readAcked()
		if err != nil {
			return false
		}
		whole.Store(uint64(end))
		ackedThen.Store(uint64(acked))
		return acked > end && end < start+wal.LSN(p.segSize)
	})
	ev := p.waitEvent(ctx, killed, "a publish whose segment ends in a record acknowledged in part")
	p.receiver.Kill()
	remove()
	cancel()
	<-done
	require.NoError(t, p.fs.SyncAll())
	acked, rep := p.cut(powercut.All)
	what := fmt.Sprintf("killed between the truncate and the rename of %s's publish, its last whole record ending at %s and %s acknowledged, the truncation on the disk",
		p.segmentOf(ev.Path).Name(p.segSize), wal.LSN(whole.Load()), wal.LSN(ackedThen.Load()))
	t.Logf("%s; cut %+v", what, rep)
	rc := p.recoverCopy()
	p.checkRecovered(rc, acked, what)
	welcome := p.restartReceiver(ctx)
	require.Equal(t, rc.pos.LSN, welcome, "%s: the restarted receiver's recovery and the copy's disagree", what)
}

// TestPowerLossFailedSync fails one fdatasync of the partial while the receiver streams
// under load. Linux drops the pages it could not write (the file system marks them
// clean, and they never reach the disk), so the receiver must not acknowledge anything
// written since its last good sync: its writer poisons itself, the session ends, and
// recovery settles the partial where that sync left it, which the next session's
// welcome names. The stream resumes; then the power is cut, and every position
// acknowledged after the failure must have survived, as the primary's bytes.
func TestPowerLossFailedSync(t *testing.T) {
	ctx := testContext(t, 3*time.Minute)
	p := newPowerRig(t, ctx)
	load, err := lab.StartLoad(ctx, p.primary.DSN(), 4, 1500)
	require.NoError(t, err)
	defer func() { _ = load.Stop() }() // only for a failure on the way: checked where it stops

	synced := p.trackSyncs()
	defer synced.stop()
	type failure struct {
		ev             powercut.Event
		good, claimed  uint64 // in the partial, from its start
		size           int64
		acked          wal.LSN
		claimErr, aErr error
	}
	failed := make(chan failure, 1)
	stop := p.fs.On(powercut.OpFsync, "*.partial", powercut.After, func(ev powercut.Event) error {
		if ev.Err == nil {
			return nil
		}
		// The receiver waits in the failed call: it has acknowledged nothing since.
		path := filepath.Join(p.spool, ev.Path)
		end, err := spool.PartialEnd(path, p.segSize)
		f := failure{ev: ev, good: synced.lastGood(ev.Path), claimed: end, claimErr: err}
		if st, err := os.Stat(path); err == nil {
			f.size = st.Size()
		}
		f.acked, f.aErr = p.readAcked()
		select {
		case failed <- f:
		default:
		}
		return nil
	})
	defer stop()
	welcome := p.acked()
	p.waitResumed(ctx, welcome, 256<<10)
	sessions := strings.Count(p.receiver.Log(), "sidecar session started")
	p.fs.FailNextSync("*.partial", syscall.EIO)
	var f failure
	select {
	case f = <-failed:
	case <-ctx.Done():
		t.Fatalf("no fdatasync of a partial failed: %v", ctx.Err())
	}
	require.NoError(t, f.claimErr)
	require.NoError(t, f.aErr)
	seg := p.segmentOf(f.ev.Path)
	start := seg.Start(p.segSize)
	what := fmt.Sprintf("failed fdatasync of %s: its last good sync left it at %s, the failed one claimed %s, %s acknowledged at the failure",
		f.ev.Path, start+wal.LSN(f.good), start+wal.LSN(f.claimed), f.acked)
	require.LessOrEqual(t, f.acked, start+wal.LSN(f.good), "%s: the receiver acknowledged bytes its last good sync had not made durable", what)

	// The session ends, the same receiver recovers the spool and welcomes the sidecar
	// again, where the last good sync left the partial.
	w := p.welcome(ctx, sessions)
	what += fmt.Sprintf("; welcome after it %s", w)
	require.True(t, p.receiver.Running(), "%s: a failed sync ends the session, not the receiver", what)
	require.Contains(t, p.receiver.Log(), "input/output error", "%s: the receiver says why the session ended", what)
	require.Equal(t, int64(1), p.fs.Stats().FailedSyncs, what)
	require.GreaterOrEqual(t, w, f.acked, "%s: recovery lost an acknowledged position", what)
	if f.size == int64(p.segSize)+spool.EndBlockSize {
		require.Equal(t, start+wal.LSN(f.good), w, "%s: recovery after the failed sync must settle the partial where its last good sync left it", what)
	} else {
		// The fsync a publish makes after its truncate: every byte was synced before,
		// and recovery keeps the partial's whole records (see
		// TestPowerLossPublishAckedTail for what that drops).
		t.Logf("%s: the failed fsync was a publish's, after its truncate (the partial holds %d bytes)", what, f.size)
	}
	t.Log(what)

	// The stream resumes past what the failed sync claimed (its pages, lost to the
	// failure, written again); then the power goes as the receiver writes, and what was
	// acknowledged stays.
	p.waitAcked(ctx, start+wal.LSN(f.claimed)+256<<10)
	writing, stopWrites := p.nextWrite()
	select {
	case <-writing:
	case <-time.After(2 * time.Second):
	}
	p.receiver.Kill()
	stopWrites()
	acked, rep := p.cut(powercut.All)
	what += fmt.Sprintf("; then cut all at %s acknowledged", acked)
	rc := p.recoverCopy()
	p.checkRecovered(rc, acked, what)
	require.Equal(t, rc.pos.LSN, p.restartReceiver(ctx), "%s: the restarted receiver's recovery and the copy's disagree", what)
	t.Logf("%s: durable after recovery %s; cut %+v", what, rc.pos, rep)
	require.NoError(t, load.Stop())
	n := p.checkIdentical(ctx)
	t.Logf("%d inserts; %d segments identical to the primary's", load.Count(), n)
}

// TestPowerLossNewSpoolDir: a receiver that makes its spool directory (and one above
// it) must make them durable, as it makes its files durable: fsynced in the directory
// that holds them. Without, a power cut takes the new directories, and with them every
// segment the receiver acknowledged.
func TestPowerLossNewSpoolDir(t *testing.T) {
	ctx := testContext(t, 2*time.Minute)
	pc := powercut.Mount(t, "")
	r := newRig(t, ctx, 1)
	r.spool = filepath.Join(pc.Dir(), "walship", "spool")
	r.startReceiver(ctx)
	r.startSidecar(ctx, r.primary)
	r.waitStreaming(ctx)
	p := &powerRig{rig: r, fs: pc, segSize: 1 << 20, checked: map[string]bool{}}
	// A load keeps the sidecar sending, so that it finds the restarted receiver at once.
	load, err := lab.StartLoad(ctx, r.primary.DSN(), 1, 1500)
	require.NoError(t, err)
	defer func() { _ = load.Stop() }() // only for a failure on the way: checked where it stops
	p.waitAcked(ctx, flushLSN(t, ctx, r.primary))
	r.receiver.Kill()
	acked, rep := p.cut(powercut.All)
	what := fmt.Sprintf("a spool the receiver made, cut all at %s acknowledged (cut %+v)", acked, rep)
	_, err = os.Stat(r.spool)
	require.NoError(t, err, "%s: the spool directory is gone", what)
	rc := p.recoverCopy()
	p.checkRecovered(rc, acked, what)
	require.Equal(t, rc.pos.LSN, p.restartReceiver(ctx), "%s: the restarted receiver's recovery and the copy's disagree", what)
}
