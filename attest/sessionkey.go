package attest

import (
	"bytes"
	"crypto/ecdh"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/attested-dev/attested/attest/binding"
)

// SessionKey is the TPM half of a session key: a P-256 ECDH key created in
// the node's TPM under the storage root key, fixedTPM and fixedParent, whose
// only authorization is TPM2_PolicyPCR over the PCR values the session's
// quote covered. Its private part is the TPM's own wrapping: it loads only
// in this TPM, and ECDH with it succeeds only while those PCRs hold. A copy
// of a session file is therefore useless off this node, and on this node
// once its measured state moves.
type SessionKey struct {
	// Public is the key's TPMT_PUBLIC.
	Public []byte `json:"public"`
	// Private is the key's TPM2B_PRIVATE contents, sealed by the SRK.
	Private []byte `json:"private"`
	// ParentName is the SRK's name, which loading under it needs.
	ParentName []byte `json:"parentName"`
	// PCRs and PCRDigest are the PolicyPCR the key is bound to.
	PCRs      []int  `json:"pcrs"`
	PCRDigest []byte `json:"pcrDigest"`
}

// ErrSessionKeyLocked means the TPM refused the session key because a PCR it
// is bound to has moved: the session no longer describes this node.
var ErrSessionKeyLocked = errors.New("attest: the session key is locked: a PCR it is bound to changed since the attestation (attest again)")

// sessionKeyTemplate is a decrypt-only P-256 key that only a PolicyPCR
// session can use (userWithAuth clear), administered only by policy too.
func sessionKeyTemplate(policy []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			UserWithAuth: false, AdminWithPolicy: true, NoDA: true, Decrypt: true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
	}
}

// keyCreation is what TPM2_CertifyCreation needs from TPM2_Create.
type keyCreation struct {
	hash   tpm2.TPM2BDigest
	ticket tpm2.TPMTTKCreation
}

// createSessionKey creates a session key bound to pcrs holding values.
func (t *TPM) createSessionKey(values map[int][]byte, pcrs []int) (*SessionKey, *keyCreation, error) {
	tp := transport.FromReadWriter(t.ch)
	digest, err := binding.PCRDigest(values, pcrs)
	if err != nil {
		return nil, nil, err
	}
	policy, err := binding.SessionKeyPolicy(values, pcrs)
	if err != nil {
		return nil, nil, err
	}
	srk, err := (tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(srkHandle)}).Execute(tp)
	if err != nil {
		return nil, nil, fmt.Errorf("attest: storage root key (was the TPM cleared? enroll again): %w", err)
	}
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(srkHandle), Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     tpm2.New2B(sessionKeyTemplate(policy)),
	}.Execute(tp)
	if err != nil {
		return nil, nil, fmt.Errorf("attest: create session key: %w", err)
	}
	return &SessionKey{
		Public: rsp.OutPublic.Bytes(), Private: rsp.OutPrivate.Buffer, ParentName: srk.Name.Buffer,
		PCRs: pcrs, PCRDigest: digest,
	}, &keyCreation{hash: rsp.CreationHash, ticket: rsp.CreationTicket}, nil
}

// ECDHPublic returns the key's point.
func (k *SessionKey) ECDHPublic() (*ecdh.PublicKey, error) {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](k.Public)
	if err != nil {
		return nil, fmt.Errorf("attest: session key public area: %w", err)
	}
	return binding.SessionKeyPoint(pub)
}

// loaded is a session key loaded into the TPM.
type loaded struct {
	tp     transport.TPM
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	// private is the blob it was loaded from, which names it.
	private []byte
	// policy is a policy session kept for the key's uses: the TPM resets
	// it after each, and each use runs PolicyPCR in it again.
	policy      tpm2.Session
	closePolicy func() error
}

func (l *loaded) flush() {
	l.dropPolicy()
	(tpm2.FlushContext{FlushHandle: l.handle}).Execute(l.tp)
}

func (l *loaded) dropPolicy() {
	if l.closePolicy != nil {
		l.closePolicy()
	}
	l.policy, l.closePolicy = nil, nil
}

// authorize returns the key's policy session satisfied for one use: its
// PCRs must hold the values the key was created for.
func (l *loaded) authorize(k *SessionKey) (tpm2.Session, error) {
	if l.policy == nil {
		sess, closer, err := tpm2.PolicySession(l.tp, tpm2.TPMAlgSHA256, 16)
		if err != nil {
			return nil, err
		}
		l.policy, l.closePolicy = sess, closer
	}
	_, err := tpm2.PolicyPCR{PolicySession: l.policy.Handle(), PcrDigest: tpm2.TPM2BDigest{Buffer: k.PCRDigest}, Pcrs: binding.PCRSelection(k.PCRs)}.Execute(l.tp)
	if err != nil {
		l.dropPolicy()
		return nil, err
	}
	return l.policy, nil
}

func (t *TPM) loadSessionKey(k *SessionKey) (*loaded, error) {
	if t.session != nil && bytes.Equal(t.session.private, k.Private) {
		return t.session, nil
	}
	// A TPM without a resource manager (swtpm, the simulator) holds three
	// transient objects: keep one session key at most.
	t.flushSessionKey()
	tp := transport.FromReadWriter(t.ch)
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](k.Public)
	if err != nil {
		return nil, fmt.Errorf("attest: session key public area: %w", err)
	}
	rsp, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(srkHandle), Name: tpm2.TPM2BName{Buffer: k.ParentName}, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    tpm2.TPM2BPrivate{Buffer: k.Private},
		InPublic:     tpm2.New2B(*pub),
	}.Execute(tp)
	if err != nil {
		// Another TPM, or this one cleared: the key is not ours to use.
		return nil, fmt.Errorf("attest: load session key (not this TPM's, or the TPM was cleared): %w", err)
	}
	t.session = &loaded{tp: tp, handle: rsp.ObjectHandle, name: rsp.Name, private: bytes.Clone(k.Private)}
	return t.session, nil
}

// flushSessionKey unloads the kept session key, if any.
func (t *TPM) flushSessionKey() {
	if t.session != nil {
		t.session.flush()
		t.session = nil
	}
}

// certifyCreation has the AK certify that this TPM created the key, over
// the attestation's qualifying data.
func (t *TPM) certifyCreation(ak *akHandle, key *loaded, c *keyCreation, qualifying []byte) (info, sig []byte, err error) {
	rsp, err := tpm2.CertifyCreation{
		SignHandle:     tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:   tpm2.NamedHandle{Handle: key.handle, Name: key.name},
		QualifyingData: tpm2.TPM2BData{Buffer: qualifying},
		CreationHash:   c.hash,
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		CreationTicket: c.ticket,
	}.Execute(transport.FromReadWriter(t.ch))
	if err != nil {
		return nil, nil, fmt.Errorf("attest: certify session key: %w", err)
	}
	return rsp.CertifyInfo.Bytes(), tpm2.Marshal(rsp.Signature), nil
}

// exchanger is an ecdh.KeyExchanger whose private key is a loaded session
// key: each ECDH runs TPM2_ECDH_ZGen under a fresh PolicyPCR session.
type exchanger struct {
	key  *loaded
	sk   *SessionKey
	pub  *ecdh.PublicKey
	err  error
	used bool
}

var _ ecdh.KeyExchanger = (*exchanger)(nil)

func (e *exchanger) PublicKey() *ecdh.PublicKey { return e.pub }
func (e *exchanger) Curve() ecdh.Curve          { return ecdh.P256() }

func (e *exchanger) ECDH(peer *ecdh.PublicKey) ([]byte, error) {
	e.used = true
	x, y, err := tpm2.ECCPoint(peer)
	if err != nil {
		return nil, err
	}
	point := tpm2.TPMSECCPoint{X: coord(x), Y: coord(y)}
	auth, err := e.key.authorize(e.sk)
	var rsp *tpm2.ECDHZGenResponse
	if err == nil {
		rsp, err = tpm2.ECDHZGen{
			KeyHandle: tpm2.AuthHandle{Handle: e.key.handle, Name: e.key.name, Auth: auth},
			InPoint:   tpm2.New2B(point),
		}.Execute(e.key.tp)
	}
	if err != nil {
		// A refused use leaves the session's policy state behind: start
		// the next use from a new one.
		e.key.dropPolicy()
		if errors.Is(err, tpm2.TPMRCValue) || errors.Is(err, tpm2.TPMRCPolicyFail) {
			e.err = ErrSessionKeyLocked
		} else {
			e.err = fmt.Errorf("attest: session key ECDH: %w", err)
		}
		return nil, e.err
	}
	out, err := rsp.OutPoint.Contents()
	if err != nil {
		return nil, fmt.Errorf("attest: session key ECDH: %w", err)
	}
	z := make([]byte, 32)
	if len(out.X.Buffer) > len(z) {
		return nil, errors.New("attest: session key ECDH: oversized result")
	}
	copy(z[len(z)-len(out.X.Buffer):], out.X.Buffer)
	return z, nil
}

func coord(v *big.Int) tpm2.TPM2BECCParameter {
	return tpm2.TPM2BECCParameter{Buffer: v.FillBytes(make([]byte, 32))}
}
