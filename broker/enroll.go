package broker

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

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
const EnrollmentTTL = 5 * time.Minute

// EKFingerprint is the node identity: SHA-256 of the EK public key, PKIX DER.
func EKFingerprint(ekPKIX []byte) string {
	sum := sha256.Sum256(ekPKIX)
	return hex.EncodeToString(sum[:])
}

// EnrollStart implements apiv1.BrokerServer.
func (s *Server) EnrollStart(ctx context.Context, req *apiv1.EnrollStartRequest) (*apiv1.EnrollStartResponse, error) {
	if !annotation.ValidName(req.GetName()) {
		return nil, status.Errorf(codes.InvalidArgument, "node name %q must be 1-63 letters, digits, '.', '_' or '-'", req.GetName())
	}
	if len(req.GetEkCertificate()) > maxEKCertificate || len(req.GetEkPublic()) > maxEKCertificate {
		return nil, status.Errorf(codes.InvalidArgument, "EK certificate or public key larger than %d bytes", maxEKCertificate)
	}
	ekPub, err := x509.ParsePKIXPublicKey(req.GetEkPublic())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "EK public key is not PKIX DER: %v", err)
	}
	fp := EKFingerprint(req.GetEkPublic())
	ekIssuer, err := s.checkEKCertificate(req.GetEkCertificate(), req.GetEkPublic())
	if err != nil {
		s.auditUnauthenticated(ctx, ReasonEnrollmentRefused, store.AuditEvent{Kind: "enroll", Node: req.GetName(), Reason: err.Error()})
		return nil, status.Error(codes.PermissionDenied, err.Error())
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
		s.auditUnauthenticated(ctx, ReasonEnrollmentRefused, store.AuditEvent{Kind: "enroll", Node: req.GetName(), Reason: err.Error()})
		return nil, status.Error(codes.PermissionDenied, err.Error())
	}
	// Generate checks the AK is restricted, fixedTPM, fixedParent, TPM
	// generated, with a creation attestation signed by itself.
	secret, ec, err := params.Generate()
	if err != nil {
		reason := "attestation key refused: " + err.Error()
		s.auditUnauthenticated(ctx, ReasonEnrollmentRefused, store.AuditEvent{Kind: "enroll", Node: req.GetName(), Reason: reason})
		return nil, status.Error(codes.PermissionDenied, reason)
	}
	if existing, err := s.store.GetNode(ctx, req.GetName()); err == nil {
		if existing.EKFingerprint != fp {
			return nil, status.Errorf(codes.AlreadyExists, "node name %q is enrolled with another EK (%s..); a node's identity cannot change", req.GetName(), existing.EKFingerprint[:12])
		}
		return nil, status.Errorf(codes.AlreadyExists, "node %q is already enrolled with this EK", req.GetName())
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, storeErr("node", err)
	}
	if existing, err := s.store.GetNodeByEK(ctx, fp); err == nil {
		return nil, status.Errorf(codes.AlreadyExists, "this TPM's EK is already enrolled as node %q", existing.Name)
	}
	// The token is checked now and spent only when credential activation
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
	e := store.Enrollment{
		ID: hex.EncodeToString(randomBytes(16)),
		Node: store.Node{
			Name: req.GetName(), EKFingerprint: fp, EKPublic: req.GetEkPublic(),
			EKCertificate: req.GetEkCertificate(), EKIssuer: ekIssuer, AKPublic: ak.GetPublic(),
		},
		SecretHash:    sum[:],
		Approved:      tokenHash != nil,
		JoinTokenHash: tokenHash,
		Expires:       s.now().Add(EnrollmentTTL),
	}
	if err := s.store.PutEnrollment(ctx, e); err != nil {
		return nil, storeErr("enrollment", err)
	}
	return &apiv1.EnrollStartResponse{EnrollmentId: e.ID, Credential: ec.Credential, Secret: ec.Secret}, nil
}

// EnrollFinish implements apiv1.BrokerServer.
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
	if e.JoinTokenHash != nil {
		ok, err := s.store.ConsumeJoinToken(ctx, e.JoinTokenHash, s.now())
		if err != nil {
			return nil, storeErr("join token", err)
		}
		if !ok {
			s.audit(ctx, store.AuditEvent{Kind: "enroll", Node: e.Node.Name, Reason: "join token expired or used by another enrollment meanwhile"})
			return nil, status.Error(codes.PermissionDenied, errJoinToken)
		}
	}
	n := e.Node
	n.EnrolledAt = s.now()
	n.State = store.NodePending
	n.Trust = "unknown"
	if e.Approved {
		n.State = store.NodeActive
	}
	if err := s.store.CreateNode(ctx, n); err != nil {
		if errors.Is(err, store.ErrExists) {
			return nil, status.Error(codes.AlreadyExists, err.Error())
		}
		return nil, storeErr("node", err)
	}
	reason := "enrolled with a join token"
	if !e.Approved {
		reason = "enrolled; waiting for admin approval ('attested node approve " + n.Name + "')"
	}
	if n.EKIssuer != "" {
		reason += "; EK certificate verified (issuer " + n.EKIssuer + ")"
	}
	s.audit(ctx, store.AuditEvent{Kind: "enroll", Node: n.Name, Allowed: true, Reason: reason})
	return &apiv1.EnrollFinishResponse{Node: nodeToAPI(n)}, nil
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
	return cert.Issuer.String(), nil
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

func nodeToAPI(n store.Node) *apiv1.Node {
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
	return out
}
