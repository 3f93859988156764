package transport

import (
	"context"
	"crypto/tls"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// pair makes certificates and a listener on a loopback port.
func pair(t *testing.T) (dir string, ln *Listener) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "tls")
	require.NoError(t, GenerateCerts(dir, CertOptions{}))
	srv, err := ServerTLS(dir)
	require.NoError(t, err)
	ln, err = Listen("127.0.0.1:0", srv)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	return dir, ln
}

func TestHandshakeAndFrames(t *testing.T) {
	dir, ln := pair(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hello := &Hello{Version: Version, SysID: 42, SegSize: 1 << 20, BlockSize: 8192, Magic: 0xD110, TLI: 1, ServerVersion: 150004}
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept(ctx)
		if err != nil {
			done <- err
			return
		}
		f, err := c.Recv()
		if err != nil {
			done <- err
			return
		}
		if _, ok := f.(*Hello); !ok {
			done <- err
			return
		}
		done <- c.Send(&Welcome{Version: Version, TLI: 1, LSN: 0x1000028})
		_, _ = c.Recv() // until the client closes, which is its error
	}()
	cli, err := ClientTLS(dir, "127.0.0.1")
	require.NoError(t, err)
	c, err := Dial(ctx, ln.Addr().String(), cli)
	require.NoError(t, err)
	defer c.Close("")
	w, err := Handshake(ctx, c, hello)
	require.NoError(t, err)
	require.Equal(t, &Welcome{Version: Version, TLI: 1, LSN: 0x1000028}, w)
	require.NoError(t, <-done)
}

func TestClientCertificateRequired(t *testing.T) {
	dir, ln := pair(t)
	go func() {
		for {
			c, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			_, _ = c.Recv() // until the client goes: its error says only how
		}
	}()
	good, err := ClientTLS(dir, "127.0.0.1")
	require.NoError(t, err)
	noCert := good.Clone()
	noCert.Certificates = nil
	other := filepath.Join(t.TempDir(), "other")
	require.NoError(t, GenerateCerts(other, CertOptions{}))
	otherCA, err := ClientTLS(other, "127.0.0.1")
	require.NoError(t, err)
	otherCA.RootCAs = good.RootCAs // trusts the receiver; only its own certificate is foreign
	wrongName, err := ClientTLS(dir, "standby.example")
	require.NoError(t, err)
	for name, conf := range map[string]*tls.Config{"no certificate": noCert, "another CA": otherCA, "wrong server name": wrongName} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := Dial(ctx, ln.Addr().String(), conf)
			if err == nil {
				_, err = Handshake(ctx, c, &Hello{Version: Version})
				c.Close("")
			}
			require.Error(t, err)
			require.NoError(t, ctx.Err(), "the refusal must come at once, not by a timeout")
			t.Logf("%s: %v", name, err)
		})
	}
}
