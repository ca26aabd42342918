package broker_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	nodeattest "github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/simtpm"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider"
)

// The go-tpm-tools simulator is one per process: these tests run serially
// and share it. Each test starts its own broker, so enrolling the same EK
// again is fine.

const debugPCR = 16

func openTPM(t *testing.T) *nodeattest.TPM {
	t.Helper()
	tpm, err := nodeattest.OpenTPM(context.Background(), "simulator")
	require.NoError(t, err)
	return tpm
}

func platform(t *testing.T) nodeattest.Platform {
	t.Helper()
	tpm := openTPM(t)
	defer tpm.Close()
	p, err := tpm.ReadPlatform()
	require.NoError(t, err)
	return p
}

func pcrValue(t *testing.T, idx int) []byte {
	for _, p := range platform(t).PCRs {
		if p.Index == idx {
			return p.Digest
		}
	}
	t.Fatalf("PCR %d not read", idx)
	return nil
}

func extendPCR(t *testing.T, idx int, data string) {
	t.Helper()
	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	sum := sha256.Sum256([]byte(data))
	require.NoError(t, legacy.PCRExtend(sim, tpmutil.Handle(idx), legacy.AlgSHA256, sum[:], ""))
}

type node struct {
	b     *brokertest.Broker
	state *nodeattest.State
	logs  nodeattest.Logs
}

func enroll(t *testing.T, b *brokertest.Broker, name string) *node {
	t.Helper()
	ctx := context.Background()
	tok, err := b.Admin.CreateJoinToken(ctx, &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	tpm := openTPM(t)
	defer tpm.Close()
	st, n, err := nodeattest.Enroll(ctx, b.Node, tpm, nodeattest.EnrollOptions{Name: name, JoinToken: tok.GetToken(), BrokerID: "broker-test"})
	require.NoError(t, err)
	require.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
	return &node{b: b, state: st}
}

func (n *node) session(t *testing.T) (*nodeattest.Session, error) {
	t.Helper()
	tpm := openTPM(t)
	defer tpm.Close()
	return nodeattest.NewSession(context.Background(), n.b.Node, tpm, n.state, n.logs)
}

// policyPinning applies a policy that accepts PCR idx's current value.
func policyPinning(t *testing.T, b *brokertest.Broker, name string, idx int) {
	t.Helper()
	y := fmt.Sprintf("name: %s\npcrs:\n  %d: [%q]\n", name, idx, hex.EncodeToString(pcrValue(t, idx)))
	_, err := b.Admin.ApplyPolicy(context.Background(), &apiv1.ApplyPolicyRequest{Yaml: y})
	require.NoError(t, err)
}

// wrap seals optsdata for key the way the keyprovider does at build time.
func wrap(t *testing.T, b *brokertest.Broker, key string, optsdata []byte) []byte {
	t.Helper()
	h := &keyprovider.Handler{Keys: &keyprovider.BrokerKeys{Broker: b.Node, CA: b.CA, Addr: b.Addr}}
	req := fmt.Sprintf(`{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"attested":[%q]},"DecryptConfig":{"Parameters":{}}},"optsdata":%q},"keyunwrapparams":{"dc":null,"annotation":null}}`,
		base64.StdEncoding.EncodeToString([]byte("key="+key)), base64.StdEncoding.EncodeToString(optsdata))
	out, err := h.Handle(context.Background(), []byte(req))
	require.NoError(t, err)
	var resp struct {
		KeyWrapResults struct{ Annotation []byte } `json:"keywrapresults"`
	}
	require.NoError(t, json.Unmarshal(out, &resp))
	return resp.KeyWrapResults.Annotation
}

func unwrap(n *node, s *nodeattest.Session, ann []byte) ([]byte, error) {
	resp, err := n.b.Node.Unwrap(context.Background(), &apiv1.UnwrapRequest{SessionToken: s.Token, Annotation: ann})
	if err != nil {
		return nil, err
	}
	tpm, err := nodeattest.OpenTPM(context.Background(), "simulator")
	if err != nil {
		return nil, err
	}
	defer tpm.Close()
	return s.Open(tpm, resp.GetKey(), resp.GetKeyVersion(), resp.GetSealed())
}

// auditReasons are the audit reasons recorded for a node: where refusals
// of unauthenticated evidence say precisely what failed.
func auditReasons(t *testing.T, b *brokertest.Broker, node string) string {
	t.Helper()
	evs, err := b.Admin.ListAudit(context.Background(), &apiv1.ListAuditRequest{Node: node})
	require.NoError(t, err)
	var out []string
	for _, e := range evs.GetEvents() {
		out = append(out, e.GetReason())
	}
	return strings.Join(out, "\n")
}

// assertUnverified checks a refusal of evidence that did not authenticate:
// one answer whatever the reason, which the audit holds.
func assertUnverified(t *testing.T, b *brokertest.Broker, err error, node, auditReason string) {
	t.Helper()
	require.Error(t, err)
	assert.Equal(t, codes.PermissionDenied, status.Code(err))
	assert.Contains(t, err.Error(), "the node is not enrolled, not approved or revoked, or its quote is not signed by its enrolled attestation key")
	assert.Contains(t, auditReasons(t, b, node), auditReason)
}

func setup(t *testing.T) (*brokertest.Broker, *node, []byte, []byte) {
	b := brokertest.Start(t)
	n := enroll(t, b, "node1")
	policyPinning(t, b, "prod", debugPCR)
	_, err := b.Admin.CreateKey(context.Background(), &apiv1.CreateKeyRequest{Name: "app", Policy: "prod"})
	require.NoError(t, err)
	optsdata := []byte(`{"symkey":"c2VjcmV0LWxheWVyLWtleS0zMi1ieXRlcy1sb25nIQ==","digest":"sha256:00","cipheroptions":{"nonce":"AAAA"}}`)
	return b, n, optsdata, wrap(t, b, "app", optsdata)
}

func TestReleaseToAttestedNode(t *testing.T) {
	_, n, optsdata, ann := setup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	got, err := unwrap(n, s, ann)
	require.NoError(t, err)
	assert.Equal(t, optsdata, got, "optsdata must come back byte-identical")
}

func TestChangedPCRIsRefusedNamingPCRAndPolicy(t *testing.T) {
	_, n, _, ann := setup(t)
	extendPCR(t, debugPCR, "unexpected boot component")
	s, err := n.session(t)
	require.NoError(t, err, "the quote itself is genuine; the policy refuses")
	_, err = unwrap(n, s, ann)
	require.Error(t, err)
	assert.Equal(t, codes.PermissionDenied, status.Code(err))
	assert.Contains(t, err.Error(), "PCR 16 differs from policy prod")
	assert.Contains(t, err.Error(), "want one of")
}

func TestSessionNoLongerValidLocallyAfterPCRChange(t *testing.T) {
	_, n, _, _ := setup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	assert.True(t, s.StillValid(time.Now(), platform(t)))
	extendPCR(t, debugPCR, "changed")
	assert.False(t, s.StillValid(time.Now(), platform(t)), "a PCR change must end the cached session")
}

// attestRequest collects evidence for name with the AK in akBlob, so tests
// can tamper with it before it reaches the broker.
func attestRequest(t *testing.T, b *brokertest.Broker, name string, akBlob []byte) *apiv1.AttestRequest {
	return collect(t, b, &nodeattest.State{Name: name, Broker: "broker-test", AKBlob: akBlob}, nodeattest.Logs{}).Request
}

func collect(t *testing.T, b *brokertest.Broker, st *nodeattest.State, logs nodeattest.Logs) *nodeattest.Evidence {
	t.Helper()
	ch, err := b.Node.Challenge(context.Background(), &apiv1.ChallengeRequest{Node: st.Name})
	require.NoError(t, err)
	tpm := openTPM(t)
	defer tpm.Close()
	ev, err := nodeattest.Collect(tpm, st, ch.GetNonce(), logs)
	require.NoError(t, err)
	return ev
}

func TestReplayedEvidenceIsRefused(t *testing.T) {
	b, n, _, _ := setup(t)
	req := attestRequest(t, b, "node1", n.state.AKBlob)
	_, err := b.Node.Attest(context.Background(), req)
	require.NoError(t, err)
	_, err = b.Node.Attest(context.Background(), req)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "nonce already used (replayed evidence?)")
}

func TestEvidenceBoundToSessionKey(t *testing.T) {
	b, n, _, _ := setup(t)
	req := attestRequest(t, b, "node1", n.state.AKBlob)
	st, err := suite.Lookup(suite.SessionName)
	require.NoError(t, err)
	_, other, err := st.GenerateKey()
	require.NoError(t, err)
	req.SessionPublicKey = other // an attacker swaps in its own session key
	_, err = b.Node.Attest(context.Background(), req)
	assertUnverified(t, b, err, "node1", "quote refused: not signed by this node's enrolled AK over this nonce, session key and PCR values: its qualifying data is for another nonce, session key or node")
	assert.NotContains(t, auditReasons(t, b, "node1"), "[]byte", "no raw bytes in a refusal")
}

func TestQuoteByUnenrolledKeyIsRefused(t *testing.T) {
	b, n, _, _ := setup(t)
	dev, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: simChannel(t)})
	require.NoError(t, err)
	rogue, err := dev.NewAK(&attest.AKConfig{Algorithm: attest.ECDSA})
	require.NoError(t, err)
	blob, err := rogue.Marshal()
	require.NoError(t, err)
	require.NoError(t, rogue.Close(dev))
	req := attestRequest(t, b, n.state.Name, blob)
	_, err = b.Node.Attest(context.Background(), req)
	assertUnverified(t, b, err, "node1", "not signed by this node's enrolled AK")
}

// TestUnenrolledNodeIsRefused: an unauthenticated caller gets the same
// answers for a name that is not enrolled as for one that is: a nonce,
// then a refusal that does not say which.
func TestUnenrolledNodeIsRefused(t *testing.T) {
	b, n, _, _ := setup(t)
	ghost := collect(t, b, &nodeattest.State{Name: "ghost", Broker: "broker-test", AKBlob: n.state.AKBlob}, nodeattest.Logs{})
	_, err := b.Node.Attest(context.Background(), ghost.Request)
	assertUnverified(t, b, err, "ghost", "node is not enrolled")
	forged := attestRequest(t, b, "node1", n.state.AKBlob)
	forged.Signature[len(forged.Signature)-1] ^= 1
	_, err2 := b.Node.Attest(context.Background(), forged)
	require.Error(t, err2)
	assert.Equal(t, strings.ReplaceAll(err.Error(), "ghost", "node1"), err2.Error(), "enrolled or not, the same answer")
}

func TestRevocationEndsSessionAtOnce(t *testing.T) {
	b, n, _, ann := setup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	_, err = b.Admin.RevokeNode(context.Background(), &apiv1.NodeRequest{Name: "node1"})
	require.NoError(t, err)
	_, err = unwrap(n, s, ann)
	require.Error(t, err)
	_, err = n.session(t)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "revoked")
}

func TestRebootEndsSession(t *testing.T) {
	_, n, _, ann := setup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	require.NoError(t, sim.Reset()) // TPM reset: resetCount increments, PCRs clear
	s2, err := n.session(t)
	require.NoError(t, err)
	assert.Greater(t, s2.ResetCount, s.ResetCount)
	_, err = unwrap(n, s, ann)
	require.Error(t, err, "a session from before the reboot must not release keys")
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
}

func TestAdminNeedsCredential(t *testing.T) {
	b := brokertest.Start(t)
	_, err := b.NoCred.CreateJoinToken(context.Background(), &apiv1.CreateJoinTokenRequest{})
	require.Error(t, err)
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
	_, err = b.NoCred.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
	assert.Equal(t, codes.Unauthenticated, status.Code(err))
}

func TestEnrollWithoutTokenWaitsForApproval(t *testing.T) {
	b := brokertest.Start(t)
	tpm := openTPM(t)
	st, n, err := nodeattest.Enroll(context.Background(), b.Node, tpm, nodeattest.EnrollOptions{Name: "n2", BrokerID: "broker-test"})
	tpm.Close()
	require.NoError(t, err)
	assert.Equal(t, apiv1.NodeState_NODE_STATE_PENDING, n.GetState())
	pending := &node{b: b, state: st}
	_, err = pending.session(t)
	require.Error(t, err, "a pending enrollment is not a node")
	assertUnverified(t, b, err, "n2", "node is not enrolled")
	_, err = b.Admin.ApproveNode(context.Background(), &apiv1.NodeRequest{Name: "n2", EkFingerprint: "SHA256:" + st.EKFingerprint})
	require.NoError(t, err)
	_, err = pending.session(t)
	require.NoError(t, err)
}

func TestJoinTokenIsSingleUse(t *testing.T) {
	b := brokertest.Start(t)
	tok, err := b.Admin.CreateJoinToken(context.Background(), &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	tpm := openTPM(t)
	defer tpm.Close()
	_, _, err = nodeattest.Enroll(context.Background(), b.Node, tpm, nodeattest.EnrollOptions{Name: "a", JoinToken: tok.GetToken()})
	require.NoError(t, err)
	_, _, err = nodeattest.Enroll(context.Background(), b.Node, tpm, nodeattest.EnrollOptions{Name: "b", JoinToken: tok.GetToken()})
	require.Error(t, err)
	// The EK is taken by "a" already; either refusal is correct, and the
	// token must not have enrolled "b".
	nodes, err := b.Admin.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
	require.NoError(t, err)
	require.Len(t, nodes.GetNodes(), 1)
}

func TestNoKeyMaterialInAudit(t *testing.T) {
	b, n, optsdata, ann := setup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s, ann)
	require.NoError(t, err)
	extendPCR(t, debugPCR, "x")
	s2, err := n.session(t)
	require.NoError(t, err)
	_, refusal := unwrap(n, s2, ann)
	require.Error(t, refusal)
	evs, err := b.Admin.ListAudit(context.Background(), &apiv1.ListAuditRequest{})
	require.NoError(t, err)
	dump, err := json.Marshal(evs)
	require.NoError(t, err)
	for _, secret := range [][]byte{optsdata, s.Token, s2.Token, s.Key.Private} {
		assert.NotContains(t, string(dump), base64.StdEncoding.EncodeToString(secret))
		assert.NotContains(t, string(dump), string(secret))
	}
	assert.False(t, strings.Contains(refusal.Error(), "c2VjcmV0"), "refusal must not quote the layer key")
}

// simChannel gives direct access to the shared simulator for tests that
// drive go-attestation themselves (rogue keys, hand-built evidence).
func simChannel(t *testing.T) attest.CommandChannelTPM20 {
	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	return rawSim{sim}
}

type rawSim struct{ rw io.ReadWriter }

func (r rawSim) Read(p []byte) (int, error)    { return r.rw.Read(p) }
func (r rawSim) Write(p []byte) (int, error)   { return r.rw.Write(p) }
func (rawSim) Close() error                    { return nil }
func (rawSim) MeasurementLog() ([]byte, error) { return nil, fmt.Errorf("no log") }
