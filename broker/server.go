// Package broker is the key broker: it enrolls nodes, appraises their TPM
// evidence, and releases layer keys only to nodes whose evidence satisfies
// the key's policy, sealed so that only the requesting session can read them.
package broker

import (
	"context"
	"crypto/hpke"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/policy"
	"github.com/attested-dev/attested/broker/store"
)

// Version is reported by Info.
const Version = "0.1.0"

// MaxMessageSize bounds every request; evidence with event logs is the
// largest legitimate message.
const MaxMessageSize = 16 << 20

// HandlerTimeout bounds every RPC, whatever deadline the caller sent.
const HandlerTimeout = 30 * time.Second

// Server implements the Broker and Admin services.
type Server struct {
	apiv1.UnimplementedBrokerServer
	cfg    *Config
	store  store.Store
	master *masterKey
	log    *slog.Logger
	now    func() time.Time

	adminHash []byte
	ekRoots   *EKRoots

	mu       sync.Mutex
	keys     map[string]hpke.PrivateKey // "name/version" -> parsed private key
	policies map[string]cachedPolicy    // name -> parsed at revision
}

type cachedPolicy struct {
	revision uint32
	p        *policy.Policy
}

// Options configures a Server.
type Options struct {
	Config    *Config
	Store     store.Store
	MasterKey string // path to the master key file
	Logger    *slog.Logger
	Now       func() time.Time
}

// New returns a broker server.
func New(o Options) (*Server, error) {
	mk, err := loadMasterKey(o.MasterKey)
	if err != nil {
		return nil, err
	}
	adminHash, err := hex.DecodeString(o.Config.AdminTokenSHA256)
	if err != nil || len(adminHash) != sha256.Size {
		return nil, fmt.Errorf("broker: adminTokenSHA256 is not a hex SHA-256")
	}
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	now := o.Now
	if now == nil {
		now = time.Now
	}
	roots, err := LoadEKRoots(o.Config.EKRoots)
	if err != nil {
		return nil, err
	}
	if o.Config.RequireEKCertificate && !roots.Configured() {
		return nil, fmt.Errorf("broker: requireEKCertificate is set but ekRoots names no root certificate")
	}
	return &Server{cfg: o.Config, store: o.Store, master: mk, log: log, now: now,
		adminHash: adminHash, ekRoots: roots, keys: map[string]hpke.PrivateKey{}, policies: map[string]cachedPolicy{}}, nil
}

// Open opens the broker in dataDir with its embedded store; override, if
// given, adjusts broker.yaml's settings (command-line flags).
func Open(dataDir string, log *slog.Logger, override ...func(*Config)) (*Server, error) {
	cfg, err := LoadConfig(dataDir)
	if err != nil {
		return nil, err
	}
	for _, o := range override {
		o(cfg)
	}
	st, err := store.OpenBolt(filepath.Join(dataDir, DatabaseFile))
	if err != nil {
		return nil, err
	}
	s, err := New(Options{Config: cfg, Store: st, MasterKey: filepath.Join(dataDir, MasterKeyFile), Logger: log})
	if err != nil {
		st.Close()
		return nil, err
	}
	return s, nil
}

// Close releases the store.
func (s *Server) Close() error { return s.store.Close() }

// Config returns the broker configuration.
func (s *Server) Config() *Config { return s.cfg }

// GRPCServer returns a gRPC server with both services registered, serving
// TLS with the given certificate (nil for tests that bring their own).
func (s *Server) GRPCServer(cert *tls.Certificate) *grpc.Server {
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageSize),
		grpc.ConnectionTimeout(10 * time.Second),
		grpc.ChainUnaryInterceptor(s.deadline, s.authorize),
	}
	if cert != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(&tls.Config{
			Certificates: []tls.Certificate{*cert},
			MinVersion:   tls.VersionTLS13,
		})))
	}
	g := grpc.NewServer(opts...)
	apiv1.RegisterBrokerServer(g, s)
	apiv1.RegisterAdminServer(g, adminServer{s: s})
	return g
}

// LoadServerCertificate loads the TLS certificate from a data directory.
func LoadServerCertificate(dataDir string) (*tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(filepath.Join(dataDir, ServerCertFile), filepath.Join(dataDir, ServerKeyFile))
	if err != nil {
		return nil, fmt.Errorf("broker: TLS certificate: %w", err)
	}
	return &c, nil
}

// Run expires stale nonces and sessions until ctx ends.
func (s *Server) Run(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			now := s.now()
			if err := s.store.Expire(ctx, now, now.Add(-s.pendingTTL())); err != nil && ctx.Err() == nil {
				s.log.Warn("expiring stale records failed", "err", err)
			}
		}
	}
}

func (s *Server) deadline(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	ctx, cancel := context.WithTimeout(ctx, HandlerTimeout)
	defer cancel()
	return h(ctx, req)
}

const adminPrefix = "/attested.broker.v1.Admin/"

// authorize admits Admin calls only with the admin credential. Node and
// pipeline calls prove themselves by evidence, not by credential.
func (s *Server) authorize(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if !strings.HasPrefix(info.FullMethod, adminPrefix) {
		return h(ctx, req)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	var token string
	if v := md.Get("authorization"); len(v) == 1 {
		token, _ = strings.CutPrefix(v[0], "Bearer ")
	}
	sum := sha256.Sum256([]byte(token))
	if token == "" || subtle.ConstantTimeCompare(sum[:], s.adminHash) != 1 {
		return nil, status.Error(codes.Unauthenticated, "admin operations need the admin credential (--admin-token-file); none or a wrong one was given")
	}
	return h(ctx, req)
}

// audit records an event. A failure to audit is logged loudly; the
// decision itself was already made fail-closed.
func (s *Server) audit(ctx context.Context, ev store.AuditEvent) {
	ev.Time = s.now()
	if err := s.store.AppendAudit(context.WithoutCancel(ctx), ev); err != nil {
		s.log.Error("audit append failed", "kind", ev.Kind, "node", ev.Node, "err", err)
	}
	s.log.Info("audit", "kind", ev.Kind, "node", ev.Node, "key", ev.Key, "allowed", ev.Allowed, "reason", ev.Reason)
}

// Info implements apiv1.BrokerServer.
func (s *Server) Info(context.Context, *apiv1.InfoRequest) (*apiv1.InfoResponse, error) {
	return &apiv1.InfoResponse{BrokerId: s.cfg.ID, Version: Version}, nil
}

func storeErr(what string, err error) error {
	if err == store.ErrNotFound {
		return status.Errorf(codes.NotFound, "%s not found", what)
	}
	return status.Errorf(codes.Internal, "broker store: %s: %v", what, err)
}

func hashToken(t []byte) []byte {
	sum := sha256.Sum256(t)
	return sum[:]
}
