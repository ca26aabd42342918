package broker_test

import (
	"context"
	"crypto/ecdh"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	nodeattest "github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/binding"
	"github.com/attested-dev/attested/attest/eventlogtest"
	"github.com/attested-dev/attested/attest/simtpm"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/suite"
)

// Finding 3: evidence that fails appraisal ends the node's live sessions in
// the same transaction, and trust status shows the failure.
func TestFailedAppraisalEndsLiveSessions(t *testing.T) {
	b := brokertest.Start(t)
	n := goodBoot().apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	s, err := n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s, ann)
	require.NoError(t, err)

	// The node's next evidence does not hold up: its log now hides the
	// last event the firmware measured.
	honest := goodBoot()
	require.NoError(t, os.WriteFile(n.logs.Firmware, eventlogtest.Firmware(honest.firmware[:len(honest.firmware)-1]), 0o600))
	_, err = n.session(t)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "evidence refused: firmware event log")

	_, err = unwrap(n, s, ann)
	require.Error(t, err, "the earlier session must end with the failed appraisal")
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
	node := listNode(t, b, "node1")
	assert.Equal(t, "untrusted", node.GetTrust())
	assert.Contains(t, node.GetTrustReason(), "firmware event log")
}

// Finding 3: a verified quote showing other PCRs than a live session's ends
// that session at once, even though the new evidence itself verifies, and
// trust does not go back to trusted.
func TestChangedPCREndsEarlierSessions(t *testing.T) {
	b, n, _, ann := setup(t)
	s1, err := n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s1, ann)
	require.NoError(t, err)
	extendPCR(t, debugPCR, "unexpected boot component")
	s2, err := n.session(t)
	require.NoError(t, err, "the quote is genuine; the policy refuses at release")
	_, err = unwrap(n, s2, ann)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "PCR 16 differs from policy prod")

	_, err = unwrap(n, s1, ann)
	require.Error(t, err, "the session of the old PCR values must not release any more")
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
	assert.Equal(t, "untrusted", listNode(t, b, "node1").GetTrust())
	assert.Contains(t, auditReasons(t, b, "node1"), "PCRs changed since last attestation; 1 older session(s) ended")
}

// Finding 3: the session key's TPM half opens a release only while the
// quoted PCRs hold, even when the broker has not seen the change yet.
func TestReleaseOpensOnlyWhilePCRsHold(t *testing.T) {
	_, n, optsdata, ann := setup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	r1, err := n.b.Node.Unwrap(context.Background(), &apiv1.UnwrapRequest{SessionToken: s.Token, Annotation: ann})
	require.NoError(t, err)
	r2, err := n.b.Node.Unwrap(context.Background(), &apiv1.UnwrapRequest{SessionToken: s.Token, Annotation: ann})
	require.NoError(t, err)
	tpm := openTPM(t)
	got, err := s.Open(tpm, r1.GetKey(), r1.GetKeyVersion(), r1.GetSealed())
	tpm.Close()
	require.NoError(t, err)
	assert.Equal(t, optsdata, got)

	extendPCR(t, debugPCR, "rootkit loaded after the attestation")
	tpm = openTPM(t)
	defer tpm.Close()
	_, err = s.Open(tpm, r2.GetKey(), r2.GetKeyVersion(), r2.GetSealed())
	assert.ErrorIs(t, err, nodeattest.ErrSessionKeyLocked)
}

// Finding 3: a stolen session (token, TPM key blob) opens nothing without
// this TPM: not with a software key, and not in another TPM (here: this one
// after TPM2_Clear, which replaces the SRK).
func TestStolenSessionOpensNothingOffTheNode(t *testing.T) {
	_, n, _, ann := setup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	r, err := n.b.Node.Unwrap(context.Background(), &apiv1.UnwrapRequest{SessionToken: s.Token, Annotation: ann})
	require.NoError(t, err, "the thief holds the token: the broker releases")

	st, err := suite.Lookup(s.Suite)
	require.NoError(t, err)
	guess, err := ecdh.P256().GenerateKey(rand.Reader)
	require.NoError(t, err)
	priv, err := hpke.NewDHKEMPrivateKey(guess)
	require.NoError(t, err)
	_, err = st.OpenWith(priv, binding.ReleaseInfo(s.Node, s.PublicKey, r.GetKey(), r.GetKeyVersion()), r.GetSealed())
	assert.Error(t, err, "no software key opens it")

	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	require.NoError(t, legacy.Clear(sim, legacy.HandleLockout, legacy.AuthCommand{Session: legacy.HandlePasswordSession, Attributes: legacy.AttrContinueSession}))
	tpm := openTPM(t)
	defer tpm.Close()
	_, err = s.Open(tpm, r.GetKey(), r.GetKeyVersion(), r.GetSealed())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not this TPM's")
}

// Finding 3: the broker accepts only a session key the TPM certifies; one
// without its certification is refused as the node's evidence, which ends
// its sessions.
func TestSessionKeyWithoutCertificationIsRefused(t *testing.T) {
	b, n, _, ann := setup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	ev := collect(t, b, n.state, nodeattest.Logs{})
	ev.Request.SessionKeyCertifySignature = nil
	_, err = b.Node.Attest(context.Background(), ev.Request)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "session key certification is not signed by this node's enrolled AK")
	_, err = unwrap(n, s, ann)
	assert.Equal(t, codes.Unauthenticated, status.Code(err))

	ev = collect(t, b, n.state, nodeattest.Logs{})
	ev.Request.SessionKeyPcrs = ev.Request.SessionKeyPcrs[1:]
	_, err = b.Node.Attest(context.Background(), ev.Request)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "session key is not bound to PCR 0")
}

// Finding 11: Explain and NodeTags answer only the session's key: a token
// alone reads neither the facts, the keys' clauses nor the tags.
func TestExplainAndTagsAreSealedToTheSession(t *testing.T) {
	b, n, _, _ := setup(t)
	_, err := b.Admin.TagNode(context.Background(), &apiv1.TagNodeRequest{Name: "node1", Set: map[string]string{"site": "frankfurt-rack-42"}})
	require.NoError(t, err)
	s, err := n.session(t)
	require.NoError(t, err)
	r, err := b.Node.Explain(context.Background(), &apiv1.ExplainRequest{SessionToken: s.Token})
	require.NoError(t, err)
	for _, secret := range []string{"node1", "PCR 16", "app", "prod"} {
		assert.NotContains(t, string(r.GetSealed()), secret)
	}
	assert.Equal(t, "node1", explain(t, b, s).GetNode())
	tr, err := b.Node.NodeTags(context.Background(), &apiv1.NodeTagsRequest{SessionToken: s.Token})
	require.NoError(t, err)
	assert.NotContains(t, string(tr.GetSealed()), "frankfurt-rack-42")
	_, err = b.Node.NodeTags(context.Background(), &apiv1.NodeTagsRequest{})
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
}

// Finding 11: Challenge gives unauthenticated callers the same answer
// whatever the node's state.
func TestChallengeSaysNothingAboutTheNode(t *testing.T) {
	b, _, _, _ := setup(t)
	_, err := b.Admin.RevokeNode(context.Background(), &apiv1.NodeRequest{Name: "node1"})
	require.NoError(t, err)
	for _, name := range []string{"node1", "ghost"} {
		ch, err := b.Node.Challenge(context.Background(), &apiv1.ChallengeRequest{Node: name})
		require.NoError(t, err, name)
		assert.Len(t, ch.GetNonce(), 57, name)
	}
}

// direct serves a broker in-process with a store and clock the test
// controls.
type direct struct {
	apiv1.BrokerClient
	srv *broker.Server
}

func (d direct) EnrollStart(ctx context.Context, in *apiv1.EnrollStartRequest, _ ...grpc.CallOption) (*apiv1.EnrollStartResponse, error) {
	return d.srv.EnrollStart(ctx, in)
}
func (d direct) EnrollFinish(ctx context.Context, in *apiv1.EnrollFinishRequest, _ ...grpc.CallOption) (*apiv1.EnrollFinishResponse, error) {
	return d.srv.EnrollFinish(ctx, in)
}
func (d direct) Challenge(ctx context.Context, in *apiv1.ChallengeRequest, _ ...grpc.CallOption) (*apiv1.ChallengeResponse, error) {
	return d.srv.Challenge(ctx, in)
}
func (d direct) Attest(ctx context.Context, in *apiv1.AttestRequest, _ ...grpc.CallOption) (*apiv1.AttestResponse, error) {
	return d.srv.Attest(ctx, in)
}
func (d direct) Explain(ctx context.Context, in *apiv1.ExplainRequest, _ ...grpc.CallOption) (*apiv1.ExplainResponse, error) {
	return d.srv.Explain(ctx, in)
}

// fakeTime is a wall clock a test sets.
type fakeTime struct {
	mu sync.Mutex
	t  time.Time
}

func (f *fakeTime) now() time.Time      { f.mu.Lock(); defer f.mu.Unlock(); return f.t }
func (f *fakeTime) add(d time.Duration) { f.mu.Lock(); f.t = f.t.Add(d); f.mu.Unlock() }

// startDirect opens a broker on a fresh data directory; reopen opens
// another server on the same directory and store, as a restart would.
func startDirect(t *testing.T, wall func() time.Time, wrap func(store.Store) store.Store) (direct, func(wall func() time.Time) direct) {
	d, reopen, _ := startDirectStore(t, wall, wrap)
	return d, reopen
}

func startDirectStore(t *testing.T, wall func() time.Time, wrap func(store.Store) store.Store) (direct, func(wall func() time.Time) direct, store.Store) {
	t.Helper()
	dir := t.TempDir()
	cfg, err := broker.Init(broker.InitOptions{DataDir: filepath.Join(dir, "broker"), CADir: filepath.Join(dir, "ca"), ID: "broker-test", Listen: "127.0.0.1:0", AdmitUncertifiedTPMs: true})
	require.NoError(t, err)
	st, err := store.OpenBolt(filepath.Join(dir, "broker", broker.DatabaseFile))
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	var use store.Store = st
	if wrap != nil {
		use = wrap(st)
	}
	open := func(wall func() time.Time) direct {
		srv, err := broker.New(broker.Options{Config: cfg, Store: use, MasterKey: filepath.Join(dir, "broker", broker.MasterKeyFile),
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Now: wall})
		require.NoError(t, err)
		return direct{srv: srv}
	}
	return open(wall), open, st
}

func enrollDirect(t *testing.T, d direct) *nodeattest.State {
	t.Helper()
	tpm := openTPM(t)
	defer tpm.Close()
	st, n, err := nodeattest.Enroll(context.Background(), d, tpm, nodeattest.EnrollOptions{Name: "node1", BrokerID: "broker-test"})
	require.NoError(t, err)
	if n.GetState() != apiv1.NodeState_NODE_STATE_ACTIVE {
		_, err := d.srv.AdminServer().ApproveNode(context.Background(), &apiv1.NodeRequest{Name: "node1", EkFingerprint: "SHA256:" + st.EKFingerprint})
		require.NoError(t, err)
	}
	return st
}

func sessionDirect(t *testing.T, d direct, st *nodeattest.State) (*nodeattest.Session, error) {
	t.Helper()
	tpm := openTPM(t)
	defer tpm.Close()
	return nodeattest.NewSession(context.Background(), d, tpm, st, nodeattest.Logs{})
}

// swapIdentity removes the node and enrolls another TPM under its name
// just before the appraisal's transaction: the admin's removal racing an
// attestation in flight.
type swapIdentity struct {
	store.Store
	once sync.Once
	arm  bool
}

func (s *swapIdentity) Appraise(ctx context.Context, node string, nonce store.SpentNonce, now time.Time, fn func(*store.Node, []store.Session) (store.Outcome, error)) (store.Node, error) {
	if s.arm {
		s.once.Do(func() {
			old, err := s.GetNode(ctx, node)
			if err == nil && s.DeleteNode(ctx, node) == nil {
				old.EKFingerprint, old.AKPublic = "another-tpm", nil
				s.CreateNode(ctx, old)
			}
		})
	}
	return s.Store.Appraise(ctx, node, nonce, now, fn)
}

// Finding 15: a session is bound to the node's identity (its EK), not its
// name: evidence of a node removed while it was being appraised opens no
// session for whoever holds the name next.
func TestSessionIsBoundToTheIdentityNotTheName(t *testing.T) {
	sw := &swapIdentity{}
	d, _ := startDirect(t, time.Now, func(s store.Store) store.Store { sw.Store = s; return sw })
	st := enrollDirect(t, d)
	sw.arm = true
	_, err := sessionDirect(t, d, st)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `node "node1" was removed or enrolled again while its evidence was appraised`)
}

// Finding 16: the broker's time does not run back with the wall clock, so
// a step back neither makes a session's age negative nor restarts it; and
// a broker restarted with its clock behind refuses sessions "from the
// future".
func TestClockStepBackCannotStretchASession(t *testing.T) {
	wall := &fakeTime{t: time.Now()}
	d, reopen := startDirect(t, wall.now, nil)
	st := enrollDirect(t, d)
	ctx := context.Background()
	admin := d.srv.AdminServer()
	_, err := admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: fresh\nsecureBoot: off\nmaxSessionAge: 5m\n"})
	require.NoError(t, err)
	_, err = admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "app", Policy: "fresh"})
	require.NoError(t, err)
	s, err := sessionDirect(t, d, st)
	require.NoError(t, err)
	age := func(d direct) (*apiv1.Clause, error) {
		r, err := d.srv.Explain(ctx, &apiv1.ExplainRequest{SessionToken: s.Token})
		if err != nil {
			return nil, err
		}
		tpm := openTPM(t)
		defer tpm.Close()
		ex, err := s.OpenExplanation(tpm, r)
		require.NoError(t, err)
		for _, c := range ex.GetKeys()[0].GetClauses() {
			if c.GetName() == "maxSessionAge" {
				return c, nil
			}
		}
		t.Fatal("no maxSessionAge clause")
		return nil, nil
	}
	wall.add(4 * time.Minute)
	c, err := age(d)
	require.NoError(t, err)
	assert.Contains(t, c.GetDetail(), "evidence is 4m0s old")

	wall.add(-time.Hour)
	c, err = age(d)
	require.NoError(t, err, "the same process: time goes on from its last reading")
	assert.Contains(t, c.GetDetail(), "evidence is 4m0s old", "a step back neither makes the age negative nor resets it")

	_, err = age(reopen(wall.now))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "session was opened after the broker's current time")
}

func listNode(t *testing.T, b *brokertest.Broker, name string) *apiv1.Node {
	t.Helper()
	r, err := b.Admin.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
	require.NoError(t, err)
	for _, n := range r.GetNodes() {
		if n.GetName() == name {
			return n
		}
	}
	t.Fatalf("node %s not listed", name)
	return nil
}

// Finding 16: lifetimes are bounded whatever the configuration says.
func TestLifetimesAreBounded(t *testing.T) {
	for _, c := range []func(*broker.Config){
		func(c *broker.Config) { c.SessionTTL = 48 * time.Hour },
		func(c *broker.Config) { c.NonceTTL = time.Hour },
	} {
		cfg := &broker.Config{ID: "b", AdminTokenSHA256: strings.Repeat("00", 32), SessionTTL: broker.DefaultSessionTTL, NonceTTL: broker.DefaultNonceTTL}
		c(cfg)
		_, err := broker.New(broker.Options{Config: cfg})
		require.Error(t, err)
		assert.Contains(t, err.Error(), "out of range")
	}
}

// Finding 10: a session keeps the verdicts of the IMA clauses, not the
// measurement list: an IMA log of tens of thousands of entries costs the
// session and the node record a few hundred bytes.
func TestLargeIMALogIsNotStored(t *testing.T) {
	d, _, st := startDirectStore(t, time.Now, nil)
	bt := goodBoot()
	for i := range 20000 {
		bt.ima = append(bt.ima, eventlogtest.IMAFile{Path: fmt.Sprintf("/usr/lib/file-%05d.so", i), Digest: bash[:]})
	}
	logs := bt.measure(t)
	info, err := os.Stat(logs.IMA)
	require.NoError(t, err)
	require.Greater(t, info.Size(), int64(2<<20), "a log of megabytes")
	stt := enrollDirect(t, d)
	_, err = d.srv.AdminServer().ApplyPolicy(context.Background(), &apiv1.ApplyPolicyRequest{Yaml: "name: ima\nima:\n  allow:\n    /usr/bin/bash: [\"" + hex.EncodeToString(bash[:]) + "\"]\n"})
	require.NoError(t, err)
	tpm := openTPM(t)
	s, err := nodeattest.NewSession(context.Background(), d, tpm, stt, logs)
	tpm.Close()
	require.NoError(t, err)
	rec, err := st.GetSession(context.Background(), hashOf(s.Token))
	require.NoError(t, err)
	assert.Less(t, len(rec.Facts), 4<<10, "the session keeps verdicts, not entries")
	n, err := st.GetNode(context.Background(), "node1")
	require.NoError(t, err)
	assert.Less(t, len(n.LastFacts), 4<<10)
	assert.Contains(t, string(rec.Facts), "is not in the allow-list of policy ima", "the verdict of the IMA clause is kept")
}

// Finding 10: an IMA clause changed after a session's appraisal cannot be
// decided from the kept verdicts: the node is sent to attest again (and is
// not marked untrusted), and its fresh evidence decides.
func TestIMAClauseChangedAfterAppraisalNeedsFreshEvidence(t *testing.T) {
	b := brokertest.Start(t)
	n := goodBoot().apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	s, err := n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s, ann)
	require.NoError(t, err)
	changed := strings.Replace(fmt.Sprintf(strictPolicy, hex.EncodeToString(shim[:]), hex.EncodeToString(grub[:]), hex.EncodeToString(bash[:])),
		"  exclude:", "    /usr/bin/sh: [\""+hex.EncodeToString(bash[:])+"\"]\n  exclude:", 1)
	_, err = b.Admin.ApplyPolicy(context.Background(), &apiv1.ApplyPolicyRequest{Yaml: changed})
	require.NoError(t, err)
	_, err = unwrap(n, s, ann)
	require.Error(t, err)
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
	assert.Contains(t, err.Error(), "changed after this node's evidence was appraised")
	assert.Equal(t, "trusted", listNode(t, b, "node1").GetTrust())
	require.NoError(t, releaseOrRefusal(t, n, ann), "fresh evidence decides")
}

func hashOf(token []byte) []byte {
	sum := sha256.Sum256(token)
	return sum[:]
}
