package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/attested-dev/attested/broker/conn"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// The broker's one TLS port serves two protocols: the gRPC API and the
// admin dashboard. They are told apart by the application protocol the
// client offers in its TLS handshake (ALPN), once the handshake is done:
//
//   - gRPC clients offer only "h2"; those connections go to the gRPC
//     server, whose own HTTP/2 transport carries all of admission control
//     (the tap handle that authenticates Admin calls before their body is
//     read, per-method size limits read from the length prefix, the byte
//     budget, keepalive enforcement; see admission.go). gRPC is never
//     served through net/http (grpc.Server.ServeHTTP), which would bypass
//     all of it.
//   - Browsers offer "h2" and "http/1.1"; the broker picks "http/1.1" for
//     them and hands the connection to an HTTP/1.1 server running the
//     dashboard.
//   - A client that offers no ALPN is closed: gRPC-Go refuses such clients
//     too, and every browser offers ALPN.
//
// Both kinds of connection are accepted under the same connection caps
// (LimitListener) and must finish the TLS handshake within
// limits.handshakeTimeout; a gRPC connection then has as long again for
// its HTTP/2 preface, as before.

// Frontend serves the broker's TLS port.
type Frontend struct {
	s    *Server
	tls  *tls.Config
	grpc *grpc.Server
	web  *http.Server // nil: no dashboard
	// grpcConns and webConns are the listeners the two servers accept
	// handshaken connections from.
	grpcConns, webConns *connQueue

	mu     sync.Mutex
	lis    net.Listener
	closed bool
}

// ALPN protocol names.
const (
	protoH2     = "h2"
	protoHTTP11 = "http/1.1"
)

// Frontend returns the broker's TLS front: the gRPC API and, when
// dashboard is not nil, the dashboard (see above). Serve it on a listener.
func (s *Server) Frontend(cert *tls.Certificate, dashboard http.Handler) *Frontend {
	f := &Frontend{s: s, grpcConns: newConnQueue(), webConns: newConnQueue()}
	base := &tls.Config{
		Certificates:     []tls.Certificate{*cert},
		MinVersion:       tls.VersionTLS13,
		NextProtos:       []string{protoH2},
		CurvePreferences: conn.KeyExchange,
	}
	if dashboard != nil {
		web := base.Clone()
		web.NextProtos = []string{protoHTTP11}
		// Browsers get Go's default key exchanges (hybrid first): the
		// dashboard carries no layer key.
		web.CurvePreferences = nil
		base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			if slices.Contains(hello.SupportedProtos, protoHTTP11) {
				return web, nil
			}
			return nil, nil
		}
		l := s.limits
		f.web = &http.Server{
			Handler:           dashboard,
			ReadHeaderTimeout: l.HandshakeTimeout,
			ReadTimeout:       l.RequestTimeout,
			WriteTimeout:      l.RequestTimeout,
			IdleTimeout:       l.IdleTimeout,
			MaxHeaderBytes:    MaxHeaderListSize,
			// Never HTTP/2 here: only http/1.1 is negotiated for the
			// dashboard, and an empty map keeps net/http from offering it.
			TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
			ErrorLog:     slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		}
	}
	f.tls = base
	f.grpc = s.grpcServer(handshakenTLS{})
	return f
}

// GRPC returns the gRPC server, for tests that inspect it.
func (f *Frontend) GRPC() *grpc.Server { return f.grpc }

// Serve accepts connections on lis (under the connection caps) until lis
// is closed or Stop is called, and returns nil then.
func (f *Frontend) Serve(lis net.Listener) error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		lis.Close()
		return nil
	}
	f.lis = lis
	f.mu.Unlock()
	l := f.s.LimitListener(lis)
	go func() { _ = f.grpc.Serve(f.grpcConns) }()
	if f.web != nil {
		go func() { _ = f.web.Serve(f.webConns) }()
	}
	defer func() {
		f.grpcConns.Close()
		f.webConns.Close()
	}()
	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			var ne interface{ Temporary() bool }
			if errors.As(err, &ne) && ne.Temporary() {
				// Out of file descriptors and the like: wait, as net/http
				// and gRPC do, rather than spin.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				f.s.log.Warn("accepting a connection failed; retrying", "err", err, "in", backoff)
				time.Sleep(backoff)
				continue
			}
			f.mu.Lock()
			closed := f.closed
			f.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("broker: accept: %w", err)
		}
		backoff = 0
		go f.handshake(c)
	}
}

// handshake completes the TLS handshake of c within the handshake timeout
// and hands the connection to the server of the protocol negotiated.
func (f *Frontend) handshake(c net.Conn) {
	if err := c.SetDeadline(time.Now().Add(f.s.limits.HandshakeTimeout)); err != nil {
		c.Close()
		return
	}
	tc := tls.Server(c, f.tls)
	if err := tc.Handshake(); err != nil {
		tc.Close()
		return
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		tc.Close()
		return
	}
	switch p := tc.ConnectionState().NegotiatedProtocol; {
	case p == protoH2:
		f.grpcConns.put(tc)
	case p == protoHTTP11 && f.web != nil:
		f.webConns.put(tc)
	default:
		tc.Close()
	}
}

// Shutdown stops accepting connections, lets gRPC calls and dashboard
// requests in flight finish until ctx ends, then closes what is left.
func (f *Frontend) Shutdown(ctx context.Context) {
	f.close()
	done := make(chan struct{})
	go func() {
		f.grpc.GracefulStop()
		close(done)
	}()
	if f.web != nil {
		_ = f.web.Shutdown(ctx)
	}
	select {
	case <-done:
	case <-ctx.Done():
		f.Stop()
	}
}

// Stop closes the listener and every connection at once.
func (f *Frontend) Stop() {
	f.close()
	f.grpc.Stop()
	if f.web != nil {
		_ = f.web.Close()
	}
}

func (f *Frontend) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	if f.lis != nil {
		f.lis.Close()
	}
	f.grpcConns.Close()
	f.webConns.Close()
}

// connQueue is a net.Listener whose connections the front has already
// accepted and handshaken.
type connQueue struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newConnQueue() *connQueue {
	return &connQueue{conns: make(chan net.Conn), done: make(chan struct{})}
}

// put hands c to the server accepting from q, or closes it if q is closed.
func (q *connQueue) put(c net.Conn) {
	select {
	case q.conns <- c:
	case <-q.done:
		c.Close()
	}
}

func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.conns:
		return c, nil
	case <-q.done:
		return nil, net.ErrClosed
	}
}

func (q *connQueue) Close() error {
	q.once.Do(func() { close(q.done) })
	return nil
}

// Addr is never used by the servers for anything but logging.
func (q *connQueue) Addr() net.Addr { return queueAddr{} }

type queueAddr struct{}

func (queueAddr) Network() string { return "tls" }
func (queueAddr) String() string  { return "broker front" }

// handshakenTLS is gRPC transport credentials for connections whose TLS
// handshake the front completed: it checks the connection is TLS with h2
// negotiated and reports its state, as credentials.NewTLS would have, so
// peer information and the security level stay what they were.
type handshakenTLS struct{}

func (handshakenTLS) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return nil, nil, fmt.Errorf("broker: a %T reached gRPC without TLS; refusing it", c)
	}
	cs := tc.ConnectionState()
	if !cs.HandshakeComplete || cs.NegotiatedProtocol != protoH2 {
		return nil, nil, fmt.Errorf("broker: a connection reached gRPC without a completed TLS handshake negotiating h2; refusing it")
	}
	return tc, credentials.TLSInfo{State: cs, CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (handshakenTLS) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("broker: server-side credentials cannot dial")
}

func (handshakenTLS) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

func (handshakenTLS) Clone() credentials.TransportCredentials { return handshakenTLS{} }

func (handshakenTLS) OverrideServerName(string) error { return nil }
