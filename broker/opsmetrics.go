package broker

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/attested-dev/attested/broker/store"
)

// Refusal classes: the values of the "class" label of
// attested_broker_refusals_total, a fixed set.
const (
	RefusalPolicy   = "policy"   // the key's policy does not hold for the session's claims
	RefusalSession  = "session"  // session unknown, expired, ended, or its node may not release
	RefusalEvidence = "evidence" // the node's signed evidence was refused at appraisal
	RefusalKey      = "key"      // the layer names a key or version that cannot release
)

// opsMetrics are what operators watch: releases, refusals, latencies,
// nodes by status, live sessions and the store's size.
type opsMetrics struct {
	releases  prometheus.Counter
	refusals  *prometheus.CounterVec
	appraisal *prometheus.HistogramVec
	release   *prometheus.HistogramVec
}

// latencyBuckets span a warm release (~1 ms) to a slow appraisal (seconds).
var latencyBuckets = []float64{0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

func (s *Server) registerOpsMetrics() {
	m := &opsMetrics{
		releases: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "attested_broker_releases_total",
			Help: "Layer keys released to attested nodes.",
		}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attested_broker_refusals_total",
			Help: "Releases and appraisals refused to callers that authenticated (by session or signed evidence), by class: policy, session, evidence, key.",
		}, []string{"class"}),
		appraisal: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "attested_broker_appraisal_duration_seconds",
			Help:    "Time to appraise a node's evidence (quote, session key, event logs, policies), by result.",
			Buckets: latencyBuckets,
		}, []string{"result"}),
		release: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "attested_broker_release_duration_seconds",
			Help:    "Time to decide an unwrap (session, policy, opening the layer key, sealing it to the session), by result.",
			Buckets: latencyBuckets,
		}, []string{"result"}),
	}
	for _, c := range []string{RefusalPolicy, RefusalSession, RefusalEvidence, RefusalKey} {
		m.refusals.WithLabelValues(c)
	}
	s.ops = m
	s.metrics.reg.MustRegister(m.releases, m.refusals, m.appraisal, m.release, &storeCollector{s: s})
}

// storeCollector reports what the store holds at scrape time, cached
// briefly so a tight scrape loop cannot turn into a full scan per scrape.
type storeCollector struct {
	s *Server

	mu     sync.Mutex
	at     time.Time
	nodes  map[string]int
	stats  store.Stats
	failed bool
}

var (
	nodesDesc    = prometheus.NewDesc("attested_broker_nodes", "Enrolled nodes by status (trusted, untrusted, stale, revoked; pending counts enrollments waiting for approval).", []string{"status"}, nil)
	sessionsDesc = prometheus.NewDesc("attested_broker_sessions_live", "Sessions that have not expired.", nil, nil)
	storeDesc    = prometheus.NewDesc("attested_broker_store_size_bytes", "Size of the broker's store.", nil, nil)
	scrapeDesc   = prometheus.NewDesc("attested_broker_store_scrape_error", "1 when the store could not be read for these metrics.", nil, nil)
)

// storeScrapeEvery bounds how often a scrape reads the whole store.
const storeScrapeEvery = 2 * time.Second

func (c *storeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- nodesDesc
	ch <- sessionsDesc
	ch <- storeDesc
	ch <- scrapeDesc
}

func (c *storeCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.at) > storeScrapeEvery {
		c.refresh()
	}
	for _, st := range []string{StatusTrusted, StatusUntrusted, StatusStale, StatusRevoked, StatusPending} {
		ch <- prometheus.MustNewConstMetric(nodesDesc, prometheus.GaugeValue, float64(c.nodes[st]), st)
	}
	ch <- prometheus.MustNewConstMetric(sessionsDesc, prometheus.GaugeValue, float64(c.stats.LiveSessions))
	ch <- prometheus.MustNewConstMetric(storeDesc, prometheus.GaugeValue, float64(c.stats.Bytes))
	failed := 0.0
	if c.failed {
		failed = 1
	}
	ch <- prometheus.MustNewConstMetric(scrapeDesc, prometheus.GaugeValue, failed)
}

func (c *storeCollector) refresh() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	now := c.s.now()
	c.at, c.failed = time.Now(), false
	nodes, err := c.s.store.ListNodes(ctx)
	if err != nil {
		c.failed = true
		return
	}
	c.nodes = map[string]int{}
	for _, n := range nodes {
		st, _ := c.s.statusOf(n, now)
		c.nodes[st]++
	}
	if pending, err := c.s.store.ListPending(ctx, now); err == nil {
		c.nodes[StatusPending] += len(pending)
	} else {
		c.failed = true
	}
	if c.stats, err = c.s.store.Stats(ctx, now); err != nil {
		c.failed = true
	}
}
