//go:build e2e

package e2e

import (
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Day-2 operations, item 1, through the binary: node status stays current.
// A pulling node is trusted; 'node show' prints its evidence, session and
// history; after a PCR change it is untrusted with the failing clause; with
// no evidence for staleAfter it is stale, and the broker records it.
func TestNodeStatusShowAndStale(t *testing.T) {
	w := newWorld(t, worldOptions{brokerConfig: "staleAfter: 4s\n"})
	n := w.node1
	w.mustPull(n, execMode)
	list := w.admin("node", "list")
	assert.Regexp(t, `(?m)^node1\s+trusted\s`, list)
	assert.Contains(t, list, "satisfies policy prod")
	show := w.admin("node", "show", "node1")
	for _, want := range []string{"status:        trusted", "PCR 16: ", "live sessions: 1", "status history:"} {
		assert.Contains(t, show, want)
	}

	n.tpm.ExtendPCR(16, []byte("a debugger was attached"))
	w.refusedPull(n, execMode)
	show = w.admin("node", "show", "node1")
	assert.Contains(t, show, "status:        untrusted")
	assert.Contains(t, show, "PCR 16 differs from policy prod")

	require.Eventually(t, func() bool {
		return assert.ObjectsAreEqual(true, regexpMatch(`(?m)^\s+\S+\s+stale\s+no evidence for`, w.admin("node", "show", "node1")))
	}, 15*time.Second, 500*time.Millisecond, "the broker records the node stale within its check period")
	assert.Regexp(t, `(?m)^node1\s+stale\s`, w.admin("node", "list"))
}

func regexpMatch(pattern, s string) bool { return regexp.MustCompile(pattern).MatchString(s) }
