package evidence_test

import (
	"crypto/sha256"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest/binding"
	"github.com/attested-dev/attested/attest/simtpm"
	"github.com/attested-dev/attested/broker/evidence"
)

// keyLab creates keys in the simulator the way a node would, and the way an
// attacker with the node's root account might instead.
type keyLab struct {
	t      *testing.T
	tp     transport.TPM
	parent tpm2.AuthHandle
	ak     *tpm2.CreateResponse
	akPub  []byte
	quoted map[int][]byte
}

func newKeyLab(t *testing.T) *keyLab {
	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	tp := transport.FromReadWriter(sim)
	srk, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tp)
	require.NoError(t, err)
	t.Cleanup(func() { tpm2.FlushContext{FlushHandle: srk.ObjectHandle}.Execute(tp) })
	l := &keyLab{t: t, tp: tp, parent: tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)}}
	l.ak, l.akPub = l.signingKey(true)
	l.quoted = map[int][]byte{}
	for i := range 24 {
		v := sha256.Sum256([]byte{byte(i)})
		l.quoted[i] = v[:]
	}
	return l
}

func (l *keyLab) signingKey(restricted bool) (*tpm2.CreateResponse, []byte) {
	tmpl := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
			Restricted: restricted, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
				&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256,
		}),
	}
	c, err := tpm2.Create{ParentHandle: l.parent, InPublic: tpm2.New2B(tmpl)}.Execute(l.tp)
	require.NoError(l.t, err)
	return c, c.OutPublic.Bytes()
}

// load loads a created key; the simulator holds three objects at a time,
// so every key is flushed right after use.
func (l *keyLab) load(c *tpm2.CreateResponse) (tpm2.AuthHandle, func()) {
	ld, err := tpm2.Load{ParentHandle: l.parent, InPrivate: c.OutPrivate, InPublic: c.OutPublic}.Execute(l.tp)
	require.NoError(l.t, err)
	return tpm2.AuthHandle{Handle: ld.ObjectHandle, Name: ld.Name, Auth: tpm2.PasswordAuth(nil)},
		func() { tpm2.FlushContext{FlushHandle: ld.ObjectHandle}.Execute(l.tp) }
}

// sessionKey makes a session key from tmpl, certified by signer over qd.
func (l *keyLab) sessionKey(tmpl tpm2.TPMTPublic, signer *tpm2.CreateResponse, qd []byte) (evidence.SessionKey, []byte) {
	c, err := tpm2.Create{ParentHandle: l.parent, InPublic: tpm2.New2B(tmpl)}.Execute(l.tp)
	require.NoError(l.t, err)
	pub := c.OutPublic.Bytes()
	h, flushKey := l.load(c)
	defer flushKey()
	sh, flushSigner := l.load(signer)
	defer flushSigner()
	cert, err := tpm2.CertifyCreation{SignHandle: sh, ObjectHandle: tpm2.NamedHandle{Handle: h.Handle, Name: h.Name}, QualifyingData: tpm2.TPM2BData{Buffer: qd},
		CreationHash: c.CreationHash, InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}, CreationTicket: c.CreationTicket}.Execute(l.tp)
	require.NoError(l.t, err)
	p, err := tpm2.Unmarshal[tpm2.TPMTPublic](pub)
	require.NoError(l.t, err)
	point, err := binding.SessionKeyPoint(p)
	require.NoError(l.t, err)
	return evidence.SessionKey{Public: pub, CertifyInfo: cert.CertifyInfo.Bytes(), Signature: tpm2.Marshal(cert.Signature), PCRs: binding.SessionKeyPCRs()},
		point.Bytes()
}

// template is a node's session key template bound to values.
func (l *keyLab) template(values map[int][]byte) tpm2.TPMTPublic {
	policy, err := binding.SessionKeyPolicy(values, binding.SessionKeyPCRs())
	require.NoError(l.t, err)
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, AdminWithPolicy: true, NoDA: true, Decrypt: true},
		AuthPolicy:       tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull}, Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID: tpm2.TPMECCNistP256, KDF: tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
	}
}

// TestSessionKeyChecks: only a TPM-created, non-duplicable key usable just
// under PolicyPCR over the quoted values, certified by the enrolled AK for
// this attestation and matching the session public key, is accepted.
func TestSessionKeyChecks(t *testing.T) {
	l := newKeyLab(t)
	qd := sha256.Sum256([]byte("qualifying data"))
	good := l.template(l.quoted)
	k, pub := l.sessionKey(good, l.ak, qd[:])
	require.NoError(t, evidence.VerifySessionKey(l.akPub, k, pub, qd[:], l.quoted))

	type attack struct {
		name, want string
		mutate     func() (evidence.SessionKey, []byte, []byte)
	}
	other := map[int][]byte{}
	for i, v := range l.quoted {
		other[i] = v
	}
	other[16] = make([]byte, 32)
	rogue, _ := l.signingKey(false)
	attacks := []attack{
		{"usable without the PCR policy", "can be used without its PCR policy", func() (evidence.SessionKey, []byte, []byte) {
			tmpl := good
			tmpl.ObjectAttributes.UserWithAuth = true
			k, pub := l.sessionKey(tmpl, l.ak, qd[:])
			return k, pub, qd[:]
		}},
		{"duplicable", "can leave the TPM", func() (evidence.SessionKey, []byte, []byte) {
			tmpl := good
			tmpl.ObjectAttributes.FixedTPM, tmpl.ObjectAttributes.FixedParent = false, false
			k, pub := l.sessionKey(tmpl, l.ak, qd[:])
			return k, pub, qd[:]
		}},
		{"bound to another state", "created for another state of the node", func() (evidence.SessionKey, []byte, []byte) {
			k, pub := l.sessionKey(l.template(other), l.ak, qd[:])
			return k, pub, qd[:]
		}},
		{"certified for another attestation", "not bound to this attestation", func() (evidence.SessionKey, []byte, []byte) {
			old := sha256.Sum256([]byte("an earlier attestation"))
			k, pub := l.sessionKey(good, l.ak, old[:])
			return k, pub, qd[:]
		}},
		{"certified by another key", "not signed by this node's enrolled AK", func() (evidence.SessionKey, []byte, []byte) {
			k, pub := l.sessionKey(good, rogue, qd[:])
			return k, pub, qd[:]
		}},
		{"a software key in the session public key", "session public key is not the TPM-certified session key", func() (evidence.SessionKey, []byte, []byte) {
			k, _ := l.sessionKey(good, l.ak, qd[:])
			_, pub := l.sessionKey(good, l.ak, qd[:])
			return k, pub, qd[:]
		}},
		{"bound to fewer PCRs", "not bound to PCR 7", func() (evidence.SessionKey, []byte, []byte) {
			k, pub := l.sessionKey(good, l.ak, qd[:])
			k.PCRs = []int{0, 1, 2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23}
			return k, pub, qd[:]
		}},
		{"public area of another key", "of another key than the public area sent", func() (evidence.SessionKey, []byte, []byte) {
			k, pub := l.sessionKey(good, l.ak, qd[:])
			k2, _ := l.sessionKey(good, l.ak, qd[:])
			k.Public = k2.Public
			return k, pub, qd[:]
		}},
	}
	for _, a := range attacks {
		t.Run(a.name, func(t *testing.T) {
			k, pub, q := a.mutate()
			err := evidence.VerifySessionKey(l.akPub, k, pub, q, l.quoted)
			require.Error(t, err)
			assert.Contains(t, err.Error(), a.want)
		})
	}
}
