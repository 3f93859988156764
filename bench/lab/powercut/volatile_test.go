package powercut

import (
	"bytes"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// memFile is a backing file in memory.
type memFile struct{ b []byte }

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.b = append(m.b, make([]byte, end-int64(len(m.b)))...)
	}
	return copy(m.b[off:], p), nil
}

func (m *memFile) Truncate(size int64) error {
	if size <= int64(len(m.b)) {
		m.b = m.b[:size]
	} else {
		m.b = append(m.b, make([]byte, size-int64(len(m.b)))...)
	}
	return nil
}

// resize is truncate(2) on a byte slice.
func resize(b []byte, size int64) []byte {
	if size <= int64(len(b)) {
		return b[:size:size]
	}
	return append(b, make([]byte, size-int64(len(b)))...)
}

// vfileModel runs prog, a program of writes, truncations, write-backs and cuts, on a
// vfile and on a trivial model (what readers see, what is durable), and checks after
// every step that the two agree.
func vfileModel(t *testing.T, prog []byte) {
	t.Helper()
	initial := bytes.Repeat([]byte{0xee}, 3*PageSize+100)
	disk := &memFile{b: bytes.Clone(initial)}
	v := newVfile(disk, int64(len(disk.b)))
	view, durable := bytes.Clone(initial), bytes.Clone(initial)
	truncated := false // since the last write-back: a random cut may show the zeros between
	fill := byte(1)
	const span = 6 * PageSize
	check := func(step int) {
		require.Equal(t, int64(len(view)), v.size, "step %d: size", step)
		got := make([]byte, len(view)+PageSize)
		n, err := v.read(got, 0)
		require.NoError(t, err)
		require.Equal(t, view, got[:n], "step %d: what readers see", step)
		for _, off := range []int64{1, PageSize - 1, PageSize + 7, 2*PageSize + 4000} {
			got := make([]byte, 5000)
			n, err := v.read(got, off)
			require.NoError(t, err)
			want := []byte{}
			if off < int64(len(view)) {
				want = view[off:min(int64(len(view)), off+5000)]
			}
			require.Equal(t, want, got[:n], "step %d: read at %d", step, off)
		}
	}
	for step := 0; len(prog) >= 5; step++ {
		op, a, b := prog[0]%6, int64(binary.LittleEndian.Uint16(prog[1:]))%span, int64(binary.LittleEndian.Uint16(prog[3:]))%(2*PageSize+10)
		prog = prog[5:]
		switch op {
		case 0, 1: // write b bytes at a
			data := bytes.Repeat([]byte{fill}, int(b))
			fill++
			require.NoError(t, v.write(data, a))
			if end := a + b; end > int64(len(view)) {
				view = resize(view, end)
			}
			copy(view[a:], data)
		case 2: // truncate to a
			v.truncate(a)
			if a < int64(len(view)) {
				truncated = true
			}
			view = resize(bytes.Clone(view), a)
		case 3: // fsync
			_, err := v.writeBack()
			require.NoError(t, err)
			durable, truncated = bytes.Clone(view), false
			require.False(t, v.dirty())
		case 4: // cut that loses all
			v = newVfile(disk, int64(len(disk.b)))
			view, truncated = bytes.Clone(durable), false
		case 5: // random cut
			_, _, err := v.persistRandom(rand.New(rand.NewPCG(uint64(a), uint64(b))))
			require.NoError(t, err)
			got := disk.b
			require.True(t, len(got) == len(durable) || len(got) == len(view), "step %d: size %d after a random cut, neither %d nor %d", step, len(got), len(durable), len(view))
			if !truncated {
				for lo := 0; lo < len(got); lo += PageSize {
					hi := min(len(got), lo+PageSize)
					page := got[lo:hi]
					old, new := resize(bytes.Clone(durable[min(lo, len(durable)):min(hi, len(durable))]), int64(hi-lo)), resize(bytes.Clone(view[min(lo, len(view)):min(hi, len(view))]), int64(hi-lo))
					require.True(t, bytes.Equal(page, old) || bytes.Equal(page, new), "step %d: page at %d is neither old nor new", step, lo)
				}
			}
			v = newVfile(disk, int64(len(disk.b)))
			view, durable, truncated = bytes.Clone(disk.b), bytes.Clone(disk.b), false
		}
		require.Equal(t, int64(len(disk.b)), v.dsize, "step %d: durable size", step)
		check(step)
	}
}

func FuzzVfile(f *testing.F) {
	f.Add([]byte{0, 10, 0, 100, 0, 3, 0, 0, 0, 0, 0, 1, 20, 50, 0, 4, 0, 0, 0, 0})
	f.Add([]byte{2, 0, 20, 0, 0, 0, 10, 0, 0, 32, 5, 1, 2, 3, 4, 3, 0, 0, 0, 0})
	f.Add([]byte{0, 0, 0, 0, 16, 0, 0, 16, 0, 16, 5, 7, 0, 9, 0, 0, 0, 0, 0, 16})
	f.Fuzz(vfileModel)
}

// TestVfileRandomPrograms runs random programs through the model check, for more than
// the fuzz seeds give without -fuzz.
func TestVfileRandomPrograms(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 300 {
		prog := make([]byte, 5*(1+rng.IntN(40)))
		for j := range prog {
			prog[j] = byte(rng.Uint32())
		}
		if !t.Run("", func(t *testing.T) { vfileModel(t, prog) }) {
			t.Fatalf("program %d: %x", i, prog)
		}
	}
}

func TestVfileLostPages(t *testing.T) {
	old := bytes.Repeat([]byte{'o'}, 2*PageSize)
	disk := &memFile{b: bytes.Clone(old)}
	v := newVfile(disk, int64(len(old)))
	require.NoError(t, v.write(bytes.Repeat([]byte{'n'}, PageSize), 0))
	require.Equal(t, 1, v.fail())
	// Still seen, as the kernel keeps a page whose writeback failed.
	got := make([]byte, PageSize)
	_, err := v.read(got, 0)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{'n'}, PageSize), got)
	// A later write-back succeeds without writing it: it is lost.
	require.NoError(t, v.write([]byte("x"), PageSize))
	n, err := v.writeBack()
	require.NoError(t, err)
	require.Equal(t, 1, n, "pages written")
	require.Equal(t, old[:PageSize], disk.b[:PageSize], "the lost page reached the disk")
	require.Equal(t, byte('x'), disk.b[PageSize])
	require.False(t, v.dirty())
	require.False(t, v.clean(), "the lost page must stay cached")
	// Written again, the page is dirty again, whole.
	require.NoError(t, v.write([]byte("y"), 1))
	_, err = v.writeBack()
	require.NoError(t, err)
	require.Equal(t, append([]byte("ny"), bytes.Repeat([]byte{'n'}, PageSize-2)...), disk.b[:PageSize])
	require.True(t, v.clean())
}

func TestVfileRandomCutMixes(t *testing.T) {
	const pages = 64
	cut := func(seed uint64) (disk []byte, kept, dropped int) {
		m := &memFile{b: bytes.Repeat([]byte{'o'}, pages*PageSize)}
		v := newVfile(m, int64(len(m.b)))
		for p := range int64(pages) {
			require.NoError(t, v.write(bytes.Repeat([]byte{'n'}, PageSize), p*PageSize))
		}
		kept, dropped, err := v.persistRandom(rand.New(rand.NewPCG(seed, seed)))
		require.NoError(t, err)
		return m.b, kept, dropped
	}
	disk, kept, dropped := cut(7)
	require.Equal(t, pages, kept+dropped)
	require.NotZero(t, kept, "pages kept")
	require.NotZero(t, dropped, "pages dropped")
	news := 0
	for lo := 0; lo < len(disk); lo += PageSize {
		switch page := disk[lo : lo+PageSize]; {
		case bytes.Equal(page, bytes.Repeat([]byte{'n'}, PageSize)):
			news++
		case !bytes.Equal(page, bytes.Repeat([]byte{'o'}, PageSize)):
			t.Fatalf("page at %d is a mix of old and new", lo)
		}
	}
	require.Equal(t, kept, news, "new pages on disk")
	again, _, _ := cut(7)
	require.Equal(t, disk, again, "the same seed must keep the same pages")
}
