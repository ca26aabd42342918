package broker_test

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
)

// Hardening finding 18: text an attacker or an admin supplies is quoted in
// errors, and text that ends up in lists (tag values) must be printable, so
// nothing can forge a line of output or drive the operator's terminal.
func TestAttackerTextIsQuoted(t *testing.T) {
	b := brokertest.Start(t)
	ctx := context.Background()
	forged := "ghost\nnode1  trusted  2026-01-01  all good"
	for _, call := range []func() error{
		func() error { _, err := b.Admin.RemoveNode(ctx, &apiv1.NodeRequest{Name: forged}); return err },
		func() error { _, err := b.Admin.RevokeNode(ctx, &apiv1.NodeRequest{Name: forged}); return err },
		func() error { _, err := b.Admin.GetNode(ctx, &apiv1.NodeRequest{Name: forged}); return err },
		func() error {
			_, err := b.Admin.LearnPolicy(ctx, &apiv1.LearnPolicyRequest{Node: forged})
			return err
		},
		func() error {
			_, err := b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "k", Policy: forged})
			return err
		},
		func() error {
			_, err := b.Admin.TagNode(ctx, &apiv1.TagNodeRequest{Name: forged, Set: map[string]string{"a\nb": "c"}})
			return err
		},
		func() error {
			_, err := b.Node.Challenge(ctx, &apiv1.ChallengeRequest{Node: forged})
			return err
		},
	} {
		err := call()
		require.Error(t, err)
		assert.NotContains(t, err.Error(), "\n", "a newline from the request reached the error text")
	}
}

func TestTagValuesArePrintable(t *testing.T) {
	b, _, _, _ := setup(t)
	for _, v := range []string{"EU\x1b[2J", "EU\rUS", "EU\u202eSU", "a,b"} {
		_, err := b.Admin.TagNode(context.Background(), &apiv1.TagNodeRequest{Name: "node1", Set: map[string]string{"region": v}})
		require.Error(t, err, "%q", v)
		assert.Contains(t, err.Error(), "printable")
		assert.False(t, strings.ContainsAny(err.Error(), "\x1b\r\u202e"), "the refusal quotes the value")
	}
	_, err := b.Admin.TagNode(context.Background(), &apiv1.TagNodeRequest{Name: "node1", Set: map[string]string{"region": "EU West (Frankfurt)"}})
	require.NoError(t, err)
}
