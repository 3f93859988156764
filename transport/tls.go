package transport

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/walship/walship/receiver/durable"
)

// ALPN is the application protocol name both peers require in the TLS handshake, so
// that a walship peer never talks to another QUIC service by mistake.
const ALPN = "walship"

// Files in a TLS directory made by GenerateCerts. The receiver needs ca.crt and
// receiver.{crt,key}; the sidecar needs ca.crt and sidecar.{crt,key}. ca.key stays
// where the certificates are made and is needed only to make more.
const (
	CACert       = "ca.crt"
	CAKey        = "ca.key"
	ReceiverCert = "receiver.crt"
	ReceiverKey  = "receiver.key"
	SidecarCert  = "sidecar.crt"
	SidecarKey   = "sidecar.key"
)

// ServerTLS loads the receiver's TLS configuration from dir: TLS 1.3 only, and a client
// certificate signed by the directory's CA required.
func ServerTLS(dir string) (*tls.Config, error) {
	pool, cert, err := loadPair(dir, ReceiverCert, ReceiverKey)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{ALPN},
	}, nil
}

// ClientTLS loads the sidecar's TLS configuration from dir, for a receiver whose
// certificate must name serverName (a host name or an IP address).
func ClientTLS(dir, serverName string) (*tls.Config, error) {
	pool, cert, err := loadPair(dir, SidecarCert, SidecarKey)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   serverName,
		NextProtos:   []string{ALPN},
	}, nil
}

func loadPair(dir, certFile, keyFile string) (*x509.CertPool, tls.Certificate, error) {
	caPEM, err := os.ReadFile(filepath.Join(dir, CACert))
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("load tls: %w (make one with 'walship certs --dir %s')", err, dir)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, tls.Certificate{}, fmt.Errorf("load tls: %s holds no PEM certificate", filepath.Join(dir, CACert))
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, certFile), filepath.Join(dir, keyFile))
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("load tls: %s/%s: %w", dir, certFile, err)
	}
	return pool, cert, nil
}

// CertOptions says what GenerateCerts makes.
type CertOptions struct {
	// Hosts are the names and IP addresses the receiver's certificate is valid for, besides
	// localhost, 127.0.0.1 and ::1, which are always included.
	Hosts []string
	// Validity of every certificate. Zero means ten years.
	Validity time.Duration
}

// GenerateCerts makes a CA and, signed by it, a receiver (server) certificate and a
// sidecar (client) certificate, in dir. It refuses to overwrite any existing file.
func GenerateCerts(dir string, opt CertOptions) error {
	if opt.Validity == 0 {
		opt.Validity = 10 * 365 * 24 * time.Hour
	}
	for _, name := range []string{CACert, CAKey, ReceiverCert, ReceiverKey, SidecarCert, SidecarKey} {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			return fmt.Errorf("make certificates: %s already exists; remove the old set or choose another --dir", filepath.Join(dir, name))
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("make certificates: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("make certificates: %w", err)
	}
	now := time.Now().Add(-time.Hour) // tolerate clocks a little behind
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "walship CA"},
		NotBefore:             now,
		NotAfter:              now.Add(opt.Validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("make certificates: ca: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	hosts := append([]string{"localhost", "127.0.0.1", "::1"}, opt.Hosts...)
	leaf := func(cn string, usage x509.ExtKeyUsage, hosts []string) (der []byte, key *ecdsa.PrivateKey, err error) {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		t := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: cn},
			NotBefore:    now,
			NotAfter:     now.Add(opt.Validity),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		}
		for _, h := range hosts {
			if ip := net.ParseIP(h); ip != nil {
				t.IPAddresses = append(t.IPAddresses, ip)
			} else {
				t.DNSNames = append(t.DNSNames, h)
			}
		}
		der, err = x509.CreateCertificate(rand.Reader, t, ca, &key.PublicKey, caKey)
		return der, key, err
	}
	rDER, rKey, err := leaf("walship receiver", x509.ExtKeyUsageServerAuth, hosts)
	if err != nil {
		return fmt.Errorf("make certificates: receiver: %w", err)
	}
	sDER, sKey, err := leaf("walship sidecar", x509.ExtKeyUsageClientAuth, nil)
	if err != nil {
		return fmt.Errorf("make certificates: sidecar: %w", err)
	}
	// Keys first, certificates after, the CA certificate last: a directory with ca.crt
	// in it is complete.
	for _, f := range []struct {
		name string
		der  []byte
		key  *ecdsa.PrivateKey
	}{{CAKey, nil, caKey}, {ReceiverKey, nil, rKey}, {SidecarKey, nil, sKey}, {ReceiverCert, rDER, nil}, {SidecarCert, sDER, nil}, {CACert, caDER, nil}} {
		var block *pem.Block
		perm := os.FileMode(0o644)
		if f.key != nil {
			der, err := x509.MarshalPKCS8PrivateKey(f.key)
			if err != nil {
				return err
			}
			block, perm = &pem.Block{Type: "PRIVATE KEY", Bytes: der}, 0o600
		} else {
			block = &pem.Block{Type: "CERTIFICATE", Bytes: f.der}
		}
		if err := durable.WriteFile(filepath.Join(dir, f.name), pem.EncodeToMemory(block), perm); err != nil {
			return fmt.Errorf("make certificates: %w", err)
		}
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return n
}
