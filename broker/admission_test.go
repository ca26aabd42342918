package broker_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/test/h2attack"
)

// These tests attack the broker as the review did, without any credential,
// over raw HTTP/2 (test/h2attack) so that the attacker's memory stays flat
// while the broker's is measured.

const (
	adminApplyPolicy = "/attested.broker.v1.Admin/ApplyPolicy"
	brokerAttest     = "/attested.broker.v1.Broker/Attest"
	brokerChallenge  = "/attested.broker.v1.Broker/Challenge"
	brokerUnwrap     = "/attested.broker.v1.Broker/Unwrap"

	// window is the most a request can send before the broker reads it
	// (the HTTP/2 stream window the broker grants up front).
	window = 64 << 10
)

func attacker(t *testing.T, addr, dataDir, laddr string) *h2attack.Conn {
	t.Helper()
	cfg, err := h2attack.TLSConfig(filepath.Join(dataDir, broker.CACertFile))
	require.NoError(t, err)
	c, err := h2attack.Dial(context.Background(), addr, cfg, laddr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// memory watches this process's heap while an attack runs.
type memory struct {
	stop      chan struct{}
	done      chan struct{}
	base      runtime.MemStats
	peak      atomic.Uint64
	allocated uint64
}

func watchMemory() *memory {
	runtime.GC()
	m := &memory{stop: make(chan struct{}), done: make(chan struct{})}
	runtime.ReadMemStats(&m.base)
	go func() {
		defer close(m.done)
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > m.peak.Load() {
				m.peak.Store(ms.HeapInuse)
			}
			select {
			case <-m.stop:
				m.allocated = ms.TotalAlloc - m.base.TotalAlloc
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return m
}

// end returns how much the heap grew at its peak and how much was
// allocated during the attack.
func (m *memory) end() (peakGrowth, allocated uint64) {
	close(m.stop)
	<-m.done
	return m.peak.Load() - min(m.peak.Load(), m.base.HeapInuse), m.allocated
}

// TestAdminBodyIsRefusedBeforeItIsRead is the review's attack: 32
// concurrent 16 MiB ApplyPolicy calls without the admin credential took the
// broker from 40 MB to 1.38 GB, because gRPC read and decoded each body
// before the credential was checked. Now the tap handle refuses the call
// from its headers: the broker grants no window beyond the first 64 KiB and
// allocates nothing for the body.
func TestAdminBodyIsRefusedBeforeItIsRead(t *testing.T) {
	b := brokertest.Start(t)
	const calls, conns = 32, 4
	const fill = 16<<20 - 64 // within gRPC's old server-wide limit, so the old broker read it all
	cs := make([]*h2attack.Conn, conns)
	for i := range cs {
		cs[i] = attacker(t, b.Addr, b.DataDir, "")
	}
	mem := watchMemory()
	results := make([]h2attack.Result, calls)
	var wg sync.WaitGroup
	for i := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = cs[i%conns].Call(adminApplyPolicy, map[string]string{"authorization": "Bearer not-the-token"},
				h2attack.BytesField(1, fill), fill, 'a', 60*time.Second)
		}()
	}
	wg.Wait()
	growth, allocated := mem.end()
	t.Logf("heap growth at peak %d MiB, allocated %d MiB", growth>>20, allocated>>20)
	for i, r := range results {
		require.NoError(t, r.Err, "call %d", i)
		assert.Equal(t, int(codes.Unauthenticated), r.Code, "call %d: %s", i, r.Message)
		assert.Contains(t, r.Message, "admin credential")
		assert.LessOrEqual(t, r.Sent, int64(window), "call %d: the broker let %d body bytes in before refusing", i, r.Sent)
	}
	// 32 bodies of 16 MiB: the old broker allocated over 1 GiB for them.
	assert.Less(t, allocated, uint64(64<<20), "the broker allocated for bodies it refuses")
	assert.Equal(t, float64(calls), counter(t, b.Server.Metrics(), "attested_broker_unauthenticated_refusals_total", "method", "ApplyPolicy", "reason", "admin_credential"))
}

// TestOversizedBodiesAreRefusedBeforeTheyAreRead: a method is refused a
// request larger than it needs from the request's length prefix; the
// broker never grants the window to send the rest.
func TestOversizedBodiesAreRefusedBeforeTheyAreRead(t *testing.T) {
	b := brokertest.Start(t)
	c := attacker(t, b.Addr, b.DataDir, "")
	for _, tc := range []struct {
		method string
		field  int
		fill   int64
	}{
		{brokerChallenge, 1, 8 << 20},
		{brokerUnwrap, 2, 8 << 20},
		{adminApplyPolicy, 1, 8 << 20}, // refused for the credential first
		{brokerAttest, 8, 17<<20 + 1},  // over the two event logs' worth
	} {
		t.Run(filepath.Base(tc.method), func(t *testing.T) {
			mem := watchMemory()
			r := c.Call(tc.method, nil, h2attack.BytesField(tc.field, tc.fill), tc.fill, 'a', 60*time.Second)
			_, allocated := mem.end()
			require.NoError(t, r.Err)
			assert.LessOrEqual(t, r.Sent, int64(window), "the broker read %d body bytes of a request it refuses", r.Sent)
			if tc.method == adminApplyPolicy {
				assert.Equal(t, int(codes.Unauthenticated), r.Code, r.Message)
			} else {
				assert.Equal(t, int(codes.ResourceExhausted), r.Code, r.Message)
				assert.Regexp(t, `request is \d+ bytes; this broker accepts at most \d+ \(.*\) for \w+ \(limits.maxMessageSize.\w+\)`, r.Message)
			}
			assert.Less(t, allocated, uint64(8<<20))
		})
	}
	assert.Equal(t, float64(1), counter(t, b.Server.Metrics(), "attested_broker_unauthenticated_refusals_total", "method", "Challenge", "reason", "message_too_large"))
}

// TestConcurrentHugeAttestsStayWithinTheBudget: many large Attest bodies at
// once (each within Attest's limit) from several sources hold at most the
// in-flight byte budget, each source at most its share; the others are
// refused as busy before their bodies are read.
func TestConcurrentHugeAttestsStayWithinTheBudget(t *testing.T) {
	b := brokertest.Start(t)
	const sources, perSource = 3, 8
	const fill = 15 << 20
	type call struct {
		c   *h2attack.Conn
		res h2attack.Result
	}
	var calls []*call
	for s := range sources {
		c := attacker(t, b.Addr, b.DataDir, fmt.Sprintf("127.0.0.%d", 2+s))
		for range perSource {
			calls = append(calls, &call{c: c})
		}
	}
	mem := watchMemory()
	var wg sync.WaitGroup
	for _, cl := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl.res = cl.c.Call(brokerAttest, nil, h2attack.BytesField(8, fill), fill, 0, 60*time.Second)
		}()
	}
	wg.Wait()
	growth, allocated := mem.end()
	t.Logf("heap growth at peak %d MiB, allocated %d MiB", growth>>20, allocated>>20)
	read, busy := 0, 0
	for i, cl := range calls {
		require.NoError(t, cl.res.Err, "call %d", i)
		if cl.res.Sent > window {
			read++
			continue
		}
		busy++
		assert.Equal(t, int(codes.ResourceExhausted), cl.res.Code, cl.res.Message)
		assert.Contains(t, cl.res.Message, "request memory")
	}
	t.Logf("%d bodies read, %d refused before reading", read, busy)
	// Each source may hold 64 MiB: one 15 MiB request counts twice its size.
	assert.GreaterOrEqual(t, busy, sources*(perSource-2))
	// 32 bodies of 15 MiB would be 480 MiB received and as much decoded.
	assert.Less(t, growth, uint64(320<<20), "heap grew beyond the request budget")
}

// TestRateLimitRefusesWithResourceExhausted: a source calling an
// unauthenticated method faster than its rate is refused, saying why.
func TestRateLimitRefusesWithResourceExhausted(t *testing.T) {
	b := brokertest.Start(t)
	limited := 0
	var msg string
	for range 400 {
		// Challenge answers any node name (it says nothing about the
		// broker's state) until the source's rate is spent.
		_, err := b.Node.Challenge(context.Background(), &apiv1.ChallengeRequest{Node: "nobody"})
		if status.Code(err) == codes.ResourceExhausted {
			limited++
			msg = status.Convert(err).Message()
		}
	}
	// Burst 100 at 20/s: however slow this machine, most of 400 are over.
	assert.Greater(t, limited, 200)
	assert.Contains(t, msg, "rate limit: too many Challenge requests from 127.0.0.1")
	assert.Contains(t, msg, "limits.rates.attest")
	assert.Equal(t, float64(limited), counter(t, b.Server.Metrics(), "attested_broker_unauthenticated_refusals_total", "method", "Challenge", "reason", "rate_limited"))
	// Another source is not held back by this one.
	other := attacker(t, b.Addr, b.DataDir, "127.0.0.9")
	r := other.Call(brokerChallenge, nil, h2attack.BytesField(1, 6), 6, 'x', 10*time.Second)
	assert.Equal(t, int(codes.OK), r.Code, r.Message)
}

// TestTokenGuessingIsRateLimited: Unwrap and Explain draw from their
// bucket only when refused, so a source guessing session tokens is held
// back while a node's releases are not (BenchmarkUnwrapThroughput makes
// thousands from one source).
func TestTokenGuessingIsRateLimited(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) {
		c.Limits.Rates = map[string]broker.Rate{"unwrap": {PerSecond: 1, Burst: 20}}
	})
	codesSeen := map[codes.Code]int{}
	var msg string
	for range 100 {
		_, err := b.Node.Unwrap(context.Background(), &apiv1.UnwrapRequest{SessionToken: []byte("guessed token")})
		codesSeen[status.Code(err)]++
		if status.Code(err) == codes.ResourceExhausted {
			msg = status.Convert(err).Message()
		}
	}
	assert.InDelta(t, 20, codesSeen[codes.Unauthenticated], 2, "refusals the bucket allowed")
	assert.InDelta(t, 80, codesSeen[codes.ResourceExhausted], 2)
	assert.Contains(t, msg, "rate limit: too many Unwrap requests from 127.0.0.1")
}

// TestRefusalFloodIsCountedAndSampled: ~3,200 refusal audit records per
// second naming any node were written and kept. Now every refusal of an
// unauthenticated caller is counted in the metrics, and the audit keeps at
// most one record per method and reason per interval, carrying the number
// of refusals it stands for.
func TestRefusalFloodIsCountedAndSampled(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) {
		c.Limits.Rates = map[string]broker.Rate{"attest": {PerSecond: 1e6, Burst: 1e6}}
		c.Limits.AuditSampleInterval = time.Hour
	})
	const flood = 3000
	var wg sync.WaitGroup
	var next atomic.Int64
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= flood {
				_, err := b.Node.Attest(context.Background(), &apiv1.AttestRequest{Node: "victim", Nonce: []byte("forged nonce")})
				assert.Equal(t, codes.PermissionDenied, status.Code(err))
			}
		}()
	}
	wg.Wait()
	for range 500 {
		_, err := b.NoCred.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
		require.Equal(t, codes.Unauthenticated, status.Code(err))
	}
	reg := b.Server.Metrics()
	assert.Equal(t, float64(flood), counter(t, reg, "attested_broker_unauthenticated_refusals_total", "method", "Attest", "reason", "evidence_unverified"))
	assert.Equal(t, float64(500), counter(t, reg, "attested_broker_unauthenticated_refusals_total", "method", "ListNodes", "reason", "admin_credential"))
	assert.Equal(t, float64(flood-1), counter(t, reg, "attested_broker_audit_refusals_sampled_out_total", "method", "Attest", "reason", "evidence_unverified"))

	// The tap handle writes its sampled record in the background.
	require.Eventually(t, func() bool { return len(auditOf(t, b, "refuse")) == 1 }, 5*time.Second, 10*time.Millisecond)
	attests := auditOf(t, b, "attest")
	require.Len(t, attests, 1, "one record stands for the whole flood")
	assert.Equal(t, "victim", attests[0].Node)
	assert.Contains(t, attests[0].Reason, "the audit keeps at most one such record per 1h0m0s")
	assert.Contains(t, attests[0].Actor, "unauthenticated 127.0.0.1")
	refusals := auditOf(t, b, "refuse")
	assert.Contains(t, refusals[0].Reason, "ListNodes request refused before it was read: admin operations need the admin credential")
}

// TestSampledAuditAccountsForEveryRefusal: over several sampling
// intervals, the sampled records of a flood together stand for every
// refusal in it, and there are no more of them than intervals.
func TestSampledAuditAccountsForEveryRefusal(t *testing.T) {
	const interval = 200 * time.Millisecond
	b := brokertest.Start(t, func(c *broker.Config) {
		c.Limits.Rates = map[string]broker.Rate{"attest": {PerSecond: 1e6, Burst: 1e6}}
		c.Limits.AuditSampleInterval = interval
	})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go b.Server.Run(ctx)
	const flood = 2000
	start := time.Now()
	for range flood {
		_, err := b.Node.Attest(context.Background(), &apiv1.AttestRequest{Node: "victim", Nonce: []byte("forged nonce")})
		require.Equal(t, codes.PermissionDenied, status.Code(err))
	}
	took := time.Since(start)
	var evs []*apiv1.AuditEvent
	require.Eventually(t, func() bool {
		evs = auditOf(t, b, "attest")
		return refusalsIn(evs) == flood
	}, 5*time.Second, 50*time.Millisecond, "the sampled records stand for %d refusals, not %d", refusalsIn(evs), flood)
	intervals := int(took/interval) + 2
	t.Logf("%d refusals in %s: %d audit records", flood, took.Round(time.Millisecond), len(evs))
	assert.LessOrEqual(t, len(evs), 2*intervals, "at most one record per interval, plus one summary each")
}

var (
	standsFor = regexp.MustCompile(`this one also stands for (\d+) more`)
	summary   = regexp.MustCompile(`^(\d+) more unauthenticated`)
)

// refusalsIn sums the refusals sampled audit records stand for.
func refusalsIn(evs []*apiv1.AuditEvent) int {
	n := 0
	for _, e := range evs {
		if m := summary.FindStringSubmatch(e.GetReason()); m != nil {
			k, _ := strconv.Atoi(m[1])
			n += k
			continue
		}
		n++
		if m := standsFor.FindStringSubmatch(e.GetReason()); m != nil {
			k, _ := strconv.Atoi(m[1])
			n += k
		}
	}
	return n
}

// TestRequestBytesInFlightAreBounded: however many sources send large
// requests at once, the bodies held never exceed limits.maxRequestBytes;
// requests over it wait for room, then are refused as busy.
func TestRequestBytesInFlightAreBounded(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) {
		c.Limits.MaxRequestBytes = 40 << 20
	})
	const sources, perSource = 8, 2
	const fill = 8 << 20 // counts 16 MiB: two fit in 40 MiB
	type call struct {
		c   *h2attack.Conn
		res h2attack.Result
	}
	var calls []*call
	for s := range sources {
		c := attacker(t, b.Addr, b.DataDir, fmt.Sprintf("127.0.1.%d", 1+s))
		for range perSource {
			calls = append(calls, &call{c: c})
		}
	}
	var peak atomic.Int64
	stop := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			v := counter(t, b.Server.Metrics(), "attested_broker_request_bytes_in_flight")
			if int64(v) > peak.Load() {
				peak.Store(int64(v))
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	mem := watchMemory()
	var wg sync.WaitGroup
	for _, cl := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl.res = cl.c.Call(brokerAttest, nil, h2attack.BytesField(8, fill), fill, 0, 60*time.Second)
		}()
	}
	wg.Wait()
	close(stop)
	<-watched
	growth, _ := mem.end()
	t.Logf("heap growth at peak %d MiB; budget in use at peak %d MiB", growth>>20, peak.Load()>>20)
	assert.LessOrEqual(t, peak.Load(), int64(40<<20))
	// Unbounded, 16 bodies of 8 MiB would be 128 MiB received and as much
	// decoded; the heap also keeps freed buffers until the next GC.
	assert.Less(t, growth, uint64(200<<20))
	for _, cl := range calls {
		require.NoError(t, cl.res.Err)
		if cl.res.Code == int(codes.ResourceExhausted) {
			assert.Contains(t, cl.res.Message, "broker is busy receiving other requests (limits.maxRequestBytes 40MiB in flight)")
			assert.LessOrEqual(t, cl.res.Sent, int64(window))
		} else {
			// Read, decoded, and refused by Attest itself.
			assert.Equal(t, int(codes.InvalidArgument), cl.res.Code, cl.res.Message)
		}
	}
}

func auditOf(t *testing.T, b *brokertest.Broker, kind string) []*apiv1.AuditEvent {
	t.Helper()
	out, err := b.Admin.ListAudit(context.Background(), &apiv1.ListAuditRequest{Kind: kind, Limit: 10000})
	require.NoError(t, err)
	return out.GetEvents()
}

// TestSlowBodyIsCutOffAtTheRequestTimeout: a caller that declares a small
// body and never finishes sending it holds its request slot only until the
// request timeout, whatever grpc-timeout it sent (none here).
func TestSlowBodyIsCutOffAtTheRequestTimeout(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) { c.Limits.RequestTimeout = time.Second })
	c := attacker(t, b.Addr, b.DataDir, "")
	// Declare 1 KiB, send 8 bytes and stall.
	start := time.Now()
	r := c.Do(h2attack.Request{Method: brokerChallenge, Prefix: h2attack.BytesField(1, 6), Fill: 6, Filler: 'x', Declare: 1024, Timeout: 10 * time.Second})
	require.NoError(t, r.Err)
	assert.Equal(t, int(codes.DeadlineExceeded), r.Code, r.Message)
	assert.Less(t, time.Since(start), 4*time.Second)
}

// limitedServe serves b's broker a second time on a listener with the
// connection caps, as 'broker serve' does, and returns its address.
func limitedServe(t *testing.T, b *brokertest.Broker) string {
	t.Helper()
	cert, err := broker.LoadServerCertificate(b.DataDir)
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f := b.Server.Frontend(cert, nil)
	go f.Serve(lis)
	t.Cleanup(f.Stop)
	return lis.Addr().String()
}

// TestIdleConnectionsAreClosed: 400 idle HTTP/2 connections stayed open for
// good. Now a connection with no request in flight is closed after the
// idle timeout.
func TestIdleConnectionsAreClosed(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) { c.Limits.IdleTimeout = time.Second })
	var cs []*h2attack.Conn
	for range 20 {
		cs = append(cs, attacker(t, b.Addr, b.DataDir, ""))
	}
	deadline := time.After(10 * time.Second)
	for i, c := range cs {
		select {
		case <-c.Done():
		case <-deadline:
			t.Fatalf("connection %d still open 10 s after it went idle", i)
		}
		_, debug, ok := c.GoAway()
		assert.True(t, ok, "connection %d closed without GOAWAY", i)
		assert.Equal(t, "max_idle", debug)
	}
}

// TestConnectionCapsRefuseAtAccept: connections over the per-source or the
// total cap are closed before the TLS handshake; closing one frees its
// slot.
func TestConnectionCapsRefuseAtAccept(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) {
		c.Limits.MaxConnections = 5
		c.Limits.MaxConnectionsPerSource = 3
	})
	addr := limitedServe(t, b)
	cfg, err := h2attack.TLSConfig(filepath.Join(b.DataDir, broker.CACertFile))
	require.NoError(t, err)
	dial := func(laddr string) (*h2attack.Conn, error) {
		return h2attack.Dial(context.Background(), addr, cfg, laddr)
	}
	var open []*h2attack.Conn
	for range 3 {
		c, err := dial("127.0.0.1")
		require.NoError(t, err)
		open = append(open, c)
	}
	_, err = dial("127.0.0.1")
	require.Error(t, err, "a fourth connection from one source")
	for range 2 {
		c, err := dial("127.0.0.2")
		require.NoError(t, err)
		open = append(open, c)
	}
	_, err = dial("127.0.0.3")
	require.Error(t, err, "a sixth connection in total")
	reg := b.Server.Metrics()
	assert.Equal(t, float64(1), counter(t, reg, "attested_broker_connections_refused_total", "reason", "source_connection_limit"))
	assert.Equal(t, float64(1), counter(t, reg, "attested_broker_connections_refused_total", "reason", "connection_limit"))

	open[0].Close()
	require.Eventually(t, func() bool {
		c, err := dial("127.0.0.3")
		if err == nil {
			c.Close()
		}
		return err == nil
	}, 5*time.Second, 50*time.Millisecond, "a closed connection gives its slot back")
	for _, c := range open[1:] {
		c.Close()
	}
}

// TestConnectionRateIsLimited: each new connection costs a TLS handshake;
// a source opening them faster than its rate is closed at accept.
func TestConnectionRateIsLimited(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) {
		c.Limits.Rates = map[string]broker.Rate{"connect": {PerSecond: 1, Burst: 5}}
	})
	addr := limitedServe(t, b)
	cfg, err := h2attack.TLSConfig(filepath.Join(b.DataDir, broker.CACertFile))
	require.NoError(t, err)
	refused := 0
	for range 20 {
		c, err := h2attack.Dial(context.Background(), addr, cfg, "")
		if err != nil {
			refused++
			continue
		}
		c.Close()
	}
	assert.InDelta(t, 15, refused, 2)
	assert.Equal(t, float64(refused), counter(t, b.Server.Metrics(), "attested_broker_connections_refused_total", "reason", "connection_rate"))
}

// TestHandshakeTimeout: a connection that never completes its TLS
// handshake is closed after the handshake timeout.
func TestHandshakeTimeout(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) { c.Limits.HandshakeTimeout = 500 * time.Millisecond })
	addr := limitedServe(t, b)
	for _, a := range []string{b.Addr, addr} {
		c, err := net.Dial("tcp", a)
		require.NoError(t, err)
		start := time.Now()
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = c.Read(make([]byte, 1))
		require.Error(t, err)
		assert.NotContains(t, err.Error(), "timeout", "the broker kept a silent connection open")
		assert.Less(t, time.Since(start), 3*time.Second)
		c.Close()
	}
	// A client that stalls inside its ClientHello, or after the TLS
	// handshake without starting HTTP/2, is cut off the same way.
	cfg, err := h2attack.TLSConfig(filepath.Join(b.DataDir, broker.CACertFile))
	require.NoError(t, err)
	for _, stall := range []string{"in the TLS handshake", "before HTTP/2"} {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		var r interface{ Read([]byte) (int, error) } = c
		if stall == "before HTTP/2" {
			tc := tls.Client(c, cfg)
			require.NoError(t, tc.Handshake())
			r = tc
		} else {
			_, err = c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00}) // a record header promising 512 bytes
			require.NoError(t, err)
		}
		start := time.Now()
		require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
		for err == nil {
			_, err = r.Read(make([]byte, 512))
		}
		assert.NotContains(t, err.Error(), "timeout", "stalled %s: the broker kept the connection", stall)
		assert.Less(t, time.Since(start), 3*time.Second, stall)
		c.Close()
	}
}

// TestPingFloodIsDisconnected: a client pinging more often than the
// keepalive policy allows is told too_many_pings and disconnected.
func TestPingFloodIsDisconnected(t *testing.T) {
	b := brokertest.Start(t)
	c := attacker(t, b.Addr, b.DataDir, "")
	for i := range 10 {
		if c.Ping([8]byte{byte(i)}) != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a ping flood was tolerated")
	}
	_, debug, ok := c.GoAway()
	require.True(t, ok)
	assert.Equal(t, "too_many_pings", debug)
}

// counter returns a counter's (or a gauge's) value in a registry.
func counter(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := want[lp.GetName()]; ok && v != lp.GetValue() {
					continue metric
				}
			}
			if g := m.GetGauge(); g != nil {
				return g.GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}
