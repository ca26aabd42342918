package broker

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"

	"github.com/attested-dev/attested/broker/store"
)

// auditUnauthenticated records a refusal of a caller that has not proven
// anything yet (its evidence or enrollment did not authenticate). Such
// refusals cost an attacker nothing, so they are counted in
// attested_broker_unauthenticated_refusals_total{method,reason} one by one
// but written to the audit log sampled: at most one record per method and
// reason per limits.auditSampleInterval, each saying how many refusals it
// stands for. reason is one of the Reason constants; ev is the record as it
// would be written unsampled. The record is written before it returns, so
// a handler's refusal is in the audit when the caller reads its error.
func (s *Server) auditUnauthenticated(ctx context.Context, reason string, ev store.AuditEvent) {
	method, src := "unknown", ""
	if full, ok := grpc.Method(ctx); ok {
		if m, ok := s.methods[full]; ok {
			method = m.name
		}
	}
	if p, ok := peer.FromContext(ctx); ok {
		src = s.guard.sourceLabel(s.guard.sourceOf(p.Addr))
	}
	if rec, ok := s.sampleRefusal(method, reason, src, ev); ok {
		s.audit(ctx, rec)
	}
}

// sampleRefusal counts a refusal and returns the audit record to write now,
// if this refusal's method and reason have had none for an interval.
func (s *Server) sampleRefusal(method, reason, src string, ev store.AuditEvent) (store.AuditEvent, bool) {
	s.metrics.refusals.WithLabelValues(method, reason).Inc()
	return s.sampleAudit(method, reason, src, ev)
}

// sampleAudit returns the audit record to write now, if any (see
// sampleRefusal), without counting the refusal.
func (s *Server) sampleAudit(method, reason, src string, ev store.AuditEvent) (store.AuditEvent, bool) {
	if ev.Kind == "" {
		ev.Kind = "refuse"
	}
	if src != "" && ev.Actor == "" {
		ev.Actor = "unauthenticated " + src
	}
	rec, ok := s.sampler.admit(s.now(), sampleKey{method, reason}, ev)
	if !ok {
		s.metrics.suppressed.WithLabelValues(method, reason).Inc()
	}
	return rec, ok
}

// refuseEarly counts and samples a refusal made before the request body
// was read (in the tap handle or before decoding). The audit record, when
// one is due, is written in the background: the tap handle runs on the
// connection's reader and must not wait for a disk write.
func (s *Server) refuseEarly(method, reason, src, msg string) {
	rec, ok := s.sampleRefusal(method, reason, src, store.AuditEvent{Reason: fmt.Sprintf("%s request refused before it was read: %s", method, msg)})
	if ok {
		go s.audit(context.Background(), rec)
	}
}

// refuseConnection samples a connection closed at accept into the audit
// (attested_broker_connections_refused_total counts them all).
func (s *Server) refuseConnection(reason, src, msg string) {
	s.metrics.connsRefused.WithLabelValues(reason).Inc()
	rec, ok := s.sampleAudit("connection", reason, src, store.AuditEvent{Reason: "connection from " + src + " closed at accept: " + msg})
	if ok {
		go s.audit(context.Background(), rec)
	}
}

// flushSampledAudit writes, for every method and reason whose interval has
// passed with refusals left uncounted in the audit, one record carrying
// their number; force writes them whatever the interval (at shutdown).
func (s *Server) flushSampledAudit(ctx context.Context, force bool) {
	for _, rec := range s.sampler.due(s.now(), force) {
		s.audit(ctx, rec)
	}
}

// auditSampler lets through at most one audit record per key and interval.
// Its keys are method and reason names from fixed sets, so it stays small
// whatever callers send.
type auditSampler struct {
	interval time.Duration
	mu       sync.Mutex
	keys     map[sampleKey]*sampleState
}

type sampleKey struct{ method, reason string }

type sampleState struct {
	written    time.Time        // when the last record for this key was written
	suppressed uint64           // refusals since then not written one by one
	since      time.Time        // the first of them
	last       store.AuditEvent // the latest of them, shown in the summary
}

func newAuditSampler(interval time.Duration) *auditSampler {
	return &auditSampler{interval: interval, keys: map[sampleKey]*sampleState{}}
}

func (a *auditSampler) admit(now time.Time, k sampleKey, ev store.AuditEvent) (store.AuditEvent, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.keys[k]
	if st == nil {
		st = &sampleState{}
		a.keys[k] = st
	}
	// A clock stepped back must not open the gate early or shut it for
	// good: an interval counts from the last write, in either direction.
	if !st.written.IsZero() && now.Sub(st.written) < a.interval && st.written.Sub(now) < a.interval {
		if st.suppressed == 0 {
			st.since = now
		}
		st.suppressed++
		st.last = ev
		return store.AuditEvent{}, false
	}
	rec := ev
	rec.Reason = fmt.Sprintf("%s [unauthenticated %s refusal (%s); the audit keeps at most one such record per %s", ev.Reason, k.method, k.reason, a.interval)
	if st.suppressed > 0 {
		rec.Reason += fmt.Sprintf("; this one also stands for %d more since %s", st.suppressed, st.since.UTC().Format(time.RFC3339))
	}
	rec.Reason += "]"
	st.written, st.suppressed = now, 0
	return rec, true
}

// due returns one summary record per key with refusals not yet written
// whose interval has passed (or all of them, with force).
func (a *auditSampler) due(now time.Time, force bool) []store.AuditEvent {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []store.AuditEvent
	for k, st := range a.keys {
		if st.suppressed == 0 || (!force && now.Sub(st.written) < a.interval && st.written.Sub(now) < a.interval) {
			continue
		}
		last := st.last
		var b strings.Builder
		fmt.Fprintf(&b, "%d more unauthenticated %s refusals (%s) since %s, recorded here as one (at most one record per %s); the last",
			st.suppressed, k.method, k.reason, st.since.UTC().Format(time.RFC3339), a.interval)
		if last.Node != "" {
			// The name is the caller's claim, not a verified node.
			fmt.Fprintf(&b, ", naming node %q", last.Node)
		}
		fmt.Fprintf(&b, ": %s", last.Reason)
		// Many callers may stand behind the count: the record names no node.
		out = append(out, store.AuditEvent{Kind: last.Kind, Actor: last.Actor, Reason: b.String()})
		st.written, st.suppressed = now, 0
	}
	return out
}

// peerAddr is the caller's address, or nil.
func peerAddr(ctx context.Context) net.Addr {
	if p, ok := peer.FromContext(ctx); ok {
		return p.Addr
	}
	return nil
}
