package broker

import (
	"container/list"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
	"google.golang.org/protobuf/proto"
)

// Admission: what a caller must get past before the broker reads its
// request, and what bounds the memory callers without a credential can make
// it hold.
//
//  1. At accept (LimitListener): total and per-source connection caps and
//     the per-source connection rate, checked before the TLS handshake,
//     which gRPC bounds by limits.handshakeTimeout. gRPC closes connections
//     idle for limits.idleTimeout and disconnects clients that ping more
//     often than limits.keepaliveMinInterval.
//  2. In gRPC's tap handle, on the connection's reader when a request's
//     headers arrive and before its stream exists: the method must exist,
//     an Admin call must carry the admin credential, and any other call must
//     fit its source's request rate and the caps on requests in flight. A
//     refused request is answered at once; gRPC discards its body frames as
//     they arrive and never buffers them. An admitted request gets a
//     deadline (limits.requestTimeout) that covers receiving its body.
//  3. Before the body is read (boundedService): the request's length prefix
//     is checked against its method's limit, and twice its length (received
//     bytes and decoded message) is taken from the in-flight byte budget, in
//     total and per source, held until the handler returns.
//
// gRPC-Go has one server-wide maximum message size and reads a request in
// full before any application code sees it, so step 3 reads the request
// itself: the method handler's decode function takes the 5-byte length
// prefix from the transport stream (ReadMessageHeader) and, only once the
// size is admitted, the body (Read). gRPC opens the stream's flow-control
// window to the declared length only when Read asks for it; until then a
// caller can send at most streamWindow bytes, so a refused body is never
// received. See TestOversizedBodiesAreRefusedBeforeTheyAreRead.

// admissionWait bounds how long an admitted request waits for room in the
// byte budget before it is refused as busy.
const admissionWait = 5 * time.Second

// requestOverhead is what the budget counts for a request besides its
// bytes (stream, goroutine, buffers).
const requestOverhead = 4 << 10

// guard holds the connection, request and byte counts, per source and in
// total, and the per-source rate limiters.
type guard struct {
	lim   Limits
	bytes *semaphore.Weighted

	mu       sync.Mutex
	sources  map[netip.Prefix]*source
	idle     list.List // sources holding nothing, most recently used first
	conns    int
	requests int
	held     int64
}

// source is one caller address (or IPv6 prefix).
type source struct {
	key      netip.Prefix
	conns    int
	requests int
	bytes    int64
	limiters map[string]*rate.Limiter
	idleElem *list.Element
}

func newGuard(l Limits) *guard {
	return &guard{lim: l, bytes: semaphore.NewWeighted(int64(l.MaxRequestBytes)), sources: map[netip.Prefix]*source{}}
}

type guardStats struct {
	conns, requests, sources int
	bytes                    int64
}

func (g *guard) stats() guardStats {
	g.mu.Lock()
	defer g.mu.Unlock()
	return guardStats{conns: g.conns, requests: g.requests, sources: len(g.sources), bytes: g.held}
}

// sourceOf names the source of an address: the address itself for IPv4,
// its /64 for IPv6 (by default). Callers that are not IP (tests over
// pipes) share the zero prefix.
func (g *guard) sourceOf(addr net.Addr) netip.Prefix {
	var ip netip.Addr
	switch a := addr.(type) {
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	case nil:
	default:
		if ap, err := netip.ParseAddrPort(a.String()); err == nil {
			ip = ap.Addr()
		}
	}
	ip = ip.Unmap()
	if !ip.IsValid() {
		return netip.Prefix{}
	}
	bits := g.lim.SourcePrefixIPv4
	if ip.Is6() {
		bits = g.lim.SourcePrefixIPv6
	}
	p, _ := ip.Prefix(bits)
	return p
}

// sourceLabel is how messages and the audit name a source.
func (g *guard) sourceLabel(p netip.Prefix) string {
	switch {
	case !p.IsValid():
		return "a non-IP peer"
	case p.Bits() == p.Addr().BitLen():
		return p.Addr().String()
	default:
		return p.String()
	}
}

// get returns the source's entry, creating it; the caller holds mu and
// calls settle when done. A full table drops its least recently idle
// entry: a source that holds nothing loses only rate state, which can make
// it only freer, never lock it out.
func (g *guard) get(key netip.Prefix) *source {
	if s, ok := g.sources[key]; ok {
		return s
	}
	if len(g.sources) >= g.lim.MaxSources {
		if e := g.idle.Back(); e != nil {
			old := e.Value.(*source)
			g.idle.Remove(e)
			delete(g.sources, old.key)
		}
	}
	s := &source{key: key}
	g.sources[key] = s
	return s
}

// settle files the source as idle or active after a change.
func (g *guard) settle(s *source) {
	idle := s.conns == 0 && s.requests == 0 && s.bytes == 0
	switch {
	case idle && s.idleElem == nil:
		s.idleElem = g.idle.PushFront(s)
	case idle:
		g.idle.MoveToFront(s.idleElem)
	case s.idleElem != nil:
		g.idle.Remove(s.idleElem)
		s.idleElem = nil
	}
}

// openConn admits a connection or says why not.
func (g *guard) openConn(key netip.Prefix) (reason, msg string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.conns >= g.lim.MaxConnections {
		return ReasonConnectionLimit, fmt.Sprintf("%d connections open, the most this broker accepts (limits.maxConnections)", g.conns)
	}
	s := g.get(key)
	defer g.settle(s)
	if s.conns >= g.lim.MaxConnectionsPerSource {
		return ReasonSourceConnectionLimit, fmt.Sprintf("%d connections open from %s, the most one source may hold (limits.maxConnectionsPerSource)", s.conns, g.sourceLabel(key))
	}
	if !g.limiter(s, rateConnect).Allow() {
		return ReasonConnectionRate, fmt.Sprintf("%s opens connections faster than %s (limits.rates.connect)", g.sourceLabel(key), g.lim.Rates[rateConnect])
	}
	s.conns++
	g.conns++
	return "", ""
}

func (g *guard) closeConn(key netip.Prefix) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if s, ok := g.sources[key]; ok && s.conns > 0 {
		s.conns--
		g.conns--
		g.settle(s)
	}
}

// admit takes a request slot and a rate token for a call of method m, or
// says why not.
func (g *guard) admit(key netip.Prefix, m methodSpec) (reason, msg string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.get(key)
	defer g.settle(s)
	switch {
	case g.requests >= g.lim.MaxRequests:
		return ReasonTooManyRequests, fmt.Sprintf("broker is busy: %d requests in flight, the most it takes from callers without credentials (limits.maxRequests); retry shortly", g.requests)
	case s.requests >= g.lim.MaxRequestsPerSource:
		return ReasonTooManyRequests, fmt.Sprintf("%d requests in flight from %s, the most one source may have (limits.maxRequestsPerSource); retry when some have finished", s.requests, g.sourceLabel(key))
	}
	l := g.limiter(s, m.rate)
	// A call that draws only when refused must still find a token left.
	if (m.onlyRefusals && l.Tokens() < 1) || (!m.onlyRefusals && !l.Allow()) {
		return ReasonRateLimited, fmt.Sprintf("rate limit: too many %s requests from %s; each source may make %s %s-class calls (limits.rates.%s); retry later",
			m.name, g.sourceLabel(key), g.lim.Rates[m.rate], m.rate, m.rate)
	}
	s.requests++
	g.requests++
	return "", ""
}

// limiter returns the source's bucket for a rate class; the caller holds
// mu.
func (g *guard) limiter(s *source, class string) *rate.Limiter {
	l := s.limiters[class]
	if l == nil {
		r := g.lim.Rates[class]
		l = rate.NewLimiter(rate.Limit(r.PerSecond), r.Burst)
		if s.limiters == nil {
			s.limiters = map[string]*rate.Limiter{}
		}
		s.limiters[class] = l
	}
	return l
}

// refused draws a token for a refused call of a method that draws only
// when refused.
func (g *guard) refused(key netip.Prefix, class string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if s, ok := g.sources[key]; ok {
		g.limiter(s, class).Allow()
	}
}

func (g *guard) endRequest(key netip.Prefix) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if s, ok := g.sources[key]; ok && s.requests > 0 {
		s.requests--
		g.requests--
		g.settle(s)
	}
}

// reserve takes n bytes of the in-flight budget for the source, waiting up
// to admissionWait for the total budget to have room. It returns the
// release, or a reason and message.
func (g *guard) reserve(ctx context.Context, key netip.Prefix, n int64) (release func(), reason, msg string) {
	if n > int64(g.lim.MaxRequestBytesPerSource) {
		return nil, ReasonBusy, fmt.Sprintf("a request of this size needs %s of request memory, more than one source may hold (limits.maxRequestBytesPerSource %s)", ByteSize(n), g.lim.MaxRequestBytesPerSource)
	}
	g.mu.Lock()
	s := g.get(key)
	if s.bytes+n > int64(g.lim.MaxRequestBytesPerSource) {
		held := s.bytes
		g.settle(s)
		g.mu.Unlock()
		return nil, ReasonBusy, fmt.Sprintf("requests from %s already hold %s of request memory; one source may hold %s (limits.maxRequestBytesPerSource); retry when they have finished",
			g.sourceLabel(key), ByteSize(held), g.lim.MaxRequestBytesPerSource)
	}
	s.bytes += n
	g.settle(s)
	g.mu.Unlock()
	undo := func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		if s, ok := g.sources[key]; ok {
			s.bytes -= n
			g.settle(s)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, admissionWait)
	defer cancel()
	if err := g.bytes.Acquire(wctx, n); err != nil {
		undo()
		return nil, ReasonBusy, fmt.Sprintf("broker is busy receiving other requests (limits.maxRequestBytes %s in flight); retry shortly", g.lim.MaxRequestBytes)
	}
	g.mu.Lock()
	g.held += n
	g.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			g.bytes.Release(n)
			g.mu.Lock()
			g.held -= n
			g.mu.Unlock()
			undo()
		})
	}, "", ""
}

// LimitListener applies the connection caps to a listener: a connection
// over limits.maxConnections, over limits.maxConnectionsPerSource from its
// source, or faster than limits.rates.connect, is closed at accept, before
// any TLS work.
func (s *Server) LimitListener(l net.Listener) net.Listener {
	return &limitListener{Listener: l, s: s}
}

type limitListener struct {
	net.Listener
	s *Server
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		g := l.s.guard
		key := g.sourceOf(c.RemoteAddr())
		if reason, msg := g.openConn(key); reason != "" {
			c.Close()
			l.s.refuseConnection(reason, g.sourceLabel(key), msg)
			continue
		}
		setUserTimeout(c, keepaliveTimeout)
		return &limitedConn{Conn: c, release: func() { g.closeConn(key) }}, nil
	}
}

// limitedConn gives its connection slot back when closed; gRPC closes a
// connection either directly or through the TLS connection over it.
type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

// call is what the tap handle admitted; it travels in the request context.
type call struct {
	spec  methodSpec
	admin bool
	src   netip.Prefix
}

type callKey struct{}

// tap is gRPC's InTapHandle: it runs when a request's headers arrive,
// before its stream is created or any of its body is read, on the
// connection's reader (so it never blocks).
func (s *Server) tap(ctx context.Context, info *tap.Info) (context.Context, error) {
	key := s.guard.sourceOf(peerAddr(ctx))
	src := s.guard.sourceLabel(key)
	m, ok := s.methods[info.FullMethodName]
	if !ok {
		name := info.FullMethodName
		if len(name) > 128 {
			name = name[:128] + "..."
		}
		msg := fmt.Sprintf("unknown method %q", name)
		s.refuseTap("unknown", ReasonUnknownMethod, src, msg, codes.Unimplemented)
		return nil, status.Error(codes.Unimplemented, msg)
	}
	if m.admin {
		if !s.adminCredential(info.Header) {
			msg := "admin operations need the admin credential (--admin-token-file); none or a wrong one was given"
			s.refuseTap(m.name, ReasonAdminCredential, src, msg, codes.Unauthenticated)
			return nil, status.Error(codes.Unauthenticated, msg)
		}
		ctx, cancel := context.WithTimeout(ctx, s.limits.RequestTimeout)
		context.AfterFunc(ctx, cancel)
		return context.WithValue(ctx, callKey{}, &call{spec: m, admin: true, src: key}), nil
	}
	if reason, msg := s.guard.admit(key, m); reason != "" {
		s.refuseTap(m.name, reason, src, msg, codes.ResourceExhausted)
		return nil, status.Error(codes.ResourceExhausted, msg)
	}
	// The deadline covers receiving the body too, which the caller's own
	// grpc-timeout (its choice) would not bound. The request slot is given
	// back when the stream ends, however it ends.
	ctx, cancel := context.WithTimeout(ctx, s.limits.RequestTimeout)
	context.AfterFunc(ctx, func() {
		cancel()
		s.guard.endRequest(key)
	})
	return context.WithValue(ctx, callKey{}, &call{spec: m, src: key}), nil
}

func (s *Server) refuseTap(method, reason, src, msg string, code codes.Code) {
	s.metrics.requests.WithLabelValues(method, code.String()).Inc()
	s.refuseEarly(method, reason, src, msg)
}

// adminCredential checks the bearer token against the admin hash in
// constant time.
func (s *Server) adminCredential(md metadata.MD) bool {
	var token string
	if v := md.Get("authorization"); len(v) == 1 {
		token, _ = strings.CutPrefix(v[0], "Bearer ")
	}
	return s.isAdminToken(token)
}

// isAdminToken checks a token against the admin hash in constant time.
func (s *Server) isAdminToken(token string) bool {
	sum := sha256.Sum256([]byte(token))
	return token != "" && subtle.ConstantTimeCompare(sum[:], s.adminHash) == 1
}

// messageReader is what the broker needs of gRPC's server transport stream
// to read a request itself: gRPC-Go's *transport.ServerStream has had these
// methods since the transport was split into client and server streams.
// Should an upgrade change them, every request is refused (fail closed)
// and the tests say so at once.
type messageReader interface {
	ReadMessageHeader(header []byte) error
	Read(n int) (mem.BufferSlice, error)
}

// boundedService returns a copy of sd whose handlers read their request
// through receive, sized and budgeted, instead of through gRPC's decoder,
// which would read up to the server-wide maximum first.
func (s *Server) boundedService(sd *grpc.ServiceDesc) *grpc.ServiceDesc {
	out := *sd
	out.Methods = make([]grpc.MethodDesc, len(sd.Methods))
	for i, md := range sd.Methods {
		spec := s.methods["/"+sd.ServiceName+"/"+md.MethodName]
		handler := md.Handler
		out.Methods[i] = grpc.MethodDesc{
			MethodName: md.MethodName,
			Handler: func(srv any, ctx context.Context, _ func(any) error, ic grpc.UnaryServerInterceptor) (resp any, err error) {
				release := func() {}
				defer func() {
					release()
					s.metrics.requests.WithLabelValues(spec.name, status.Code(err).String()).Inc()
					if err != nil && spec.onlyRefusals {
						if c, ok := ctx.Value(callKey{}).(*call); ok {
							s.guard.refused(c.src, spec.rate)
						}
					}
				}()
				return handler(srv, ctx, func(msg any) error {
					var err error
					release, err = s.receive(ctx, spec, msg)
					return err
				}, ic)
			},
		}
	}
	return &out
}

// receive reads and decodes the request of a call the tap admitted: the
// length prefix first, then, if the method takes that much and the budget
// has room, the body. It returns the budget's release (never nil).
func (s *Server) receive(ctx context.Context, spec methodSpec, msg any) (release func(), err error) {
	release = func() {}
	c, _ := ctx.Value(callKey{}).(*call)
	if c == nil || c.spec.full != spec.full {
		return release, status.Error(codes.Internal, "broker: request was not admitted by the tap handle; refusing it")
	}
	src := s.guard.sourceLabel(c.src)
	refuse := func(reason string, code codes.Code, msg string) error {
		if !c.admin {
			s.refuseEarly(spec.name, reason, src, msg)
		}
		return status.Error(code, msg)
	}
	st, ok := grpc.ServerTransportStreamFromContext(ctx).(messageReader)
	if !ok {
		return release, status.Error(codes.Internal, "broker: this gRPC version does not let the broker size a request before reading it, so it refuses every request (see broker/admission.go)")
	}
	var hdr [5]byte
	if err := st.ReadMessageHeader(hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return release, refuse(ReasonMalformed, codes.InvalidArgument, "request carries no message")
		}
		return release, recvError(err)
	}
	if hdr[0] != 0 {
		return release, refuse(ReasonMalformed, codes.Unimplemented, "compressed requests are not accepted")
	}
	n := int64(binary.BigEndian.Uint32(hdr[1:]))
	if n > spec.maxSize {
		return release, refuse(ReasonTooLarge, codes.ResourceExhausted, fmt.Sprintf("%s request is %d bytes; this broker accepts at most %d (%s) for %s (limits.maxMessageSize.%s)",
			spec.name, n, spec.maxSize, ByteSize(spec.maxSize), spec.name, spec.name))
	}
	if !c.admin {
		r, reason, msg := s.guard.reserve(ctx, c.src, requestWeight(n))
		if r == nil {
			return release, refuse(reason, codes.ResourceExhausted, msg)
		}
		release = r
	}
	data, err := st.Read(int(n))
	if err != nil {
		return release, recvError(err)
	}
	// One contiguous copy, then the frames go, then the decoded message:
	// at most twice the request at any time, what the budget counted.
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	data.Free()
	defer buf.Free()
	pm, ok := msg.(proto.Message)
	if !ok {
		return release, status.Errorf(codes.Internal, "broker: %T is not a protobuf message", msg)
	}
	if err := proto.Unmarshal(buf.ReadOnlyData(), pm); err != nil {
		return release, refuse(ReasonMalformed, codes.InvalidArgument, fmt.Sprintf("%s request does not decode: %v", spec.name, err))
	}
	return release, nil
}

// recvError turns a transport read failure into a status.
func recvError(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return status.Error(codes.InvalidArgument, "request ended before its message was complete")
	}
	return status.Errorf(codes.Unavailable, "reading request: %v", err)
}
