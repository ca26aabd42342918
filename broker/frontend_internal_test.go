package broker

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/credentials"
)

// tlsPair returns both ends of a TLS connection over a pipe, the server
// offering serverProtos and the client clientProtos; handshake says
// whether to complete the handshake.
func tlsPair(t *testing.T, serverProtos, clientProtos []string, handshake bool) (*tls.Conn, *tls.Conn) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"localhost"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	a, b := net.Pipe()
	srv := tls.Server(a, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: serverProtos, MinVersion: tls.VersionTLS13})
	cli := tls.Client(b, &tls.Config{InsecureSkipVerify: true, NextProtos: clientProtos, MinVersion: tls.VersionTLS13})
	t.Cleanup(func() { a.Close(); b.Close() }) // no close_notify: a pipe has no reader left
	if handshake {
		done := make(chan error, 1)
		go func() { done <- cli.Handshake() }()
		require.NoError(t, srv.Handshake())
		require.NoError(t, <-done)
	}
	return srv, cli
}

// TestHandshakenCredentials: gRPC gets the TLS state of a connection the
// front handshook, as credentials.NewTLS would report it, and nothing but
// a completed TLS connection that negotiated h2.
func TestHandshakenCredentials(t *testing.T) {
	srv, _ := tlsPair(t, []string{"h2"}, []string{"h2"}, true)
	c, auth, err := handshakenTLS{}.ServerHandshake(srv)
	require.NoError(t, err)
	assert.Same(t, srv, c)
	info, ok := auth.(credentials.TLSInfo)
	require.True(t, ok)
	assert.Equal(t, "h2", info.State.NegotiatedProtocol)
	assert.True(t, info.State.HandshakeComplete)
	assert.Equal(t, credentials.PrivacyAndIntegrity, info.SecurityLevel)
	assert.Equal(t, "tls", info.AuthType())

	for name, conn := range map[string]net.Conn{
		"plain TCP":            func() net.Conn { a, _ := net.Pipe(); return a }(),
		"TLS not handshaken":   func() net.Conn { s, _ := tlsPair(t, []string{"h2"}, []string{"h2"}, false); return s }(),
		"TLS with http/1.1":    func() net.Conn { s, _ := tlsPair(t, []string{"http/1.1"}, []string{"http/1.1"}, true); return s }(),
		"TLS without any ALPN": func() net.Conn { s, _ := tlsPair(t, nil, nil, true); return s }(),
	} {
		_, _, err := handshakenTLS{}.ServerHandshake(conn)
		assert.Error(t, err, name)
	}
}
