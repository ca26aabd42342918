package evidence

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rsa"
	"errors"
	"fmt"

	"github.com/google/go-attestation/attest"
	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpm2"

	"github.com/attested-dev/attested/attest/binding"
)

// VerifyTagCertification checks a TPM2_NV_Certify of the node's tag index:
// signed by the enrolled AK over the quote's qualifying data, of the tag
// index with attributes only the owner can write and locked, and returns
// the digest the index holds.
func VerifyTagCertification(akPublic, info, sig, nvPublic, qualifying []byte) ([]byte, error) {
	ak, err := attest.ParseAKPublic(akPublic)
	if err != nil {
		return nil, fmt.Errorf("enrolled AK does not parse: %v", err)
	}
	if err := verifySignature(ak, info, sig); err != nil {
		return nil, fmt.Errorf("tag certification is not signed by this node's enrolled AK: %v", err)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMSNVPublic](nvPublic)
	if err != nil {
		return nil, fmt.Errorf("tag index public area does not parse: %v", err)
	}
	a := pub.Attributes
	switch {
	case uint32(pub.NVIndex) != binding.TagIndex:
		return nil, fmt.Errorf("certified NV index is 0x%08x, not the tag index 0x%08x", uint32(pub.NVIndex), uint32(binding.TagIndex))
	case !a.OwnerWrite || a.AuthWrite || a.PolicyWrite || a.PPWrite:
		return nil, errors.New("tag index can be written by others than the TPM owner")
	case !a.WriteDefine || !a.WriteLocked:
		return nil, errors.New("tag index is not write-locked")
	case pub.NameAlg != tpm2.TPMAlgSHA256 || pub.DataSize != 32:
		return nil, errors.New("tag index is not a SHA-256 digest")
	}
	name, err := tpm2.NVName(pub)
	if err != nil {
		return nil, fmt.Errorf("tag index name: %v", err)
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](info)
	if err != nil {
		return nil, fmt.Errorf("tag certification does not parse: %v", err)
	}
	// go-tpm does not enforce the magic on unmarshal. Without it, a
	// restricted AK could have signed caller-chosen bytes (TPM2_Sign with a
	// hash ticket over data not starting with TPM_GENERATED).
	if err := att.Magic.Check(); err != nil {
		return nil, errors.New("tag certification was not produced by the TPM (TPM_GENERATED magic missing)")
	}
	if att.Type != tpm2.TPMSTAttestNV {
		return nil, errors.New("signed structure is not an NV certification")
	}
	if !bytes.Equal(att.ExtraData.Buffer, qualifying) {
		return nil, errors.New("tag certification is not bound to this attestation's nonce and session key")
	}
	nv, err := att.Attested.NV()
	if err != nil {
		return nil, fmt.Errorf("tag certification: %v", err)
	}
	if !bytes.Equal(nv.IndexName.Buffer, name.Buffer) {
		return nil, errors.New("tag certification is of another NV index than the public area sent")
	}
	if nv.Offset != 0 || len(nv.NVContents.Buffer) != 32 {
		return nil, errors.New("tag certification does not cover the whole digest")
	}
	return nv.NVContents.Buffer, nil
}

func verifySignature(ak *attest.AKPublic, msg, sig []byte) error {
	s, err := legacy.DecodeSignature(bytes.NewBuffer(sig))
	if err != nil {
		return fmt.Errorf("signature does not parse: %v", err)
	}
	h := ak.Hash.New()
	h.Write(msg)
	digest := h.Sum(nil)
	switch pub := ak.Public.(type) {
	case *ecdsa.PublicKey:
		if s.ECC == nil || !ecdsa.Verify(pub, digest, s.ECC.R, s.ECC.S) {
			return errors.New("ECDSA signature does not verify")
		}
	case *rsa.PublicKey:
		if s.RSA == nil {
			return errors.New("not an RSA signature")
		}
		return rsa.VerifyPKCS1v15(pub, ak.Hash, digest, s.RSA.Signature)
	default:
		return fmt.Errorf("unsupported AK type %T", pub)
	}
	return nil
}
