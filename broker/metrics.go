package broker

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Reasons a caller that has not authenticated is refused: the values of the
// "reason" label of attested_broker_unauthenticated_refusals_total. The set
// is fixed so that no caller can grow the number of time series.
const (
	// Before the request body is read.
	ReasonUnknownMethod   = "unknown_method"    // no such gRPC method
	ReasonAdminCredential = "admin_credential"  // Admin call without the admin credential
	ReasonRateLimited     = "rate_limited"      // per-source request rate exceeded
	ReasonTooManyRequests = "too_many_requests" // requests in flight, in total or from the source
	ReasonTooLarge        = "message_too_large" // request larger than its method accepts
	ReasonBusy            = "busy"              // request bytes in flight, in total or from the source
	ReasonMalformed       = "malformed"         // no message, compressed, or does not decode
	// By the handlers, through auditUnauthenticated.
	ReasonEvidenceUnverified = "evidence_unverified" // attestation evidence that did not authenticate (nonce, quote)
	ReasonEnrollmentRefused  = "enrollment_refused"  // enrollment refused before credential activation proved the TPM
	// At accept.
	ReasonConnectionLimit       = "connection_limit"        // maxConnections open
	ReasonSourceConnectionLimit = "source_connection_limit" // maxConnectionsPerSource open from the source
	ReasonConnectionRate        = "connection_rate"         // the source opens connections faster than rates.connect
)

// metrics are the broker's Prometheus metrics, in a registry the Server
// owns (not the global one), so that tests and several servers in one
// process stay apart.
type metrics struct {
	reg          *prometheus.Registry
	refusals     *prometheus.CounterVec
	requests     *prometheus.CounterVec
	connsRefused *prometheus.CounterVec
	suppressed   *prometheus.CounterVec
	// statusChanges counts node status changes by the new status.
	statusChanges *prometheus.CounterVec
}

func newMetrics(g *guard) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attested_broker_unauthenticated_refusals_total",
			Help: "Requests refused before the caller had authenticated, by gRPC method and reason.",
		}, []string{"method", "reason"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attested_broker_requests_total",
			Help: "Requests handled, by gRPC method and status code.",
		}, []string{"method", "code"}),
		connsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attested_broker_connections_refused_total",
			Help: "Connections closed at accept because a connection limit was reached, by reason.",
		}, []string{"reason"}),
		suppressed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attested_broker_audit_refusals_sampled_out_total",
			Help: "Refusals of unauthenticated callers not written to the audit log one by one (folded into a sampled record's count), by method and reason.",
		}, []string{"method", "reason"}),
	}
	m.statusChanges = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "attested_broker_node_status_changes_total",
		Help: "Node status changes, by the status entered.",
	}, []string{"status"})
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	m.reg.MustRegister(m.refusals, m.requests, m.connsRefused, m.suppressed, m.statusChanges,
		gauge("attested_broker_open_connections", "Client connections open.", func() float64 { return float64(g.stats().conns) }),
		gauge("attested_broker_requests_in_flight", "Requests in flight from callers without the admin credential.", func() float64 { return float64(g.stats().requests) }),
		gauge("attested_broker_request_bytes_in_flight", "Memory held by request bodies of callers without the admin credential (received bytes plus the decoded message).", func() float64 { return float64(g.stats().bytes) }),
		gauge("attested_broker_sources_tracked", "Sources (IPv4 addresses, IPv6 prefixes) in the rate and connection table.", func() float64 { return float64(g.stats().sources) }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Metrics returns the broker's metric registry, for a /metrics endpoint
// (promhttp.HandlerFor) or for more collectors.
func (s *Server) Metrics() *prometheus.Registry { return s.metrics.reg }
