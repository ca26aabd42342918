package attest

import (
	"bytes"
	"context"
	"crypto/hpke"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/grpc"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/suite"
)

// Session is an appraised attestation the node can spend on unwraps. The
// broker seals every release to its key, a P-256 key that lives in the TPM
// (Key), usable only while the PCRs the quote covered hold: the session
// holds no private key a copy of it could use.
type Session struct {
	Broker string `json:"broker"`
	Node   string `json:"node"`
	Token  []byte `json:"token"`
	Suite  string `json:"suite"`
	// Key is the session key in the TPM.
	Key          SessionKey `json:"key"`
	PublicKey    []byte     `json:"publicKey"`
	Expires      time.Time  `json:"expires"`
	ResetCount   uint32     `json:"resetCount"`
	RestartCount uint32     `json:"restartCount"`
	// EAR is the broker's signed attestation result for the appraisal that
	// opened the session (draft-ietf-rats-ear JWT); empty when the broker
	// issues none.
	EAR string `json:"ear,omitempty"`
}

// Appraiser is the broker's attestation API as the node needs it.
type Appraiser interface {
	Challenge(ctx context.Context, in *apiv1.ChallengeRequest, opts ...grpc.CallOption) (*apiv1.ChallengeResponse, error)
	Attest(ctx context.Context, in *apiv1.AttestRequest, opts ...grpc.CallOption) (*apiv1.AttestResponse, error)
}

// ExpiryMargin is how long before expiry a session stops being reused, so a
// session does not run out between check and use.
const ExpiryMargin = 15 * time.Second

// Platform is the node's measured state: PCR values and TPM counters.
type Platform struct {
	PCRs         []attest.PCR
	ResetCount   uint32
	RestartCount uint32
}

// Values maps each PCR index to its value.
func (p Platform) Values() map[int][]byte {
	out := make(map[int][]byte, len(p.PCRs))
	for _, pcr := range p.PCRs {
		out[pcr.Index] = pcr.Digest
	}
	return out
}

// ReadPlatform reads the SHA-256 PCRs and the reset/restart counters.
func (t *TPM) ReadPlatform() (Platform, error) {
	pcrs, err := t.dev.PCRs(attest.HashSHA256)
	if err != nil {
		return Platform{}, fmt.Errorf("attest: read PCRs: %w", err)
	}
	clock, err := tpm2.ReadClock{}.Execute(transport.FromReadWriter(t.ch))
	if err != nil {
		return Platform{}, fmt.Errorf("attest: read TPM clock: %w", err)
	}
	return Platform{PCRs: pcrs, ResetCount: clock.CurrentTime.ClockInfo.ResetCount,
		RestartCount: clock.CurrentTime.ClockInfo.RestartCount}, nil
}

// StillValid reports whether s still describes this node: not near expiry,
// and the TPM has not rebooted or changed a PCR its key is bound to since
// the quote. (The TPM enforces the PCRs itself at every use; checking first
// means the broker never releases to a session whose node moved on.)
func (s *Session) StillValid(now time.Time, p Platform) bool {
	if !now.Add(ExpiryMargin).Before(s.Expires) || s.ResetCount != p.ResetCount || s.RestartCount != p.RestartCount {
		return false
	}
	d, err := binding.PCRDigest(p.Values(), s.Key.PCRs)
	return err == nil && bytes.Equal(d, s.Key.PCRDigest)
}

// Logs names the event logs a node sends with its quote; empty sends none.
type Logs struct {
	// Firmware is the TCG event log, usually
	// /sys/kernel/security/tpm0/binary_bios_measurements.
	Firmware string
	// IMA is the IMA binary runtime measurement list, usually
	// /sys/kernel/security/ima/binary_runtime_measurements.
	IMA string
}

// MaxLogSize bounds what a node reads and sends.
const MaxLogSize = 8 << 20

func readLog(path, what string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("attest: %s log: %w", what, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxLogSize+1))
	if err != nil {
		return nil, fmt.Errorf("attest: %s log: %w", what, err)
	}
	if len(data) > MaxLogSize {
		return nil, fmt.Errorf("attest: %s log %s is larger than %d bytes", what, path, MaxLogSize)
	}
	return data, nil
}

// QuoteHook, when set, is called once per TPM quote; tests and metrics
// count quotes with it.
var QuoteHook func()

// NewSession asks the broker for a nonce, collects the evidence for it and
// has the broker appraise it. This is the only place a quote happens.
func NewSession(ctx context.Context, b Appraiser, t *TPM, st *State, logs Logs) (*Session, error) {
	ch, err := b.Challenge(ctx, &apiv1.ChallengeRequest{Node: st.Name})
	if err != nil {
		return nil, fmt.Errorf("attest: challenge: %w", err)
	}
	ev, err := Collect(t, st, ch.GetNonce(), logs)
	if err != nil {
		return nil, err
	}
	resp, err := b.Attest(ctx, ev.Request)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	return ev.Session(resp), nil
}

// Evidence is a node's attestation for one nonce, ready for the broker,
// with the session secrets that go with it.
type Evidence struct {
	Request *apiv1.AttestRequest
	broker  string
	ev      *evidence
}

// Collect creates a session key (a P-256 key in the TPM bound to the
// current PCRs), quotes the PCRs over H(nonce, session key, node), has the
// AK certify the key and the tag index, and reads the event logs.
func Collect(t *TPM, st *State, nonce []byte, logs Logs) (*Evidence, error) {
	// The previous session's key, kept by a lingering TPM, would take one
	// of the few object slots attesting needs.
	t.flushSessionKey()
	ak, err := t.loadAK(st.AKBlob)
	if err != nil {
		return nil, err
	}
	defer ak.flush()
	ev, err := t.evidence(ak, nonce, st.Name)
	if err != nil {
		return nil, err
	}
	// Logs are read after the quote: the firmware log is fixed after boot,
	// and the broker replays the IMA log only up to the quoted PCR 10, so
	// measurements appended meanwhile do not spoil the evidence.
	fw, err := readLog(logs.Firmware, "firmware event")
	if err != nil {
		return nil, err
	}
	ima, err := readLog(logs.IMA, "IMA")
	if err != nil {
		return nil, err
	}
	req := &apiv1.AttestRequest{Node: st.Name, Nonce: nonce, SessionPublicKey: ev.public, SessionSuite: suite.SessionName,
		Quote: ev.quote, Signature: ev.quoteSig, EventLog: fw, ImaLog: ima,
		SessionKeyPublic: ev.key.Public, SessionKeyCertifyInfo: ev.keyCertInfo, SessionKeyCertifySignature: ev.keyCertSig}
	for _, p := range ev.key.PCRs {
		req.SessionKeyPcrs = append(req.SessionKeyPcrs, uint32(p))
	}
	switch tc, err := t.certifyTags(ak, ev.qualifying); {
	case err == nil:
		req.TagCertifyInfo, req.TagCertifySignature, req.TagNvPublic = tc.Info, tc.Signature, tc.NVPublic
	case !errors.Is(err, errNoTagIndex):
		return nil, err
	}
	for _, p := range ev.platform.PCRs {
		req.Pcrs = append(req.Pcrs, &apiv1.PCR{Index: uint32(p.Index), Digest: p.Digest})
	}
	return &Evidence{Request: req, broker: st.Broker, ev: ev}, nil
}

// Session is the session the broker opened for this evidence.
func (e *Evidence) Session(resp *apiv1.AttestResponse) *Session {
	return &Session{
		Broker: e.broker, Node: e.Request.GetNode(), Token: resp.GetSessionToken(), Suite: suite.SessionName,
		Key: *e.ev.key, PublicKey: e.ev.public, Expires: time.Unix(resp.GetExpiresUnix(), 0),
		ResetCount: resp.GetResetCount(), RestartCount: resp.GetRestartCount(), EAR: resp.GetEar(),
	}
}

// quoteAttempts bounds retries when a PCR moves while the evidence is made
// (IMA extends PCR 10 all the time on a busy host).
const quoteAttempts = 3

// evidence is one consistent set of session key and quote.
type evidence struct {
	public                  []byte
	key                     *SessionKey
	keyCertInfo, keyCertSig []byte
	qualifying              []byte
	quote, quoteSig         []byte
	platform                Platform
}

// evidence creates a session key bound to the current PCRs and quotes them,
// retrying while the PCRs read after the quote are not the ones quoted or
// the ones the key is bound to, so the broker is not sent evidence that
// cannot verify.
func (t *TPM) evidence(ak *akHandle, nonce []byte, node string) (*evidence, error) {
	for i := 1; ; i++ {
		ev, consistent, err := t.tryEvidence(ak, nonce, node)
		if err != nil {
			return nil, err
		}
		if consistent || i == quoteAttempts {
			return ev, nil
		}
	}
}

func (t *TPM) tryEvidence(ak *akHandle, nonce []byte, node string) (*evidence, bool, error) {
	before, err := t.ReadPlatform()
	if err != nil {
		return nil, false, err
	}
	key, creation, err := t.createSessionKey(before.Values(), binding.SessionKeyPCRs())
	if err != nil {
		return nil, false, err
	}
	point, err := key.ECDHPublic()
	if err != nil {
		return nil, false, err
	}
	public := point.Bytes()
	ev := &evidence{public: public, key: key, qualifying: binding.QualifyingData(nonce, public, node)}
	l, err := t.loadSessionKey(key)
	if err != nil {
		return nil, false, err
	}
	// The key stays loaded until the TPM closes: the first release
	// opens with it.
	ev.keyCertInfo, ev.keyCertSig, err = t.certifyCreation(ak, l, creation, ev.qualifying)
	if err != nil {
		return nil, false, err
	}
	q, err := tpm2.Quote{
		SignHandle:     tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: ev.qualifying},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect:      binding.PCRSelection(allPCRs()),
	}.Execute(ak.tp)
	if err != nil {
		return nil, false, fmt.Errorf("attest: quote: %w", err)
	}
	if QuoteHook != nil {
		QuoteHook()
	}
	ev.quote, ev.quoteSig = q.Quoted.Bytes(), tpm2.Marshal(q.Signature)
	if ev.platform, err = t.ReadPlatform(); err != nil {
		return nil, false, err
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](ev.quote)
	if err != nil {
		return nil, false, fmt.Errorf("attest: the TPM's quote does not parse: %v", err)
	}
	info, err := att.Attested.Quote()
	if err != nil {
		return nil, false, fmt.Errorf("attest: the TPM's quote does not parse: %v", err)
	}
	h := sha256.New()
	for _, p := range ev.platform.PCRs {
		h.Write(p.Digest)
	}
	after, err := binding.PCRDigest(ev.platform.Values(), key.PCRs)
	if err != nil {
		return nil, false, err
	}
	return ev, bytes.Equal(h.Sum(nil), info.PCRDigest.Buffer) && bytes.Equal(after, key.PCRDigest), nil
}

func allPCRs() []int {
	out := make([]int, 24)
	for i := range out {
		out[i] = i
	}
	return out
}

// Open decrypts a release the broker sealed to this session; the TPM half
// of the key does its part in t, and only while the session's PCRs hold
// (ErrSessionKeyLocked otherwise).
func (s *Session) Open(t *TPM, key string, version uint32, sealed []byte) ([]byte, error) {
	return s.open(t, binding.ReleaseInfo(s.Node, s.PublicKey, key, version), sealed)
}

func (s *Session) open(t *TPM, info, sealed []byte) ([]byte, error) {
	st, err := suite.Lookup(s.Suite)
	if err != nil {
		return nil, err
	}
	pub, err := s.Key.ECDHPublic()
	if err != nil {
		return nil, err
	}
	l, err := t.loadSessionKey(&s.Key)
	if err != nil {
		return nil, err
	}
	x := &exchanger{key: l, sk: &s.Key, pub: pub}
	priv, err := hpke.NewDHKEMPrivateKey(x)
	if err != nil {
		return nil, fmt.Errorf("attest: session key: %w", err)
	}
	pt, err := st.OpenWith(priv, info, sealed)
	if x.err != nil {
		return nil, x.err
	}
	if err != nil {
		return nil, fmt.Errorf("attest: the broker's release does not open with this session's key")
	}
	return pt, nil
}
