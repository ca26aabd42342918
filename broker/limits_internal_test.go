package broker

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/broker/store"
)

// TestEveryMethodHasALimit: a method added to the API must get a size and
// rate class chosen for it, not the fallback.
func TestEveryMethodHasALimit(t *testing.T) {
	for _, m := range apiMethods() {
		d, ok := methodDefaults[m.name]
		require.True(t, ok, "method %s has no entry in methodDefaults", m.full)
		assert.Equal(t, m.admin, d.rate == "", "method %s: admin methods have no rate class, the others one", m.full)
	}
	methods := DefaultLimits().methods()
	assert.Equal(t, int64(2*8<<20+1<<20), methods["/attested.broker.v1.Broker/Attest"].maxSize)
	assert.Equal(t, attestMessageSize, maxMessageSize(methods), "the server-wide maximum is the largest method's")
}

func TestLimitsFromYAML(t *testing.T) {
	var cfg Config
	require.NoError(t, yaml.Unmarshal([]byte(`
limits:
  maxConnections: 100
  idleTimeout: 30s
  maxRequestBytes: 64MiB
  maxMessageSize:
    Attest: 4MiB
    ApplyPolicy: 65536
  rates:
    attest: {perSecond: 0.5, burst: 3}
`), &cfg))
	l, err := cfg.Limits.resolved()
	require.NoError(t, err)
	assert.Equal(t, 100, l.MaxConnections)
	assert.Equal(t, 100, l.MaxConnectionsPerSource, "a per-source cap never exceeds the total")
	assert.Equal(t, 30*time.Second, l.IdleTimeout)
	assert.Equal(t, ByteSize(64<<20), l.MaxRequestBytes)
	assert.Equal(t, Rate{PerSecond: 0.5, Burst: 3}, l.Rates["attest"])
	assert.Equal(t, DefaultLimits().Rates["unwrap"], l.Rates["unwrap"])
	assert.Equal(t, DefaultLimits().HandshakeTimeout, l.HandshakeTimeout)
	m := l.methods()
	assert.Equal(t, int64(4<<20), m["/attested.broker.v1.Broker/Attest"].maxSize)
	assert.Equal(t, int64(65536), m["/attested.broker.v1.Admin/ApplyPolicy"].maxSize)

	for _, bad := range []struct{ yaml, want string }{
		{"maxConnections: -1", "limits.maxConnections is -1"},
		{"idleTimeout: -1s", "limits.idleTimeout"},
		{"maxMessageSize: {Atest: 1MiB}", `unknown method "Atest"`},
		{"maxMessageSize: {Attest: 3GiB}", "between 1 byte and 2 GiB"},
		{"rates: {nodes: {perSecond: 1, burst: 1}}", `unknown class "nodes"`},
		{"rates: {attest: {perSecond: 0, burst: 1}}", "must be positive"},
		{"sourcePrefixIPv6: 129", "sourcePrefixIPv6"},
		{"maxRequestBytesPerSource: 16MiB", "the largest Attest request accepted (limits.maxMessageSize.Attest, 17MiB) needs 34820KiB of request memory, more than limits.maxRequestBytesPerSource (16MiB) allows"},
	} {
		var c Config
		require.NoError(t, yaml.Unmarshal([]byte("limits:\n  "+bad.yaml+"\n"), &c), bad.yaml)
		_, err := c.Limits.resolved()
		require.Error(t, err, bad.yaml)
		assert.Contains(t, err.Error(), bad.want)
	}
	var c Config
	assert.ErrorContains(t, yaml.Unmarshal([]byte("limits:\n  maxRequestBytes: 12 parsecs\n"), &c), "want a whole number of bytes")
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]ByteSize{"0": 0, "4096": 4096, "4096B": 4096, "64KiB": 64 << 10, "16 MiB": 16 << 20, "2GiB": 2 << 30, "1MB": 1 << 20} {
		got, err := ParseByteSize(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "-1", "1.5MiB", "MiB", "99999999999999GiB"} {
		_, err := ParseByteSize(in)
		assert.Error(t, err, in)
	}
	assert.Equal(t, "17MiB", ByteSize(17<<20).String())
	assert.Equal(t, "1000B", ByteSize(1000).String())
	out, err := yaml.Marshal(struct{ S ByteSize }{64 << 10})
	require.NoError(t, err)
	assert.Equal(t, "s: 64KiB\n", string(out))
}

// TestAuditSamplerStandsForEveryRefusal: at most one record per key per
// interval, and the records together account for every refusal.
func TestAuditSamplerStandsForEveryRefusal(t *testing.T) {
	a := newAuditSampler(time.Minute)
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	k := sampleKey{"Attest", ReasonEvidenceUnverified}
	var written []store.AuditEvent
	admit := func(at time.Time, node string) {
		if rec, ok := a.admit(at, k, store.AuditEvent{Kind: "attest", Node: node, Reason: "nonce unknown"}); ok {
			written = append(written, rec)
		}
	}
	// 1000 refusals in the first 30 s: one record.
	for i := range 1000 {
		admit(t0.Add(time.Duration(i)*30*time.Millisecond), fmt.Sprintf("n%d", i))
	}
	require.Len(t, written, 1)
	assert.Equal(t, "n0", written[0].Node)
	assert.Contains(t, written[0].Reason, "nonce unknown [unauthenticated Attest refusal (evidence_unverified); the audit keeps at most one such record per 1m0s]")
	assert.Empty(t, a.due(t0.Add(59*time.Second), false), "no summary before the interval has passed")

	// The summary carries the other 999 and names no node.
	sum := a.due(t0.Add(61*time.Second), false)
	require.Len(t, sum, 1)
	assert.True(t, strings.HasPrefix(sum[0].Reason, "999 more unauthenticated Attest refusals (evidence_unverified) since 2030-01-01T00:00:00Z"), sum[0].Reason)
	assert.Contains(t, sum[0].Reason, `naming node "n999"`)
	assert.Empty(t, sum[0].Node)
	assert.Empty(t, a.due(t0.Add(10*time.Minute), false), "nothing left to summarise")

	// Refusals after a summary wait for the next interval; the next
	// record written folds them in.
	admit(t0.Add(62*time.Second), "x")
	admit(t0.Add(63*time.Second), "y")
	require.Len(t, written, 1)
	admit(t0.Add(3*time.Minute), "z")
	require.Len(t, written, 2)
	assert.Contains(t, written[1].Reason, "this one also stands for 2 more since 2030-01-01T00:01:02Z")

	// A clock stepped back an hour neither floods nor silences the audit.
	admit(t0.Add(-time.Hour), "back")
	require.Len(t, written, 3)
	admit(t0.Add(-time.Hour+time.Second), "back2")
	require.Len(t, written, 3)

	// Forced at shutdown, whatever the interval.
	require.Len(t, a.due(t0.Add(-time.Hour+2*time.Second), true), 1)
}

func TestSourcesAreAddressesAndIPv6Prefixes(t *testing.T) {
	l, err := Limits{}.resolved()
	require.NoError(t, err)
	g := newGuard(l)
	src := func(s string) string {
		return g.sourceLabel(g.sourceOf(net.TCPAddrFromAddrPort(netip.MustParseAddrPort(s))))
	}
	assert.Equal(t, "203.0.113.7", src("203.0.113.7:443"))
	assert.Equal(t, "203.0.113.7", src("[::ffff:203.0.113.7]:443"), "IPv4-mapped addresses are IPv4")
	assert.Equal(t, "2001:db8:1:2::/64", src("[2001:db8:1:2:aaaa::1]:443"))
	assert.Equal(t, src("[2001:db8:1:2::1]:1"), src("[2001:db8:1:2:ffff::9]:2"), "one /64 is one source")
	assert.Equal(t, "a non-IP peer", g.sourceLabel(g.sourceOf(nil)))
}

// TestSourceTableIsBounded: a flood of sources keeps at most maxSources
// idle entries; sources holding connections are never dropped.
func TestSourceTableIsBounded(t *testing.T) {
	l, err := Limits{MaxSources: 100, MaxConnectionsPerSource: 1, Rates: map[string]Rate{ratePublic: {PerSecond: 1, Burst: 1}}}.resolved()
	require.NoError(t, err)
	g := newGuard(l)
	held := netip.MustParsePrefix("198.51.100.1/32")
	reason, _ := g.openConn(held)
	require.Empty(t, reason)
	m := methodSpec{name: "Info", rate: ratePublic}
	for i := range 10000 {
		key := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32)
		reason, _ := g.admit(key, m)
		require.Empty(t, reason)
		g.endRequest(key)
	}
	assert.LessOrEqual(t, g.stats().sources, 101)
	reason, _ = g.openConn(held)
	assert.Equal(t, ReasonSourceConnectionLimit, reason, "the source with a connection kept its count")
	// The rate of the latest source is still tracked.
	last := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, 39, 15}), 32)
	reason, _ = g.admit(last, m)
	assert.Equal(t, ReasonRateLimited, reason)
}
