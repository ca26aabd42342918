// Package enrolltest enrolls with a broker the way an attacker without a
// TPM would: an "EK" and an attestation key that live in software, an EK
// public area that claims whatever the attacker likes, an AK public area that
// claims restricted/fixedTPM, and credential activation done by hand. Without
// an EK certificate the broker cannot tell this from a TPM; tests use it to
// prove what such a caller can and cannot obtain.
package enrolltest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// PolicyA is the TCG EK Credential Profile's low-range EK authPolicy
// (PolicySecret(TPM_RH_ENDORSEMENT), SHA-256).
var PolicyA = mustHex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")

// PolicyBSHA256 is the high-range EK authPolicy (PolicyOR of PolicyA and
// PolicyC, SHA-256).
var PolicyBSHA256 = mustHex("ca3d0a99a2b93906f7a3342414efcfb3a385d44cd1fd459089d19b5071c0b7a0")

// Attribute sets of the TCG EK templates.
const (
	LowRangeAttributes = tpm2.FlagFixedTPM | tpm2.FlagFixedParent | tpm2.FlagSensitiveDataOrigin |
		tpm2.FlagAdminWithPolicy | tpm2.FlagRestricted | tpm2.FlagDecrypt
	HighRangeAttributes = LowRangeAttributes | tpm2.FlagUserWithAuth
)

// Impostor is a TPM made of software keys.
type Impostor struct {
	ek    crypto.PrivateKey // *rsa.PrivateKey or *ecdsa.PrivateKey
	ekPub crypto.PublicKey
	// Area is the EK public area sent with the request: the TCG low-range
	// template holding the EK's key, unless a test changes it.
	Area tpm2.Public
	// AreaBytes, when set, is sent instead of Area's encoding.
	AreaBytes []byte
	// EKPublic, when set, is sent as the EK (PKIX DER) instead of the
	// impostor's own key: an attacker copying a victim's EK.
	EKPublic []byte

	ak       *ecdsa.PrivateKey
	akParams *apiv1.AKParameters
	akName   []byte
}

// NewRSA returns an impostor with an RSA EK of the given size.
func NewRSA(bits int) (*Impostor, error) {
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		return nil, err
	}
	area := tpm2.Public{
		Type: tpm2.AlgRSA, NameAlg: tpm2.AlgSHA256, Attributes: LowRangeAttributes, AuthPolicy: PolicyA,
		RSAParameters: &tpm2.RSAParams{
			Symmetric:  &tpm2.SymScheme{Alg: tpm2.AlgAES, KeyBits: 128, Mode: tpm2.AlgCFB},
			KeyBits:    uint16(bits),
			ModulusRaw: k.N.FillBytes(make([]byte, (bits+7)/8)),
		},
	}
	return newImpostor(k, &k.PublicKey, area)
}

// NewECC returns an impostor with a NIST P-256 EK (fast to generate, for
// floods).
func NewECC() (*Impostor, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	pub, err := k.PublicKey.ECDH()
	if err != nil {
		return nil, err
	}
	xy := pub.Bytes()[1:]
	area := tpm2.Public{
		Type: tpm2.AlgECC, NameAlg: tpm2.AlgSHA256, Attributes: LowRangeAttributes, AuthPolicy: PolicyA,
		ECCParameters: &tpm2.ECCParams{
			Symmetric: &tpm2.SymScheme{Alg: tpm2.AlgAES, KeyBits: 128, Mode: tpm2.AlgCFB},
			CurveID:   tpm2.CurveNISTP256,
			Point:     tpm2.ECPoint{XRaw: xy[:32], YRaw: xy[32:]},
		},
	}
	return newImpostor(k, &k.PublicKey, area)
}

func newImpostor(ek crypto.PrivateKey, ekPub crypto.PublicKey, area tpm2.Public) (*Impostor, error) {
	i := &Impostor{ek: ek, ekPub: ekPub, Area: area}
	if err := i.makeAK(); err != nil {
		return nil, err
	}
	return i, nil
}

// makeAK creates a software ECDSA key whose public area claims to be a
// restricted, fixedTPM, TPM-generated signing key, with a creation
// attestation it signs itself: exactly what go-attestation checks.
func (i *Impostor) makeAK() error {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	pubECDH, err := k.PublicKey.ECDH()
	if err != nil {
		return err
	}
	xy := pubECDH.Bytes()[1:]
	pub := tpm2.Public{
		Type: tpm2.AlgECC, NameAlg: tpm2.AlgSHA256, Attributes: tpm2.FlagSignerDefault | tpm2.FlagNoDA,
		ECCParameters: &tpm2.ECCParams{
			Sign:    &tpm2.SigScheme{Alg: tpm2.AlgECDSA, Hash: tpm2.AlgSHA256},
			CurveID: tpm2.CurveNISTP256,
			Point:   tpm2.ECPoint{XRaw: xy[:32], YRaw: xy[32:]},
		},
	}
	pubBytes, err := pub.Encode()
	if err != nil {
		return err
	}
	name, err := pub.Name()
	if err != nil {
		return err
	}
	cd := tpm2.CreationData{ParentNameAlg: tpm2.AlgSHA256, ParentName: tpm2.Name{Handle: ptr(tpmutil.Handle(0x81000001))},
		ParentQualifiedName: tpm2.Name{Handle: ptr(tpmutil.Handle(0x81000001))}}
	cdBytes, err := cd.EncodeCreationData()
	if err != nil {
		return err
	}
	cdSum := sha256.Sum256(cdBytes)
	att := tpm2.AttestationData{
		Magic: 0xff544347, Type: tpm2.TagAttestCreation, QualifiedSigner: tpm2.Name{Handle: ptr(tpmutil.Handle(0x40000001))},
		AttestedCreationInfo: &tpm2.CreationInfo{Name: name, OpaqueDigest: cdSum[:]},
	}
	attBytes, err := att.Encode()
	if err != nil {
		return err
	}
	attSum := sha256.Sum256(attBytes)
	r, s, err := ecdsa.Sign(rand.Reader, k, attSum[:])
	if err != nil {
		return err
	}
	sig, err := tpm2.Signature{Alg: tpm2.AlgECDSA, ECC: &tpm2.SignatureECC{HashAlg: tpm2.AlgSHA256, R: r, S: s}}.Encode()
	if err != nil {
		return err
	}
	nameBytes, err := name.Digest.Encode()
	if err != nil {
		return err
	}
	i.ak, i.akName = k, nameBytes
	i.akParams = &apiv1.AKParameters{Public: pubBytes, CreateData: cdBytes, CreateAttestation: attBytes, CreateSignature: sig}
	return nil
}

func ptr[T any](v T) *T { return &v }

// EKDER is the impostor's EK, PKIX DER.
func (i *Impostor) EKDER() []byte {
	der, err := x509.MarshalPKIXPublicKey(i.ekPub)
	if err != nil {
		panic(err)
	}
	return der
}

// Fingerprint is the EK fingerprint as the broker prints it.
func (i *Impostor) Fingerprint() string {
	sum := sha256.Sum256(i.EKDER())
	return "SHA256:" + hex.EncodeToString(sum[:])
}

// Request is the EnrollStart request the impostor sends.
func (i *Impostor) Request(name, joinToken string) (*apiv1.EnrollStartRequest, error) {
	area := i.AreaBytes
	if area == nil {
		var err error
		if area, err = i.Area.Encode(); err != nil {
			return nil, err
		}
	}
	ek := i.EKPublic
	if ek == nil {
		ek = i.EKDER()
	}
	return &apiv1.EnrollStartRequest{Name: name, EkPublic: ek, EkPublicArea: area, JoinToken: joinToken, Ak: i.akParams}, nil
}

// Enroll runs both enrollment steps against b.
func (i *Impostor) Enroll(ctx context.Context, b apiv1.BrokerClient, name, joinToken string) (*apiv1.Node, error) {
	req, err := i.Request(name, joinToken)
	if err != nil {
		return nil, err
	}
	start, err := b.EnrollStart(ctx, req)
	if err != nil {
		return nil, err
	}
	secret, err := i.Activate(start)
	if err != nil {
		return nil, err
	}
	fin, err := b.EnrollFinish(ctx, &apiv1.EnrollFinishRequest{EnrollmentId: start.GetEnrollmentId(), ActivatedSecret: secret})
	if err != nil {
		return nil, err
	}
	return fin.GetNode(), nil
}

// Activate does TPM2_ActivateCredential in software: recover the seed with
// the EK's private key, check the integrity HMAC over the AK's name, and
// decrypt the credential (TPM 2.0 Part 1, 24).
func (i *Impostor) Activate(resp *apiv1.EnrollStartResponse) ([]byte, error) {
	cred, secret := resp.GetCredential(), resp.GetSecret()
	if len(cred) < 2 || len(secret) < 2 {
		return nil, errors.New("enrolltest: short credential")
	}
	var seed []byte
	switch k := i.ek.(type) {
	case *rsa.PrivateKey:
		var err error
		seed, err = rsa.DecryptOAEP(sha256.New(), nil, k, secret[2:], []byte("IDENTITY\x00"))
		if err != nil {
			return nil, fmt.Errorf("enrolltest: seed: %w", err)
		}
	case *ecdsa.PrivateKey:
		in := bytes.NewBuffer(secret[2:])
		var x, y tpmutil.U16Bytes
		if err := tpmutil.UnpackBuf(in, &x, &y); err != nil {
			return nil, err
		}
		eph, err := ecdh.P256().NewPublicKey(append(append([]byte{4}, x...), y...))
		if err != nil {
			return nil, err
		}
		priv, err := k.ECDH()
		if err != nil {
			return nil, err
		}
		z, err := priv.ECDH(eph)
		if err != nil {
			return nil, err
		}
		ekX := priv.PublicKey().Bytes()[1:33]
		seed, err = tpm2.KDFe(tpm2.AlgSHA256, z, "IDENTITY", x, ekX, 256)
		if err != nil {
			return nil, err
		}
	}
	id := cred[2:]
	if len(id) < 2 {
		return nil, errors.New("enrolltest: short ID object")
	}
	macLen := int(binary.BigEndian.Uint16(id))
	if len(id) < 2+macLen {
		return nil, errors.New("enrolltest: short ID object")
	}
	mac, encIdentity := id[2:2+macLen], id[2+macLen:]
	macKey, err := tpm2.KDFa(tpm2.AlgSHA256, seed, "INTEGRITY", nil, nil, 256)
	if err != nil {
		return nil, err
	}
	h := hmac.New(sha256.New, macKey)
	h.Write(encIdentity)
	h.Write(i.akName)
	if !hmac.Equal(h.Sum(nil), mac) {
		return nil, errors.New("enrolltest: credential integrity check failed")
	}
	symKey, err := tpm2.KDFa(tpm2.AlgSHA256, seed, "STORAGE", i.akName, nil, 128)
	if err != nil {
		return nil, err
	}
	c, err := aes.NewCipher(symKey)
	if err != nil {
		return nil, err
	}
	cv := make([]byte, len(encIdentity))
	//lint:ignore SA1019 TPM credential blobs are AES-CFB by specification (TPM 2.0 Part 1, 24.4).
	cipher.NewCFBDecrypter(c, make([]byte, aes.BlockSize)).XORKeyStream(cv, encIdentity)
	if len(cv) < 2 || int(binary.BigEndian.Uint16(cv)) != len(cv)-2 {
		return nil, errors.New("enrolltest: credential does not decrypt")
	}
	return cv[2:], nil
}

// RSAPublicArea is the TCG low-range (L-1) EK public area for an RSA key,
// as a TPM would report it: what an attacker rebuilds from a victim's EK.
func RSAPublicArea(pub *rsa.PublicKey) ([]byte, error) {
	bits := pub.N.BitLen()
	return tpm2.Public{
		Type: tpm2.AlgRSA, NameAlg: tpm2.AlgSHA256, Attributes: LowRangeAttributes, AuthPolicy: PolicyA,
		RSAParameters: &tpm2.RSAParams{
			Symmetric:  &tpm2.SymScheme{Alg: tpm2.AlgAES, KeyBits: 128, Mode: tpm2.AlgCFB},
			KeyBits:    uint16(bits),
			ModulusRaw: pub.N.FillBytes(make([]byte, (bits+7)/8)),
		},
	}.Encode()
}

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}
