package broker_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

func history(t *testing.T, d *apiv1.NodeDetail) string {
	t.Helper()
	var out []string
	for _, h := range d.GetHistory() {
		out = append(out, h.GetStatus())
	}
	return strings.Join(out, ",")
}

// Status follows appraisals: trusted while the evidence satisfies a key's
// policy, untrusted with the failing clause when it does not, revoked when
// an admin says so (not an old PCR reason), each change kept in the
// history.
func TestStatusFollowsAppraisals(t *testing.T) {
	b, n, _, _ := setup(t)
	ctx := context.Background()
	_, err := n.session(t)
	require.NoError(t, err)
	node := listNode(t, b, "node1")
	assert.Equal(t, "trusted", node.GetStatus())
	assert.Contains(t, node.GetStatusReason(), "satisfies policy prod")

	extendPCR(t, debugPCR, "a debugger was attached")
	_, err = n.session(t)
	require.NoError(t, err, "the evidence is genuine; the policy decides")
	node = listNode(t, b, "node1")
	assert.Equal(t, "untrusted", node.GetStatus())
	assert.Contains(t, node.GetStatusReason(), "PCR 16 differs from policy prod")

	_, err = b.Admin.RevokeNode(ctx, &apiv1.NodeRequest{Name: "node1"})
	require.NoError(t, err)
	node = listNode(t, b, "node1")
	assert.Equal(t, "revoked", node.GetStatus())
	assert.NotContains(t, node.GetStatusReason(), "PCR 16", "a revoked node shows the revocation")

	d, err := b.Admin.GetNode(ctx, &apiv1.NodeRequest{Name: "node1"})
	require.NoError(t, err)
	assert.Equal(t, "trusted,untrusted,revoked", history(t, d), "attested, changed, revoked")
	assert.NotEmpty(t, d.GetEvidence())
	assert.Contains(t, strings.Join(d.GetEvidence(), "\n"), "PCR 16: ")
	assert.Equal(t, float64(1), counter(t, b.Server.Metrics(), "attested_broker_node_status_changes_total", "status", "untrusted"))
	assert.Equal(t, float64(1), counter(t, b.Server.Metrics(), "attested_broker_node_status_changes_total", "status", "revoked"))
}

// A node allowed one key and refused another does not flap with each
// pull: status follows its evidence, and refusals are audited events.
func TestStatusDoesNotFlapWithReleases(t *testing.T) {
	b, n, _, allowed := setup(t)
	ctx := context.Background()
	_, err := b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: fmt.Sprintf("name: other\npcrs:\n  16: [%q]\n", strings.Repeat("ab", 32))})
	require.NoError(t, err)
	_, err = b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "other", Policy: "other"})
	require.NoError(t, err)
	refused := wrap(t, b, "other", []byte("k"))
	s, err := n.session(t)
	require.NoError(t, err)
	for range 3 {
		_, err = unwrap(n, s, refused)
		require.Error(t, err)
		_, err = unwrap(n, s, allowed)
		require.NoError(t, err)
	}
	d, err := b.Admin.GetNode(ctx, &apiv1.NodeRequest{Name: "node1"})
	require.NoError(t, err)
	assert.Equal(t, "trusted", d.GetNode().GetStatus())
	assert.Contains(t, d.GetNode().GetStatusReason(), "satisfies policy prod")
	assert.Equal(t, "trusted", history(t, d))
}

// A node that sends no evidence within staleAfter is stale, shown at once
// and recorded (and announced) by the periodic check.
func TestStatusGoesStale(t *testing.T) {
	wall := &fakeTime{t: time.Now()}
	d, _ := startDirect(t, wall.now, nil)
	st := enrollDirect(t, d)
	ctx := context.Background()
	_, err := sessionDirect(t, d, st)
	require.NoError(t, err)
	admin := d.srv.AdminServer()
	get := func() *apiv1.NodeDetail {
		nd, err := admin.GetNode(ctx, &apiv1.NodeRequest{Name: "node1"})
		require.NoError(t, err)
		return nd
	}
	assert.Equal(t, "trusted", get().GetNode().GetStatus())
	wall.add(5 * time.Minute)
	assert.Equal(t, "trusted", get().GetNode().GetStatus(), "within staleAfter (6m by default)")
	wall.add(2 * time.Minute)
	nd := get()
	assert.Equal(t, "stale", nd.GetNode().GetStatus(), "shown at once")
	assert.Contains(t, nd.GetNode().GetStatusReason(), "no evidence for 7m0s (staleAfter 6m0s)")
	assert.Equal(t, "trusted", history(t, nd), "not yet recorded")
	require.NoError(t, d.srv.CheckStatus(ctx))
	assert.Equal(t, "trusted,stale", history(t, get()), "recorded by the check")
	_, err = sessionDirect(t, d, st)
	require.NoError(t, err)
	assert.Equal(t, "trusted,stale,trusted", history(t, get()), "evidence again")
}
