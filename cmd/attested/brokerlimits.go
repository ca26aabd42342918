package main

import (
	"github.com/spf13/pflag"

	"github.com/attested-dev/attested/broker"
)

// limitFlags registers the 'broker serve' flags for the limits on what
// callers can make the broker hold, and returns what applies those given
// on the command line over broker.yaml's "limits" section. The rest of the
// limits (per-method sizes, rates) are in broker.yaml only.
func limitFlags(fs *pflag.FlagSet) func(*broker.Config) {
	d := broker.DefaultLimits()
	var l broker.Limits
	attest := broker.DefaultMaxMessageSize("Attest")
	fs.IntVar(&l.MaxConnections, "max-connections", d.MaxConnections, "open client connections at most; more are closed at accept (broker.yaml: limits.maxConnections)")
	fs.IntVar(&l.MaxConnectionsPerSource, "max-connections-per-source", d.MaxConnectionsPerSource, "open connections from one IPv4 address or IPv6 /64 at most (broker.yaml: limits.maxConnectionsPerSource)")
	fs.DurationVar(&l.HandshakeTimeout, "handshake-timeout", d.HandshakeTimeout, "time a new connection has for its TLS and HTTP/2 handshake (broker.yaml: limits.handshakeTimeout)")
	fs.DurationVar(&l.IdleTimeout, "idle-timeout", d.IdleTimeout, "close connections with no request in flight for this long (broker.yaml: limits.idleTimeout)")
	fs.IntVar(&l.MaxRequests, "max-requests", d.MaxRequests, "requests in flight from callers without the admin credential, in total (broker.yaml: limits.maxRequests)")
	fs.IntVar(&l.MaxRequestsPerSource, "max-requests-per-source", d.MaxRequestsPerSource, "requests in flight from one source (broker.yaml: limits.maxRequestsPerSource)")
	fs.DurationVar(&l.RequestTimeout, "request-timeout", d.RequestTimeout, "bound on a whole request, receiving its body included (broker.yaml: limits.requestTimeout)")
	l.MaxRequestBytes, l.MaxRequestBytesPerSource = d.MaxRequestBytes, d.MaxRequestBytesPerSource
	fs.Var(&l.MaxRequestBytes, "max-request-bytes", "memory request bodies of callers without the admin credential may hold at once, e.g. 256MiB (broker.yaml: limits.maxRequestBytes)")
	fs.Var(&l.MaxRequestBytesPerSource, "max-request-bytes-per-source", "share of --max-request-bytes one source may hold (broker.yaml: limits.maxRequestBytesPerSource)")
	fs.Var(&attest, "max-attest-size", "largest Attest request (evidence with event logs) accepted (broker.yaml: limits.maxMessageSize.Attest)")
	return func(c *broker.Config) {
		set := func(name string, apply func()) {
			if fs.Changed(name) {
				apply()
			}
		}
		set("max-connections", func() { c.Limits.MaxConnections = positive(l.MaxConnections) })
		set("max-connections-per-source", func() { c.Limits.MaxConnectionsPerSource = positive(l.MaxConnectionsPerSource) })
		set("handshake-timeout", func() { c.Limits.HandshakeTimeout = positive(l.HandshakeTimeout) })
		set("idle-timeout", func() { c.Limits.IdleTimeout = positive(l.IdleTimeout) })
		set("max-requests", func() { c.Limits.MaxRequests = positive(l.MaxRequests) })
		set("max-requests-per-source", func() { c.Limits.MaxRequestsPerSource = positive(l.MaxRequestsPerSource) })
		set("request-timeout", func() { c.Limits.RequestTimeout = positive(l.RequestTimeout) })
		set("max-request-bytes", func() { c.Limits.MaxRequestBytes = positive(l.MaxRequestBytes) })
		set("max-request-bytes-per-source", func() { c.Limits.MaxRequestBytesPerSource = positive(l.MaxRequestBytesPerSource) })
		set("max-attest-size", func() {
			m := map[string]broker.ByteSize{}
			for k, v := range c.Limits.MaxMessageSize {
				m[k] = v
			}
			m["Attest"] = positive(attest)
			c.Limits.MaxMessageSize = m
		})
	}
}

// positive makes an explicit 0 on the command line an error (the limits
// refuse negative values) rather than a silent default.
func positive[T ~int | ~int64](v T) T {
	if v == 0 {
		return -1
	}
	return v
}
