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
	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpmutil"
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
	area, err := t.ekPublicArea(ek.Public)
	if err != nil {
		return nil, nil, err
	}
	ak, err := t.dev.NewAK(&attest.AKConfig{Algorithm: attest.ECDSA})
	if err != nil {
		return nil, nil, fmt.Errorf("attest: create attestation key: %w", err)
	}
	defer ak.Close(t.dev)
	p := ak.AttestationParameters()
	req := &apiv1.EnrollStartRequest{
		Name: o.Name, EkPublic: ekDER, EkPublicArea: area, JoinToken: o.JoinToken,
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

// Where go-attestation keeps the RSA EK and the nonce some manufacturers
// mix into its template ("Registry of Reserved TPM 2.0 Handles and
// Localities").
const (
	ekHandle     = tpmutil.Handle(0x81010001)
	ekNonceIndex = tpmutil.Handle(0x01c00003)
)

// ekPublicArea returns the TPMT_PUBLIC of the EK that credential activation
// will use, as the TPM reports it, so the broker can check it is a standard
// EK template for the key we present. go-attestation activates with the RSA
// EK persisted at 0x81010001, creating it there from the TCG template when
// absent; so do we, first, so that what we send is the key the TPM uses.
func (t *TPM) ekPublicArea(want crypto.PublicKey) ([]byte, error) {
	tp := transport.FromReadWriter(t.ch)
	rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(ekHandle)}.Execute(tp)
	if err != nil {
		if !isNoObject(err) {
			return nil, fmt.Errorf("attest: read EK public area: %w", err)
		}
		if err := t.persistEK(); err != nil {
			return nil, err
		}
		if rp, err = (tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(ekHandle)}).Execute(tp); err != nil {
			return nil, fmt.Errorf("attest: read EK public area: %w", err)
		}
	}
	area := rp.OutPublic.Bytes()
	pub, err := legacy.DecodePublic(area)
	if err != nil {
		return nil, fmt.Errorf("attest: EK public area: %w", err)
	}
	key, err := pub.Key()
	if err != nil {
		return nil, fmt.Errorf("attest: EK public area: %w", err)
	}
	if k, ok := key.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(want) {
		return nil, fmt.Errorf("attest: the EK persisted at %#x is not the key in the TPM's EK certificate; credential activation would fail", uint32(ekHandle))
	}
	return area, nil
}

// persistEK creates the RSA EK from go-attestation's template (the TCG
// low-range L-1, with the manufacturer's nonce when the TPM has one) and
// persists it where go-attestation looks for it.
func (t *TPM) persistEK() error {
	tmpl := ekTemplateRSA()
	if nonce, err := legacy.NVReadEx(t.ch, ekNonceIndex, legacy.HandleOwner, "", 0); err == nil {
		copy(tmpl.RSAParameters.ModulusRaw, nonce)
	}
	h, _, err := legacy.CreatePrimary(t.ch, legacy.HandleEndorsement, legacy.PCRSelection{}, "", "", tmpl)
	if err != nil {
		return fmt.Errorf("attest: create EK: %w", err)
	}
	defer legacy.FlushContext(t.ch, h)
	if err := legacy.EvictControl(t.ch, "", legacy.HandleOwner, h, ekHandle); err != nil {
		return fmt.Errorf("attest: persist EK at %#x: %w", uint32(ekHandle), err)
	}
	return nil
}

// ekTemplateRSA is the TCG EK Credential Profile's low-range RSA 2048 EK
// template (L-1), which go-attestation also creates.
func ekTemplateRSA() legacy.Public {
	return legacy.Public{
		Type: legacy.AlgRSA, NameAlg: legacy.AlgSHA256,
		Attributes: legacy.FlagFixedTPM | legacy.FlagFixedParent | legacy.FlagSensitiveDataOrigin |
			legacy.FlagAdminWithPolicy | legacy.FlagRestricted | legacy.FlagDecrypt,
		// PolicySecret(TPM_RH_ENDORSEMENT)
		AuthPolicy: []byte{
			0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
			0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
		},
		RSAParameters: &legacy.RSAParams{
			Symmetric:  &legacy.SymScheme{Alg: legacy.AlgAES, KeyBits: 128, Mode: legacy.AlgCFB},
			KeyBits:    2048,
			ModulusRaw: make([]byte, 256),
		},
	}
}

// isNoObject reports a TPM error saying no object is at the handle.
func isNoObject(err error) bool { return errors.Is(err, tpm2.TPMRCHandle) }
