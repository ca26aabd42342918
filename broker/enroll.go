package broker

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

const errJoinToken = "join token is invalid, expired or already used; ask the admin for a new one ('attested node token create')"

// maxEKCertificate bounds EK certificates; real ones are 1-2 KiB.
const maxEKCertificate = 16 << 10

// EnrollmentTTL bounds how long a credential activation challenge is open.
// Answering takes one TPM2_ActivateCredential (the node creates its AK and
// EK before it asks), well under a second on most TPMs.
const EnrollmentTTL = 2 * time.Minute

// EKFingerprint is the node identity: SHA-256 of the EK public key, PKIX DER.
func EKFingerprint(ekPKIX []byte) string {
	sum := sha256.Sum256(ekPKIX)
	return hex.EncodeToString(sum[:])
}

// fingerprintPrefix marks EK fingerprints as users see them.
const fingerprintPrefix = "SHA256:"

// DisplayFingerprint is an EK fingerprint as nodes print it and admins
// approve it: "SHA256:" and 64 hex digits.
func DisplayFingerprint(fp string) string { return fingerprintPrefix + fp }

// ParseFingerprint accepts "SHA256:<hex>" or bare hex, in either case.
func ParseFingerprint(s string) (string, error) {
	h := strings.ToLower(strings.TrimSpace(s))
	h = strings.TrimPrefix(h, strings.ToLower(fingerprintPrefix))
	if b, err := hex.DecodeString(h); err != nil || len(b) != sha256.Size {
		return "", fmt.Errorf("EK fingerprint %q is not SHA256: and 64 hex digits (as 'attested node enroll' prints it)", s)
	}
	return h, nil
}

// EnrollStart implements apiv1.BrokerServer. Its caller is not
// authenticated yet, so it checks only what the request itself carries
// (the EK's strength and template, its certificate, the AK, the join token)
// and answers alike whatever the broker holds: whether this EK or this
// name is enrolled is decided, and told, in EnrollFinish, once credential
// activation has proven the caller holds the TPM.
func (s *Server) EnrollStart(ctx context.Context, req *apiv1.EnrollStartRequest) (*apiv1.EnrollStartResponse, error) {
	if !annotation.ValidName(req.GetName()) {
		return nil, status.Errorf(codes.InvalidArgument, "node name %q must be 1-63 letters, digits, '.', '_' or '-'", req.GetName())
	}
	if len(req.GetEkCertificate()) > maxEKCertificate || len(req.GetEkPublic()) > maxEKCertificate || len(req.GetEkPublicArea()) > maxEKCertificate {
		return nil, status.Errorf(codes.InvalidArgument, "EK certificate, public key or public area larger than %d bytes", maxEKCertificate)
	}
	ekPub, err := x509.ParsePKIXPublicKey(req.GetEkPublic())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "EK public key is not PKIX DER: %v", err)
	}
	// Nothing is authenticated yet: refusals are sampled into the audit.
	refuse := func(reason string) error {
		s.auditUnauthenticated(ctx, ReasonEnrollmentRefused, store.AuditEvent{Kind: "enroll", Node: req.GetName(), Reason: reason})
		return status.Error(codes.PermissionDenied, reason)
	}
	if err := checkEKKey(ekPub); err != nil {
		return nil, refuse(err.Error())
	}
	template, err := checkEKPublicArea(req.GetEkPublicArea(), ekPub)
	if err != nil {
		return nil, refuse(err.Error())
	}
	fp := EKFingerprint(req.GetEkPublic())
	ekIssuer, err := s.checkEKCertificate(req.GetEkCertificate(), req.GetEkPublic())
	if err != nil {
		return nil, refuse(err.Error())
	}
	ak := req.GetAk()
	if ak == nil {
		return nil, status.Error(codes.InvalidArgument, "no attestation key parameters")
	}
	params := attest.ActivationParameters{
		EK: ekPub,
		AK: attest.AttestationParameters{
			Public: ak.GetPublic(), CreateData: ak.GetCreateData(),
			CreateAttestation: ak.GetCreateAttestation(), CreateSignature: ak.GetCreateSignature(),
		},
	}
	if err := checkAKSignOnly(ak.GetPublic()); err != nil {
		return nil, refuse(err.Error())
	}
	// Generate checks the AK is restricted, fixedTPM, fixedParent, TPM
	// generated, with a creation attestation signed by itself.
	secret, ec, err := params.Generate()
	if err != nil {
		return nil, refuse("attestation key refused: " + err.Error())
	}
	// The token is checked now (it is the caller's own credential, and
	// says nothing about nodes) and spent only when credential activation
	// succeeds, so a failed enrollment does not burn it.
	var tokenHash []byte
	if tok := req.GetJoinToken(); tok != "" {
		tokenHash = hashToken([]byte(tok))
		ok, err := s.store.JoinTokenValid(ctx, tokenHash, s.now())
		if err != nil {
			return nil, storeErr("join token", err)
		}
		if !ok {
			s.auditUnauthenticated(ctx, ReasonEnrollmentRefused, store.AuditEvent{Kind: "enroll", Node: req.GetName(), Reason: "join token invalid, expired or already used"})
			return nil, status.Error(codes.PermissionDenied, errJoinToken)
		}
	}
	sum := sha256.Sum256(secret)
	now := s.now()
	e := store.Enrollment{
		ID: hex.EncodeToString(randomBytes(16)),
		Node: store.Node{
			Name: req.GetName(), EKFingerprint: fp, EKPublic: req.GetEkPublic(),
			EKCertificate: req.GetEkCertificate(), EKIssuer: ekIssuer, AKPublic: ak.GetPublic(),
		},
		SecretHash:    sum[:],
		Approved:      tokenHash != nil || (ekIssuer != "" && s.cfg.ApproveCertifiedEKs),
		JoinTokenHash: tokenHash,
		Expires:       now.Add(EnrollmentTTL),
	}
	if err := s.store.PutEnrollment(ctx, e, s.limit(s.cfg.MaxEnrollmentsInFlight, DefaultMaxEnrollmentsInFlight), now); err != nil {
		if errors.Is(err, store.ErrLimit) {
			return nil, status.Errorf(codes.ResourceExhausted, "too many enrollments in flight (%v); try again in a minute", err)
		}
		return nil, storeErr("enrollment", err)
	}
	s.log.Debug("enrollment started", "node", req.GetName(), "ek", DisplayFingerprint(fp), "template", template)
	return &apiv1.EnrollStartResponse{EnrollmentId: e.ID, Credential: ec.Credential, Secret: ec.Secret}, nil
}

// limit is a configured bound, or its default when unset (a Config not
// read through LoadConfig).
func (s *Server) limit(v, def int) int {
	if v > 0 {
		return v
	}
	return def
}

func (s *Server) pendingTTL() time.Duration {
	if s.cfg.PendingTTL > 0 {
		return s.cfg.PendingTTL
	}
	return DefaultPendingTTL
}

// EnrollFinish implements apiv1.BrokerServer. Once credential activation
// proved the caller holds the TPM, an enrollment backed by a join token
// (or a trusted certificate, where so configured) becomes a node,
// superseding anything pending for its name or EK; any other waits for an
// admin to approve its EK fingerprint, blocking nothing meanwhile.
func (s *Server) EnrollFinish(ctx context.Context, req *apiv1.EnrollFinishRequest) (*apiv1.EnrollFinishResponse, error) {
	e, err := s.store.TakeEnrollment(ctx, req.GetEnrollmentId())
	if errors.Is(err, store.ErrNotFound) || (err == nil && s.now().After(e.Expires)) {
		return nil, status.Error(codes.NotFound, "enrollment unknown or expired; start again with 'attested node enroll'")
	}
	if err != nil {
		return nil, storeErr("enrollment", err)
	}
	sum := sha256.Sum256(req.GetActivatedSecret())
	if subtle.ConstantTimeCompare(sum[:], e.SecretHash) != 1 {
		reason := "credential activation failed: the attestation key is not in the same TPM as the EK"
		s.auditUnauthenticated(ctx, ReasonEnrollmentRefused, store.AuditEvent{Kind: "enroll", Node: e.Node.Name, Reason: reason})
		return nil, status.Error(codes.PermissionDenied, reason)
	}
	now := s.now()
	n := e.Node
	n.EnrolledAt = now
	n.Trust = "unknown"
	ek := DisplayFingerprint(n.EKFingerprint)
	if !e.Approved {
		n.State = store.NodePending
		p := store.PendingEnrollment{Node: n, Expires: now.Add(s.pendingTTL())}
		lim := store.PendingLimits{Total: s.limit(s.cfg.MaxPending, DefaultMaxPending), PerName: s.limit(s.cfg.MaxPendingPerName, DefaultMaxPendingPerName)}
		switch err := s.store.AddPending(ctx, p, lim, now); {
		case errors.Is(err, store.ErrExists):
			s.audit(ctx, store.AuditEvent{Kind: "enroll", Node: n.Name, Reason: err.Error()})
			return nil, status.Errorf(codes.AlreadyExists, "%v; an admin removes a node with 'attested node remove'", err)
		case errors.Is(err, store.ErrLimit):
			s.audit(ctx, store.AuditEvent{Kind: "enroll", Node: n.Name, Reason: "not recorded for approval: " + err.Error()})
			return nil, status.Errorf(codes.ResourceExhausted, "enrollment not recorded for approval: %v; enroll with a join token ('attested node token create'), or have an admin approve or remove pending enrollments ('attested node list --pending')", err)
		case err != nil:
			return nil, storeErr("pending enrollment", err)
		}
		s.audit(ctx, store.AuditEvent{Kind: "enroll", Node: n.Name, Allowed: true, Reason: fmt.Sprintf(
			"waiting for approval until %s: EK %s, EK certificate %s; approve with 'attested node approve %s --ek %s'",
			p.Expires.UTC().Format(time.RFC3339), ek, ekCertState(n.EKIssuer), n.Name, ek)})
		out := s.nodeToAPI(n)
		out.PendingExpiresUnix = p.Expires.Unix()
		return &apiv1.EnrollFinishResponse{Node: out}, nil
	}
	n.State = store.NodeActive
	switch err := s.store.EnrollNode(ctx, n, e.JoinTokenHash, now); {
	case errors.Is(err, store.ErrJoinToken):
		s.audit(ctx, store.AuditEvent{Kind: "enroll", Node: n.Name, Reason: "join token expired or used by another enrollment meanwhile"})
		return nil, status.Error(codes.PermissionDenied, errJoinToken)
	case errors.Is(err, store.ErrExists):
		s.audit(ctx, store.AuditEvent{Kind: "enroll", Node: n.Name, Reason: err.Error()})
		return nil, status.Errorf(codes.AlreadyExists, "%v; an admin removes a node with 'attested node remove' (the join token is not spent)", err)
	case err != nil:
		return nil, storeErr("node", err)
	}
	how := "a join token"
	if e.JoinTokenHash == nil {
		how = "a trusted EK certificate (approveCertifiedEKs)"
	}
	s.audit(ctx, store.AuditEvent{Kind: "enroll", Node: n.Name, Allowed: true, Reason: fmt.Sprintf(
		"enrolled with %s: EK %s, EK certificate %s", how, ek, ekCertState(n.EKIssuer))})
	return &apiv1.EnrollFinishResponse{Node: s.nodeToAPI(n)}, nil
}

// ekCertState says how far an EK's manufacturer was verified.
func ekCertState(issuer string) string {
	if issuer == "" {
		return "unverified (none, or no trusted root configured)"
	}
	return "verified (issuer " + issuer + ")"
}

// checkEKCertificate verifies the EK certificate, when there is one, chains
// to a configured manufacturer root and certifies this EK. It returns the
// issuer of a verified certificate, or "" when the TPM has none (then a
// join token or admin approval is what admits it).
func (s *Server) checkEKCertificate(certDER, ekPKIX []byte) (string, error) {
	if len(certDER) == 0 {
		if s.cfg.RequireEKCertificate {
			return "", errors.New("EK certificate required: this TPM presented none, and the broker requires one chaining to a trusted manufacturer root")
		}
		return "", nil
	}
	if !s.ekRoots.Configured() {
		if s.cfg.RequireEKCertificate {
			return "", errors.New("EK certificate cannot be verified: no manufacturer roots configured")
		}
		// Without roots the certificate proves nothing; admission rests on
		// the join token or approval, as for a TPM without one.
		return "", nil
	}
	cert, err := s.ekRoots.Verify(certDER)
	if err != nil {
		return "", err
	}
	der, err := x509.MarshalPKIXPublicKey(cert.PublicKey)
	if err != nil {
		return "", fmt.Errorf("EK certificate public key: %v", err)
	}
	if subtle.ConstantTimeCompare(der, ekPKIX) != 1 {
		return "", errors.New("EK certificate is for another key than the EK presented")
	}
	// The issuer is the certificate's text, shown in lists and messages:
	// escape what a terminal would interpret.
	return printable(cert.Issuer.String()), nil
}

// checkAKSignOnly refuses AKs that can also decrypt: go-attestation checks
// restricted/fixedTPM/fixedParent, and we add sign-only.
func checkAKSignOnly(public []byte) error {
	pub, err := tpm2.DecodePublic(public)
	if err != nil {
		return fmt.Errorf("attestation key public area does not parse: %v", err)
	}
	if pub.Attributes&tpm2.FlagSign == 0 || pub.Attributes&tpm2.FlagDecrypt != 0 {
		return errors.New("attestation key refused: it must be a sign-only key")
	}
	return nil
}

// nodeToAPI shows a node as the API does: its status as of now, and the
// tags its TPM certified when they are the ones the broker holds.
func (s *Server) nodeToAPI(n store.Node) *apiv1.Node {
	out := &apiv1.Node{
		Name: n.Name, EkFingerprint: n.EKFingerprint, Trust: n.Trust, TrustReason: n.TrustReason,
		EnrolledUnix: n.EnrolledAt.Unix(), Tags: n.Tags, TagsVersion: n.TagsVersion, EkIssuer: n.EKIssuer,
	}
	if !n.LastAttested.IsZero() {
		out.LastAttestedUnix = n.LastAttested.Unix()
	}
	switch n.State {
	case store.NodePending:
		out.State = apiv1.NodeState_NODE_STATE_PENDING
	case store.NodeActive:
		out.State = apiv1.NodeState_NODE_STATE_ACTIVE
	case store.NodeRevoked:
		out.State = apiv1.NodeState_NODE_STATE_REVOKED
	}
	out.Status, out.StatusReason = s.statusOf(n, s.now())
	since := n.StatusSince
	if out.Status != n.Status || since.IsZero() {
		// Changed by the clock since it was recorded (a node gone stale);
		// the periodic check records it.
		since = s.now()
	}
	out.StatusSinceUnix = since.Unix()
	out.CertifiedTags = certifiedTags(n, n.CertifiedTagDigest)
	return out
}

// printable escapes control and other non-printable characters (as Go
// quotes them), so text from a certificate or a log cannot break lines or
// drive a terminal where it is shown.
func printable(s string) string {
	var b strings.Builder
	for _, r := range s {
		if unicode.IsPrint(r) {
			b.WriteRune(r)
			continue
		}
		q := strconv.QuoteRune(r)
		b.WriteString(q[1 : len(q)-1])
	}
	return b.String()
}
