// Package archive keeps a cluster's WAL in S3-compatible object storage: whole
// segments and timeline history files under their PostgreSQL names below a prefix,
// each stored with a SHA-256 checksum the server verifies on upload and the client on
// download, and never overwritten with different bytes. An identity object
// (walship.json) binds the prefix to one cluster, as a spool's identity binds a spool.
//
// Credentials come from the AWS SDK's standard chain (environment, shared config and
// credentials files, web identity, container and instance roles); the endpoint from
// Config.Endpoint, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, as the AWS SDKs read
// them.
package archive

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"

	"github.com/walship/walship/receiver/spool"
)

// IdentityObject names the object that binds an archive's prefix to a cluster.
const IdentityObject = "walship.json"

var (
	// ErrConflict is an object that exists with other bytes than those to be stored.
	ErrConflict = errors.New("the archive holds other bytes under this name")
	// ErrNotFound is an object the archive does not hold.
	ErrNotFound = errors.New("not in the archive")
	// ErrWrongCluster is an archive bound to another cluster.
	ErrWrongCluster = errors.New("the archive belongs to another cluster")
)

// Config says where the archive is.
type Config struct {
	// URL is s3://BUCKET[/PREFIX].
	URL string
	// Endpoint is the S3 server's URL; empty: the SDK's (AWS, or AWS_ENDPOINT_URL_S3).
	Endpoint string
	// Region; empty: the SDK's (AWS_REGION, the shared config), else us-east-1.
	Region string
	// PathStyle addresses buckets as ENDPOINT/BUCKET rather than BUCKET.ENDPOINT, as
	// most S3-compatible servers want.
	PathStyle bool
}

// Archive is a bucket prefix holding one cluster's WAL.
type Archive struct {
	client         *s3.Client
	bucket, prefix string
	url            string
}

// Object is an object of the archive: its name below the prefix, its size and when it
// was stored.
type Object struct {
	Name     string
	Size     int64
	Modified time.Time
}

// Open connects to the archive (it sends nothing yet).
func Open(ctx context.Context, cfg Config) (*Archive, error) {
	bucket, prefix, err := parseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	client, err := newClient(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return &Archive{client: client, bucket: bucket, prefix: prefix, url: cfg.URL}, nil
}

func newClient(ctx context.Context, cfg Config) (*s3.Client, error) {
	var opts []func(*config.LoadOptions) error
	if cfg.Region != "" {
		opts = append(opts, config.WithRegion(cfg.Region))
	}
	ac, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("archive %s: AWS configuration: %w", cfg.URL, err)
	}
	if ac.Region == "" {
		ac.Region = "us-east-1"
	}
	client := s3.NewFromConfig(ac, func(o *s3.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
		o.UsePathStyle = cfg.PathStyle
		// Checksums on every upload, and checked on every download that has one.
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenSupported
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenSupported
	})
	return client, nil
}

// parseURL splits s3://BUCKET/PREFIX; the prefix, if any, ends with a slash.
func parseURL(s string) (bucket, prefix string, err error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "s3" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return "", "", fmt.Errorf("archive URL %q: want s3://BUCKET or s3://BUCKET/PREFIX", s)
	}
	prefix = strings.Trim(u.Path, "/")
	if prefix != "" {
		prefix += "/"
	}
	return u.Host, prefix, nil
}

func (a *Archive) String() string { return a.url }

func (a *Archive) key(name string) string { return a.prefix + name }

// Put stores b under name, with its SHA-256 for the server to check. An object that is
// there already with the same bytes is success, with other bytes ErrConflict; it is
// never overwritten.
func (a *Archive) Put(ctx context.Context, name string, b []byte) error {
	sum := sha256.Sum256(b)
	want := base64.StdEncoding.EncodeToString(sum[:])
	switch have, err := a.checksum(ctx, name); {
	case err == nil && have == want:
		return nil
	case err == nil:
		return fmt.Errorf("archive %s: %s: %w (SHA-256 %s, ours %s)", a.url, name, ErrConflict, have, want)
	case !errors.Is(err, ErrNotFound):
		return err
	}
	_, err := a.client.PutObject(ctx, &s3.PutObjectInput{
		Bucket:            aws.String(a.bucket),
		Key:               aws.String(a.key(name)),
		Body:              bytes.NewReader(b),
		ContentLength:     aws.Int64(int64(len(b))),
		ChecksumAlgorithm: types.ChecksumAlgorithmSha256,
		ChecksumSHA256:    aws.String(want),
		IfNoneMatch:       aws.String("*"), // another writer's object is not overwritten either
	}, signPayload(sum))
	if apiCode(err) == "PreconditionFailed" {
		// Someone stored it meanwhile: the same bytes are fine.
		if have, herr := a.checksum(ctx, name); herr == nil && have == want {
			return nil
		}
		return fmt.Errorf("archive %s: %s: %w", a.url, name, ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("archive %s: upload %s: %w", a.url, name, err)
	}
	return nil
}

// signPayload gives the request signature our SHA-256 of the body as its payload hash.
// Over plain HTTP the SDK would otherwise hash the body a second time to sign it (the
// checksum header we set stops it reusing its own); over HTTPS it would send the body
// unsigned, which the checksum alone guards. With it, both are one pass.
func signPayload(sum [sha256.Size]byte) func(*s3.Options) {
	hash := hex.EncodeToString(sum[:])
	set := middleware.FinalizeMiddlewareFunc("WalshipPayloadHash", func(ctx context.Context, in middleware.FinalizeInput, next middleware.FinalizeHandler) (middleware.FinalizeOutput, middleware.Metadata, error) {
		return next.HandleFinalize(v4.SetPayloadHash(ctx, hash), in)
	})
	return func(o *s3.Options) {
		o.APIOptions = append(o.APIOptions, func(st *middleware.Stack) error {
			return st.Finalize.Insert(set, "ComputePayloadHash", middleware.Before)
		})
	}
}

// Holds says (nil) whether the archive holds b under name, with the same checksum.
func (a *Archive) Holds(ctx context.Context, name string, b []byte) error {
	have, err := a.checksum(ctx, name)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(b)
	if want := base64.StdEncoding.EncodeToString(sum[:]); have != want {
		return fmt.Errorf("archive %s: %s: %w", a.url, name, ErrConflict)
	}
	return nil
}

// checksum returns the SHA-256 the archive holds for name (base64), ErrNotFound if it
// holds no such object. An object stored without one is read and hashed.
func (a *Archive) checksum(ctx context.Context, name string) (string, error) {
	out, err := a.client.HeadObject(ctx, &s3.HeadObjectInput{
		Bucket:       aws.String(a.bucket),
		Key:          aws.String(a.key(name)),
		ChecksumMode: types.ChecksumModeEnabled,
	})
	if isNotFound(err) {
		return "", fmt.Errorf("archive %s: %s: %w", a.url, name, ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("archive %s: look up %s: %w", a.url, name, err)
	}
	if out.ChecksumSHA256 != nil && *out.ChecksumSHA256 != "" {
		return *out.ChecksumSHA256, nil
	}
	b, err := a.Get(ctx, name)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return base64.StdEncoding.EncodeToString(sum[:]), nil
}

// Get reads the object name; the SDK checks its bytes against the stored checksum.
func (a *Archive) Get(ctx context.Context, name string) ([]byte, error) {
	out, err := a.client.GetObject(ctx, &s3.GetObjectInput{
		Bucket:       aws.String(a.bucket),
		Key:          aws.String(a.key(name)),
		ChecksumMode: types.ChecksumModeEnabled,
	})
	if isNotFound(err) {
		return nil, fmt.Errorf("archive %s: %s: %w", a.url, name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("archive %s: download %s: %w", a.url, name, err)
	}
	defer func() { _ = out.Body.Close() }() // read only
	b, err := io.ReadAll(out.Body)
	if err != nil {
		return nil, fmt.Errorf("archive %s: download %s: %w", a.url, name, err)
	}
	if out.ChecksumSHA256 != nil && *out.ChecksumSHA256 != "" {
		// The SDK has checked it as it read; check again, in case the server sent
		// none it could check.
		sum := sha256.Sum256(b)
		if got := base64.StdEncoding.EncodeToString(sum[:]); got != *out.ChecksumSHA256 {
			return nil, fmt.Errorf("archive %s: %s: its bytes have SHA-256 %s, the archive says %s", a.url, name, got, *out.ChecksumSHA256)
		}
	}
	return b, nil
}

// List returns every object below the prefix, in name order.
func (a *Archive) List(ctx context.Context) ([]Object, error) {
	var objs []Object
	p := s3.NewListObjectsV2Paginator(a.client, &s3.ListObjectsV2Input{Bucket: aws.String(a.bucket), Prefix: aws.String(a.prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("archive %s: list: %w", a.url, err)
		}
		for _, o := range page.Contents {
			objs = append(objs, Object{Name: strings.TrimPrefix(aws.ToString(o.Key), a.prefix), Size: aws.ToInt64(o.Size), Modified: aws.ToTime(o.LastModified)})
		}
	}
	return objs, nil
}

// Delete removes the object name; one that is not there is no error.
func (a *Archive) Delete(ctx context.Context, name string) error {
	_, err := a.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(a.bucket), Key: aws.String(a.key(name))})
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("archive %s: delete %s: %w", a.url, name, err)
	}
	return nil
}

// Bind binds the archive to the cluster of id, or checks that it is bound to it.
func (a *Archive) Bind(ctx context.Context, id spool.Identity) error {
	b, err := a.Get(ctx, IdentityObject)
	if errors.Is(err, ErrNotFound) {
		b, err = json.MarshalIndent(id, "", "  ")
		if err != nil {
			return err
		}
		if err := a.Put(ctx, IdentityObject, append(b, '\n')); err == nil || !errors.Is(err, ErrConflict) {
			return err
		}
		b, err = a.Get(ctx, IdentityObject) // another receiver bound it meanwhile
	}
	if err != nil {
		return err
	}
	var have spool.Identity
	if err := json.Unmarshal(b, &have); err != nil {
		return fmt.Errorf("archive %s: %s: %w", a.url, IdentityObject, err)
	}
	if have.SysID != id.SysID || have.SegSize != id.SegSize {
		return fmt.Errorf("archive %s: %w: system identifier %d, %d-byte segments; this spool's is %d, %d-byte segments",
			a.url, ErrWrongCluster, have.SysID, have.SegSize, id.SysID, id.SegSize)
	}
	return nil
}

// Identity reads the cluster the archive is bound to; ok is false if it is bound to none.
func (a *Archive) Identity(ctx context.Context) (id spool.Identity, ok bool, err error) {
	b, err := a.Get(ctx, IdentityObject)
	if errors.Is(err, ErrNotFound) {
		return id, false, nil
	}
	if err != nil {
		return id, false, err
	}
	if err := json.Unmarshal(b, &id); err != nil {
		return id, false, fmt.Errorf("archive %s: %s: %w", a.url, IdentityObject, err)
	}
	return id, true, nil
}

func isNotFound(err error) bool {
	var nsk *types.NoSuchKey
	var nf *types.NotFound
	return errors.As(err, &nsk) || errors.As(err, &nf) || apiCode(err) == "NotFound" || apiCode(err) == "NoSuchKey"
}

func apiCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}
