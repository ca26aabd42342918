//go:build e2e

package e2e

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/test/swtpm"
)

// tpmTimeout is the node's configured deadline in the TPM fault tests.
const tpmTimeout = 5 * time.Second

// TestTPMVanishesAndReturns: the node's TPM is killed (SIGKILL) after a
// pull made its session warm. The next pull fails within the node's
// deadline saying the TPM cannot be reached, and nothing is decrypted;
// once the TPM is back (its volatile state lost, as after a power cut),
// the node attests again and pulls.
func TestTPMVanishesAndReturns(t *testing.T) {
	eachMode(t, func(t *testing.T, m mode) {
		w := newWorld(t, worldOptions{})
		n := w.node1
		n.cfg = n.writeConfig("node-short-timeout.yaml", tpmTimeout)
		w.mustPull(n, m) // the session is warm
		before, _ := w.quotes(n)

		n.tpm.Kill()
		msg, r := w.refusedPull(n, m)
		assert.Less(t, r.dur, tpmTimeout+10*time.Second)
		assert.Contains(t, msg, "connect to swtpm at "+n.tpm.Addr())
		assert.Contains(t, msg, "connection refused")

		require.NoError(t, n.tpm.Restart())
		w.mustPull(n, m)
		after, allowed := w.quotes(n)
		assert.Equal(t, before+1, after, "the node attests once more after its TPM restarted")
		assert.Equal(t, after, allowed)
	})
}

// TestTPMHangs: a TPM that takes a command and never answers (a wedged
// chip or bus) fails the pull within the node's deadline, saying the TPM
// did not answer; the node recovers when the TPM does.
func TestTPMHangs(t *testing.T) {
	eachMode(t, func(t *testing.T, m mode) {
		w := newWorld(t, worldOptions{})
		n := w.node1
		p := proxyTPM(t, n)
		w.mustPull(n, m)

		p.Set(swtpm.Hang)
		msg, r := w.refusedPull(n, m)
		assert.GreaterOrEqual(t, r.dur, tpmTimeout-time.Second, "the node's deadline, not something else, ended the wait")
		assert.Less(t, r.dur, tpmTimeout+10*time.Second)
		// In exec mode too, where the layers' processes wait for the one
		// talking to the TPM: they report its failure, not a guess.
		assert.Contains(t, msg, "the TPM (swtpm at "+strings.TrimPrefix(p.URI(), "swtpm://")+") did not answer before the request's deadline")
		assert.NotContains(t, msg, "broker")

		p.Set(swtpm.Pass)
		w.mustPull(n, m)
	})
}

// TestTPMFailureCode: a TPM that answers every command with an error code
// (TPM_RC_FAILURE, as in its failure mode) fails the pull at once with
// the TPM's own words; the node recovers when the TPM does.
func TestTPMFailureCode(t *testing.T) {
	eachMode(t, func(t *testing.T, m mode) {
		w := newWorld(t, worldOptions{})
		n := w.node1
		p := proxyTPM(t, n)
		w.mustPull(n, m)

		p.Set(swtpm.Fail)
		msg, r := w.refusedPull(n, m)
		assert.Less(t, r.dur, tpmTimeout)
		assert.Contains(t, msg, "commands not being accepted because of a TPM failure")

		p.Set(swtpm.Pass)
		w.mustPull(n, m)
	})
}

// proxyTPM puts a swtpm.Proxy between node n and its TPM (enrolment went
// direct) and gives n a short deadline.
func proxyTPM(t *testing.T, n *node) *swtpm.Proxy {
	p, err := swtpm.NewProxy(n.tpm)
	require.NoError(t, err)
	t.Cleanup(p.Close)
	n.cfg = n.writeConfig("node-short-timeout.yaml", tpmTimeout)
	b, err := os.ReadFile(n.cfg)
	require.NoError(t, err)
	proxied := strings.Replace(string(b), "tpm: "+n.tpm.URI()+"\n", "tpm: "+p.URI()+"\n", 1)
	require.NotEqual(t, string(b), proxied)
	require.NoError(t, os.WriteFile(n.cfg, []byte(proxied), 0o600))
	return p
}
