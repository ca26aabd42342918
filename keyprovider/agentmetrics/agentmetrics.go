// Package agentmetrics holds the agent's Prometheus metrics, apart from the
// keyprovider so exec mode never links the metrics library.
package agentmetrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// Metrics are the agent's Prometheus metrics: what ocicrypt asked of it,
// how long it took, and how its attestations went.
type Metrics struct {
	requests     *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	attestations *prometheus.CounterVec
	quotes       prometheus.Counter
	expiry       prometheus.Gauge
}

// NewMetrics registers the agent's metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attested_agent_requests_total",
			Help: "ocicrypt keyprovider requests served, by method (WrapKey, UnWrapKey) and gRPC code.",
		}, []string{"method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "attested_agent_request_duration_seconds",
			Help:    "Time to serve a keyprovider request, by method.",
			Buckets: []float64{0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10},
		}, []string{"method"}),
		attestations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attested_agent_attestations_total",
			Help: "Attestations of this node (quote, appraisal, new session), by result.",
		}, []string{"result"}),
		quotes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "attested_agent_tpm_quotes_total",
			Help: "TPM quotes made.",
		}),
		expiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "attested_agent_session_expiry_timestamp_seconds",
			Help: "When the current attestation session expires (Unix time; 0 before the first).",
		}),
	}
	for _, r := range []string{"ok", "failed"} {
		m.attestations.WithLabelValues(r)
	}
	reg.MustRegister(m.requests, m.duration, m.attestations, m.quotes, m.expiry)
	return m
}

// Interceptor counts and times the keyprovider service's requests.
func (m *Metrics) Interceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := h(ctx, req)
		method := info.FullMethod
		if i := len(method) - 1; i > 0 {
			for i >= 0 && method[i] != '/' {
				i--
			}
			method = method[i+1:]
		}
		m.requests.WithLabelValues(method, status.Code(err).String()).Inc()
		m.duration.WithLabelValues(method).Observe(time.Since(start).Seconds())
		return resp, err
	}
}

// Attested records an attestation's outcome and its session's expiry.
func (m *Metrics) Attested(expires time.Time, err error) {
	if err != nil {
		m.attestations.WithLabelValues("failed").Inc()
		return
	}
	m.attestations.WithLabelValues("ok").Inc()
	m.expiry.Set(float64(expires.Unix()))
}

// Quoted counts a TPM quote.
func (m *Metrics) Quoted() { m.quotes.Inc() }
