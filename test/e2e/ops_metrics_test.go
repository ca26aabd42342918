//go:build e2e

package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// scrape reads a Prometheus endpoint and returns the value of the sample
// named by a regexp over its name and labels (-1 when absent).
func scrape(t *testing.T, addr, sample string) float64 {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^` + sample + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return v
}

// Day-2 operations, item 2, through the binary: the broker's and the
// agent's metrics count what happened.
func TestMetricsCountReleasesAndRefusals(t *testing.T) {
	w := newWorld(t, worldOptions{})
	n := w.node1
	agentMetrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg, err := os.ReadFile(n.cfg)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(n.cfg, append(cfg, []byte("metricsListen: "+agentMetrics+"\n")...), 0o600))

	w.mustPull(n, grpcMode)
	layers := float64(len(w.inspect(w.image).Layers))
	assert.Equal(t, layers, scrape(t, w.metricsAddr, `attested_broker_releases_total`))
	assert.Equal(t, 1.0, scrape(t, w.metricsAddr, `attested_broker_nodes\{status="trusted"\}`))
	assert.GreaterOrEqual(t, scrape(t, w.metricsAddr, `attested_broker_sessions_live`), 1.0)
	assert.Greater(t, scrape(t, w.metricsAddr, `attested_broker_store_size_bytes`), 0.0)
	assert.Greater(t, scrape(t, w.metricsAddr, `attested_broker_release_duration_seconds_count\{result="released"\}`), 0.0)
	assert.Equal(t, layers, scrape(t, agentMetrics, `attested_agent_requests_total\{code="OK",method="UnWrapKey"\}`))
	assert.Equal(t, 1.0, scrape(t, agentMetrics, `attested_agent_tpm_quotes_total`))
	assert.Greater(t, scrape(t, agentMetrics, `attested_agent_session_expiry_timestamp_seconds`), float64(time.Now().Unix()))

	n.tpm.ExtendPCR(16, []byte("a debugger was attached"))
	w.refusedPull(n, grpcMode)
	assert.Greater(t, scrape(t, w.metricsAddr, `attested_broker_refusals_total\{class="policy"\}`), 0.0)
	assert.Equal(t, 1.0, scrape(t, w.metricsAddr, `attested_broker_node_status_changes_total\{status="untrusted"\}`))
	assert.Eventually(t, func() bool { return scrape(t, w.metricsAddr, `attested_broker_nodes\{status="untrusted"\}`) == 1 },
		5*time.Second, 250*time.Millisecond, "node counts are at most 2 s old")
	assert.Greater(t, scrape(t, agentMetrics, `attested_agent_requests_total\{code="PermissionDenied",method="UnWrapKey"\}`), 0.0)
}
