package attest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-attestation/attest"
	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/grpc"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/suite"
)

// Session is an appraised attestation the node can spend on unwraps. The
// private key never leaves the node; the broker seals releases to it.
type Session struct {
	Broker       string    `json:"broker"`
	Node         string    `json:"node"`
	Token        []byte    `json:"token"`
	Suite        string    `json:"suite"`
	PrivateKey   []byte    `json:"privateKey"`
	PublicKey    []byte    `json:"publicKey"`
	Expires      time.Time `json:"expires"`
	ResetCount   uint32    `json:"resetCount"`
	RestartCount uint32    `json:"restartCount"`
	// PCRDigest is SHA-256 over the quoted PCR values; a change on the node
	// means the session no longer describes it.
	PCRDigest []byte `json:"pcrDigest"`
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

// Digest hashes the PCR values in index order.
func (p Platform) Digest() []byte {
	h := sha256.New()
	for _, pcr := range p.PCRs {
		fmt.Fprintf(h, "%d:", pcr.Index)
		h.Write(pcr.Digest)
	}
	return h.Sum(nil)
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
// and the TPM has not rebooted or changed a PCR since the quote.
func (s *Session) StillValid(now time.Time, p Platform) bool {
	return now.Add(ExpiryMargin).Before(s.Expires) &&
		s.ResetCount == p.ResetCount && s.RestartCount == p.RestartCount &&
		bytes.Equal(s.PCRDigest, p.Digest())
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

// NewSession asks the broker for a nonce, creates a session key pair,
// quotes the PCRs over H(nonce, session key, node), and has the broker
// appraise it. This is the only place a quote happens.
func NewSession(ctx context.Context, b Appraiser, t *TPM, st *State, logs Logs) (*Session, error) {
	ch, err := b.Challenge(ctx, &apiv1.ChallengeRequest{Node: st.Name})
	if err != nil {
		return nil, fmt.Errorf("attest: challenge: %w", err)
	}
	s := suite.Default()
	priv, pub, err := s.GenerateKey()
	if err != nil {
		return nil, err
	}
	ak, err := t.dev.LoadAK(st.AKBlob)
	if err != nil {
		return nil, fmt.Errorf("attest: load attestation key (was the TPM cleared? enroll again): %w", err)
	}
	defer ak.Close(t.dev)
	qd := binding.QualifyingData(ch.GetNonce(), pub, st.Name)
	q, plat, err := t.consistentQuote(ak, qd)
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
	req := &apiv1.AttestRequest{Node: st.Name, Nonce: ch.GetNonce(), SessionPublicKey: pub, SessionSuite: s.Name,
		Quote: q.Quote, Signature: q.Signature, EventLog: fw, ImaLog: ima}
	switch tc, err := t.certifyTags(st.AKBlob, qd); {
	case err == nil:
		req.TagCertifyInfo, req.TagCertifySignature, req.TagNvPublic = tc.Info, tc.Signature, tc.NVPublic
	case !errors.Is(err, errNoTagIndex):
		return nil, err
	}
	for _, p := range plat.PCRs {
		req.Pcrs = append(req.Pcrs, &apiv1.PCR{Index: uint32(p.Index), Digest: p.Digest})
	}
	resp, err := b.Attest(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	return &Session{
		Broker: st.Broker, Node: st.Name, Token: resp.GetSessionToken(), Suite: s.Name,
		PrivateKey: priv, PublicKey: pub, Expires: time.Unix(resp.GetExpiresUnix(), 0),
		ResetCount: resp.GetResetCount(), RestartCount: resp.GetRestartCount(), PCRDigest: plat.Digest(),
	}, nil
}

// quoteAttempts bounds retries when a PCR moves between the quote and the
// PCR read (IMA extends PCR 10 all the time on a busy host).
const quoteAttempts = 3

// consistentQuote quotes the SHA-256 PCRs and reads their values, retrying
// while the values read are not the ones quoted, so the broker is not sent
// evidence that cannot verify.
func (t *TPM) consistentQuote(ak *attest.AK, qd []byte) (*attest.Quote, Platform, error) {
	for i := 1; ; i++ {
		q, err := ak.Quote(t.dev, qd, attest.HashSHA256)
		if err != nil {
			return nil, Platform{}, fmt.Errorf("attest: quote: %w", err)
		}
		if QuoteHook != nil {
			QuoteHook()
		}
		plat, err := t.ReadPlatform()
		if err != nil {
			return nil, Platform{}, err
		}
		att, err := legacy.DecodeAttestationData(q.Quote)
		if err != nil || att.AttestedQuoteInfo == nil {
			return nil, Platform{}, fmt.Errorf("attest: the TPM's quote does not parse: %v", err)
		}
		h := sha256.New()
		for _, p := range plat.PCRs {
			h.Write(p.Digest)
		}
		if bytes.Equal(h.Sum(nil), att.AttestedQuoteInfo.PCRDigest) || i == quoteAttempts {
			return q, plat, nil
		}
	}
}

// Open decrypts a release the broker sealed to this session.
func (s *Session) Open(key string, version uint32, sealed []byte) ([]byte, error) {
	st, err := suite.Lookup(s.Suite)
	if err != nil {
		return nil, err
	}
	pt, err := st.Open(s.PrivateKey, binding.ReleaseInfo(s.Node, s.PublicKey, key, version), sealed)
	if err != nil {
		return nil, fmt.Errorf("attest: the broker's release does not open with this session's key")
	}
	return pt, nil
}
