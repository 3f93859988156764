package archive_test

import (
	"context"
	"crypto/sha256"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/bench/lab"
	"github.com/walship/walship/receiver/archive"
	"github.com/walship/walship/receiver/spool"
)

// startS3 starts a real S3-compatible server for the test and points the AWS SDK's
// standard chain at it.
func startS3(t *testing.T, ctx context.Context) *lab.S3 {
	t.Helper()
	s, err := lab.StartS3(ctx, t.TempDir(), "walship-test")
	require.NoError(t, err)
	t.Cleanup(s.Kill)
	for _, kv := range s.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	return s
}

func TestArchive(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	s := startS3(t, ctx)
	a, err := archive.Open(ctx, archive.Config{URL: s.URL("cluster1"), PathStyle: true})
	require.NoError(t, err)

	// Binding: the first cluster binds the prefix, another is refused.
	id := spool.Identity{SysID: 7, SegSize: 16 << 20, BlockSize: 8192, Magic: 0xD110, ServerVersion: 150000}
	require.NoError(t, a.Bind(ctx, id))
	require.NoError(t, a.Bind(ctx, id), "the same cluster again")
	other := id
	other.SysID = 8
	require.ErrorIs(t, a.Bind(ctx, other), archive.ErrWrongCluster)

	// Put and Get; the same bytes again are fine, other bytes are refused and stay.
	seg := []byte(strings.Repeat("wal!", 1024))
	require.NoError(t, a.Put(ctx, "000000010000000000000001", seg))
	require.NoError(t, a.Put(ctx, "000000010000000000000001", seg))
	err = a.Put(ctx, "000000010000000000000001", []byte("other bytes"))
	require.ErrorIs(t, err, archive.ErrConflict)
	got, err := a.Get(ctx, "000000010000000000000001")
	require.NoError(t, err)
	require.Equal(t, sha256.Sum256(seg), sha256.Sum256(got), "the first bytes stay")
	_, err = a.Get(ctx, "000000010000000000000002")
	require.ErrorIs(t, err, archive.ErrNotFound)

	objs, err := a.List(ctx)
	require.NoError(t, err)
	require.Len(t, objs, 2)
	require.Equal(t, archive.Object{Name: "000000010000000000000001", Size: int64(len(seg)), Modified: objs[0].Modified}, objs[0])
	require.Equal(t, archive.IdentityObject, objs[1].Name)
	require.WithinDuration(t, time.Now(), objs[0].Modified, time.Minute)

	// An object damaged in the store is refused on download, not handed on.
	path := s.ObjectPath("cluster1/000000010000000000000001")
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	b[100] ^= 0xff
	require.NoError(t, os.WriteFile(path, b, 0o644))
	_, err = a.Get(ctx, "000000010000000000000001")
	require.Error(t, err)
	require.Contains(t, strings.ToLower(err.Error()), "checksum")

	// A bad URL is a clear error.
	for _, u := range []string{"", "http://bucket/x", "s3://", "s3:///prefix", "s3://b/p?x=1"} {
		_, err := archive.Open(ctx, archive.Config{URL: u})
		require.ErrorContains(t, err, "want s3://BUCKET or s3://BUCKET/PREFIX", u)
	}
}
