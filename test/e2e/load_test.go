//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/test/load"
)

// TestLoadHarnessCatchesWrongRelease: the verdicts attested-load and the
// fault tests rest on can fail. Here the policy is loosened after the
// failing nodes were set up (PCR 16 no longer pinned), so the broker
// rightly releases to them, and the harness must count every such release
// as wrong, in its own counts and in the audit's.
func TestLoadHarnessCatchesWrongRelease(t *testing.T) {
	const nodes, failing = 4, 1
	w := newWorld(t, worldOptions{noImage: true, brokerConfig: stormLimits(t, nodes)})
	s := newStorm(t, w, nodes, failing, false)
	pcr0, err := s.fleet.Nodes[nodes-1].TPM.PCR(0)
	require.NoError(t, err)
	_, err = s.admin.ApplyPolicy(context.Background(), &apiv1.ApplyPolicyRequest{Yaml: fmt.Sprintf("name: storm\npcrs:\n  0: [\"%x\"]\n", pcr0)})
	require.NoError(t, err)

	stop := s.start()
	s.waitReleases(40)
	r := stop()
	assert.Positive(t, r.WrongReleases, "releases to the node with PCR 16 extended were not counted as wrong")
	assert.Positive(t, r.ErrorCount)
	for msg := range r.Errors {
		assert.Contains(t, msg, "WRONG RELEASE")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	audited, err := load.AuditReleases(ctx, s.admin)
	require.NoError(t, err)
	problems := load.CheckAudit(r.Releases, audited, s.failing)
	require.NotEmpty(t, problems)
	assert.Contains(t, problems[0], "which fails policy")
}
