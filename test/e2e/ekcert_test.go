//go:build e2e

package e2e

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/test/swtpm"
)

// TestEKCertificateChainsToSwtpmCA: swtpm_setup --create-ek-cert gives the
// TPM an EK certificate from the suite's CA; a broker configured with that
// CA enrolls it and says so; a TPM whose certificate another CA issued is
// refused.
func TestEKCertificateChainsToSwtpmCA(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true, brokerConfig: ekTrust(t, true)})
	var reasons []string
	for _, e := range w.audit("--kind", "enroll") {
		reasons = append(reasons, e.Reason)
	}
	assert.Contains(t, strings.Join(reasons, "\n"), "EK certificate verified (issuer CN=swtpm-localca)")

	other, err := swtpm.NewCA(filepath.Join(w.dir, "other-ca"))
	require.NoError(t, err)
	rogue := w.newNodeWithCA("rogue", other)
	r := rogue.enrollWithToken(w.tokenFile())
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "does not chain to a trusted TPM manufacturer root")
	assert.NotContains(t, w.admin("node", "list"), "rogue")
}

// TestExplainShowsEveryClause: 'attested node attest --explain' shows the
// evidence and each key's policy clause by clause, pass and fail.
func TestExplainShowsEveryClause(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	n := w.node1
	r := w.attested(n, "node", "attest", "--explain")
	require.NoError(t, r.err, "%s", r.stderr)
	out := string(r.stdout)
	assert.Contains(t, out, "firmware event log: none sent")
	assert.Contains(t, out, "key app (policy prod): would be released")
	assert.Regexp(t, `ok +pcr 16 +PCR 16 is 0{16}\.\., accepted by policy prod`, out)

	n.tpm.ExtendPCR(16, []byte("unexpected"))
	r = w.attested(n, "node", "attest", "--explain")
	require.Error(t, r.err, "a node that would be refused a key exits non-zero")
	assert.Contains(t, r.msg(), "node node1 would be refused key app")
	out = string(r.stdout)
	assert.Contains(t, out, "key app (policy prod): would be REFUSED")
	assert.Regexp(t, `FAIL +pcr 16 +PCR 16 differs from policy prod: got [0-9a-f]{16}\.\., want one of 0{16}\.\.`, out)
	assert.Regexp(t, `ok +pcr 0 `, out)
}

// TestExecForwardsToAgentAndFallsBack: with agent: set, exec mode uses the
// warm agent (no new quote); when the agent is gone, leaving its socket
// behind, exec mode attests itself and the pull still works.
func TestExecForwardsToAgentAndFallsBack(t *testing.T) {
	w := newWorld(t, worldOptions{})
	n := w.node1
	n.startAgent(true)
	agentCfg := n.writeConfig("node-agent.yaml", 20*time.Second)
	require.NoError(t, appendLine(agentCfg, "agent: unix://"+n.sock))
	n.cfg = agentCfg

	_, before := w.quotes(n)
	w.mustPull(n, execMode)
	_, after := w.quotes(n)
	assert.Equal(t, before, after, "a warm agent answers; exec mode does not quote")

	require.NoError(t, n.agent.cmd.Process.Kill())
	<-n.agent.done
	require.FileExists(t, n.sock, "a killed agent leaves its socket")
	w.mustPull(n, execMode)
	_, fallback := w.quotes(n)
	assert.Equal(t, after+1, fallback, "without an agent, exec mode attests once itself")
}
