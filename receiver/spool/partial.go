package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cespare/xxhash/v2"
	"golang.org/x/sys/unix"

	"github.com/walship/walship/receiver/durable"
)

// A partial segment is pre-sized, as PostgreSQL's own WAL files are: making an
// overwrite durable costs the file system about half what an append costs, for an
// append changes the file's size and must commit the journal with the data. So
// <segment>.partial is the segment's full size of WAL space, zeros where nothing was
// received yet, followed by an end block of EndBlockSize bytes that says where the
// received bytes end.
//
// The end block holds two slots, written in turn, each in a 512-byte sector of its own:
// a sequence number, where the bytes made durable by the sync before ended (prev), where
// they end now (end), the xxhash64 of the bytes between the two, and a CRC32C of the
// slot. A sync writes the new bytes, then the slot not written last, then fdatasyncs
// both at once. After a crash, the newest slot whose CRC holds and whose hash matches
// the file's bytes says where the durable bytes end; if the crash cut its sync short
// (the slot or some of its bytes never reached the disk), the other slot does, for its
// sync completed before the next one began. Bytes past the end are no part of the
// partial, whatever they hold: readers use the end, never the file's size.
//
// The newest slot is written before its fdatasync, and a reader that is not the writer
// cannot tell whether that fdatasync has returned, or failed. What such a reader may
// count on is the end of a slot that a newer one follows: the writer writes a slot only
// once the sync before it succeeded. So the writer settles a quiet stream's last sync
// with a slot that claims no more (Writer.Settle), and Recover leaves two slots that say
// the same; Scan counts that end (partialState.certain).
//
// A partial of at most a segment's size, written by walship releases before pre-sizing
// (or a publish's, between its truncate and its rename), says how many bytes it holds by
// its size alone, which no hash vouches for: Recover keeps its whole records and turns
// it into a pre-sized one.
const (
	EndBlockSize = 4096
	slotSize     = 512
	slotLen      = 44 // magic, seq, prev, end, hash, crc
	slotMagic    = 0x646E_4570_6977_6C61
)

// spareName is a zero-filled, fsynced pre-sized file kept ready for the next partial,
// so that starting a segment does not wait for 16 MB of zeros to be written.
const spareName = ".walship.spare"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

type endSlot struct {
	seq, prev, end, hash uint64
}

func (s endSlot) encode(b []byte) {
	binary.LittleEndian.PutUint64(b[0:], slotMagic)
	binary.LittleEndian.PutUint64(b[8:], s.seq)
	binary.LittleEndian.PutUint64(b[16:], s.prev)
	binary.LittleEndian.PutUint64(b[24:], s.end)
	binary.LittleEndian.PutUint64(b[32:], s.hash)
	binary.LittleEndian.PutUint32(b[40:], crc32.Checksum(b[:40], castagnoli))
}

func decodeSlot(b []byte) (endSlot, bool) {
	if binary.LittleEndian.Uint64(b[0:]) != slotMagic || binary.LittleEndian.Uint32(b[40:]) != crc32.Checksum(b[:40], castagnoli) {
		return endSlot{}, false
	}
	return endSlot{
		seq:  binary.LittleEndian.Uint64(b[8:]),
		prev: binary.LittleEndian.Uint64(b[16:]),
		end:  binary.LittleEndian.Uint64(b[24:]),
		hash: binary.LittleEndian.Uint64(b[32:]),
	}, true
}

// partialState is what a partial's end block says: end is where its durable bytes end,
// by the newest slot that holds, which only the writer, or a reader that holds the
// writer lock and has fdatasynced the file since, may count on. certain is where the
// bytes end that are durable for certain: the end of a slot that a newer one follows
// (see EndBlockSize); 0 for an old-style partial, which nothing vouches for before
// Recover has checked its records. legacy says the file is such an old-style partial,
// whose size is its end; fellBack that a slot did not hold (a sync cut short by a
// crash). seq is the sequence number of the newest slot whose CRC holds, so that the
// next one written is newer than every slot in the file.
type partialState struct {
	end, certain, seq uint64
	legacy, fellBack  bool
}

func readPartialState(f *os.File, segSize uint64) (partialState, error) {
	info, err := f.Stat()
	if err != nil {
		return partialState{}, err
	}
	size := uint64(info.Size())
	if size <= segSize {
		return partialState{end: size, legacy: true}, nil
	}
	if size != segSize+EndBlockSize {
		return partialState{}, fmt.Errorf("partial segment %s holds %d bytes: neither a pre-sized partial (%d) nor at most a %d-byte segment",
			filepath.Base(f.Name()), size, segSize+EndBlockSize, segSize)
	}
	block := make([]byte, 2*slotSize)
	if _, err := f.ReadAt(block, int64(segSize)); err != nil {
		if errors.Is(err, io.EOF) {
			// The file shrank since its stat: a publish cut its end block off, and the
			// segment is about to appear under its own name. To a reader the partial
			// is gone, as it would be a moment later (Scan then looks again).
			err = fmt.Errorf("%w: published meanwhile", fs.ErrNotExist)
		}
		return partialState{}, fmt.Errorf("read the end block of %s: %w", f.Name(), err)
	}
	a, aok := decodeSlot(block[:slotLen])
	b, bok := decodeSlot(block[slotSize : slotSize+slotLen])
	// A slot that is not all zeros and does not decode is one whose write a crash tore.
	torn := !aok && !allZero(block[:slotLen]) || !bok && !allZero(block[slotSize:slotSize+slotLen])
	if aok && bok && b.seq > a.seq || !aok {
		a, aok, b, bok = b, bok, a, aok
	}
	var st partialState
	if aok {
		st.seq = a.seq
	}
	for i, c := range []struct {
		s  endSlot
		ok bool
	}{{a, aok}, {b, bok}} {
		s := c.s
		if !c.ok || s.prev > s.end || s.end > segSize {
			continue
		}
		match, err := hashMatches(f, s)
		if err != nil {
			return partialState{}, err
		}
		if match {
			st.end, st.fellBack = s.end, i > 0 || torn
			switch {
			case i > 0 || torn:
				// The slot after this one was written (or is being, torn): this one's
				// sync had completed.
				st.certain = s.end
			case bok && follows(a, b, segSize):
				st.certain = min(b.end, a.end)
			}
			return st, nil
		}
	}
	st.fellBack = aok || torn
	return st, nil
}

// follows says whether newer was written after older's sync had succeeded: the next
// sequence number, and either the bytes since older's end (a Sync) or the same claim
// (two slots of Recover, written with bytes it had made durable).
func follows(newer, older endSlot, segSize uint64) bool {
	if newer.seq != older.seq+1 || older.prev > older.end || older.end > segSize {
		return false
	}
	return newer.prev == older.end || newer.prev == older.prev && newer.end == older.end && newer.hash == older.hash
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func hashMatches(f *os.File, s endSlot) (bool, error) {
	d := xxhash.New()
	if _, err := io.Copy(d, io.NewSectionReader(f, int64(s.prev), int64(s.end-s.prev))); err != nil {
		return false, fmt.Errorf("read %s: %w", f.Name(), err)
	}
	return d.Sum64() == s.hash, nil
}

// PartialBytes reads the bytes a partial segment holds: up to its end, not its size.
func PartialBytes(path string, segSize uint64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read only
	st, err := readPartialState(f, segSize)
	if err != nil {
		return nil, err
	}
	b := make([]byte, st.end)
	if _, err := f.ReadAt(b, 0); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}

// SyncPartial fdatasyncs the partial segment at path. The receiver writes a partial's
// end slot before its fdatasync, so a reader may find an end that is not durable yet:
// one that hands the bytes on calls this after reading them, which makes durable all
// it read.
func SyncPartial(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	// Opened read only: the fdatasync is what counts, and its error is returned.
	defer func() { _ = f.Close() }()
	return fdatasync(f)
}

// PartialEnd is how many bytes the partial segment at path holds, by its newest end
// slot: one that hands them on calls SyncPartial after reading them (see SyncPartial),
// and one that only reports them uses DurableEnd or Scan.
func PartialEnd(path string, segSize uint64) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }() // read only
	st, err := readPartialState(f, segSize)
	return st.end, err
}

// DurableEnd is how many bytes the partial segment at path holds for certain durable,
// which a reader that is neither the writer nor syncs the partial itself may count on
// (see partialState.certain): the end of a slot that a newer one follows; none of an
// old-style partial's before Recover.
func DurableEnd(path string, segSize uint64) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }() // read only
	st, err := readPartialState(f, segSize)
	return st.certain, err
}

// writeEndBlock replaces a partial's end block by two valid slots, seq and seq+1, both
// saying that it holds held, its first bytes (already durable, or fdatasynced with the
// block), and fdatasyncs the file. It is how Recover settles a partial: afterwards no
// older or broken slot is left to confuse the next recovery, and a reader that is not
// the writer counts held (two slots that say the same: see partialState.certain).
func writeEndBlock(f *os.File, segSize uint64, held []byte, seq uint64) error {
	block := make([]byte, EndBlockSize)
	for q := seq; q <= seq+1; q++ {
		s := endSlot{seq: q, prev: 0, end: uint64(len(held)), hash: xxhash.Sum64(held)}
		s.encode(block[(q%2)*slotSize:])
	}
	if _, err := f.WriteAt(block, int64(segSize)); err != nil {
		return fmt.Errorf("write the end block of %s: %w", f.Name(), err)
	}
	return fdatasync(f)
}

func fdatasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("fdatasync %s: %w", f.Name(), err)
		}
		return nil
	}
}

// zeros is written to pre-size files.
var zeros = make([]byte, 1<<20)

// writeZeros writes zeros over [from, to) of f.
func writeZeros(f *os.File, from, to uint64) error {
	for from < to {
		n := min(to-from, uint64(len(zeros)))
		if _, err := f.WriteAt(zeros[:n], int64(from)); err != nil {
			return err
		}
		from += n
	}
	return nil
}

// preSized makes a new file of segSize+EndBlockSize zeros under a temporary name in
// dir, fsyncs it and returns it open. With write, the zeros are written: writing into a
// hole allocates blocks and costs what an append costs. Without, the file is a hole,
// made at once, for a stream so fast that the zeros would cost more than they save.
func preSized(dir string, segSize uint64, write bool) (*os.File, error) {
	f, err := os.CreateTemp(dir, durable.TempPrefix+"partial-")
	if err != nil {
		return nil, err
	}
	// Readable by others, as every WAL file of the spool: restore_command runs as the
	// server's user.
	err = f.Chmod(0o644)
	if err == nil && write {
		err = writeZeros(f, 0, segSize+EndBlockSize)
	} else if err == nil {
		err = f.Truncate(int64(segSize + EndBlockSize))
	}
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		// err says what failed; the temporary file is no part of the spool, and Recover
		// removes a leftover of it by its prefix.
		_ = f.Close()
		_ = os.Remove(f.Name())
		return nil, fmt.Errorf("pre-size a partial segment: %w", err)
	}
	return f, nil
}

// makeSpare leaves a pre-sized file at spareName for the next partial, unless one is
// there. It runs beside the writer; a failure only means the next partial is written
// at once.
func makeSpare(dir string, segSize uint64) error {
	path := filepath.Join(dir, spareName)
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	f, err := preSized(dir, segSize, true)
	if err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(f.Name()) // a spare that may not hold its zeros is no spare
		return fmt.Errorf("pre-size a partial segment: close: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		_ = os.Remove(f.Name()) // the rename's error is the one returned
		return err
	}
	return nil
}

// createPartial makes path a new pre-sized partial, durable under its name, from the
// spare if one is ready, else made now (zeros written or not, see preSized).
func createPartial(dir, path string, segSize uint64, zeros bool) (*os.File, error) {
	spare := filepath.Join(dir, spareName)
	err := os.Rename(spare, path)
	if errors.Is(err, os.ErrNotExist) {
		var f *os.File
		if f, err = preSized(dir, segSize, zeros); err != nil {
			return nil, err
		}
		if err = f.Close(); err != nil {
			err = fmt.Errorf("pre-size a partial segment: close: %w", err)
		} else {
			err = os.Rename(f.Name(), path)
		}
		if err != nil {
			_ = os.Remove(f.Name()) // err, returned below, says what failed
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create partial segment: %w", err)
	}
	if err := durable.SyncDir(dir); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open partial segment: %w", err)
	}
	// A spare of another segment size (the spool was rebound? it cannot be) would not
	// do; check rather than trust.
	if info, err := f.Stat(); err != nil || uint64(info.Size()) != segSize+EndBlockSize {
		_ = f.Close() // nothing was written through it
		return nil, fmt.Errorf("create partial segment %s: the pre-sized file has the wrong size", path)
	}
	return f, nil
}
