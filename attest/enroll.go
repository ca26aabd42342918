package attest

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-attestation/attest"
	"google.golang.org/grpc"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// Enrollment is the broker's side of enrollment, as the node needs it.
type Enrollment interface {
	EnrollStart(ctx context.Context, in *apiv1.EnrollStartRequest, opts ...grpc.CallOption) (*apiv1.EnrollStartResponse, error)
	EnrollFinish(ctx context.Context, in *apiv1.EnrollFinishRequest, opts ...grpc.CallOption) (*apiv1.EnrollFinishResponse, error)
}

// EnrollOptions configures Enroll.
type EnrollOptions struct {
	Name      string
	JoinToken string
	BrokerID  string
}

// Enroll registers this TPM's EK and a new restricted attestation key with
// the broker and answers its credential activation challenge, which only a
// TPM holding both keys can do.
func Enroll(ctx context.Context, b Enrollment, t *TPM, o EnrollOptions) (*State, *apiv1.Node, error) {
	eks, err := t.dev.EKs()
	if err != nil {
		return nil, nil, fmt.Errorf("attest: read EK: %w", err)
	}
	if len(eks) == 0 {
		return nil, nil, errors.New("attest: the TPM reports no endorsement key")
	}
	ek := eks[0]
	ekDER, err := x509.MarshalPKIXPublicKey(ek.Public)
	if err != nil {
		return nil, nil, fmt.Errorf("attest: EK public key: %w", err)
	}
	ak, err := t.dev.NewAK(&attest.AKConfig{Algorithm: attest.ECDSA})
	if err != nil {
		return nil, nil, fmt.Errorf("attest: create attestation key: %w", err)
	}
	defer ak.Close(t.dev)
	p := ak.AttestationParameters()
	req := &apiv1.EnrollStartRequest{
		Name: o.Name, EkPublic: ekDER, JoinToken: o.JoinToken,
		Ak: &apiv1.AKParameters{Public: p.Public, CreateData: p.CreateData,
			CreateAttestation: p.CreateAttestation, CreateSignature: p.CreateSignature},
	}
	if ek.Certificate != nil {
		req.EkCertificate = ek.Certificate.Raw
	}
	start, err := b.EnrollStart(ctx, req)
	if err != nil {
		return nil, nil, fmt.Errorf("attest: enroll: %w", err)
	}
	secret, err := ak.ActivateCredential(t.dev, attest.EncryptedCredential{Credential: start.GetCredential(), Secret: start.GetSecret()})
	if err != nil {
		return nil, nil, fmt.Errorf("attest: credential activation: %w", err)
	}
	fin, err := b.EnrollFinish(ctx, &apiv1.EnrollFinishRequest{EnrollmentId: start.GetEnrollmentId(), ActivatedSecret: secret})
	if err != nil {
		return nil, nil, fmt.Errorf("attest: enroll: %w", err)
	}
	blob, err := ak.Marshal()
	if err != nil {
		return nil, nil, fmt.Errorf("attest: save attestation key: %w", err)
	}
	sum := sha256.Sum256(ekDER)
	return &State{Name: o.Name, Broker: o.BrokerID, EKFingerprint: hex.EncodeToString(sum[:]), AKBlob: blob}, fin.GetNode(), nil
}

// EK returns the TPM's endorsement public key.
func (t *TPM) EK() (crypto.PublicKey, error) {
	eks, err := t.dev.EKs()
	if err != nil {
		return nil, fmt.Errorf("attest: read EK: %w", err)
	}
	if len(eks) == 0 {
		return nil, errors.New("attest: the TPM reports no endorsement key")
	}
	return eks[0].Public, nil
}
