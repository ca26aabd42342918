//go:build e2e

package e2e

import (
	"context"
	"crypto/tls"
	"net"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// TestBrokerHangsMidCall extends TestBrokerDown past the TCP accept: a
// broker that completes the TLS handshake and then says nothing, and one
// that speaks gRPC but never answers a call (a wedged store, a stuck
// handler). Either way the pull fails at the node's configured deadline
// with a message naming the broker, in both modes; in gRPC mode the agent
// is warm, so the call that hangs is the release itself.
func TestBrokerHangsMidCall(t *testing.T) {
	const timeout = 4 * time.Second
	for _, c := range []struct {
		name  string
		serve func(t *testing.T, addr string, cert tls.Certificate)
	}{
		{"TLS then silence", silentTLS},
		{"gRPC never answers", silentGRPC},
	} {
		t.Run(c.name, func(t *testing.T) {
			eachMode(t, func(t *testing.T, m mode) {
				w := newWorld(t, worldOptions{})
				n := w.node1
				n.cfg = n.writeConfig("node-short-timeout.yaml", timeout)
				if m == grpcMode {
					w.mustPull(n, m) // the agent's session is warm
				}
				cert, err := tls.LoadX509KeyPair(filepath.Join(w.brokerDir, broker.ServerCertFile), filepath.Join(w.brokerDir, broker.ServerKeyFile))
				require.NoError(t, err)
				w.broker.stop()
				c.serve(t, w.brokerAddr, cert)

				msg, r := w.refusedPull(n, m)
				assert.Regexp(t, `broker `+regexp.QuoteMeta(w.brokerAddr)+` did not answer in time`, msg)
				// The configured timeout, not something else, ends the wait.
				assert.GreaterOrEqual(t, r.dur, timeout-500*time.Millisecond)
				assert.Less(t, r.dur, timeout+10*time.Second)
				t.Logf("timeout %s: failed after %s", timeout, r.dur)
			})
		})
	}
}

// listenAgain listens on addr, which a broker just left.
func listenAgain(t *testing.T, addr string) net.Listener {
	var l net.Listener
	var err error
	for range 50 {
		if l, err = net.Listen("tcp", addr); err == nil {
			return l
		}
		time.Sleep(100 * time.Millisecond)
	}
	require.NoError(t, err)
	return nil
}

// silentTLS completes TLS handshakes on addr with the broker's own
// certificate (so the node's pinned CA accepts it), offers HTTP/2, and
// then sends nothing.
func silentTLS(t *testing.T, addr string, cert tls.Certificate) {
	l := tls.NewListener(listenAgain(t, addr), &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}})
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			go c.(*tls.Conn).Handshake()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
}

// silentGRPC serves the broker API on addr over TLS with the broker's
// certificate; every call waits until the caller gives up.
func silentGRPC(t *testing.T, addr string, cert tls.Certificate) {
	l := listenAgain(t, addr)
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})))
	apiv1.RegisterBrokerServer(srv, hangingBroker{})
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
}

type hangingBroker struct {
	apiv1.UnimplementedBrokerServer
}

func (hangingBroker) Info(ctx context.Context, _ *apiv1.InfoRequest) (*apiv1.InfoResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (hangingBroker) Challenge(ctx context.Context, _ *apiv1.ChallengeRequest) (*apiv1.ChallengeResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (hangingBroker) Attest(ctx context.Context, _ *apiv1.AttestRequest) (*apiv1.AttestResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (hangingBroker) Unwrap(ctx context.Context, _ *apiv1.UnwrapRequest) (*apiv1.UnwrapResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}
