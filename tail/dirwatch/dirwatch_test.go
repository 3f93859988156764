package dirwatch

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestWatch: a write to a file of the watched directory wakes a wait; a drain
// forgets the writes before it; an interrupt ends a wait at once.
func TestWatch(t *testing.T) {
	dir := t.TempDir()
	seg := filepath.Join(dir, "000000010000000000000001")
	require.NoError(t, os.WriteFile(seg, make([]byte, 8192), 0o600))
	w, err := New(dir, Written|Added)
	require.NoError(t, err)
	defer w.Close()

	woke, err := w.Wait(10 * time.Millisecond)
	require.NoError(t, err)
	require.False(t, woke, "nothing was written yet")

	f, err := os.OpenFile(seg, os.O_WRONLY, 0)
	require.NoError(t, err)
	defer func() { assert.NoError(t, f.Close()) }()
	_, err = f.WriteAt([]byte("wal"), 100)
	require.NoError(t, err)
	woke, err = w.Wait(10 * time.Second)
	require.NoError(t, err)
	require.True(t, woke, "a write wakes the wait")

	woke, err = w.Wait(time.Millisecond)
	require.NoError(t, err)
	require.False(t, woke, "nothing written since")
	for range 3 {
		_, err = f.WriteAt([]byte("wal"), 200)
		require.NoError(t, err)
	}
	require.NoError(t, w.Drain(), "a drain after a wait that timed out")
	woke, err = w.Wait(10 * time.Millisecond)
	require.NoError(t, err)
	require.False(t, woke, "the drain forgot the writes before it")

	require.NoError(t, os.WriteFile(filepath.Join(dir, "000000010000000000000002"), nil, 0o600))
	woke, err = w.Wait(10 * time.Second)
	require.NoError(t, err)
	require.True(t, woke, "a new segment file wakes the wait")

	go func() {
		time.Sleep(20 * time.Millisecond) // the interrupt must come while the wait waits
		w.Interrupt()
	}()
	start := time.Now()
	woke, err = w.Wait(time.Minute)
	require.NoError(t, err)
	require.False(t, woke)
	require.Less(t, time.Since(start), 30*time.Second, "the interrupt ended the wait")
}

// TestWatchAdded: a watch for added files ignores writes, and sees a file renamed in.
func TestWatchAdded(t *testing.T) {
	dir := t.TempDir()
	seg := filepath.Join(dir, "000000010000000000000001.partial")
	require.NoError(t, os.WriteFile(seg, nil, 0o600))
	w, err := New(dir, Added)
	require.NoError(t, err)
	defer w.Close()
	require.NoError(t, os.WriteFile(seg, []byte("more wal"), 0o600))
	woke, err := w.Wait(10 * time.Millisecond)
	require.NoError(t, err)
	require.False(t, woke, "a write is not an added file")
	tmp := filepath.Join(dir, ".tmp")
	require.NoError(t, os.WriteFile(tmp, []byte("x"), 0o600)) // created: an event too
	require.NoError(t, w.Drain())
	require.NoError(t, os.Rename(tmp, filepath.Join(dir, "walship.freeze")))
	woke, err = w.Wait(10 * time.Second)
	require.NoError(t, err)
	require.True(t, woke, "a file renamed into the directory")
}
