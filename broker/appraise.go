package broker

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/evidence"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// NumPCRs is the number of PCRs a quote must cover (the SHA-256 bank).
const NumPCRs = 24

// Challenge implements apiv1.BrokerServer.
func (s *Server) Challenge(ctx context.Context, req *apiv1.ChallengeRequest) (*apiv1.ChallengeResponse, error) {
	n, err := s.activeNode(ctx, req.GetNode())
	if err != nil {
		return nil, err
	}
	nonce := randomBytes(32)
	exp := s.now().Add(s.cfg.NonceTTL)
	if err := s.store.PutNonce(ctx, nonce, store.Nonce{Node: n.Name, Expires: exp}); err != nil {
		return nil, storeErr("nonce", err)
	}
	return &apiv1.ChallengeResponse{Nonce: nonce, ExpiresUnix: exp.Unix()}, nil
}

// activeNode returns the node if it may attest, or a status saying why not.
func (s *Server) activeNode(ctx context.Context, name string) (store.Node, error) {
	n, err := s.store.GetNode(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return n, status.Errorf(codes.PermissionDenied, "node %q is not enrolled with broker %s; run 'attested node enroll' on it", name, s.cfg.ID)
	}
	if err != nil {
		return n, storeErr("node", err)
	}
	switch n.State {
	case store.NodeActive:
		return n, nil
	case store.NodePending:
		return n, status.Errorf(codes.PermissionDenied, "node %q is enrolled but not approved; an admin must run 'attested node approve %s'", name, name)
	case store.NodeRevoked:
		return n, status.Errorf(codes.PermissionDenied, "node %q is revoked", name)
	}
	return n, status.Errorf(codes.PermissionDenied, "node %q is in unknown state %q", name, n.State)
}

// Attest implements apiv1.BrokerServer. It verifies the quote against the
// enrolled AK and the single-use nonce, and opens a session whose claims
// are the quoted PCR values. Policy is evaluated per key at Unwrap.
func (s *Server) Attest(ctx context.Context, req *apiv1.AttestRequest) (*apiv1.AttestResponse, error) {
	// Nothing before the quote is verified is authenticated: refusals up
	// to there are audited (with a checked name) but change no node.
	if !annotation.ValidName(req.GetNode()) {
		return nil, status.Error(codes.InvalidArgument, "node name is not valid")
	}
	nonce, err := s.store.ConsumeNonce(ctx, req.GetNonce())
	if errors.Is(err, store.ErrNotFound) {
		return nil, s.refuseUnverified(ctx, req.GetNode(), codes.PermissionDenied, "nonce unknown or already used (replayed evidence?); ask for a new challenge")
	}
	if err != nil {
		return nil, storeErr("nonce", err)
	}
	if nonce.Node != req.GetNode() {
		return nil, s.refuseUnverified(ctx, req.GetNode(), codes.PermissionDenied, fmt.Sprintf("nonce was issued to node %q, not %q", nonce.Node, req.GetNode()))
	}
	if s.now().After(nonce.Expires) {
		return nil, s.refuseUnverified(ctx, req.GetNode(), codes.DeadlineExceeded, "nonce expired before the evidence arrived")
	}
	n, err := s.activeNode(ctx, req.GetNode())
	if err != nil {
		return nil, err
	}
	st, err := suite.Lookup(req.GetSessionSuite())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if _, err := st.KEM.NewPublicKey(req.GetSessionPublicKey()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "session public key is not a %s key", st.Name)
	}
	qd := binding.QualifyingData(req.GetNonce(), req.GetSessionPublicKey(), n.Name)
	pcrs, clock, err := verifyQuote(n.AKPublic, req, qd)
	if err != nil {
		return nil, s.refuseUnverified(ctx, n.Name, codes.PermissionDenied, "quote refused: "+err.Error())
	}
	facts, err := appraiseLogs(req, pcrs)
	if err != nil {
		return nil, s.refuseAttest(ctx, n.Name, codes.PermissionDenied, "evidence refused: "+err.Error())
	}
	if len(req.GetTagCertifyInfo()) > 0 {
		facts.CertifiedTagDigest, err = evidence.VerifyTagCertification(n.AKPublic, req.GetTagCertifyInfo(),
			req.GetTagCertifySignature(), req.GetTagNvPublic(), qd)
		if err != nil {
			return nil, s.refuseAttest(ctx, n.Name, codes.PermissionDenied, "evidence refused: "+err.Error())
		}
	}
	factsJSON, err := json.Marshal(facts)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "facts: %v", err)
	}
	token := randomBytes(32)
	now := s.now()
	sess := store.Session{
		TokenHash: hashToken(token), Node: n.Name, PublicKey: req.GetSessionPublicKey(), Suite: st.Name,
		PCRs: pcrs, ResetCount: clock.ResetCount, RestartCount: clock.RestartCount, Facts: factsJSON,
		Created: now, Expires: now.Add(s.cfg.SessionTTL),
	}
	// A TPM's reset counter only grows; going back means old evidence or
	// another TPM. A change means a reboot, which ends older sessions. The
	// check reads the counters in the same transaction that moves them, so
	// concurrent attestations cannot roll them back.
	var rebooted bool
	var backwards string
	if _, err := s.store.UpdateNode(ctx, n.Name, func(n *store.Node) error {
		if n.ClockSeen && (clock.ResetCount < n.ResetCount || (clock.ResetCount == n.ResetCount && clock.RestartCount < n.RestartCount)) {
			backwards = fmt.Sprintf("TPM reset/restart counters went backwards (%d/%d, last seen %d/%d)", clock.ResetCount, clock.RestartCount, n.ResetCount, n.RestartCount)
			return errBackwards
		}
		rebooted = n.ClockSeen && (clock.ResetCount != n.ResetCount || clock.RestartCount != n.RestartCount)
		n.ResetCount, n.RestartCount, n.ClockSeen = clock.ResetCount, clock.RestartCount, true
		n.LastAttested, n.LastPCRs, n.LastFacts = now, pcrs, factsJSON
		if n.Trust != "untrusted" {
			// A verified quote alone does not clear a policy refusal; the
			// next release or refusal decides.
			n.Trust, n.TrustReason = "trusted", "quote verified"
		}
		return nil
	}); errors.Is(err, errBackwards) {
		return nil, s.refuseAttest(ctx, n.Name, codes.PermissionDenied, backwards)
	} else if err != nil {
		return nil, storeErr("node", err)
	}
	if rebooted {
		if err := s.store.DeleteNodeSessions(ctx, n.Name); err != nil {
			return nil, storeErr("sessions", err)
		}
	}
	if err := s.store.PutSession(ctx, sess); err != nil {
		return nil, storeErr("session", err)
	}
	reason := "quote verified; session opened"
	if rebooted {
		reason += " (TPM rebooted since last attestation; older sessions ended)"
	}
	s.audit(ctx, store.AuditEvent{Kind: "attest", Node: n.Name, Allowed: true, Reason: reason})
	return &apiv1.AttestResponse{SessionToken: token, ExpiresUnix: sess.Expires.Unix(),
		ResetCount: clock.ResetCount, RestartCount: clock.RestartCount}, nil
}

// appraiseLogs replays the event logs, when sent, against the verified
// PCR values and derives facts from them.
func appraiseLogs(req *apiv1.AttestRequest, pcrs map[int][]byte) (evidence.Facts, error) {
	var f evidence.Facts
	var err error
	if len(req.GetEventLog()) > 0 {
		if f, err = evidence.ReplayFirmware(req.GetEventLog(), pcrs); err != nil {
			return f, err
		}
	}
	if len(req.GetImaLog()) > 0 {
		ima, err := evidence.ReplayIMA(req.GetImaLog(), pcrs[evidence.IMAPCR])
		if err != nil {
			return f, err
		}
		f.IMA = ima
	}
	return f, nil
}

var errBackwards = errors.New("counters went backwards")

// refuseUnverified refuses evidence that did not authenticate: it is
// audited, but says nothing about the node it names.
// quoteFailure says in words which part of a quote did not verify;
// go-attestation's own text dumps raw nonce bytes.
func quoteFailure(err error) string {
	switch msg := err.Error(); {
	case strings.Contains(msg, "nonce ="):
		return "its qualifying data is for another nonce, session key or node (replayed or lent evidence)"
	case strings.Contains(msg, "digest didn't match"):
		return "the PCR values sent are not the ones the TPM quoted"
	case strings.Contains(msg, "signature"):
		return "the signature does not verify with the enrolled AK (another key signed it)"
	default:
		return msg
	}
}

func (s *Server) refuseUnverified(ctx context.Context, node string, code codes.Code, reason string) error {
	s.auditUnauthenticated(ctx, ReasonEvidenceUnverified, store.AuditEvent{Kind: "attest", Node: node, Reason: reason})
	return status.Error(code, reason)
}

// refuseAttest refuses evidence the node's AK signed, and records the node
// as untrusted with the reason.
func (s *Server) refuseAttest(ctx context.Context, node string, code codes.Code, reason string) error {
	s.audit(ctx, store.AuditEvent{Kind: "attest", Node: node, Reason: reason})
	if node != "" {
		// Only record trust on nodes that exist; unknown names are noise.
		_, _ = s.store.UpdateNode(ctx, node, func(n *store.Node) error {
			n.Trust, n.TrustReason = "untrusted", reason
			return nil
		})
	}
	return status.Error(code, reason)
}

// verifyQuote checks the quote's signature by the enrolled AK, its
// qualifying data, and that it covers exactly the presented SHA-256 PCRs.
func verifyQuote(akPublic []byte, req *apiv1.AttestRequest, qualifying []byte) (map[int][]byte, tpm2.ClockInfo, error) {
	var clock tpm2.ClockInfo
	ak, err := attest.ParseAKPublic(akPublic)
	if err != nil {
		return nil, clock, fmt.Errorf("enrolled AK does not parse: %v", err)
	}
	if len(req.GetPcrs()) != NumPCRs {
		return nil, clock, fmt.Errorf("evidence has %d PCR values, want all %d of the SHA-256 bank", len(req.GetPcrs()), NumPCRs)
	}
	pcrs := make([]attest.PCR, 0, NumPCRs)
	values := make(map[int][]byte, NumPCRs)
	for _, p := range req.GetPcrs() {
		if p.GetIndex() >= NumPCRs || len(p.GetDigest()) != crypto.SHA256.Size() {
			return nil, clock, fmt.Errorf("PCR %d: not a SHA-256 PCR value", p.GetIndex())
		}
		if _, dup := values[int(p.GetIndex())]; dup {
			return nil, clock, fmt.Errorf("PCR %d given twice", p.GetIndex())
		}
		values[int(p.GetIndex())] = p.GetDigest()
		pcrs = append(pcrs, attest.PCR{Index: int(p.GetIndex()), Digest: p.GetDigest(), DigestAlg: crypto.SHA256})
	}
	q := attest.Quote{Quote: req.GetQuote(), Signature: req.GetSignature()}
	if err := ak.VerifyAll([]attest.Quote{q}, pcrs, qualifying); err != nil {
		return nil, clock, fmt.Errorf("not signed by this node's enrolled AK over this nonce, session key and PCR values: %s", quoteFailure(err))
	}
	att, err := tpm2.DecodeAttestationData(req.GetQuote())
	if err != nil {
		return nil, clock, fmt.Errorf("quote structure: %v", err)
	}
	if att.Type != tpm2.TagAttestQuote {
		return nil, clock, errors.New("signed structure is not a quote")
	}
	return values, att.ClockInfo, nil
}
