package broker

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/evidence"
)

// Limits bound what callers, above all callers without any credential, can
// make the broker hold: connections, requests in flight, request bytes in
// memory, request rates, and audit records. A zero field takes its default
// (DefaultLimits); broker.yaml's "limits" section and 'broker serve' flags
// override them.
type Limits struct {
	// MaxConnections caps open client connections; more are closed at
	// accept, before the TLS handshake.
	MaxConnections int `yaml:"maxConnections,omitempty"`
	// MaxConnectionsPerSource caps open connections from one source (an
	// IPv4 address or an IPv6 /64, see SourcePrefixIPv4/IPv6).
	MaxConnectionsPerSource int `yaml:"maxConnectionsPerSource,omitempty"`
	// HandshakeTimeout bounds the TLS and HTTP/2 handshake of a new
	// connection.
	HandshakeTimeout time.Duration `yaml:"handshakeTimeout,omitempty"`
	// IdleTimeout closes a connection that has had no request in flight for
	// this long; clients reconnect on their next call.
	IdleTimeout time.Duration `yaml:"idleTimeout,omitempty"`
	// MaxConnectionAge closes any connection this old (after letting its
	// requests finish), so no connection lives for ever.
	MaxConnectionAge time.Duration `yaml:"maxConnectionAge,omitempty"`
	// KeepaliveMinInterval is the shortest interval at which a client may
	// send HTTP/2 pings, and only while it has a request in flight; a client
	// pinging more often is disconnected.
	KeepaliveMinInterval time.Duration `yaml:"keepaliveMinInterval,omitempty"`
	// MaxStreamsPerConnection caps concurrent requests on one connection.
	MaxStreamsPerConnection int `yaml:"maxStreamsPerConnection,omitempty"`

	// MaxRequests caps requests in flight from callers without the admin
	// credential, from all sources together.
	MaxRequests int `yaml:"maxRequests,omitempty"`
	// MaxRequestsPerSource caps requests in flight from one source.
	MaxRequestsPerSource int `yaml:"maxRequestsPerSource,omitempty"`
	// RequestTimeout bounds a whole request, receiving its body included.
	RequestTimeout time.Duration `yaml:"requestTimeout,omitempty"`
	// MaxRequestBytes caps the memory that request bodies of callers
	// without the admin credential may hold at once (each request counts
	// twice its size: the received bytes and the decoded message), taken
	// before a body is read and held until the request ends.
	MaxRequestBytes ByteSize `yaml:"maxRequestBytes,omitempty"`
	// MaxRequestBytesPerSource is the share of MaxRequestBytes one source
	// may hold.
	MaxRequestBytesPerSource ByteSize `yaml:"maxRequestBytesPerSource,omitempty"`
	// MaxMessageSize overrides the largest request each method accepts,
	// by method name (e.g. Attest, ApplyPolicy). A larger request is
	// refused from its length prefix, before its body is read.
	MaxMessageSize map[string]ByteSize `yaml:"maxMessageSize,omitempty"`

	// Rates overrides the per-source request rates of the methods callers
	// reach without a credential, by class: public (Info, GetWrappingKey),
	// enroll (EnrollStart, EnrollFinish), attest (Challenge, Attest,
	// NodeTags), unwrap (Unwrap, Explain). Unwrap and Explain carry a
	// session token and draw from their bucket only when refused, so a
	// node's releases are never rate-limited, guessing at tokens is. The
	// class connect limits new connections (each costs a TLS handshake);
	// login limits failed dashboard logins (only failures draw).
	Rates map[string]Rate `yaml:"rates,omitempty"`
	// MaxSources bounds the table of sources the broker keeps rate and
	// connection state for; the least recently idle entries go first.
	MaxSources int `yaml:"maxSources,omitempty"`
	// SourcePrefixIPv4 and SourcePrefixIPv6 say how many leading address
	// bits name one source: one IPv4 address and one IPv6 /64 (what one
	// host usually holds) by default.
	SourcePrefixIPv4 int `yaml:"sourcePrefixIPv4,omitempty"`
	SourcePrefixIPv6 int `yaml:"sourcePrefixIPv6,omitempty"`

	// AuditSampleInterval: refusals of callers that have not authenticated
	// are written to the audit log at most once per interval for each
	// method and reason, each record carrying how many refusals it stands
	// for (the metrics count every one).
	AuditSampleInterval time.Duration `yaml:"auditSampleInterval,omitempty"`
}

// Rate is a token bucket: PerSecond requests on average, Burst at once.
type Rate struct {
	PerSecond float64 `yaml:"perSecond"`
	Burst     int     `yaml:"burst"`
}

func (r Rate) String() string {
	return fmt.Sprintf("%s/s, burst %d", strconv.FormatFloat(r.PerSecond, 'f', -1, 64), r.Burst)
}

// Rate classes of the methods callers reach without a credential.
const (
	ratePublic  = "public"
	rateEnroll  = "enroll"
	rateAttest  = "attest"
	rateUnwrap  = "unwrap"
	rateConnect = "connect"
	rateLogin   = "login"
)

// MaxHeaderListSize bounds the request headers of one call; gRPC's own
// default (16 MiB) would let every connection hold that much.
const MaxHeaderListSize = 16 << 10

// streamWindow is the HTTP/2 flow-control window of a request before the
// broker reads it: the most a request can make the broker buffer before its
// method's size limit and the byte budget are checked. 64 KiB is HTTP/2's
// and gRPC's minimum; a fixed window also stops gRPC's bandwidth estimator
// from growing it to megabytes.
const streamWindow = 64 << 10

// connWindow is the connection-level window; gRPC returns it as data
// arrives, so it bounds throughput, not memory.
const connWindow = 1 << 20

// DefaultLimits are the limits of a broker that configures none.
func DefaultLimits() Limits {
	return Limits{
		MaxConnections:           4096,
		MaxConnectionsPerSource:  128,
		HandshakeTimeout:         10 * time.Second,
		IdleTimeout:              30 * time.Second,
		MaxConnectionAge:         time.Hour,
		KeepaliveMinInterval:     time.Minute,
		MaxStreamsPerConnection:  32,
		MaxRequests:              512,
		MaxRequestsPerSource:     64,
		RequestTimeout:           HandlerTimeout,
		MaxRequestBytes:          128 << 20,
		MaxRequestBytesPerSource: 40 << 20,
		Rates: map[string]Rate{
			ratePublic:  {PerSecond: 50, Burst: 200},
			rateEnroll:  {PerSecond: 2, Burst: 20},
			rateAttest:  {PerSecond: 20, Burst: 100},
			rateUnwrap:  {PerSecond: 500, Burst: 2000},
			rateConnect: {PerSecond: 50, Burst: 200},
			rateLogin:   {PerSecond: 0.1, Burst: 10},
		},
		MaxSources:          16384,
		SourcePrefixIPv4:    32,
		SourcePrefixIPv6:    64,
		AuditSampleInterval: time.Minute,
	}
}

// methodSpec is what the broker knows about one gRPC method before it reads
// the request: who may call it, how large a request may be, and which rate
// bucket it draws from.
type methodSpec struct {
	full    string // "/attested.broker.v1.Broker/Attest"
	name    string // "Attest"
	admin   bool   // needs the admin credential
	maxSize int64
	rate    string // rate class; "" for admin methods
	// onlyRefusals: the call draws from its rate bucket only when it is
	// refused (calls that carry a session token).
	onlyRefusals bool
}

// attestMessageSize fits the two event logs a node may send (each at most
// evidence.MaxLogSize) plus quote, signature, PCRs and tag certification.
const attestMessageSize = 2*evidence.MaxLogSize + 1<<20

// methodDefaults sizes each method's requests by what it carries; every
// method of the API must be listed (a test checks it), so a new method gets
// a deliberate limit.
var methodDefaults = map[string]struct {
	maxSize int64
	rate    string
}{
	// Broker: reached without a credential.
	"Info":           {4 << 10, ratePublic},
	"GetWrappingKey": {4 << 10, ratePublic},
	"EnrollStart":    {64 << 10, rateEnroll}, // EK certificate and public key (16 KiB each at most), AK parameters
	"EnrollFinish":   {4 << 10, rateEnroll},
	"Challenge":      {4 << 10, rateAttest},
	"Attest":         {attestMessageSize, rateAttest},
	"NodeTags":       {4 << 10, rateAttest},
	"Unwrap":         {64 << 10, rateUnwrap}, // token and one layer annotation
	"Explain":        {4 << 10, rateUnwrap},
	"JWKS":           {4 << 10, ratePublic},
	// Admin: authenticated before the body is read.
	"CreateKey":           {64 << 10, ""},
	"ListKeys":            {4 << 10, ""},
	"ApplyPolicy":         {4 << 20, ""}, // policy YAML, allow-lists included
	"ListPolicies":        {4 << 10, ""},
	"CreateJoinToken":     {4 << 10, ""},
	"ApproveNode":         {4 << 10, ""},
	"RevokeNode":          {4 << 10, ""},
	"RemoveNode":          {4 << 10, ""},
	"ListNodes":           {4 << 10, ""},
	"ListAudit":           {4 << 10, ""},
	"TagNode":             {64 << 10, ""},
	"LearnPolicy":         {4 << 10, ""},
	"GetNode":             {4 << 10, ""},
	"RotateKey":           {4 << 10, ""},
	"DisableKey":          {4 << 10, ""},
	"GetKey":              {4 << 10, ""},
	"ListPolicyRevisions": {4 << 10, ""},
	"VerifyAudit":         {4 << 10, ""},
	"AddWebhook":          {8 << 10, ""}, // a URL and event names
	"ListWebhooks":        {4 << 10, ""},
	"RemoveWebhook":       {4 << 10, ""},
	"TestWebhook":         {4 << 10, ""},
}

// DefaultMaxMessageSize is the largest request a method (e.g. "Attest")
// accepts unless limits.maxMessageSize says otherwise.
func DefaultMaxMessageSize(method string) ByteSize {
	if d, ok := methodDefaults[method]; ok {
		return ByteSize(d.maxSize)
	}
	return unlistedMethodSize
}

// unlistedMethodSize applies to a method missing from methodDefaults.
const unlistedMethodSize = 64 << 10

// apiMethods lists the methods of both services.
func apiMethods() []methodSpec {
	var out []methodSpec
	for _, sd := range []struct {
		name    string
		methods []string
		admin   bool
	}{
		{apiv1.Broker_ServiceDesc.ServiceName, methodNames(apiv1.Broker_ServiceDesc.Methods), false},
		{apiv1.Admin_ServiceDesc.ServiceName, methodNames(apiv1.Admin_ServiceDesc.Methods), true},
	} {
		for _, m := range sd.methods {
			spec := methodSpec{full: "/" + sd.name + "/" + m, name: m, admin: sd.admin, maxSize: unlistedMethodSize}
			if d, ok := methodDefaults[m]; ok {
				spec.maxSize, spec.rate = d.maxSize, d.rate
			}
			spec.onlyRefusals = spec.rate == rateUnwrap
			if !spec.admin && spec.rate == "" {
				// An unlisted method callers reach without a credential
				// draws from the strictest bucket.
				spec.rate = rateEnroll
			}
			out = append(out, spec)
		}
	}
	return out
}

// resolved returns the limits with defaults filled in, checked.
func (l Limits) resolved() (Limits, error) {
	d := DefaultLimits()
	r := l
	for _, f := range []struct {
		name string
		v    *int
		def  int
	}{
		{"maxConnections", &r.MaxConnections, d.MaxConnections},
		{"maxConnectionsPerSource", &r.MaxConnectionsPerSource, d.MaxConnectionsPerSource},
		{"maxStreamsPerConnection", &r.MaxStreamsPerConnection, d.MaxStreamsPerConnection},
		{"maxRequests", &r.MaxRequests, d.MaxRequests},
		{"maxRequestsPerSource", &r.MaxRequestsPerSource, d.MaxRequestsPerSource},
		{"maxSources", &r.MaxSources, d.MaxSources},
		{"sourcePrefixIPv4", &r.SourcePrefixIPv4, d.SourcePrefixIPv4},
		{"sourcePrefixIPv6", &r.SourcePrefixIPv6, d.SourcePrefixIPv6},
	} {
		if *f.v < 0 {
			return r, fmt.Errorf("limits.%s is %d; it must be positive (0 takes the default, %d)", f.name, *f.v, f.def)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	for _, f := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"handshakeTimeout", &r.HandshakeTimeout, d.HandshakeTimeout},
		{"idleTimeout", &r.IdleTimeout, d.IdleTimeout},
		{"maxConnectionAge", &r.MaxConnectionAge, d.MaxConnectionAge},
		{"keepaliveMinInterval", &r.KeepaliveMinInterval, d.KeepaliveMinInterval},
		{"requestTimeout", &r.RequestTimeout, d.RequestTimeout},
		{"auditSampleInterval", &r.AuditSampleInterval, d.AuditSampleInterval},
	} {
		if *f.v < 0 {
			return r, fmt.Errorf("limits.%s is %s; it must be positive (0 takes the default, %s)", f.name, *f.v, f.def)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	for _, f := range []struct {
		name string
		v    *ByteSize
		def  ByteSize
	}{
		{"maxRequestBytes", &r.MaxRequestBytes, d.MaxRequestBytes},
		{"maxRequestBytesPerSource", &r.MaxRequestBytesPerSource, d.MaxRequestBytesPerSource},
	} {
		if *f.v < 0 {
			return r, fmt.Errorf("limits.%s is %s; it must be positive (0 takes the default, %s)", f.name, *f.v, f.def)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	if r.SourcePrefixIPv4 > 32 || r.SourcePrefixIPv6 > 128 {
		return r, fmt.Errorf("limits.sourcePrefixIPv4 must be 1-32 and limits.sourcePrefixIPv6 1-128")
	}
	if r.MaxConnectionsPerSource > r.MaxConnections {
		r.MaxConnectionsPerSource = r.MaxConnections
	}
	if r.MaxRequestsPerSource > r.MaxRequests {
		r.MaxRequestsPerSource = r.MaxRequests
	}
	if r.MaxRequestBytesPerSource > r.MaxRequestBytes {
		r.MaxRequestBytesPerSource = r.MaxRequestBytes
	}
	rates := map[string]Rate{}
	for k, v := range d.Rates {
		rates[k] = v
	}
	for k, v := range l.Rates {
		if _, ok := d.Rates[k]; !ok {
			return r, fmt.Errorf("limits.rates: unknown class %q (classes: %s)", k, strings.Join(sortedKeys(d.Rates), ", "))
		}
		if v.PerSecond <= 0 || v.Burst <= 0 || math.IsInf(v.PerSecond, 0) || math.IsNaN(v.PerSecond) {
			return r, fmt.Errorf("limits.rates.%s: perSecond and burst must be positive", k)
		}
		rates[k] = v
	}
	r.Rates = rates
	known := map[string]bool{}
	for _, m := range apiMethods() {
		known[m.name] = true
	}
	for k, v := range l.MaxMessageSize {
		if !known[k] {
			return r, fmt.Errorf("limits.maxMessageSize: unknown method %q", k)
		}
		if v <= 0 || v > math.MaxInt32 {
			return r, fmt.Errorf("limits.maxMessageSize.%s must be between 1 byte and 2 GiB", k)
		}
	}
	// A request the budget could never admit would be refused as busy
	// for ever: say so at start instead.
	for _, m := range r.methods() {
		if need := requestWeight(m.maxSize); !m.admin && need > int64(r.MaxRequestBytesPerSource) {
			return r, fmt.Errorf("limits: the largest %s request accepted (limits.maxMessageSize.%s, %s) needs %s of request memory, more than limits.maxRequestBytesPerSource (%s) allows",
				m.name, m.name, ByteSize(m.maxSize), ByteSize(need), r.MaxRequestBytesPerSource)
		}
	}
	return r, nil
}

// methods returns the method table under these (resolved) limits.
func (l Limits) methods() map[string]methodSpec {
	out := map[string]methodSpec{}
	for _, m := range apiMethods() {
		if v, ok := l.MaxMessageSize[m.name]; ok {
			m.maxSize = int64(v)
		}
		out[m.full] = m
	}
	return out
}

// requestWeight is what a request of n bytes counts against the byte
// budget: the bytes received and the decoded message, plus the stream and
// buffers around them.
func requestWeight(n int64) int64 { return 2*n + requestOverhead }

// maxMessageSize is the largest request any method accepts: gRPC's own
// server-wide bound, behind the per-method ones.
func maxMessageSize(methods map[string]methodSpec) int {
	n := int64(0)
	for _, m := range methods {
		n = max(n, m.maxSize)
	}
	return int(n)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// ByteSize is a size in bytes; in YAML and flags it is an integer or a
// number with a unit: 512KiB, 16MiB, 1GiB (KB, MB and GB mean the same
// powers of two here, to keep one meaning).
type ByteSize int64

// ParseByteSize reads "16MiB", "64KiB", "1GiB", "4096" or "4096B".
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"GB", 1 << 30}, {"MB", 1 << 20}, {"KB", 1 << 10}, {"B", 1}} {
		if rest, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %q: want a whole number of bytes, KiB, MiB or GiB (e.g. 16MiB)", s)
	}
	return ByteSize(n * mult), nil
}

func (b ByteSize) String() string {
	switch n := int64(b); {
	case n != 0 && n%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", n>>30)
	case n != 0 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n != 0 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	default:
		return fmt.Sprintf("%dB", n)
	}
}

// UnmarshalYAML accepts an integer or a string with a unit.
func (b *ByteSize) UnmarshalYAML(unmarshal func(any) error) error {
	var s string
	if err := unmarshal(&s); err != nil {
		return err
	}
	v, err := ParseByteSize(s)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// MarshalYAML writes the size with its unit.
func (b ByteSize) MarshalYAML() (any, error) { return b.String(), nil }

// Set and Type make ByteSize a pflag.Value.
func (b *ByteSize) Set(s string) error {
	v, err := ParseByteSize(s)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// Type names the flag value type in --help.
func (b *ByteSize) Type() string { return "size" }

func methodNames(ms []grpc.MethodDesc) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.MethodName
	}
	return out
}
