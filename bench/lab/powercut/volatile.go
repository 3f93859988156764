package powercut

import (
	"maps"
	"math/rand/v2"
	"slices"
	"time"
)

// PageSize is the granularity of the volatile layer: a write dirties whole pages, and a
// random cut keeps or drops each dirty page whole.
const PageSize = 4096

// backing is the durable copy of one file: the file in the backing directory.
type backing interface {
	ReadAt(b []byte, off int64) (int, error)
	WriteAt(b []byte, off int64) (int, error)
	Truncate(size int64) error
}

// vfile is the page cache of one file: what was written to it and not yet made durable.
// It is pure bookkeeping over its backing file, which it writes only in writeBack and
// persistRandom.
//
// What a reader sees at offset o < size: the cached page holding o if there is one;
// else the backing file's byte if o < min(zero, dsize); else zero. Invariants: zero <=
// size; every byte of a cached page at or past size is zero; no page lies wholly at or
// past size.
type vfile struct {
	b     backing
	size  int64 // the size readers see
	dsize int64 // the backing file's size: the durable size
	// zero is the lowest size the file was truncated to since it was last written back
	// (dsize if it was not): durable bytes from there on read as zeros.
	zero  int64
	pages map[int64]*page
	// mtime is when the file was last changed through the cache: stat shows it, and
	// writeBack leaves it on the backing file.
	mtime time.Time
}

// page is one cached page. A lost page is one whose write-back failed (FailNextSync):
// it stays readable, as the kernel keeps such pages in its page cache marked clean,
// but it is never written back.
type page struct {
	b    [PageSize]byte
	lost bool
}

func newVfile(b backing, size int64) *vfile {
	return &vfile{b: b, size: size, dsize: size, zero: size, pages: make(map[int64]*page)}
}

// durableLimit is where the bytes that come from the backing file end.
func (v *vfile) durableLimit() int64 { return min(v.zero, v.dsize) }

// fillDurable fills dst with what the backing file holds at off: its bytes below
// durableLimit, zeros past it.
func (v *vfile) fillDurable(dst []byte, off int64) error {
	n := max(0, min(int64(len(dst)), v.durableLimit()-off))
	if n > 0 {
		if _, err := v.b.ReadAt(dst[:n], off); err != nil {
			return err
		}
	}
	clear(dst[n:])
	return nil
}

// read reads into dst at off what a reader sees, up to the size: it returns how many
// bytes it read, 0 at or past the end.
func (v *vfile) read(dst []byte, off int64) (int, error) {
	if off >= v.size {
		return 0, nil
	}
	n := min(int64(len(dst)), v.size-off)
	for a := off; a < off+n; {
		p := a / PageSize
		b := min(off+n, (p+1)*PageSize)
		if pg := v.pages[p]; pg != nil {
			copy(dst[a-off:b-off], pg.b[a-p*PageSize:])
		} else if err := v.fillDurable(dst[a-off:b-off], a); err != nil {
			return 0, err
		}
		a = b
	}
	return int(n), nil
}

// write writes data at off into the cache.
func (v *vfile) write(data []byte, off int64) error {
	end := off + int64(len(data))
	for a := off; a < end; {
		p := a / PageSize
		lo := p * PageSize
		b := min(end, lo+PageSize)
		pg := v.pages[p]
		if pg == nil {
			pg = new(page)
			if a != lo || b != lo+PageSize {
				if err := v.fillDurable(pg.b[:], lo); err != nil {
					return err
				}
			}
			v.pages[p] = pg
		}
		copy(pg.b[a-lo:], data[a-off:b-off])
		pg.lost = false
		a = b
	}
	v.size = max(v.size, end)
	return nil
}

// truncate sets the size readers see.
func (v *vfile) truncate(size int64) {
	if size < v.size {
		v.zero = min(v.zero, size)
		for p := range v.pages {
			if p*PageSize >= size {
				delete(v.pages, p)
			}
		}
		if pg := v.pages[size/PageSize]; pg != nil {
			clear(pg.b[size%PageSize:])
		}
	}
	v.size = size
}

// dirty says whether anything cached is still to be written back.
func (v *vfile) dirty() bool {
	if v.size != v.dsize || v.zero < v.dsize {
		return true
	}
	for _, pg := range v.pages {
		if !pg.lost {
			return true
		}
	}
	return false
}

// clean says the cache adds nothing to the backing file: it can be dropped.
func (v *vfile) clean() bool { return len(v.pages) == 0 && !v.dirty() }

// writeBack makes the file durable as readers see it: the truncation, the dirty pages
// and the size reach the backing file. Lost pages stay cached and are not written.
// It returns how many pages it wrote.
func (v *vfile) writeBack() (int, error) {
	if v.zero < v.dsize {
		if err := v.b.Truncate(v.zero); err != nil {
			return 0, err
		}
		v.dsize = v.zero
	}
	written := 0
	for _, p := range slices.Sorted(maps.Keys(v.pages)) {
		pg := v.pages[p]
		if pg.lost {
			continue
		}
		lo := p * PageSize
		n := min(PageSize, v.size-lo)
		if _, err := v.b.WriteAt(pg.b[:n], lo); err != nil {
			return written, err
		}
		v.dsize = max(v.dsize, lo+n)
		delete(v.pages, p)
		written++
	}
	if v.dsize != v.size {
		if err := v.b.Truncate(v.size); err != nil {
			return written, err
		}
		v.dsize = v.size
	}
	v.zero = v.size
	return written, nil
}

// fail is a failed write-back: the dirty pages are lost (still cached, never to be
// written); the size and any truncation stay pending.
func (v *vfile) fail() int {
	lost := 0
	for _, pg := range v.pages {
		if !pg.lost {
			pg.lost = true
			lost++
		}
	}
	return lost
}

// persistRandom is the part of a random cut that concerns this file: a coin decides
// whether the new size (with any truncation before it) reached the backing file, and
// one coin for each dirty page, in page order, whether that page did. A page kept is
// written whole up to the size the file ends with, so that each page of the backing
// file holds its old content or its new, never a mix. The cache itself is left as it
// was: the caller drops it.
func (v *vfile) persistRandom(rng *rand.Rand) (kept, dropped int, err error) {
	target := v.dsize
	if v.size != v.dsize || v.zero < v.dsize {
		if rng.IntN(2) == 0 {
			if v.zero < v.dsize {
				if err := v.b.Truncate(v.zero); err != nil {
					return 0, 0, err
				}
				v.dsize = v.zero
			}
			target = v.size
		}
	}
	for _, p := range slices.Sorted(maps.Keys(v.pages)) {
		pg := v.pages[p]
		if pg.lost {
			continue
		}
		lo := p * PageSize
		n := min(PageSize, target-lo)
		if rng.IntN(2) != 0 || n <= 0 {
			dropped++
			continue
		}
		if _, err := v.b.WriteAt(pg.b[:n], lo); err != nil {
			return kept, dropped, err
		}
		v.dsize = max(v.dsize, lo+n)
		kept++
	}
	if v.dsize != target {
		if err := v.b.Truncate(target); err != nil {
			return kept, dropped, err
		}
		v.dsize = target
	}
	return kept, dropped, nil
}

// allocate is fallocate(2) in modes 0 and FALLOC_FL_KEEP_SIZE: the space itself is not
// modelled, only the size, which mode 0 extends as a truncation up would.
func (v *vfile) allocate(off, length int64, keepSize bool) {
	if !keepSize && off+length > v.size {
		v.truncate(off + length)
	}
}
