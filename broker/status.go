package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/evidence"
	"github.com/attested-dev/attested/broker/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Node status is what is true of a node now, for operators, dashboards,
// webhooks and Kubernetes placement:
//
//	revoked    an admin revoked it
//	pending    enrolled, waiting for approval
//	stale      no authenticated evidence within staleAfter
//	untrusted  its last evidence was refused, or satisfies no key's policy
//	trusted    its last evidence was accepted and satisfies at least one
//	           key's policy (or there are no keys yet)
//
// Status follows appraisals, not releases: a node allowed one key and
// refused another does not flap with every pull (each refusal is audited
// and announced as a refusal event instead).
const (
	StatusTrusted   = "trusted"
	StatusUntrusted = "untrusted"
	StatusStale     = "stale"
	StatusRevoked   = "revoked"
	StatusPending   = "pending"
)

// DefaultStaleAfter is three times the agent's default re-attestation
// period.
const DefaultStaleAfter = 6 * time.Minute

// maxHistory bounds the status changes kept per node.
const maxHistory = 32

// statusOf computes a node's status at now.
func (s *Server) statusOf(n store.Node, now time.Time) (status, reason string) {
	switch n.State {
	case store.NodeRevoked:
		return StatusRevoked, "revoked by an admin"
	case store.NodePending:
		return StatusPending, "enrolled, waiting for an admin's approval"
	}
	seen := n.LastSeen
	if seen.IsZero() {
		seen = n.LastAttested
	}
	if seen.IsZero() {
		return StatusStale, "no evidence received since enrollment"
	}
	if age := now.Sub(seen); age > s.staleAfter() {
		return StatusStale, fmt.Sprintf("no evidence for %s (staleAfter %s); last at %s", age.Round(time.Second), s.staleAfter(), seen.UTC().Format(time.RFC3339))
	}
	if n.Trust == StatusUntrusted {
		return StatusUntrusted, n.TrustReason
	}
	return StatusTrusted, n.TrustReason
}

func (s *Server) staleAfter() time.Duration {
	if s.cfg.StaleAfter > 0 {
		return s.cfg.StaleAfter
	}
	return DefaultStaleAfter
}

// statusChange is a change recordStatus made, for announcing it once the
// transaction that made it committed.
type statusChange struct {
	node, from, to, reason string
	at                     time.Time
}

// recordStatus brings the node's stored status up to date within the
// transaction that changed it, keeping a bounded history. It returns the
// change, if any.
func (s *Server) recordStatus(n *store.Node, now time.Time) *statusChange {
	status, reason := s.statusOf(*n, now)
	if status == n.Status && reason == n.StatusReason {
		return nil
	}
	from := n.Status
	n.Status, n.StatusReason = status, reason
	if status != from {
		n.StatusSince = now
	}
	n.History = append(n.History, store.StatusChange{Time: now, Status: status, Reason: reason})
	if len(n.History) > maxHistory {
		n.History = n.History[len(n.History)-maxHistory:]
	}
	if status == from {
		return nil // the reason moved; not a change to announce
	}
	return &statusChange{node: n.Name, from: from, to: status, reason: reason, at: now}
}

// announce tells webhooks and metrics of committed status changes.
func (s *Server) announce(ctx context.Context, changes ...*statusChange) {
	for _, c := range changes {
		if c == nil || c.from == "" {
			// Nothing to announce for a status first recorded.
			continue
		}
		s.metrics.statusChanges.WithLabelValues(c.to).Inc()
		s.notify(ctx, Event{Kind: "status", Time: c.at, Node: c.node, Status: c.to, PreviousStatus: c.from, Reason: c.reason})
	}
}

// CheckStatus records the status of every node as of now (nodes go stale
// by the clock alone); Run calls it periodically.
func (s *Server) CheckStatus(ctx context.Context) error {
	nodes, err := s.store.ListNodes(ctx)
	if err != nil {
		return err
	}
	now := s.now()
	for _, n := range nodes {
		if st, reason := s.statusOf(n, now); st == n.Status && reason == n.StatusReason {
			continue
		}
		var change *statusChange
		if _, err := s.store.UpdateNode(ctx, n.Name, func(n *store.Node) error {
			change = s.recordStatus(n, now)
			return nil
		}); err != nil && ctx.Err() == nil {
			s.log.Warn("recording node status failed", "node", n.Name, "err", err)
			continue
		}
		s.announce(ctx, change)
	}
	return nil
}

// trustFromVerdicts is a node's trust after accepted evidence: trusted if
// the policy of some key holds (or no key exists yet), untrusted with every
// key policy's failing clauses otherwise. Policies no key uses release
// nothing and do not count.
func trustFromVerdicts(verdicts []policyVerdict, keys []store.Key) (trust, reason string) {
	used := map[string]bool{}
	for _, k := range keys {
		used[k.Policy] = true
	}
	if len(used) == 0 {
		return StatusTrusted, "evidence verified (no keys on this broker yet)"
	}
	var pass, fail []string
	for _, v := range verdicts {
		switch {
		case !used[v.name]:
		case v.err != nil:
			fail = append(fail, v.err.Error())
		case v.res.Allowed:
			pass = append(pass, v.name)
		default:
			fail = append(fail, v.res.Error())
		}
	}
	if len(pass) > 0 {
		return StatusTrusted, "evidence verified; satisfies policy " + strings.Join(pass, ", ")
	}
	if len(fail) == 0 {
		return StatusUntrusted, "no policy of a key exists on this broker"
	}
	return StatusUntrusted, "evidence satisfies no key's policy: " + strings.Join(fail, "; ")
}

// certifiedTags are the node's tags when its TPM certified exactly them.
func certifiedTags(n store.Node, certifiedDigest []byte) map[string]string {
	if certifiedDigest == nil || len(n.Tags) == 0 {
		return nil
	}
	if string(binding.TagDigest(n.Name, n.Tags)) != string(certifiedDigest) {
		return nil
	}
	return n.Tags
}

// GetNode implements apiv1.AdminServer: what is true of the node now, its
// last evidence, its live sessions and its status history.
func (a adminServer) GetNode(ctx context.Context, req *apiv1.NodeRequest) (*apiv1.NodeDetail, error) {
	s := a.s
	n, err := s.store.GetNode(ctx, req.GetName())
	if err != nil {
		return nil, storeErr(fmt.Sprintf("node %q", req.GetName()), err)
	}
	out := &apiv1.NodeDetail{Node: s.nodeToAPI(n)}
	if !n.LastAttested.IsZero() {
		out.LastEvidenceUnix = n.LastAttested.Unix()
		var facts evidence.Facts
		if len(n.LastFacts) > 0 {
			if err := json.Unmarshal(n.LastFacts, &facts); err != nil {
				return nil, status.Errorf(codes.Internal, "node %q: last facts: %v", n.Name, err)
			}
		}
		out.Evidence = append(pcrLines(n.LastPCRs), facts.Lines()...)
	}
	sessions, err := s.store.NodeSessions(ctx, n.Name, s.now())
	if err != nil {
		return nil, storeErr("sessions", err)
	}
	for _, sess := range sessions {
		out.Sessions = append(out.Sessions, &apiv1.SessionInfo{CreatedUnix: sess.Created.Unix(), ExpiresUnix: sess.Expires.Unix()})
	}
	for _, h := range n.History {
		out.History = append(out.History, &apiv1.StatusChange{TimeUnix: h.Time.Unix(), Status: h.Status, Reason: h.Reason})
	}
	return out, nil
}

// pcrLines shows the PCR values of the last accepted quote, briefly.
func pcrLines(pcrs map[int][]byte) []string {
	idx := make([]int, 0, len(pcrs))
	for i := range pcrs {
		idx = append(idx, i)
	}
	sort.Ints(idx)
	var out []string
	for _, i := range idx {
		out = append(out, fmt.Sprintf("PCR %2d: %x", i, pcrs[i]))
	}
	return out
}
