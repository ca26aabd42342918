// Package broker is the key broker: it enrolls nodes, appraises their TPM
// evidence, and releases layer keys only to nodes whose evidence satisfies
// the key's policy, sealed so that only the requesting session can read them.
package broker

import (
	"context"
	"crypto/hpke"
	"crypto/sha256"
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
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/broker/keysig"
	"github.com/attested-dev/attested/broker/policy"
	"github.com/attested-dev/attested/broker/store"
	"github.com/hashicorp/golang-lru/v2/expirable"
)

// Version is reported by Info.
const Version = apiv1.Version

// HandlerTimeout bounds every RPC, whatever deadline the caller sent: the
// default of limits.requestTimeout.
const HandlerTimeout = 30 * time.Second

// Upper bounds of the configurable lifetimes: evidence older than this is
// not fresh, whatever a configuration says.
const (
	MaxSessionTTL = 24 * time.Hour
	MaxNonceTTL   = 10 * time.Minute
)

func checkLifetimes(c *Config) error {
	if c.SessionTTL <= 0 || c.SessionTTL > MaxSessionTTL {
		return fmt.Errorf("broker: sessionTTL %s is out of range: an appraisal may serve unwraps for at most %s", c.SessionTTL, MaxSessionTTL)
	}
	if c.NonceTTL <= 0 || c.NonceTTL > MaxNonceTTL {
		return fmt.Errorf("broker: nonceTTL %s is out of range: a node answers a challenge within at most %s", c.NonceTTL, MaxNonceTTL)
	}
	return nil
}

// Server keepalive: gRPC's defaults, stated because the connection
// listener sets TCP_USER_TIMEOUT itself (gRPC can only on a bare TCP
// connection).
const (
	keepaliveTime    = 2 * time.Hour
	keepaliveTimeout = 20 * time.Second
)

// Server implements the Broker and Admin services.
type Server struct {
	apiv1.UnimplementedBrokerServer
	cfg    *Config
	store  store.Store
	master *masterKey
	log    *slog.Logger
	// now is the broker's clock (see clock.go).
	now func() time.Time

	adminHash []byte
	ekRoots   *EKRoots
	signer    *keysig.Signer // nil on a broker initialised before signed wrapping keys
	ear       *earIssuer     // nil on a broker initialised before attestation results

	limits  Limits                // resolved: no zero fields
	methods map[string]methodSpec // by full gRPC method name
	guard   *guard
	metrics *metrics
	sampler *auditSampler
	hooks   *hooks // webhooks and their delivery (webhook.go)

	mu   sync.Mutex
	keys map[string]hpke.PrivateKey // "name/version" -> parsed private key
	// layerKeys keeps layer keys opened recently (see openLayerKey).
	layerKeys *expirable.LRU[[sha256.Size]byte, []byte]
	policies  map[string]cachedPolicy // name -> parsed at revision
	claims    map[string]claimsRecord // session token hash -> decoded claims
	ops       *opsMetrics
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
	if err := checkLifetimes(o.Config); err != nil {
		return nil, err
	}
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
	wall := o.Now
	if wall == nil {
		wall = time.Now
	}
	now := newClock(wall, log).now
	roots, err := LoadEKRoots(o.Config.EKRoots)
	if err != nil {
		return nil, err
	}
	if o.Config.RequireEKCertificate && !roots.Configured() {
		return nil, fmt.Errorf("broker: requireEKCertificate is set but ekRoots names no root certificate")
	}
	limits, err := o.Config.Limits.resolved()
	if err != nil {
		return nil, fmt.Errorf("broker: %s: %w", ConfigFile, err)
	}
	g := newGuard(limits)
	s := &Server{cfg: o.Config, store: o.Store, master: mk, log: log, now: now,
		adminHash: adminHash, ekRoots: roots, keys: map[string]hpke.PrivateKey{}, layerKeys: newLayerKeys(), policies: map[string]cachedPolicy{}, claims: map[string]claimsRecord{},
		limits: limits, methods: limits.methods(), guard: g, metrics: newMetrics(g), sampler: newAuditSampler(limits.AuditSampleInterval)}
	s.registerOpsMetrics()
	if err := s.store.StartAuditChain(context.Background(), mk.audit, now()); err != nil {
		return nil, fmt.Errorf("broker: audit chain: %w", err)
	}
	if err := s.initWebhooks(); err != nil {
		return nil, err
	}
	return s, nil
}

// Open opens the broker in dataDir with the store broker.yaml names (the
// embedded one by default); override, if given, adjusts broker.yaml's
// settings (command-line flags).
func Open(dataDir string, log *slog.Logger, override ...func(*Config)) (*Server, error) {
	if err := CheckDataDir(dataDir); err != nil {
		return nil, err
	}
	cfg, err := LoadConfig(dataDir)
	if err != nil {
		return nil, err
	}
	for _, o := range override {
		o(cfg)
	}
	if err := checkEKPolicy(cfg); err != nil {
		return nil, err
	}
	st, err := openStore(dataDir, cfg, log)
	if err != nil {
		return nil, err
	}
	s, err := New(Options{Config: cfg, Store: st, MasterKey: filepath.Join(dataDir, MasterKeyFile), Logger: log})
	if err == nil {
		err = s.startup(dataDir)
	}
	if err != nil {
		st.Close()
		return nil, err
	}
	return s, nil
}

// Close writes the sampled audit records still pending and releases the
// store.
func (s *Server) Close() error {
	s.stopWebhooks()
	s.flushSampledAudit(context.Background(), true)
	return s.store.Close()
}

// Config returns the broker configuration.
func (s *Server) Config() *Config { return s.cfg }

// GRPCServer returns a gRPC server with both services registered, serving
// TLS with the given certificate (nil for tests that bring their own).
// Serve it on LimitListener(listener) for the connection caps; everything
// else (see admission.go) is in the server itself. 'broker serve' uses
// Frontend instead, which also serves the dashboard on the same port.
func (s *Server) GRPCServer(cert *tls.Certificate) *grpc.Server {
	var creds credentials.TransportCredentials
	if cert != nil {
		creds = credentials.NewTLS(&tls.Config{
			Certificates:     []tls.Certificate{*cert},
			MinVersion:       tls.VersionTLS13,
			CurvePreferences: conn.KeyExchange,
		})
	}
	return s.grpcServer(creds)
}

// grpcServer returns the gRPC server with the given transport credentials
// (none: the tests' own).
func (s *Server) grpcServer(creds credentials.TransportCredentials) *grpc.Server {
	l := s.limits
	opts := []grpc.ServerOption{
		// The per-method limits apply before this server-wide one (see
		// receive); it stays as a backstop.
		grpc.MaxRecvMsgSize(maxMessageSize(s.methods)),
		grpc.InTapHandle(s.tap),
		grpc.ConnectionTimeout(l.HandshakeTimeout),
		grpc.MaxConcurrentStreams(uint32(l.MaxStreamsPerConnection)),
		grpc.MaxHeaderListSize(MaxHeaderListSize),
		grpc.StaticStreamWindowSize(streamWindow),
		grpc.StaticConnWindowSize(connWindow),
		// Without gRPC's 32 KiB read buffer the framer reads from the TLS
		// connection's own record buffer: an idle connection costs ~33 KiB
		// instead of ~49 KiB, and throughput is the same.
		grpc.ReadBufferSize(0),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle:     l.IdleTimeout,
			MaxConnectionAge:      l.MaxConnectionAge,
			MaxConnectionAgeGrace: l.RequestTimeout,
			Time:                  keepaliveTime,
			Timeout:               keepaliveTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: l.KeepaliveMinInterval}),
		grpc.ChainUnaryInterceptor(s.deadline, s.authorize),
	}
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	s.log.Info("limits on callers", "maxConnections", l.MaxConnections, "maxConnectionsPerSource", l.MaxConnectionsPerSource,
		"idleTimeout", l.IdleTimeout, "handshakeTimeout", l.HandshakeTimeout, "requestTimeout", l.RequestTimeout,
		"maxRequests", l.MaxRequests, "maxRequestsPerSource", l.MaxRequestsPerSource,
		"maxRequestBytes", l.MaxRequestBytes.String(), "maxRequestBytesPerSource", l.MaxRequestBytesPerSource.String(),
		"maxAttestSize", ByteSize(s.methods[brokerPrefix+"Attest"].maxSize).String())
	g := grpc.NewServer(opts...)
	g.RegisterService(s.boundedService(&apiv1.Broker_ServiceDesc), s)
	g.RegisterService(s.boundedService(&apiv1.Admin_ServiceDesc), adminServer{s: s})
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

// Run expires stale nonces and sessions, writes the sampled audit
// records of refusals, and delivers webhook events, until ctx ends.
func (s *Server) Run(ctx context.Context) {
	s.startWebhooks(ctx)
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	sample := time.NewTicker(s.limits.AuditSampleInterval)
	defer sample.Stop()
	// Nodes go stale by the clock alone; check often enough that a stale
	// node is announced within a small part of the window.
	check := time.NewTicker(max(s.staleAfter()/12, time.Second))
	defer check.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sample.C:
			s.flushSampledAudit(ctx, false)
		case <-check.C:
			if err := s.CheckStatus(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("checking node status failed", "err", err)
			}
		case <-t.C:
			now := s.now()
			if err := s.store.Expire(ctx, now, now.Add(-s.pendingTTL())); err != nil && ctx.Err() == nil {
				s.log.Warn("expiring stale records failed", "err", err)
			}
		}
	}
}

func (s *Server) deadline(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	ctx, cancel := context.WithTimeout(ctx, s.limits.RequestTimeout)
	defer cancel()
	return h(ctx, req)
}

const (
	adminPrefix  = "/attested.broker.v1.Admin/"
	brokerPrefix = "/attested.broker.v1.Broker/"
)

// authorize admits Admin calls only with the admin credential. Node and
// pipeline calls prove themselves by evidence, not by credential. The tap
// handle already refused Admin calls without it before reading their body;
// this second check guards any path that bypasses the tap.
func (s *Server) authorize(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if !strings.HasPrefix(info.FullMethod, adminPrefix) {
		return h(ctx, req)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if !s.adminCredential(md) {
		return nil, status.Error(codes.Unauthenticated, "admin operations need the admin credential (--admin-token-file); none or a wrong one was given")
	}
	return h(ctx, req)
}

// audit records an event. A failure to audit is logged loudly; the
// decision itself was already made fail-closed.
func (s *Server) audit(ctx context.Context, ev store.AuditEvent) error {
	ev.Time = s.now()
	ev.Actor = actorOf(ctx, ev.Actor)
	err := s.store.AppendAudit(context.WithoutCancel(ctx), ev)
	if err != nil {
		s.log.Error("audit append failed", "kind", ev.Kind, "node", ev.Node, "err", err)
	}
	s.log.Info("audit", "kind", ev.Kind, "node", ev.Node, "key", ev.Key, "allowed", ev.Allowed, "reason", ev.Reason)
	return err
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
