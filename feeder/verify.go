package feeder

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
)

// Verdict is what Verify says of one file.
type Verdict struct {
	File    string
	Bytes   int64
	Records int // records that start in the file
	OK      bool
	At      wal.LSN // where the problem is
	Offset  int64   // the same, as an offset in the file
	Reason  string
}

func (v Verdict) String() string {
	if v.OK {
		return fmt.Sprintf("%s ok: %d bytes, %d records", v.File, v.Bytes, v.Records)
	}
	return fmt.Sprintf("%s BAD at offset %d (%s): %s", v.File, v.Offset, v.At, v.Reason)
}

// segFile is one file of a timeline's WAL: a published segment or the partial.
type segFile struct {
	seg  wal.Segment
	path string
	size int64
}

// VerifySpool checks every published segment and partial of a spool: page headers
// (with the spool's system identifier), the record chain across files and every CRC.
func VerifySpool(dir string) ([]Verdict, error) {
	id, ok, err := spool.ReadIdentity(dir)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("verify: %s is not a spool that has received anything (no %s)", dir, spool.IdentityFile)
	}
	c, err := spool.Scan(dir, id.SegSize)
	if err != nil {
		return nil, err
	}
	byTLI := map[uint32][]segFile{}
	for _, s := range c.Segments {
		byTLI[s.TLI] = append(byTLI[s.TLI], segFile{s, filepath.Join(dir, s.Name(id.SegSize)), int64(id.SegSize)})
	}
	for tli, p := range c.Partials {
		byTLI[tli] = append(byTLI[tli], segFile{p.Seg, filepath.Join(dir, p.Seg.Name(id.SegSize)+spool.PartialSuffix), int64(p.Size)})
	}
	var tlis []uint32
	for tli := range byTLI {
		tlis = append(tlis, tli)
	}
	sort.Slice(tlis, func(i, j int) bool { return tlis[i] < tlis[j] })
	var out []Verdict
	for _, tli := range tlis {
		fs := byTLI[tli]
		sort.Slice(fs, func(i, j int) bool { return fs[i].seg.No < fs[j].seg.No })
		out = append(out, verifyRun(id.Stream(), tli, fs)...)
	}
	return out, nil
}

// VerifyFiles checks single segment or partial files, each on its own: the stream's
// parameters come from the file's first page (its long header).
func VerifyFiles(paths []string) ([]Verdict, error) {
	var out []Verdict
	for _, p := range paths {
		v, err := verifyFile(p)
		if err != nil {
			return out, err
		}
		out = append(out, v)
	}
	return out, nil
}

func verifyFile(path string) (Verdict, error) {
	base := filepath.Base(path)
	name := strings.TrimSuffix(base, spool.PartialSuffix)
	info, err := os.Stat(path)
	if err != nil {
		return Verdict{}, fmt.Errorf("verify: %w", err)
	}
	head := make([]byte, wal.LongHeaderSize)
	f, err := os.Open(path)
	if err != nil {
		return Verdict{}, fmt.Errorf("verify: %w", err)
	}
	_, err = io.ReadFull(f, head)
	_ = f.Close() // read only: the read error is the one that counts
	if err != nil {
		return Verdict{File: base, Bytes: info.Size(), At: 0, Reason: "shorter than a long page header"}, nil
	}
	h, err := wal.ParsePageHeader(head)
	if err != nil || h.Info&wal.FlagLongHeader == 0 {
		return Verdict{File: base, Bytes: info.Size(), Reason: "the first page has no long header: not the start of a WAL segment"}, nil
	}
	st := wal.Stream{SysID: h.SysID, SegSize: uint64(h.SegSize), BlockSize: uint64(h.BlockSize), Magic: h.Magic}
	if err := st.Validate(); err != nil {
		return Verdict{File: base, Bytes: info.Size(), Reason: "long header: " + err.Error()}, nil
	}
	seg, err := wal.ParseSegmentName(name, st.SegSize)
	if err != nil {
		return Verdict{}, fmt.Errorf("verify %s: %w", path, err)
	}
	size := info.Size()
	if strings.HasSuffix(base, spool.PartialSuffix) {
		// What is certainly durable, as the spool's verify and walship status count it.
		end, err := spool.DurableEnd(path, st.SegSize)
		if err != nil {
			return Verdict{File: base, Bytes: size, Reason: err.Error()}, nil
		}
		size = int64(end)
	} else if uint64(size) != st.SegSize {
		return Verdict{File: base, Bytes: size, At: seg.Start(st.SegSize) + wal.LSN(size), Offset: size,
			Reason: fmt.Sprintf("%d bytes, want %d", size, st.SegSize)}, nil
	}
	return verifyRun(st, seg.TLI, []segFile{{seg, path, size}})[0], nil
}

// verifyRun walks the records of consecutive files of one timeline. A file is ok when
// the walk passes through it to its end (or the bytes run out in its last record); the
// file where the walk stops early is bad, and the walk starts again at the next file.
func verifyRun(st wal.Stream, tli uint32, fs []segFile) []Verdict {
	byNo := map[uint64]segFile{}
	for _, f := range fs {
		byNo[f.seg.No] = f
	}
	src := &wal.Files{SegSize: st.SegSize, Locate: func(no uint64) (string, int64, bool) {
		f, ok := byNo[no]
		return f.path, f.size, ok
	}}
	defer src.Close()
	out := make([]Verdict, len(fs))
	for i, f := range fs {
		out[i] = Verdict{File: filepath.Base(f.path), Bytes: f.size, OK: true}
	}
	segStart := func(i int) wal.LSN { return fs[i].seg.Start(st.SegSize) }
	indexOf := func(lsn wal.LSN) int {
		for i := range fs {
			if lsn >= segStart(i) && lsn < segStart(i)+wal.LSN(st.SegSize) {
				return i
			}
		}
		return len(fs) - 1
	}
	for i := 0; i < len(fs); {
		r := wal.NewReader(st, tli, src, segStart(i), 0)
		var stop *wal.EndError
		for {
			rec, err := r.Next()
			if err != nil {
				if !errors.As(err, &stop) {
					stop = &wal.EndError{At: r.Pos(), Reason: err.Error(), Err: err}
				}
				break
			}
			out[indexOf(rec.LSN)].Records++
		}
		j := indexOf(stop.At)
		bytesRanOut := errors.Is(stop.Err, io.EOF) && (j == len(fs)-1 || fs[j+1].seg.No != fs[j].seg.No+1)
		// A walk that ends with the bytes in the last file (or before a missing one) is a
		// clean end; anything else marks the file where it stopped.
		if !bytesRanOut {
			off := int64(stop.At - segStart(j))
			out[j].OK, out[j].At, out[j].Offset, out[j].Reason = false, stop.At, off, stop.Reason
		}
		i = j + 1
	}
	return out
}
