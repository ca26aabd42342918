package evidence_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest/binding"
	"github.com/attested-dev/attested/broker/evidence"
)

// signer stands in for an AK: its public area in TPM form, and a key that
// signs whatever a test hands it, as a restricted AK would sign any bytes
// that do not start with TPM_GENERATED (via a hash ticket).
type signer struct {
	key    *ecdsa.PrivateKey
	public []byte
}

func newSigner(t *testing.T) signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	pub := legacy.Public{
		Type: legacy.AlgECC, NameAlg: legacy.AlgSHA256,
		Attributes: legacy.FlagSign | legacy.FlagRestricted | legacy.FlagFixedTPM | legacy.FlagFixedParent | legacy.FlagSensitiveDataOrigin | legacy.FlagUserWithAuth,
		ECCParameters: &legacy.ECCParams{Sign: &legacy.SigScheme{Alg: legacy.AlgECDSA, Hash: legacy.AlgSHA256}, CurveID: legacy.CurveNISTP256,
			Point: legacy.ECPoint{XRaw: k.X.FillBytes(make([]byte, 32)), YRaw: k.Y.FillBytes(make([]byte, 32))}},
	}
	enc, err := pub.Encode()
	require.NoError(t, err)
	return signer{k, enc}
}

func (s signer) sign(t *testing.T, msg []byte) []byte {
	d := sha256.Sum256(msg)
	r, ss, err := ecdsa.Sign(rand.Reader, s.key, d[:])
	require.NoError(t, err)
	sig, err := legacy.Signature{Alg: legacy.AlgECDSA, ECC: &legacy.SignatureECC{HashAlg: legacy.AlgSHA256, R: r, S: ss}}.Encode()
	require.NoError(t, err)
	return sig
}

func tagIndex() tpm2.TPMSNVPublic {
	return tpm2.TPMSNVPublic{NVIndex: tpm2.TPMHandle(binding.TagIndex), NameAlg: tpm2.TPMAlgSHA256, DataSize: 32,
		Attributes: tpm2.TPMANV{OwnerWrite: true, WriteDefine: true, WriteLocked: true, Written: true, OwnerRead: true, AuthRead: true, NoDA: true}}
}

func certification(t *testing.T, magic tpm2.TPMGenerated, qualifying, digest []byte) (info, nvPub []byte) {
	pub := tagIndex()
	name, err := tpm2.NVName(&pub)
	require.NoError(t, err)
	att := tpm2.TPMSAttest{
		Magic: magic, Type: tpm2.TPMSTAttestNV, ExtraData: tpm2.TPM2BData{Buffer: qualifying},
		Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestNV, &tpm2.TPMSNVCertifyInfo{IndexName: *name, NVContents: tpm2.TPM2BData{Buffer: digest}}),
	}
	return tpm2.Marshal(att), tpm2.Marshal(pub)
}

func TestTagCertificationVerifies(t *testing.T) {
	ak := newSigner(t)
	qd, digest := make([]byte, 32), binding.TagDigest("n", map[string]string{"region": "EU"})
	info, nvPub := certification(t, tpm2.TPMGeneratedValue, qd, digest)
	got, err := evidence.VerifyTagCertification(ak.public, info, ak.sign(t, info), nvPub, qd)
	require.NoError(t, err)
	assert.Equal(t, digest, got)

	_, err = evidence.VerifyTagCertification(ak.public, info, ak.sign(t, info), nvPub, append([]byte{1}, qd[1:]...))
	assert.ErrorContains(t, err, "not bound to this attestation")
}

// TestTagCertificationWithoutTPMGeneratedMagicIsRefused: a restricted AK
// signs any external data that does not start with TPM_GENERATED, so a
// certification lacking the magic proves nothing.
func TestTagCertificationWithoutTPMGeneratedMagicIsRefused(t *testing.T) {
	ak := newSigner(t)
	qd := make([]byte, 32)
	info, nvPub := certification(t, 0, qd, binding.TagDigest("n", map[string]string{"region": "EU"}))
	_, err := evidence.VerifyTagCertification(ak.public, info, ak.sign(t, info), nvPub, qd)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "TPM_GENERATED magic missing")
}
