package broker_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/keysig"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// layerOpts is ocicrypt's optsdata for a layer (PrivateLayerBlockCipherOptions).
func layerOpts(digest string) []byte {
	return fmt.Appendf(nil, `{"symkey":"c2VjcmV0LWxheWVyLWtleS0zMi1ieXRlcy1sb25nIQ==","digest":%q,"cipheroptions":{"nonce":"AAAA"}}`, digest)
}

func keyVersionOf(t *testing.T, ann []byte) uint32 {
	t.Helper()
	a, err := annotation.Parse(ann)
	require.NoError(t, err)
	require.Len(t, a.Recipients, 1)
	return a.Recipients[0].KeyVersion
}

func auditKind(t *testing.T, b *brokertest.Broker, kind string) []*apiv1.AuditEvent {
	t.Helper()
	r, err := b.Admin.ListAudit(context.Background(), &apiv1.ListAuditRequest{Kind: kind})
	require.NoError(t, err)
	return r.GetEvents()
}

// TestReleaseRecordNamesLayerAndPolicyRevision: "which node got which
// layer, when, under which policy revision" is one record; the layer key
// itself appears nowhere in it.
func TestReleaseRecordNamesLayerAndPolicyRevision(t *testing.T) {
	b, n, _, _ := setup(t)
	ctx := context.Background()
	// Revision 2 of the policy: the same PCR, and a comment.
	cur, err := b.Admin.ListPolicyRevisions(ctx, &apiv1.PolicyRequest{Name: "prod"})
	require.NoError(t, err)
	_, err = b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: cur.GetPolicies()[0].GetYaml() + "# reviewed\n"})
	require.NoError(t, err)
	const digest = "sha256:4a1b3e3c8b5d1f1e9d6a0e2c7b4f3a2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f"
	opts := layerOpts(digest)
	ann := wrap(t, b, "app", opts)
	s, err := n.session(t)
	require.NoError(t, err)
	got, err := unwrap(n, s, ann)
	require.NoError(t, err)
	assert.Equal(t, opts, got)

	rel := auditKind(t, b, "release")
	require.Len(t, rel, 1)
	e := rel[0]
	assert.Equal(t, "node1", e.GetNode())
	assert.Equal(t, "app", e.GetKey())
	assert.EqualValues(t, 1, e.GetKeyVersion())
	assert.Equal(t, digest, e.GetLayerDigest())
	assert.Equal(t, "prod", e.GetPolicy())
	assert.EqualValues(t, 2, e.GetPolicyRevision())
	assert.NotZero(t, e.GetTimeUnixNano())
	assert.NotContains(t, e.String(), "c2VjcmV0", "the layer key is never audited")

	// A refusal names the key version and policy revision that refused.
	extendPCR(t, debugPCR, "refuse me")
	s, err = n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s, ann)
	require.Error(t, err)
	ref := auditKind(t, b, "refuse")
	require.NotEmpty(t, ref)
	last := ref[len(ref)-1]
	assert.EqualValues(t, 1, last.GetKeyVersion())
	assert.EqualValues(t, 2, last.GetPolicyRevision())
	assert.Empty(t, last.GetLayerDigest(), "nothing was opened")

	// A wrapper's digest that is not a digest is not recorded as one.
	extendPCR(t, debugPCR, "")
	assert.Empty(t, auditDigestOf(t, b, n, layerOpts("sha256:AB\nforged line")))
}

// auditDigestOf releases a layer whose optsdata is opts (to a node whose
// PCR the policy pins at the current value) and returns the layer digest
// its release record names.
func auditDigestOf(t *testing.T, b *brokertest.Broker, n *node, opts []byte) string {
	t.Helper()
	policyPinning(t, b, "prod", debugPCR)
	s, err := n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s, wrap(t, b, "app", opts))
	require.NoError(t, err)
	rel := auditKind(t, b, "release")
	return rel[len(rel)-1].GetLayerDigest()
}

// TestRotationKeepsOldImagesDecrypting: after a rotation, new wraps use
// the new version (signed like the first), layers wrapped under the old
// one still unwrap, and the counts say which version released what.
func TestRotationKeepsOldImagesDecrypting(t *testing.T) {
	b, n, optsdata, ann1 := setup(t)
	ctx := context.Background()
	require.EqualValues(t, 1, keyVersionOf(t, ann1))

	_, err := b.Admin.RotateKey(ctx, &apiv1.KeyRequest{Name: "app", Version: 2})
	assert.Equal(t, codes.FailedPrecondition, status.Code(err), "rotating from a version that is not the latest")
	k2, err := b.Admin.RotateKey(ctx, &apiv1.KeyRequest{Name: "app", Version: 1})
	require.NoError(t, err)
	assert.EqualValues(t, 2, k2.GetVersion())
	assert.Equal(t, "prod", k2.GetPolicy())

	wk, err := b.Node.GetWrappingKey(ctx, &apiv1.GetWrappingKeyRequest{Name: "app"})
	require.NoError(t, err)
	assert.EqualValues(t, 2, wk.GetVersion())
	require.NoError(t, keysig.Verify(wk, b.CA, time.Now()), "a rotated version is signed like the first")

	ann2 := wrap(t, b, "app", optsdata)
	assert.EqualValues(t, 2, keyVersionOf(t, ann2), "new wraps use the new version")

	s, err := n.session(t)
	require.NoError(t, err)
	for _, ann := range [][]byte{ann1, ann2, ann1} {
		got, err := unwrap(n, s, ann)
		require.NoError(t, err)
		assert.Equal(t, optsdata, got)
	}

	d, err := b.Admin.GetKey(ctx, &apiv1.KeyRequest{Name: "app"})
	require.NoError(t, err)
	require.Len(t, d.GetVersions(), 2)
	assert.Equal(t, k2.GetSuite(), d.GetVersions()[1].GetSuite())
	assert.Equal(t, "prod", d.GetPolicy().GetName())
	counts := map[uint32][2]uint64{}
	for _, c := range d.GetCounts() {
		counts[c.GetVersion()] = [2]uint64{c.GetReleases(), c.GetRefusals()}
	}
	assert.Equal(t, map[uint32][2]uint64{1: {2, 0}, 2: {1, 0}}, counts)

	keys := auditKind(t, b, "key")
	assert.Contains(t, keys[len(keys)-1].GetReason(), "rotated: version 2")
	assert.Contains(t, keys[len(keys)-1].GetReason(), "layers wrapped under version 1 still unwrap")
}

// TestDisableStopsReleasesAtOnce: disabling a version refuses its layers
// on the very next unwrap, of a warm session, naming the version and when
// it was disabled; other versions go on; a fully disabled key hands out
// no wrapping key.
func TestDisableStopsReleasesAtOnce(t *testing.T) {
	b, n, optsdata, ann1 := setup(t)
	ctx := context.Background()
	s, err := n.session(t)
	require.NoError(t, err)
	_, err = unwrap(n, s, ann1) // warm: the private key is cached
	require.NoError(t, err)
	_, err = b.Admin.RotateKey(ctx, &apiv1.KeyRequest{Name: "app"})
	require.NoError(t, err)
	ann2 := wrap(t, b, "app", optsdata)

	k, err := b.Admin.DisableKey(ctx, &apiv1.KeyRequest{Name: "app", Version: 1})
	require.NoError(t, err)
	assert.EqualValues(t, 1, k.GetVersion())
	assert.NotZero(t, k.GetDisabledUnix())

	_, err = unwrap(n, s, ann1)
	require.Error(t, err)
	assert.Equal(t, codes.PermissionDenied, status.Code(err))
	assert.Regexp(t, `key app version 1 is disabled \(since \d{4}-\d\d-\d\dT[\d:]+Z\): no layer key wrapped under it is released`, err.Error())
	got, err := unwrap(n, s, ann2)
	require.NoError(t, err, "version 2 still releases")
	assert.Equal(t, optsdata, got)
	wk, err := b.Node.GetWrappingKey(ctx, &apiv1.GetWrappingKeyRequest{Name: "app"})
	require.NoError(t, err)
	assert.EqualValues(t, 2, wk.GetVersion())

	_, err = b.Admin.DisableKey(ctx, &apiv1.KeyRequest{Name: "app", Version: 7})
	assert.Equal(t, codes.NotFound, status.Code(err))
	_, err = b.Admin.DisableKey(ctx, &apiv1.KeyRequest{Name: "app"})
	require.NoError(t, err)
	_, err = unwrap(n, s, ann2)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "key app version 2 is disabled")
	_, err = b.Node.GetWrappingKey(ctx, &apiv1.GetWrappingKeyRequest{Name: "app"})
	assert.Equal(t, codes.FailedPrecondition, status.Code(err))
	assert.Contains(t, err.Error(), `every version of key "app" on broker broker-test is disabled`)
	assert.Contains(t, err.Error(), "attested key rotate app")
	ex := explain(t, b, s)
	require.Len(t, ex.GetKeys(), 1)
	assert.False(t, ex.GetKeys()[0].GetAllowed(), "--explain says the key would be refused")
	assert.Contains(t, ex.GetKeys()[0].String(), "every version of key app is disabled")

	// Rotating gives the key a version that releases again; the disabled
	// ones stay disabled.
	_, err = b.Admin.RotateKey(ctx, &apiv1.KeyRequest{Name: "app"})
	require.NoError(t, err)
	ann3 := wrap(t, b, "app", optsdata)
	_, err = unwrap(n, s, ann3)
	require.NoError(t, err)
	_, err = unwrap(n, s, ann1)
	require.Error(t, err)

	d, err := b.Admin.GetKey(ctx, &apiv1.KeyRequest{Name: "app"})
	require.NoError(t, err)
	counts := map[uint32][2]uint64{}
	for _, c := range d.GetCounts() {
		counts[c.GetVersion()] = [2]uint64{c.GetReleases(), c.GetRefusals()}
	}
	assert.Equal(t, map[uint32][2]uint64{1: {1, 2}, 2: {1, 1}, 3: {1, 0}}, counts)
	var disabled []string
	for _, e := range auditKind(t, b, "key") {
		if strings.HasPrefix(e.GetReason(), "disabled") {
			disabled = append(disabled, e.GetReason())
		}
	}
	assert.Equal(t, []string{
		"disabled version 1: no layer key wrapped under it is released from now on",
		"disabled version 2: no layer key wrapped under it is released from now on",
	}, disabled)
}

// TestPolicyHistory: every revision is kept; applying the current YAML
// again changes nothing and writes no audit record.
func TestPolicyHistory(t *testing.T) {
	b := brokertest.Start(t)
	ctx := context.Background()
	y1 := "name: p\npcrs:\n  16: [\"" + strings.Repeat("00", 32) + "\"]\n"
	y2 := y1 + "maxSessionAge: 1h\n"
	apply := func(y string) uint32 {
		t.Helper()
		p, err := b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: y})
		require.NoError(t, err)
		return p.GetRevision()
	}
	assert.EqualValues(t, 1, apply(y1))
	assert.EqualValues(t, 1, apply(y1), "identical: unchanged")
	assert.EqualValues(t, 2, apply(y2))
	assert.EqualValues(t, 2, apply(y2))
	assert.EqualValues(t, 3, apply(y1))
	assert.Len(t, auditKind(t, b, "policy"), 3, "no audit record for an unchanged policy")

	revs, err := b.Admin.ListPolicyRevisions(ctx, &apiv1.PolicyRequest{Name: "p"})
	require.NoError(t, err)
	require.Len(t, revs.GetPolicies(), 3)
	for i, want := range []string{y1, y2, y1} {
		assert.EqualValues(t, i+1, revs.GetPolicies()[i].GetRevision())
		assert.Equal(t, want, revs.GetPolicies()[i].GetYaml())
	}
	_, err = b.Admin.ListPolicyRevisions(ctx, &apiv1.PolicyRequest{Name: "nope"})
	assert.Equal(t, codes.NotFound, status.Code(err))
}
