package broker

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/evidence"
	"github.com/attested-dev/attested/broker/policy"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// NumPCRs is the number of PCRs a quote must cover (the SHA-256 bank).
const NumPCRs = 24

// Challenge implements apiv1.BrokerServer. Every valid node name gets a
// nonce, enrolled or not: the answer says nothing about the broker's state,
// and nothing is stored (see nonce.go).
func (s *Server) Challenge(ctx context.Context, req *apiv1.ChallengeRequest) (*apiv1.ChallengeResponse, error) {
	if !annotation.ValidName(req.GetNode()) {
		return nil, status.Errorf(codes.InvalidArgument, "node name %q must be 1-63 letters, digits, '.', '_' or '-'", req.GetNode())
	}
	now := s.now()
	return &apiv1.ChallengeResponse{Nonce: s.issueNonce(req.GetNode(), now), ExpiresUnix: now.Add(s.cfg.NonceTTL).Unix()}, nil
}

// stateError says why a node that proved itself may not attest.
func (s *Server) stateError(n store.Node) error {
	switch n.State {
	case store.NodeActive:
		return nil
	case store.NodePending:
		return status.Errorf(codes.PermissionDenied, "node %q is enrolled but not approved; an admin must approve it ('attested node approve %s --ek SHA256:%s')", n.Name, n.Name, n.EKFingerprint)
	case store.NodeRevoked:
		return status.Errorf(codes.PermissionDenied, "node %q is revoked", n.Name)
	}
	return status.Errorf(codes.PermissionDenied, "node %q is in unknown state %q", n.Name, n.State)
}

// Attest implements apiv1.BrokerServer. It verifies the quote against the
// enrolled AK and the nonce, checks the session key's TPM half, replays the
// event logs, and records the outcome with the node in one transaction:
// evidence that fails, or that shows PCRs or counters other than a live
// session's, ends those sessions at once. Policy is evaluated per key at
// Unwrap.
func (s *Server) Attest(ctx context.Context, req *apiv1.AttestRequest) (*apiv1.AttestResponse, error) {
	start := time.Now()
	resp, err := s.attest(ctx, req)
	result := "accepted"
	switch status.Code(err) {
	case codes.OK:
	case codes.PermissionDenied, codes.DeadlineExceeded, codes.InvalidArgument:
		result = "refused"
	default:
		result = "error"
	}
	s.ops.appraisal.WithLabelValues(result).Observe(time.Since(start).Seconds())
	return resp, err
}

func (s *Server) attest(ctx context.Context, req *apiv1.AttestRequest) (*apiv1.AttestResponse, error) {
	// Until the quote verifies nothing is authenticated: every refusal up
	// to there gives the same answer whatever the broker knows of the node
	// (the precise reason goes to the audit), and changes nothing.
	name := req.GetNode()
	if !annotation.ValidName(name) {
		return nil, status.Errorf(codes.InvalidArgument, "node name %q must be 1-63 letters, digits, '.', '_' or '-'", name)
	}
	now := s.now()
	nonceExpires, err := s.checkNonce(name, req.GetNonce(), now)
	if err != nil {
		return nil, s.refuseUnverified(ctx, name, codes.PermissionDenied, err.Error(), err.Error())
	}
	n, err := s.store.GetNode(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, s.refuseUnverified(ctx, name, codes.PermissionDenied, "node is not enrolled", s.unverified(name))
	}
	if err != nil {
		return nil, storeErr("node", err)
	}
	qd := binding.QualifyingData(req.GetNonce(), req.GetSessionPublicKey(), n.Name)
	pcrs, clock, err := verifyQuote(n.AKPublic, req, qd)
	if err != nil {
		return nil, s.refuseUnverified(ctx, name, codes.PermissionDenied, "quote refused: "+err.Error(), s.unverified(name))
	}
	// The node's TPM signed this evidence for this challenge: from here on
	// the node is told the precise reason, and a failure is its state.
	if err := s.stateError(n); err != nil {
		if n.State == store.NodeRevoked {
			s.notify(ctx, Event{Kind: EventRefusal, Time: now, Node: n.Name, Reason: "attestation refused: node is revoked"})
		}
		return nil, err
	}
	facts, failure := s.appraiseEvidence(req, n, pcrs, qd)
	st, _ := suite.Lookup(suite.SessionName)
	token := randomBytes(32)
	sess := store.Session{
		TokenHash: hashToken(token), Node: n.Name, EKFingerprint: n.EKFingerprint,
		PublicKey: req.GetSessionPublicKey(), Suite: st.Name,
		PCRs: pcrs, ResetCount: clock.ResetCount, RestartCount: clock.RestartCount,
		Created: now, Expires: now.Add(s.cfg.SessionTTL),
	}
	var trust, trustReason string
	var rec claimsRecord
	var verdicts []policyVerdict
	if failure == "" {
		claims := policy.Claims{Node: n.Name, PCRs: pcrs, Facts: facts, Tags: n.Tags}
		rec = claimsRecord{Facts: facts}
		if rec.IMAVerdicts, err = s.imaVerdicts(ctx, claims); err != nil {
			return nil, storeErr("policies", err)
		}
		if sess.Facts, err = json.Marshal(rec); err != nil {
			return nil, status.Errorf(codes.Internal, "facts: %v", err)
		}
		if verdicts, err = s.evaluatePolicies(ctx, n, pcrs, rec); err != nil {
			return nil, storeErr("policies", err)
		}
		keys, err := s.store.ListKeys(ctx)
		if err != nil {
			return nil, storeErr("keys", err)
		}
		trust, trustReason = trustFromVerdicts(verdicts, keys)
	}
	var ended int
	var reboot bool
	var change *statusChange
	_, err = s.store.Appraise(ctx, n.Name, store.SpentNonce{Nonce: req.GetNonce(), Expires: nonceExpires.Add(spentMargin)}, now,
		func(cur *store.Node, live []store.Session) (store.Outcome, error) {
			if cur.EKFingerprint != n.EKFingerprint {
				// Removed and enrolled again while this evidence was being
				// checked: it was signed by another identity's AK.
				return store.Outcome{}, errIdentityChanged
			}
			if err := s.stateError(*cur); err != nil {
				return store.Outcome{}, err
			}
			// A TPM's counters only grow; going back means old evidence or
			// another TPM. The check reads them in the transaction that
			// moves them, so concurrent attestations cannot roll them back.
			if failure == "" && cur.ClockSeen && (clock.ResetCount < cur.ResetCount || (clock.ResetCount == cur.ResetCount && clock.RestartCount < cur.RestartCount)) {
				failure = fmt.Sprintf("TPM reset/restart counters went backwards (%d/%d, last seen %d/%d)", clock.ResetCount, clock.RestartCount, cur.ResetCount, cur.RestartCount)
			}
			cur.LastSeen = now
			if failure != "" {
				cur.Trust, cur.TrustReason = StatusUntrusted, evidenceRefused+failure
				change = s.recordStatus(cur, now)
				ended = len(live)
				return store.Outcome{EndAll: true}, nil
			}
			reboot = cur.ClockSeen && (clock.ResetCount != cur.ResetCount || clock.RestartCount != cur.RestartCount)
			cur.ResetCount, cur.RestartCount, cur.ClockSeen = clock.ResetCount, clock.RestartCount, true
			cur.LastAttested, cur.LastPCRs, cur.CertifiedTagDigest = now, pcrs, facts.CertifiedTagDigest
			var err error
			if cur.LastFacts, err = json.Marshal(facts); err != nil {
				return store.Outcome{}, err
			}
			cur.Trust, cur.TrustReason = trust, trustReason
			change = s.recordStatus(cur, now)
			out := store.Outcome{Open: &sess}
			for _, l := range live {
				if l.ResetCount != clock.ResetCount || l.RestartCount != clock.RestartCount || !samePCRs(l.PCRs, pcrs) {
					out.End = append(out.End, l.TokenHash)
				}
			}
			ended = len(out.End)
			return out, nil
		})
	switch {
	case errors.Is(err, store.ErrNonceSpent):
		return nil, s.refuseUnverified(ctx, name, codes.PermissionDenied, "nonce already used (replayed evidence?)", "nonce already used (replayed evidence?); ask for a new challenge")
	case errors.Is(err, errIdentityChanged), errors.Is(err, store.ErrNotFound):
		return nil, status.Errorf(codes.PermissionDenied, "node %q was removed or enrolled again while its evidence was appraised; attest again", name)
	case err != nil:
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, storeErr("node", err)
	}
	s.announce(ctx, change)
	if failure != "" {
		s.ops.refusals.WithLabelValues(RefusalEvidence).Inc()
		reason := evidenceRefused + failure
		if ended > 0 {
			reason += fmt.Sprintf(" (%d live session(s) ended)", ended)
		}
		s.audit(ctx, store.AuditEvent{Kind: "attest", Node: n.Name, Reason: reason})
		s.notify(ctx, Event{Kind: EventRefusal, Time: now, Node: n.Name, Reason: reason})
		return nil, status.Error(codes.PermissionDenied, reason)
	}
	reason := "evidence verified; session opened"
	switch {
	case reboot:
		reason += fmt.Sprintf(" (TPM rebooted since last attestation; %d older session(s) ended)", ended)
	case ended > 0:
		reason += fmt.Sprintf(" (PCRs changed since last attestation; %d older session(s) ended)", ended)
	}
	s.audit(ctx, store.AuditEvent{Kind: "attest", Node: n.Name, Allowed: true, Reason: reason})
	return &apiv1.AttestResponse{SessionToken: token, ExpiresUnix: sess.Expires.Unix(),
		ResetCount: clock.ResetCount, RestartCount: clock.RestartCount,
		Ear: s.attestationResult(earInput{node: n, rec: rec, pcrs: pcrs, nonce: req.GetNonce(), issued: now, expires: sess.Expires, evaluate: verdicts})}, nil
}

// evidenceRefused prefixes the status reason of a node whose signed
// evidence was refused.
const evidenceRefused = "evidence refused: "

var errIdentityChanged = errors.New("node identity changed")

// unverified is the one answer to evidence that did not authenticate.
func (s *Server) unverified(node string) string {
	return fmt.Sprintf("broker %s refused the evidence of node %q: the node is not enrolled, not approved or revoked, or its quote is not signed by its enrolled attestation key over this challenge; an admin sees which in the audit ('attested audit list --node %s')", s.cfg.ID, node, node)
}

// appraiseEvidence checks everything in the evidence beyond the quote: the
// session key's TPM half, the event logs, the tag certification. It
// returns the facts, or why the evidence is refused.
func (s *Server) appraiseEvidence(req *apiv1.AttestRequest, n store.Node, pcrs map[int][]byte, qd []byte) (evidence.Facts, string) {
	if req.GetSessionSuite() != suite.SessionName {
		return evidence.Facts{}, fmt.Sprintf("session key suite is %q; this broker needs %s, with the key in the TPM", req.GetSessionSuite(), suite.SessionName)
	}
	st, _ := suite.Lookup(suite.SessionName)
	if _, err := st.KEM.NewPublicKey(req.GetSessionPublicKey()); err != nil {
		return evidence.Facts{}, fmt.Sprintf("session public key is not a %s key", st.Name)
	}
	sk := evidence.SessionKey{Public: req.GetSessionKeyPublic(), CertifyInfo: req.GetSessionKeyCertifyInfo(), Signature: req.GetSessionKeyCertifySignature()}
	for _, p := range req.GetSessionKeyPcrs() {
		sk.PCRs = append(sk.PCRs, int(p))
	}
	if err := evidence.VerifySessionKey(n.AKPublic, sk, req.GetSessionPublicKey(), qd, pcrs); err != nil {
		return evidence.Facts{}, err.Error()
	}
	facts, err := appraiseLogs(req, pcrs)
	if err != nil {
		return facts, err.Error()
	}
	if len(req.GetTagCertifyInfo()) > 0 {
		facts.CertifiedTagDigest, err = evidence.VerifyTagCertification(n.AKPublic, req.GetTagCertifyInfo(),
			req.GetTagCertifySignature(), req.GetTagNvPublic(), qd)
		if err != nil {
			return facts, err.Error()
		}
	}
	return facts, ""
}

func samePCRs(a, b map[int][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i, v := range a {
		if !bytes.Equal(v, b[i]) {
			return false
		}
	}
	return true
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
		sum := sha256.Sum256(req.GetEventLog())
		f.FirmwareLogSHA256 = sum[:]
	}
	if len(req.GetImaLog()) > 0 {
		ima, err := evidence.ReplayIMA(req.GetImaLog(), pcrs[evidence.IMAPCR])
		if err != nil {
			return f, err
		}
		f.IMA, f.IMAViolations = ima.Entries, ima.Violations
		if ima.Entries != nil {
			f.IMASummary = &evidence.IMASummary{Measurements: len(ima.Entries)}
		}
		sum := sha256.Sum256(req.GetImaLog())
		f.IMALogSHA256 = sum[:]
	}
	return f, nil
}

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

// refuseUnverified refuses evidence that did not authenticate: the audit
// gets the precise reason (sampled: anyone can send such evidence), the
// caller the answer it would get whatever the node's state; nothing about
// the node changes.
func (s *Server) refuseUnverified(ctx context.Context, node string, code codes.Code, reason, answer string) error {
	s.auditUnauthenticated(ctx, ReasonEvidenceUnverified, store.AuditEvent{Kind: "attest", Node: node, Reason: reason})
	return status.Error(code, answer)
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
