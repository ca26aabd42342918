package broker_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest/eventlogtest"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
)

// webhookBroker starts a broker running its webhook worker, with a
// receiver subscribed to events.
func webhookBroker(t *testing.T, events ...string) (*brokertest.Broker, *brokertest.Receiver, string) {
	t.Helper()
	rc := brokertest.NewReceiver(t)
	b := brokertest.Start(t, func(c *broker.Config) { c.Webhooks.CAFile = rc.CAFile })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Server.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	w, err := b.Admin.AddWebhook(context.Background(), &apiv1.AddWebhookRequest{Url: rc.URL, Events: events})
	require.NoError(t, err)
	return b, rc, w.GetSecret()
}

func waitEvents(t *testing.T, rc *brokertest.Receiver, secret string, n int) []brokertest.WebhookEvent {
	t.Helper()
	require.Eventually(t, func() bool { return len(rc.Requests()) >= n }, 10*time.Second, 10*time.Millisecond, "%d webhook event(s)", n)
	return rc.Events(t, secret)
}

func TestRefusedReleaseRaisesWebhookEvent(t *testing.T) {
	b, rc, secret := webhookBroker(t, broker.EventRefusal)
	n := enroll(t, b, "node1")
	policyPinning(t, b, "prod", debugPCR)
	_, err := b.Admin.CreateKey(context.Background(), &apiv1.CreateKeyRequest{Name: "app", Policy: "prod"})
	require.NoError(t, err)
	ann := wrap(t, b, "app", []byte("layer key"))
	s, err := n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s, ann)
	require.NoError(t, err, "a release raises nothing")

	extendPCR(t, debugPCR, "unexpected boot component")
	s, err = n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s, ann)
	require.Error(t, err)
	evs := waitEvents(t, rc, secret, 1)
	require.Len(t, evs, 1)
	assert.Equal(t, "refusal", evs[0].Kind)
	assert.Equal(t, "node1", evs[0].Node)
	assert.Equal(t, "app", evs[0].Key)
	assert.Contains(t, evs[0].Reason, "PCR 16 differs from policy prod")
	assert.Equal(t, "broker-test", evs[0].Broker)
}

// TestRefusedAttestationRaisesWebhookEventButGarbageDoesNot: evidence
// signed by the node's AK and refused is an event; evidence that does not
// authenticate (anyone can send it) is not, and only sampled in the audit.
func TestRefusedAttestationRaisesWebhookEventButGarbageDoesNot(t *testing.T) {
	b, rc, secret := webhookBroker(t, broker.EventRefusal)
	bt := goodBoot()
	// The log hides the bootkit the firmware really measured.
	bt.extendOnly = []eventlogtest.Event{eventlogtest.BootApp(rootkit[:])}
	n := bt.apply(t, b)

	forged := attestRequest(t, b, "node1", n.state.AKBlob)
	forged.Signature[len(forged.Signature)-1] ^= 1
	_, err := b.Node.Attest(context.Background(), forged)
	assertUnverified(t, b, err, "node1", "not signed by this node's enrolled AK")
	ghost := attestRequest(t, b, "ghost", n.state.AKBlob)
	_, err = b.Node.Attest(context.Background(), ghost)
	require.Error(t, err)

	_, err = n.session(t)
	require.ErrorContains(t, err, "firmware event log does not replay")
	evs := waitEvents(t, rc, secret, 1)
	assert.Equal(t, "node1", evs[0].Node)
	assert.Contains(t, evs[0].Reason, "evidence refused: firmware event log does not replay")
	assert.Empty(t, evs[0].Key)

	_, err = b.Admin.RevokeNode(context.Background(), &apiv1.NodeRequest{Name: "node1"})
	require.NoError(t, err)
	_, err = n.session(t)
	require.ErrorContains(t, err, "revoked")
	evs = waitEvents(t, rc, secret, 2)
	require.Len(t, evs, 2, "the forged and unknown-node evidence raised nothing")
	assert.Equal(t, "attestation refused: node is revoked", evs[1].Reason)
}
