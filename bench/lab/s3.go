package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"
)

// VersityGW is the S3-compatible server the tests store archives in: versitygw with
// its posix backend (each bucket a directory), built from the Go module proxy.
const (
	VersityGWModule  = "github.com/versity/versitygw/cmd/versitygw"
	VersityGWVersion = "v1.8.0"
)

// VersityGWBin returns the versitygw binary, built into the lab's cache with go install
// the first time (about a minute; it says so on stderr).
func VersityGWBin(ctx context.Context) (string, error) {
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(filepath.Dir(cache), "versitygw-"+VersityGWVersion)
	bin := filepath.Join(dir, "versitygw")
	if exists(bin) {
		return bin, nil
	}
	fmt.Fprintf(os.Stderr, "lab: building %s@%s into %s\n", VersityGWModule, VersityGWVersion, dir)
	tmp, err := os.MkdirTemp(filepath.Dir(cache), ".versitygw-")
	if err != nil {
		if err := os.MkdirAll(filepath.Dir(cache), 0o755); err != nil {
			return "", err
		}
		if tmp, err = os.MkdirTemp(filepath.Dir(cache), ".versitygw-"); err != nil {
			return "", err
		}
	}
	defer func() { _ = os.RemoveAll(tmp) }() // a leftover of a failure only takes space
	cmd := exec.CommandContext(ctx, "go", "install", VersityGWModule+"@"+VersityGWVersion)
	cmd.Env = append(os.Environ(), "GOBIN="+tmp, "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install %s@%s: %v\n%s", VersityGWModule, VersityGWVersion, err, out)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, dir); err != nil && !exists(bin) {
		return "", err
	}
	return bin, nil
}

// S3 is a running S3-compatible server with one bucket, its data in a directory.
type S3 struct {
	Endpoint             string // http://127.0.0.1:PORT
	Bucket               string
	AccessKey, SecretKey string
	Root                 string // the posix backend's directory: Root/Bucket holds the objects
	bin, addr, log       string
	proc                 *Proc
}

// StartS3 starts versitygw on a free port with its data in dir and a bucket named
// bucket, and waits until it answers.
func StartS3(ctx context.Context, dir, bucket string) (*S3, error) {
	bin, err := VersityGWBin(ctx)
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	secret := make([]byte, 16)
	rand.Read(secret)
	s := &S3{Bucket: bucket, AccessKey: "walship-test", SecretKey: hex.EncodeToString(secret), Root: filepath.Join(dir, "s3"),
		bin: bin, addr: "127.0.0.1:" + strconv.Itoa(port), log: filepath.Join(dir, "versitygw.log")}
	s.Endpoint = "http://" + s.addr
	if err := os.MkdirAll(filepath.Join(s.Root, bucket), 0o755); err != nil {
		return nil, err
	}
	return s, s.Start(ctx)
}

// Start starts the server again after Stop or Kill; the objects stay.
func (s *S3) Start(ctx context.Context) error {
	p, err := StartProcEnv("versitygw", s.log, s.bin, []string{"ROOT_ACCESS_KEY_ID=" + s.AccessKey, "ROOT_SECRET_ACCESS_KEY=" + s.SecretKey},
		"--port", s.addr, "--quiet", "posix", s.Root)
	if err != nil {
		return err
	}
	s.proc = p
	err = Wait(ctx, 10*time.Millisecond, "versitygw to listen on "+s.addr, func() (bool, error) {
		if !p.Running() {
			return false, fmt.Errorf("%w: versitygw exited: %v\n%s", ErrNever, p.Err(), p.Log())
		}
		c, err := net.DialTimeout("tcp", s.addr, 100*time.Millisecond)
		if err != nil {
			return false, nil
		}
		c.Close()
		return true, nil
	})
	if err != nil {
		p.Kill()
	}
	return err
}

// Stop stops the server with SIGTERM.
func (s *S3) Stop(ctx context.Context) error {
	if s.proc == nil || !s.proc.Running() {
		return nil
	}
	return s.proc.Stop(ctx)
}

// Kill kills the server at once (SIGKILL).
func (s *S3) Kill() {
	if s.proc != nil && s.proc.Running() {
		s.proc.Kill()
	}
}

// Pid is the running server's process id, 0 if it is not running.
func (s *S3) Pid() int {
	if s.proc == nil || !s.proc.Running() {
		return 0
	}
	return s.proc.Pid()
}

// Env is the environment that points the AWS SDK's standard chain at the server.
func (s *S3) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey,
		"AWS_ENDPOINT_URL_S3=" + s.Endpoint, "AWS_REGION=us-east-1"}
}

// URL is the archive URL of prefix in the bucket.
func (s *S3) URL(prefix string) string { return "s3://" + s.Bucket + "/" + prefix }

// ObjectPath is where the posix backend keeps an object.
func (s *S3) ObjectPath(key string) string { return filepath.Join(s.Root, s.Bucket, key) }
