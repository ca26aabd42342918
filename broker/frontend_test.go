package broker_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/test/h2attack"
)

// The broker's TLS port serves gRPC to clients offering only h2 and the
// dashboard to browsers (h2 and http/1.1 offered); see frontend.go.

// handshake dials addr offering protos (ALPN) and returns the connection.
func handshake(t *testing.T, b *brokertest.Broker, addr string, protos ...string) (*tls.Conn, error) {
	t.Helper()
	d := &tls.Dialer{Config: &tls.Config{RootCAs: b.CA, ServerName: "localhost", NextProtos: protos, MinVersion: tls.VersionTLS13}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*tls.Conn)
	t.Cleanup(func() { tc.Close() })
	return tc, nil
}

// closedByServer says whether the server closes c within 5 s.
func closedByServer(c net.Conn) bool {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

func TestGRPCClientsNegotiateH2(t *testing.T) {
	b := brokertest.Start(t)
	var p peer.Peer
	_, err := b.Admin.ListNodes(context.Background(), &apiv1.ListNodesRequest{}, grpc.Peer(&p))
	require.NoError(t, err)
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	require.True(t, ok, "the client sees TLS: %T", p.AuthInfo)
	assert.Equal(t, "h2", info.State.NegotiatedProtocol)
	assert.Equal(t, uint16(tls.VersionTLS13), info.State.Version)
	assert.Equal(t, credentials.PrivacyAndIntegrity, info.SecurityLevel)
}

func TestBrowsersGetTheDashboard(t *testing.T) {
	b := brokertest.Start(t)
	c, err := handshake(t, b, b.Addr, "h2", "http/1.1")
	require.NoError(t, err)
	assert.Equal(t, "http/1.1", c.ConnectionState().NegotiatedProtocol)
	_, err = c.Write([]byte("GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n"))
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, resp.Header.Get("Content-Security-Policy"), "default-src 'none'")
}

// TestWithoutDashboardOnlyGRPCIsServed: a front without the dashboard
// negotiates h2 with a browser (which then speaks HTTP/2 to gRPC and gets
// nothing it can show) and closes clients that offer only http/1.1.
func TestWithoutDashboardOnlyGRPCIsServed(t *testing.T) {
	b := brokertest.Start(t)
	cert, err := broker.LoadServerCertificate(b.DataDir)
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f := b.Server.Frontend(cert, nil)
	go f.Serve(lis)
	t.Cleanup(f.Stop)
	c, err := handshake(t, b, lis.Addr().String(), "h2", "http/1.1")
	require.NoError(t, err)
	assert.Equal(t, "h2", c.ConnectionState().NegotiatedProtocol)
	// Go's TLS lets a client offering only http/1.1 complete the
	// handshake with an h2-only server, negotiating nothing.
	c, err = handshake(t, b, lis.Addr().String(), "http/1.1")
	require.NoError(t, err)
	assert.Empty(t, c.ConnectionState().NegotiatedProtocol)
	assert.True(t, closedByServer(c), "an HTTP/1.1 client is closed")
}

func TestClientsWithoutALPNAreClosed(t *testing.T) {
	b := brokertest.Start(t)
	c, err := handshake(t, b, b.Addr)
	require.NoError(t, err)
	assert.True(t, closedByServer(c), "a client offering no ALPN is closed")
	_, err = handshake(t, b, b.Addr, "spdy/3")
	assert.Error(t, err, "a client offering only an unknown protocol fails the handshake")
}

// TestDashboardConnectionsShareTheCaps: browser connections count against
// the same per-source cap as gRPC connections.
func TestDashboardConnectionsShareTheCaps(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) { c.Limits.MaxConnectionsPerSource = 2 })
	for range 2 {
		c, err := handshake(t, b, b.Addr, "h2", "http/1.1")
		require.NoError(t, err)
		require.Equal(t, "http/1.1", c.ConnectionState().NegotiatedProtocol)
	}
	cfg, err := h2attack.TLSConfig(filepath.Join(b.DataDir, broker.CACertFile))
	require.NoError(t, err)
	_, err = h2attack.Dial(context.Background(), b.Addr, cfg, "")
	assert.Error(t, err, "a third connection from the source, gRPC or not")
	assert.Equal(t, float64(1), counter(t, b.Server.Metrics(), "attested_broker_connections_refused_total", "reason", "source_connection_limit"))
}

// TestStalledDashboardConnectionsAreClosed: a browser connection that
// sends no request is closed after the handshake timeout, like a gRPC one
// that sends no preface.
func TestStalledDashboardConnectionsAreClosed(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) { c.Limits.HandshakeTimeout = 500 * time.Millisecond })
	c, err := handshake(t, b, b.Addr, "h2", "http/1.1")
	require.NoError(t, err)
	start := time.Now()
	assert.True(t, closedByServer(c))
	assert.Less(t, time.Since(start), 3*time.Second)
}

// The release channel is post-quantum: a client without the hybrid key
// exchange cannot reach the gRPC API at all.
func TestGRPCNeedsHybridKeyExchange(t *testing.T) {
	b := brokertest.Start(t)
	pool := b.CA
	for _, curves := range [][]tls.CurveID{{tls.X25519}, {tls.CurveP256}} {
		c, err := tls.Dial("tcp", b.Addr, &tls.Config{RootCAs: pool, NextProtos: []string{"h2"}, CurvePreferences: curves, MinVersion: tls.VersionTLS13})
		if err == nil {
			c.Close()
		}
		require.Error(t, err, "key exchange %v", curves)
	}
	c, err := tls.Dial("tcp", b.Addr, &tls.Config{RootCAs: pool, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13})
	require.NoError(t, err)
	assert.Equal(t, tls.X25519MLKEM768, c.ConnectionState().CurveID)
	c.Close()
}
