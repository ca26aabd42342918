package broker_test

import (
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"testing"

	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	nodeattest "github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/enrolltest"
)

// These tests replay the review's attack on enrollment (issue 6, finding
// 4): a caller without a TPM makes up an EK and an AK whose public area
// claims restricted/fixedTPM, and passes credential activation in software.
// Without a required EK certificate nothing can tell it from a TPM, so
// what it obtains must be worth nothing: a pending entry that blocks no one,
// that an admin approves only by naming its EK, among a bounded number.

// uncertifiedBroker admits TPMs without EK certificates (by join token or
// approval), the setting the attack needs.
func uncertifiedBroker(t *testing.T, configure ...func(*broker.Config)) *brokertest.Broker {
	return brokertest.Start(t, append([]func(*broker.Config){func(c *broker.Config) {
		c.RequireEKCertificate = false
		// These tests make hundreds of enrollments from one source: the
		// caps under test, not the rate limit, must refuse them.
		c.Limits.Rates = map[string]broker.Rate{"enroll": {PerSecond: 10000, Burst: 10000}}
	}}, configure...)...)
}

var tpmSigScheme = legacy.SigScheme{Alg: legacy.AlgRSASSA, Hash: legacy.AlgSHA256}

func impostor(t *testing.T) *enrolltest.Impostor {
	t.Helper()
	i, err := enrolltest.NewRSA(2048)
	require.NoError(t, err)
	return i
}

func token(t *testing.T, b *brokertest.Broker) string {
	t.Helper()
	tok, err := b.Admin.CreateJoinToken(context.Background(), &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	return tok.GetToken()
}

// enrollSim enrolls the simulator's TPM as name, with a join token when
// tok is not empty.
func enrollSim(t *testing.T, b *brokertest.Broker, name, tok string) (*apiv1.Node, error) {
	t.Helper()
	tpm := openTPM(t)
	defer tpm.Close()
	_, n, err := nodeattest.Enroll(context.Background(), b.Node, tpm, nodeattest.EnrollOptions{Name: name, JoinToken: tok, BrokerID: "broker-test"})
	return n, err
}

func simFingerprint(t *testing.T) string {
	der, err := x509.MarshalPKIXPublicKey(simEK(t))
	require.NoError(t, err)
	sum := sha256.Sum256(der)
	return "SHA256:" + hex.EncodeToString(sum[:])
}

func listNodes(t *testing.T, b *brokertest.Broker) *apiv1.ListNodesResponse {
	t.Helper()
	r, err := b.Admin.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
	require.NoError(t, err)
	return r
}

// TestImpostorEnrollsInSoftware is the attack's first step, and stays
// true: with certificates not required, a made-up EK and AK pass credential
// activation. What follows must make that worthless.
func TestImpostorEnrollsInSoftware(t *testing.T) {
	b := uncertifiedBroker(t)
	n, err := impostor(t).Enroll(context.Background(), b.Node, "anything", "")
	require.NoError(t, err)
	assert.Equal(t, apiv1.NodeState_NODE_STATE_PENDING, n.GetState(), "without a token it only waits for approval")
}

// TestImpostorRefusedWhenCertificatesRequired: with the default
// (requireEKCertificate), the impostor has no certificate and gets nothing.
func TestImpostorRefusedWhenCertificatesRequired(t *testing.T) {
	b := brokerTrusting(t, newCA(t, "TPM Manufacturer Root"))
	_, err := impostor(t).Enroll(context.Background(), b.Node, "victim", "")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "EK certificate required")
}

// TestPendingSquatDoesNotBlockTokenEnrollment: the impostor's pending entry
// under the victim's name does not stop the victim enrolling with a join
// token, and is superseded by it.
func TestPendingSquatDoesNotBlockTokenEnrollment(t *testing.T) {
	b := uncertifiedBroker(t)
	squat := impostor(t)
	_, err := squat.Enroll(context.Background(), b.Node, "victim", "")
	require.NoError(t, err)

	n, err := enrollSim(t, b, "victim", token(t, b))
	require.NoError(t, err, "a pending enrollment must never block a join-token enrollment of that name")
	assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
	l := listNodes(t, b)
	require.Len(t, l.GetNodes(), 1)
	assert.Equal(t, simFingerprint(t), "SHA256:"+l.GetNodes()[0].GetEkFingerprint())
	assert.Empty(t, l.GetPending(), "the squat is superseded")
	_, err = b.Admin.ApproveNode(context.Background(), &apiv1.NodeRequest{Name: "victim", EkFingerprint: squat.Fingerprint()})
	require.Error(t, err, "a superseded squat cannot be approved")
}

// TestPendingEnrollmentDoesNotBlockEK: a TPM waiting for approval under one
// name enrolls with a join token under another; the pending entry goes.
func TestPendingEnrollmentDoesNotBlockEK(t *testing.T) {
	b := uncertifiedBroker(t)
	n, err := enrollSim(t, b, "first-try", "")
	require.NoError(t, err)
	require.Equal(t, apiv1.NodeState_NODE_STATE_PENDING, n.GetState())
	n, err = enrollSim(t, b, "worker-1", token(t, b))
	require.NoError(t, err, "a pending enrollment must never block a join-token enrollment of that EK")
	assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
	l := listNodes(t, b)
	require.Len(t, l.GetNodes(), 1)
	assert.Equal(t, "worker-1", l.GetNodes()[0].GetName())
	assert.Empty(t, l.GetPending())
}

// TestApprovalMustNameTheEK: 'node approve NAME' alone approved whatever
// was pending under NAME, the squat included. An approval names the EK
// fingerprint the node printed; several enrollments may wait under one
// name and only the named one is approved.
func TestApprovalMustNameTheEK(t *testing.T) {
	ctx := context.Background()
	b := uncertifiedBroker(t)
	squat := impostor(t)
	_, err := squat.Enroll(ctx, b.Node, "victim", "")
	require.NoError(t, err)
	n, err := enrollSim(t, b, "victim", "")
	require.NoError(t, err, "a second enrollment may wait under the same name")
	require.Equal(t, apiv1.NodeState_NODE_STATE_PENDING, n.GetState())
	real := simFingerprint(t)

	_, err = b.Admin.ApproveNode(ctx, &apiv1.NodeRequest{Name: "victim"})
	require.Error(t, err, "approval by name alone must be refused")
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
	assert.Contains(t, err.Error(), squat.Fingerprint(), "the refusal shows what is pending")
	assert.Contains(t, err.Error(), real)

	_, err = b.Admin.ApproveNode(ctx, &apiv1.NodeRequest{Name: "victim", EkFingerprint: "SHA256:" + hex.EncodeToString(make([]byte, 32))})
	require.Error(t, err)
	assert.Equal(t, codes.FailedPrecondition, status.Code(err))
	assert.Contains(t, err.Error(), real)

	got, err := b.Admin.ApproveNode(ctx, &apiv1.NodeRequest{Name: "victim", EkFingerprint: real})
	require.NoError(t, err)
	assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, got.GetState())
	assert.Equal(t, real, "SHA256:"+got.GetEkFingerprint())
	l := listNodes(t, b)
	assert.Empty(t, l.GetPending(), "approving one enrollment of a name drops the others")
	_, err = b.Node.Challenge(ctx, &apiv1.ChallengeRequest{Node: "victim"})
	require.NoError(t, err, "the approved node attests")
}

// TestPendingEnrollmentsAreCapped: the review filled the broker with 300
// pending squats in seconds. They are capped in total and per name, and a
// join-token enrollment still goes through when the caps are full.
func TestPendingEnrollmentsAreCapped(t *testing.T) {
	ctx := context.Background()
	b := uncertifiedBroker(t)
	accepted := 0
	for i := range 300 {
		imp, err := enrolltest.NewECC()
		require.NoError(t, err)
		_, err = imp.Enroll(ctx, b.Node, fmt.Sprintf("squat-%d", i), "")
		if err == nil {
			accepted++
			continue
		}
		require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
		assert.Contains(t, err.Error(), "join token")
	}
	assert.Equal(t, broker.DefaultMaxPending, accepted)
	assert.Len(t, listNodes(t, b).GetPending(), broker.DefaultMaxPending)
	n, err := enrollSim(t, b, "squat-1", token(t, b))
	require.NoError(t, err, "join tokens are never capped by pending enrollments")
	assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
}

func TestPendingEnrollmentsAreCappedPerName(t *testing.T) {
	ctx := context.Background()
	b := uncertifiedBroker(t)
	accepted := 0
	for range 20 {
		imp, err := enrolltest.NewECC()
		require.NoError(t, err)
		if _, err := imp.Enroll(ctx, b.Node, "victim", ""); err == nil {
			accepted++
		} else {
			require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
			assert.Contains(t, err.Error(), `"victim"`)
		}
	}
	assert.Equal(t, broker.DefaultMaxPendingPerName, accepted)
	_, err := enrollSim(t, b, "other", "")
	require.NoError(t, err, "other names are not affected")
}

// TestWeakEKIsRefused: an RSA-1024 EK was accepted.
func TestWeakEKIsRefused(t *testing.T) {
	b := uncertifiedBroker(t)
	weak, err := enrolltest.NewRSA(1024)
	require.NoError(t, err)
	_, err = weak.Enroll(context.Background(), b.Node, "weak", token(t, b))
	require.Error(t, err)
	assert.Equal(t, codes.PermissionDenied, status.Code(err))
	assert.Contains(t, err.Error(), "RSA-1024")
	assert.Contains(t, err.Error(), "RSA-2048")
	assert.Empty(t, listNodes(t, b).GetNodes())
}

// TestNonStandardEKTemplateIsRefused: the EK's public area must be one of
// the TCG EK templates, for the key presented.
func TestNonStandardEKTemplateIsRefused(t *testing.T) {
	other, err := enrolltest.NewRSA(2048)
	require.NoError(t, err)
	otherArea := other.Area
	cases := []struct {
		name   string
		tamper func(i *enrolltest.Impostor)
		want   string
	}{
		{"no public area", func(i *enrolltest.Impostor) { i.AreaBytes = []byte{} }, "EK public area"},
		{"not fixedTPM", func(i *enrolltest.Impostor) { i.Area.Attributes &^= 0x2 }, "fixedTPM"},
		{"signing EK", func(i *enrolltest.Impostor) { i.Area.Attributes |= 0x40000 }, "sign"},
		{"not restricted", func(i *enrolltest.Impostor) { i.Area.Attributes &^= 0x10000 }, "restricted"},
		{"no authPolicy", func(i *enrolltest.Impostor) { i.Area.AuthPolicy = nil }, "authPolicy"},
		{"high-range attributes with PolicyA", func(i *enrolltest.Impostor) { i.Area.Attributes |= 0x40 }, "unexpected userWithAuth"},
		{"no symmetric", func(i *enrolltest.Impostor) { i.Area.RSAParameters.Symmetric = nil }, "AES-128-CFB"},
		{"AES-256", func(i *enrolltest.Impostor) { i.Area.RSAParameters.Symmetric.KeyBits = 256 }, "AES-128-CFB"},
		{"a scheme", func(i *enrolltest.Impostor) {
			i.Area.RSAParameters.Sign = &tpmSigScheme
		}, "scheme"},
		{"SHA-1 name", func(i *enrolltest.Impostor) { i.Area.NameAlg = 0x0004 }, "SHA-256"},
		{"other exponent", func(i *enrolltest.Impostor) { i.Area.RSAParameters.ExponentRaw = 3 }, "exponent"},
		{"another key", func(i *enrolltest.Impostor) { i.Area = otherArea }, "another key"},
		{"trailing bytes", func(i *enrolltest.Impostor) {
			a, _ := i.Area.Encode()
			i.AreaBytes = append(a, 0)
		}, "trailing"},
	}
	b := uncertifiedBroker(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			i := impostor(t)
			c.tamper(i)
			_, err := i.Enroll(context.Background(), b.Node, "odd", token(t, b))
			require.Error(t, err)
			assert.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
			assert.Contains(t, err.Error(), c.want)
		})
	}
	assert.Empty(t, listNodes(t, b).GetNodes())
}

// TestStandardEKTemplatesAreAccepted: the low-range L-1 (RSA 2048) and L-2
// (P-256) and high-range H-1 and H-2 templates.
func TestStandardEKTemplatesAreAccepted(t *testing.T) {
	b := uncertifiedBroker(t)
	for k, high := range []bool{false, true} {
		rsaImp := impostor(t)
		eccImp, err := enrolltest.NewECC()
		require.NoError(t, err)
		for j, i := range []*enrolltest.Impostor{rsaImp, eccImp} {
			if high {
				i.Area.Attributes = enrolltest.HighRangeAttributes
				i.Area.AuthPolicy = enrolltest.PolicyBSHA256
			}
			n, err := i.Enroll(context.Background(), b.Node, fmt.Sprintf("std-%d-%d", k, j), token(t, b))
			require.NoError(t, err, "high range %v, %d", high, j)
			assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
		}
	}
}

// TestEnrollStartRevealsNothing: EnrollStart told any caller which name an
// EK was enrolled under, and that a name was taken. Unauthenticated
// callers get the same answer whatever the broker holds; conflicts are
// reported only once credential activation proved the caller holds the TPM.
func TestEnrollStartRevealsNothing(t *testing.T) {
	ctx := context.Background()
	b := uncertifiedBroker(t)
	_, err := enrollSim(t, b, "node1", token(t, b))
	require.NoError(t, err)

	// The victim's EK is public (its certificate, any log); the attacker
	// rebuilds its public area and sends it with its own AK.
	victimEK := simEK(t).(*rsa.PublicKey)
	victimDER, err := x509.MarshalPKIXPublicKey(victimEK)
	require.NoError(t, err)
	victimArea, err := enrolltest.RSAPublicArea(victimEK)
	require.NoError(t, err)

	probe := func(i *enrolltest.Impostor, name string) (*apiv1.EnrollStartResponse, error) {
		req, err := i.Request(name, "")
		require.NoError(t, err)
		return b.Node.EnrollStart(ctx, req)
	}
	copyEK := impostor(t)
	copyEK.EKPublic, copyEK.AreaBytes = victimDER, victimArea
	for _, name := range []string{"node1", "fresh"} {
		_, err := probe(copyEK, name)
		require.NoError(t, err, "EnrollStart must not tell that this EK is enrolled (name %q)", name)
	}
	own := impostor(t)
	r, err := probe(own, "node1")
	require.NoError(t, err, "EnrollStart must not tell that the name is taken")

	// With its own EK the impostor activates, and only then learns the
	// name is taken.
	secret, err := own.Activate(r)
	require.NoError(t, err)
	_, err = b.Node.EnrollFinish(ctx, &apiv1.EnrollFinishRequest{EnrollmentId: r.GetEnrollmentId(), ActivatedSecret: secret})
	require.Error(t, err)
	assert.Equal(t, codes.AlreadyExists, status.Code(err))
	// With the victim's EK it cannot activate, and learns nothing.
	r, err = probe(copyEK, "x")
	require.NoError(t, err)
	_, err = b.Node.EnrollFinish(ctx, &apiv1.EnrollFinishRequest{EnrollmentId: r.GetEnrollmentId(), ActivatedSecret: make([]byte, 32)})
	require.Error(t, err)
	assert.Equal(t, codes.PermissionDenied, status.Code(err))
	assert.NotContains(t, err.Error(), "node1")
}

// TestEnrollmentsInFlightAreBounded: credential activation challenges that
// nobody answers are capped.
func TestEnrollmentsInFlightAreBounded(t *testing.T) {
	ctx := context.Background()
	b := uncertifiedBroker(t)
	imp, err := enrolltest.NewECC()
	require.NoError(t, err)
	req, err := imp.Request("flood", "")
	require.NoError(t, err)
	var last *apiv1.EnrollStartResponse
	for i := 0; ; i++ {
		r, err := b.Node.EnrollStart(ctx, req)
		if err != nil {
			require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
			assert.Equal(t, broker.DefaultMaxEnrollmentsInFlight, i)
			break
		}
		require.Less(t, i, 1000, "challenges in flight are not bounded")
		last = r
	}
	// Answering one frees its slot.
	secret, err := imp.Activate(last)
	require.NoError(t, err)
	_, err = b.Node.EnrollFinish(ctx, &apiv1.EnrollFinishRequest{EnrollmentId: last.GetEnrollmentId(), ActivatedSecret: secret})
	require.NoError(t, err)
	_, err = b.Node.EnrollStart(ctx, req)
	require.NoError(t, err)
}
