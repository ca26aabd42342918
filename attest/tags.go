package attest

import (
	"encoding/json"
	"errors"
	"fmt"

	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/attested-dev/attested/attest/binding"
)

// srkHandle is where go-attestation persists the storage root key its AKs
// are created under.
const srkHandle = 0x81000001

// tagNVPublic is the tag index: written with owner authorization only, and
// write-locked until the owner deletes it (WriteDefine), readable with its
// empty auth value so the AK can certify it.
func tagNVPublic() tpm2.TPMSNVPublic {
	return tpm2.TPMSNVPublic{
		NVIndex: tpm2.TPMHandle(binding.TagIndex),
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			OwnerWrite: true, WriteDefine: true, OwnerRead: true, AuthRead: true, NoDA: true,
			NT: tpm2.TPMNTOrdinary,
		},
		DataSize: 32,
	}
}

// WriteTags stores the tag digest in the TPM's tag NV index and locks it;
// a previous index is deleted first (owner authorization, empty here as on
// most hosts). Only a process with owner authorization can change it.
func (t *TPM) WriteTags(digest []byte) error {
	if len(digest) != 32 {
		return errors.New("attest: tag digest must be 32 bytes")
	}
	tp := transport.FromReadWriter(t.ch)
	owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	idx := tpm2.TPMHandle(binding.TagIndex)
	if pub, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tp); err == nil {
		if _, err := (tpm2.NVUndefineSpace{AuthHandle: owner, NVIndex: tpm2.NamedHandle{Handle: idx, Name: pub.NVName}}).Execute(tp); err != nil {
			return fmt.Errorf("attest: delete old tag index: %w", err)
		}
	}
	public := tagNVPublic()
	if _, err := (tpm2.NVDefineSpace{AuthHandle: owner, PublicInfo: tpm2.New2B(public)}).Execute(tp); err != nil {
		return fmt.Errorf("attest: define tag index: %w", err)
	}
	pub, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tp)
	if err != nil {
		return fmt.Errorf("attest: read tag index: %w", err)
	}
	named := tpm2.NamedHandle{Handle: idx, Name: pub.NVName}
	if _, err := (tpm2.NVWrite{AuthHandle: owner, NVIndex: named, Data: tpm2.TPM2BMaxNVBuffer{Buffer: digest}}).Execute(tp); err != nil {
		return fmt.Errorf("attest: write tag index: %w", err)
	}
	if _, err := (tpm2.NVWriteLock{AuthHandle: owner, NVIndex: named}).Execute(tp); err != nil {
		return fmt.Errorf("attest: lock tag index: %w", err)
	}
	return nil
}

// TagCertification is the AK's TPM2_NV_Certify of the tag index.
type TagCertification struct {
	Info, Signature, NVPublic []byte
}

// errNoTagIndex means the node has no tags written; it sends none.
var errNoTagIndex = errors.New("attest: no tag index")

// certifyTags has the AK certify the tag index's contents over the same
// qualifying data as the quote.
func (t *TPM) certifyTags(ak *akHandle, qualifying []byte) (*TagCertification, error) {
	tp := transport.FromReadWriter(t.ch)
	idx := tpm2.TPMHandle(binding.TagIndex)
	pub, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tp)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, errNoTagIndex
	}
	if err != nil {
		// Not "no tags": a TPM that fails here must not silently drop the
		// certification a policy may require.
		return nil, fmt.Errorf("attest: read tag index: %w", err)
	}
	rsp, err := tpm2.NVCertify{
		SignHandle:     tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: tpm2.PasswordAuth(nil)},
		AuthHandle:     tpm2.AuthHandle{Handle: idx, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:        tpm2.NamedHandle{Handle: idx, Name: pub.NVName},
		QualifyingData: tpm2.TPM2BData{Buffer: qualifying},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		Size:           32,
	}.Execute(tp)
	if err != nil {
		return nil, fmt.Errorf("attest: certify tag index: %w", err)
	}
	nvPub, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("attest: tag index public area: %w", err)
	}
	return &TagCertification{Info: rsp.CertifyInfo.Bytes(), Signature: tpm2.Marshal(rsp.Signature), NVPublic: tpm2.Marshal(nvPub)}, nil
}

// akHandle is the attestation key loaded in the TPM. One load serves the
// quote and every certification of an attestation.
type akHandle struct {
	tp     transport.TPM
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
}

func (a *akHandle) flush() { (tpm2.FlushContext{FlushHandle: a.handle}).Execute(a.tp) }

// loadAK loads a go-attestation AK blob under the SRK.
func (t *TPM) loadAK(blob []byte) (*akHandle, error) {
	var k struct {
		Public []byte
		Blob   []byte `json:"KeyBlob"`
	}
	if err := json.Unmarshal(blob, &k); err != nil || len(k.Public) == 0 || len(k.Blob) == 0 {
		return nil, errors.New("attest: attestation key blob is not in the expected format")
	}
	h, _, err := legacy.Load(t.ch, srkHandle, "", k.Public, k.Blob)
	if err != nil {
		return nil, fmt.Errorf("attest: load attestation key (was the TPM cleared? enroll again): %w", err)
	}
	tp := transport.FromReadWriter(t.ch)
	pub, err := (tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(h)}).Execute(tp)
	if err != nil {
		legacy.FlushContext(t.ch, h)
		return nil, fmt.Errorf("attest: attestation key: %w", err)
	}
	return &akHandle{tp: tp, handle: tpm2.TPMHandle(h), name: pub.Name}, nil
}

// RemoveTags deletes the tag index (owner authorization).
func (t *TPM) RemoveTags() error {
	tp := transport.FromReadWriter(t.ch)
	idx := tpm2.TPMHandle(binding.TagIndex)
	pub, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tp)
	if err != nil {
		return nil
	}
	owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	if _, err := (tpm2.NVUndefineSpace{AuthHandle: owner, NVIndex: tpm2.NamedHandle{Handle: idx, Name: pub.NVName}}).Execute(tp); err != nil {
		return fmt.Errorf("attest: delete tag index: %w", err)
	}
	return nil
}
