// Package brokertest runs a real broker on loopback for tests: its own data
// directory, TLS, the embedded store, and clients dialled the way the CLI
// dials them.
package brokertest

import (
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/broker/dashboard"
)

// Broker is a running broker and clients for it.
type Broker struct {
	Server  *broker.Server
	DataDir string
	Addr    string
	// CA is the broker CA, as clients pin it.
	CA *x509.CertPool
	// Node is an unauthenticated client (nodes and pipelines).
	Node apiv1.BrokerClient
	// Admin carries the admin credential.
	Admin apiv1.AdminClient
	// NoCred is an Admin client without credential.
	NoCred apiv1.AdminClient
	// Dashboard is the dashboard served on Addr to browsers (ALPN
	// http/1.1), as 'broker serve' serves it.
	Dashboard *dashboard.Dashboard

	stop func()
}

// Stop stops the broker as a shutdown does (pending sampled audit records
// written, the store closed), so a test can change its data directory and
// Serve it again; the test's cleanup stops it otherwise.
func (b *Broker) Stop() { b.stop() }

// Start runs a broker until the test ends; configure adjusts broker.yaml
// before the broker opens.
func Start(t testing.TB, configure ...func(*broker.Config)) *Broker {
	t.Helper()
	dir := t.TempDir()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	// Tests enroll simulator TPMs, which have no EK certificate; tests that
	// require one configure it.
	cfg, err := broker.Init(broker.InitOptions{DataDir: dir, CADir: t.TempDir(), ID: "broker-test",
		Listen: lis.Addr().String(), AdmitUncertifiedTPMs: true})
	require.NoError(t, err)
	if len(configure) > 0 {
		for _, f := range configure {
			f(cfg)
		}
		data, err := yaml.Marshal(cfg)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, broker.ConfigFile), data, 0o600))
	}
	return serve(t, dir, lis, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

// Serve runs the broker of an existing data directory on loopback until
// the test ends, logging to log.
func Serve(t testing.TB, dataDir string, log *slog.Logger) *Broker {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	return serve(t, dataDir, lis, log)
}

func serve(t testing.TB, dir string, lis net.Listener, log *slog.Logger) *Broker {
	t.Helper()
	srv, err := broker.Open(dir, log)
	if err != nil {
		lis.Close()
	}
	require.NoError(t, err)
	cert, err := broker.LoadServerCertificate(dir)
	require.NoError(t, err)
	dash, err := dashboard.New(dashboard.Options{Broker: srv, BrokerID: srv.Config().ID, Log: log, Metrics: srv.Metrics()})
	require.NoError(t, err)
	front := srv.Frontend(cert, dash)
	go front.Serve(lis)
	ca, err := conn.CAPool(filepath.Join(dir, broker.CACertFile))
	require.NoError(t, err)
	b := &Broker{Server: srv, DataDir: dir, Addr: lis.Addr().String(), CA: ca, Dashboard: dash,
		stop: sync.OnceFunc(func() { front.Stop(); srv.Close() })}
	t.Cleanup(b.Stop)

	dial := func(admin bool) *grpc.ClientConn {
		o := conn.Options{Addr: b.Addr, CAFile: filepath.Join(dir, broker.CACertFile)}
		if admin {
			o.AdminTokenFile = filepath.Join(dir, broker.AdminTokenFile)
		}
		cc, err := conn.Dial(o)
		require.NoError(t, err)
		t.Cleanup(func() { cc.Close() })
		return cc
	}
	plain := dial(false)
	b.Node = apiv1.NewBrokerClient(plain)
	b.NoCred = apiv1.NewAdminClient(plain)
	b.Admin = apiv1.NewAdminClient(dial(true))
	return b
}
