//go:build e2e

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/ear"
)

// rpJWKS fetches the broker's JWK Set as a relying party does: the public
// JWKS call over TLS pinned to the broker CA.
func (w *world) rpJWKS() (*jose.JSONWebKeySet, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := w.brokerClient().JWKS(ctx, &apiv1.JWKSRequest{})
	require.NoError(w.t, err)
	set, err := ear.ParseJWKS([]byte(r.GetJwks()))
	require.NoError(w.t, err)
	return set, r.GetJwks()
}

// nodeEAR runs 'attested node attest --ear' on n and returns the EAR it
// printed: stdout holds the JWT alone.
func (w *world) nodeEAR(n *node, extra ...string) (string, result) {
	w.t.Helper()
	r := w.attested(n, append([]string{"node", "attest", "--ear"}, extra...)...)
	if !slices.Contains(extra, "--explain") || !strings.Contains(r.msg(), "would be refused key") {
		// With --explain, a node refused a key exits non-zero; the EAR is
		// still printed.
		require.NoError(w.t, r.err, "node attest --ear: %s", r.stderr)
	}
	tok := strings.TrimSpace(string(r.stdout))
	require.Len(w.t, strings.Split(tok, "."), 3, "stdout is one compact JWT: %q", r.stdout)
	require.NotContains(w.t, tok, "\n")
	return tok, r
}

// Issue 7 item 7 through the binary: a node on swtpm prints its EAR with
// 'node attest --ear'; it verifies with the broker's JWKS (the RPC, and
// 'attested ear verify'), states what the broker established, turns
// contraindicated when a PCR the policy pins moves, and fails verification
// once altered.
func TestEARThroughTheBinary(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	n := w.node1
	tok, r := w.nodeEAR(n)
	assert.Contains(t, r.msg(), "node node1 attested")
	assert.Contains(t, r.msg(), "attestation result verified")

	keys, rawJWKS := w.rpJWKS()
	res, err := ear.Verify(tok, keys, time.Now())
	require.NoError(t, err)
	assert.Equal(t, ear.Profile, res.Profile)
	require.NotNil(t, res.Status)
	assert.Equal(t, ear.TierAffirming, *res.Status)
	a := res.Submods[ear.SubmodNode]
	// swtpm's EK certificate chains to the configured root: genuine
	// hardware; policy prod pins PCR 0 (firmware code) and 16.
	assert.Equal(t, ear.TrustVector{InstanceIdentity: 2, Hardware: 2, Executables: 2, Configuration: 2}, *a.TrustVector)
	c, err := a.NodeClaims()
	require.NoError(t, err)
	assert.Equal(t, w.brokerID, c.Broker)
	assert.Equal(t, "node1", c.Node)
	assert.NotEmpty(t, c.EKIssuer)
	assert.True(t, c.Policies["prod"].Allowed)
	assert.Equal(t, []string{"policy://" + w.brokerID + "/prod/1"}, a.PolicyIDs)

	// The binary's own relying-party side agrees, from the broker or a file.
	v := w.run(runOpts{stdin: []byte(tok)}, "ear verify", shared.attested, "--config", n.cfg, "ear", "verify", "--require-affirming")
	require.NoError(t, v.err, "ear verify: %s", v.stderr)
	assert.Contains(t, string(v.stdout), "status affirming")
	assert.Contains(t, string(v.stdout), "policy prod (revision 1): accepts")
	j := w.attested(n, "ear", "jwks")
	require.NoError(t, j.err, "ear jwks: %s", j.stderr)
	assert.JSONEq(t, rawJWKS, string(j.stdout))
	jwksFile := filepath.Join(w.dir, "jwks.json")
	require.NoError(t, os.WriteFile(jwksFile, j.stdout, 0o600))
	earFile := filepath.Join(w.dir, "node1.ear")
	require.NoError(t, os.WriteFile(earFile, []byte(tok+"\n"), 0o600))
	v = w.run(runOpts{}, "ear verify --jwks", shared.attested, "ear", "verify", "--jwks", jwksFile, "--json", earFile)
	require.NoError(t, v.err, "ear verify --jwks: %s", v.stderr)
	assert.Contains(t, string(v.stdout), `"ear_trustworthiness_vector"`)

	// Altered: refused, by the library and by the binary.
	parts := strings.Split(tok, ".")
	payload := []byte(parts[1])
	i := len(payload) / 2
	if payload[i] == 'A' {
		payload[i] = 'B'
	} else {
		payload[i] = 'A'
	}
	forged := parts[0] + "." + string(payload) + "." + parts[2]
	_, err = ear.Verify(forged, keys, time.Now())
	require.Error(t, err)
	v = w.run(runOpts{stdin: []byte(forged)}, "ear verify forged", shared.attested, "--config", n.cfg, "ear", "verify")
	require.Error(t, v.err)
	assert.Contains(t, v.msg(), "ear:")

	// A PCR the policy pins moved: the next EAR is contraindicated, and a
	// relying party that requires affirming refuses it. --explain goes to
	// stderr with --ear; stdout stays the JWT alone.
	n.tpm.ExtendPCR(16, []byte("debug shell"))
	tok, r = w.nodeEAR(n, "--explain")
	assert.Contains(t, r.msg(), "evidence of node node1")
	res, err = ear.Verify(tok, keys, time.Now())
	require.NoError(t, err)
	assert.Equal(t, ear.TierContraindicated, *res.Status)
	a = res.Submods[ear.SubmodNode]
	assert.Equal(t, ear.Claim(96), a.TrustVector.Configuration)
	assert.Equal(t, ear.Claim(2), a.TrustVector.Executables)
	c, err = a.NodeClaims()
	require.NoError(t, err)
	assert.Equal(t, []string{"pcr 16"}, c.Policies["prod"].Failed)
	v = w.run(runOpts{stdin: []byte(tok)}, "ear verify contraindicated", shared.attested, "ear", "verify", "--jwks", jwksFile, "--require-affirming")
	require.Error(t, v.err)
	assert.Contains(t, v.msg(), "ear_status is contraindicated, not affirming")
	assert.Contains(t, string(v.stdout), "policy prod (revision 1): refuses (pcr 16)")
}

// A broker initialised before EARs: 'node attest --ear' says what to do;
// 'broker issue-ear-key' and a restart give it EARs that verify with its
// JWKS, under the key the command named.
func TestEARKeyForAnOlderBroker(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	n := w.node1
	w.broker.stop()
	require.NoError(t, os.Remove(filepath.Join(w.brokerDir, broker.EARKeyFile)))
	require.NoError(t, w.serveBroker(w.brokerAddr))

	r := w.attested(n, "node", "attest", "--ear")
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "issued no attestation result (EAR)")
	assert.Contains(t, r.msg(), "attested broker issue-ear-key")
	j := w.attested(n, "ear", "jwks")
	require.Error(t, j.err)
	assert.Contains(t, j.msg(), "publishes no EAR key")

	w.broker.stop()
	k := w.run(runOpts{}, "broker issue-ear-key", shared.attested, "broker", "issue-ear-key", "--data-dir", w.brokerDir)
	require.NoError(t, k.err, "issue-ear-key: %s", k.stderr)
	fi, err := os.Stat(filepath.Join(w.brokerDir, broker.EARKeyFile))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	again := w.run(runOpts{}, "broker issue-ear-key again", shared.attested, "broker", "issue-ear-key", "--data-dir", w.brokerDir)
	require.Error(t, again.err)
	assert.Contains(t, again.msg(), "exists")
	require.NoError(t, w.serveBroker(w.brokerAddr))

	tok, _ := w.nodeEAR(n)
	keys, _ := w.rpJWKS()
	require.Len(t, keys.Keys, 1)
	assert.Contains(t, string(k.stdout), "kid "+keys.Keys[0].KeyID)
	_, err = ear.Verify(tok, keys, time.Now())
	require.NoError(t, err)
}
