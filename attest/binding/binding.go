// Package binding defines what a node's quote and a broker's release are
// bound to. Node and broker must compute these identically, so both import
// this package rather than each keeping a copy.
package binding

import (
	"crypto/ecdh"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"

	"github.com/google/go-tpm/tpm2"
)

// QualifyingData is the quote's extraData: a hash over the broker nonce, the
// session public key and the node name, each length-prefixed so no two
// inputs collide. A quote over it proves the TPM saw this nonce for this
// session key, so the evidence cannot be replayed or lent to another key.
func QualifyingData(nonce, sessionPublic []byte, node string) []byte {
	h := sha256.New()
	h.Write([]byte("attested/v1/quote\x00"))
	for _, part := range [][]byte{nonce, sessionPublic, []byte(node)} {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(part)))
		h.Write(n[:])
		h.Write(part)
	}
	return h.Sum(nil)
}

// ReleaseInfo is the HPKE info for a layer key released to a session.
func ReleaseInfo(node string, sessionPublic []byte, key string, version uint32) []byte {
	sum := sha256.Sum256(sessionPublic)
	return fmt.Appendf(nil, "attested/v1/release\x00%s\x00%x\x00%s\x00%d", node, sum, key, version)
}

// ExplainInfo is the HPKE info of an explanation sealed to a session.
func ExplainInfo(node string, sessionPublic []byte) []byte {
	sum := sha256.Sum256(sessionPublic)
	return fmt.Appendf(nil, "attested/v1/explain\x00%s\x00%x", node, sum)
}

// TagsInfo is the HPKE info of a node's tags sealed to its session.
func TagsInfo(node string, sessionPublic []byte) []byte {
	sum := sha256.Sum256(sessionPublic)
	return fmt.Appendf(nil, "attested/v1/tags\x00%s\x00%x", node, sum)
}

// TagDigest is what a node's TPM holds in its tag NV index: a hash over the
// node name and its tags, sorted, so node and broker agree byte for byte.
func TagDigest(node string, tags map[string]string) []byte {
	keys := make([]string, 0, len(tags))
	for k := range tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	fmt.Fprintf(h, "attested/v1/tags\x00%s\x00", node)
	for _, k := range keys {
		fmt.Fprintf(h, "%s=%s\n", k, tags[k])
	}
	return h.Sum(nil)
}

// TagIndex is the NV index holding the tag digest, in the owner range.
const TagIndex = 0x01800A77

// SessionKeyPCRs are the PCRs a session key's TPM half is bound to: every
// SHA-256 PCR but IMA's 10, which grows while the host runs (IMA facts are
// as fresh as the session, bounded by its lifetime and maxSessionAge).
func SessionKeyPCRs() []int {
	out := make([]int, 0, 23)
	for i := range 24 {
		if i != 10 {
			out = append(out, i)
		}
	}
	return out
}

// PCRSelection is the SHA-256 bank selection of pcrs, in the TPM's format.
func PCRSelection(pcrs []int) tpm2.TPMLPCRSelection {
	idx := make([]uint, len(pcrs))
	for i, p := range pcrs {
		idx[i] = uint(p)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(idx...),
	}}}
}

// PCRDigest is the SHA-256 over the values of pcrs in ascending index
// order, as TPM2_PolicyPCR computes it.
func PCRDigest(values map[int][]byte, pcrs []int) ([]byte, error) {
	sorted := slices.Clone(pcrs)
	slices.Sort(sorted)
	h := sha256.New()
	for _, i := range sorted {
		v, ok := values[i]
		if !ok {
			return nil, fmt.Errorf("binding: no value for PCR %d", i)
		}
		h.Write(v)
	}
	return h.Sum(nil), nil
}

// SessionKeyPolicy is the authPolicy of a session key: TPM2_PolicyPCR over
// pcrs holding the given values. The node creates the key with it; the
// broker recomputes it from the quoted values, so a key it accepts opens
// nothing once one of those PCRs moves.
func SessionKeyPolicy(values map[int][]byte, pcrs []int) ([]byte, error) {
	d, err := PCRDigest(values, pcrs)
	if err != nil {
		return nil, err
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: d}, Pcrs: PCRSelection(pcrs)}).Update(calc); err != nil {
		return nil, fmt.Errorf("binding: session key policy: %w", err)
	}
	return calc.Hash().Digest, nil
}

// SessionKeyPoint returns the P-256 point of a session key's public area;
// it is the classical half of the session's hybrid public key.
func SessionKeyPoint(pub *tpm2.TPMTPublic) (*ecdh.PublicKey, error) {
	if pub.Type != tpm2.TPMAlgECC {
		return nil, errors.New("binding: session key is not an ECC key")
	}
	parms, err := pub.Parameters.ECCDetail()
	if err != nil {
		return nil, fmt.Errorf("binding: session key parameters: %w", err)
	}
	if parms.CurveID != tpm2.TPMECCNistP256 {
		return nil, errors.New("binding: session key is not on P-256")
	}
	point, err := pub.Unique.ECC()
	if err != nil {
		return nil, fmt.Errorf("binding: session key point: %w", err)
	}
	k, err := tpm2.ECDHPub(parms, point)
	if err != nil {
		return nil, fmt.Errorf("binding: session key point: %w", err)
	}
	return k, nil
}
