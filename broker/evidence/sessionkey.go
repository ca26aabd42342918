package evidence

import (
	"bytes"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"

	"github.com/attested-dev/attested/attest/binding"
)

// SessionKey is what the broker needs to accept a session key's TPM half.
type SessionKey struct {
	// Public is the key's TPMT_PUBLIC; CertifyInfo and Signature are the
	// AK's TPM2_CertifyCreation of it.
	Public, CertifyInfo, Signature []byte
	// PCRs are the PCRs the node says the key is bound to.
	PCRs []int
}

// VerifySessionKey checks that the session public key is a key the node's
// TPM created (certified by the enrolled AK
// over this attestation's qualifying data), that can never leave that TPM,
// and that only TPM2_PolicyPCR over the quoted values of at least the
// required PCRs unlocks: so whatever the broker seals to the session opens
// only in that TPM, and only while those PCRs hold.
func VerifySessionKey(akPublic []byte, k SessionKey, sessionPublic, qualifying []byte, quoted map[int][]byte) error {
	ak, err := attest.ParseAKPublic(akPublic)
	if err != nil {
		return fmt.Errorf("enrolled AK does not parse: %v", err)
	}
	if err := verifySignature(ak, k.CertifyInfo, k.Signature); err != nil {
		return fmt.Errorf("session key certification is not signed by this node's enrolled AK: %v", err)
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](k.CertifyInfo)
	if err != nil {
		return fmt.Errorf("session key certification does not parse: %v", err)
	}
	// go-tpm does not enforce the magic on unmarshal; without it a
	// restricted AK might have signed caller-chosen bytes.
	if err := att.Magic.Check(); err != nil {
		return errors.New("session key certification was not produced by the TPM (TPM_GENERATED magic missing)")
	}
	if att.Type != tpm2.TPMSTAttestCreation {
		return errors.New("session key certification is not a TPM2_CertifyCreation")
	}
	if !bytes.Equal(att.ExtraData.Buffer, qualifying) {
		return errors.New("session key certification is not bound to this attestation's nonce and session key")
	}
	creation, err := att.Attested.Creation()
	if err != nil {
		return fmt.Errorf("session key certification: %v", err)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](k.Public)
	if err != nil {
		return fmt.Errorf("session key public area does not parse: %v", err)
	}
	if pub.NameAlg != tpm2.TPMAlgSHA256 {
		return errors.New("session key name algorithm is not SHA-256")
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		return fmt.Errorf("session key name: %v", err)
	}
	if !bytes.Equal(creation.ObjectName.Buffer, name.Buffer) {
		return errors.New("session key certification is of another key than the public area sent")
	}
	a := pub.ObjectAttributes
	switch {
	case !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin:
		return errors.New("session key can leave the TPM or was imported (fixedTPM, fixedParent and sensitiveDataOrigin required)")
	case a.UserWithAuth || !a.AdminWithPolicy:
		return errors.New("session key can be used without its PCR policy (userWithAuth set or adminWithPolicy clear)")
	case !a.Decrypt || a.SignEncrypt || a.Restricted:
		return errors.New("session key is not a plain decryption key")
	}
	point, err := binding.SessionKeyPoint(pub)
	if err != nil {
		return err
	}
	if !bytes.Equal(sessionPublic, point.Bytes()) {
		return errors.New("the session public key is not the TPM-certified session key")
	}
	for _, need := range binding.SessionKeyPCRs() {
		if !slices.Contains(k.PCRs, need) {
			return fmt.Errorf("session key is not bound to PCR %d (it must be bound to PCRs %v)", need, binding.SessionKeyPCRs())
		}
	}
	for _, p := range k.PCRs {
		if p < 0 || p >= 24 {
			return fmt.Errorf("session key is bound to PCR %d, which no quote covers", p)
		}
	}
	want, err := binding.SessionKeyPolicy(quoted, k.PCRs)
	if err != nil {
		return err
	}
	if !bytes.Equal(pub.AuthPolicy.Buffer, want) {
		return errors.New("session key policy is not PolicyPCR over the quoted PCR values (created for another state of the node)")
	}
	return nil
}
