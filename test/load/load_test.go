package load

import (
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/broker"
)

func TestPercentileNearestRank(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i)*time.Millisecond)
	}
	assert.Equal(t, 50*time.Millisecond, Percentile(s, 50))
	assert.Equal(t, 90*time.Millisecond, Percentile(s, 90))
	assert.Equal(t, 99*time.Millisecond, Percentile(s, 99))
	assert.Equal(t, 100*time.Millisecond, Percentile(s, 100))
	assert.Equal(t, time.Millisecond, Percentile(s[:1], 99))
	assert.Equal(t, 2*time.Millisecond, Percentile(s[:2], 99), "p99 of two samples is the larger one")
	assert.Zero(t, Percentile(nil, 50))
}

func TestRecorderCountsOnlyFromReset(t *testing.T) {
	r := NewRecorder()
	before := time.Now()
	r.Reset()
	r.Observe(OpUnwrap, before) // started before the run: not counted
	r.Add(OpUnwrap, time.Now(), 3*time.Millisecond)
	r.Fail(OpUnwrap, fmt.Errorf("node load-0001: broker 127.0.0.1:4000 is unreachable"))
	r.Fail(OpUnwrap, fmt.Errorf("node load-0002: broker 127.0.0.1:4001 is unreachable"))
	st := r.Stats(time.Second)
	require.Len(t, st, 1)
	assert.Equal(t, 1, st[0].Count)
	assert.Equal(t, 3*time.Millisecond, st[0].P50)
	errs, n := r.Errors()
	assert.Equal(t, 2, n)
	assert.Equal(t, map[string]int{"layer unwrap (node: session check, release, TPM open): node NODE: broker 127.0.0.1:PORT is unreachable": 2}, errs,
		"failures differing only in node and port are counted together")
}

// TestCheckAuditFindsMissingAndWrongReleases: the load generator's verdict
// on the audit fails a release a node received that the audit lacks, and
// any release to a failing node, whoever saw it.
func TestCheckAuditFindsMissingAndWrongReleases(t *testing.T) {
	failing := map[string]bool{"bad": true}
	assert.Empty(t, CheckAudit(map[string]int{"a": 3}, map[string]int{"a": 3}, failing))
	assert.Empty(t, CheckAudit(map[string]int{"a": 3}, map[string]int{"a": 4}, failing), "a release whose answer was lost is audited and not received")
	p := CheckAudit(map[string]int{"a": 3}, map[string]int{"a": 2}, failing)
	require.Len(t, p, 1)
	assert.Contains(t, p[0], "node a received 3 layer keys, the audit records 2 releases")
	p = CheckAudit(map[string]int{}, map[string]int{"bad": 1}, failing)
	require.Len(t, p, 1)
	assert.Contains(t, p[0], "releases to node bad, which fails policy")
}

// TestLoadLimitsAreValid: the limits the load generator writes into
// broker.yaml are ones the broker accepts, raised for nodes on one address.
func TestLoadLimitsAreValid(t *testing.T) {
	y, err := LimitsYAML(LoadLimits(1000, 4), 1000)
	require.NoError(t, err)
	var cfg broker.Config
	require.NoError(t, yaml.Unmarshal([]byte(y), &cfg))
	assert.GreaterOrEqual(t, cfg.Limits.MaxConnectionsPerSource, 2000)
	assert.GreaterOrEqual(t, cfg.Limits.MaxRequestsPerSource, 5000)
	assert.GreaterOrEqual(t, cfg.MaxEnrollmentsInFlight, 1000)
	dir := t.TempDir()
	_, err = broker.Init(broker.InitOptions{DataDir: filepath.Join(dir, "b"), CADir: filepath.Join(dir, "ca"), AdmitUncertifiedTPMs: true})
	require.NoError(t, err)
	require.NoError(t, MergeYAML(filepath.Join(dir, "b", broker.ConfigFile), y, "metricsListen: \"off\"\n"))
	srv, err := broker.Open(filepath.Join(dir, "b"), nil)
	require.NoError(t, err, "the broker refuses the load generator's limits")
	srv.Close()
}

// TestProxyRoundRobin: each connection goes to the next backend; one that
// refuses is skipped.
func TestProxyRoundRobin(t *testing.T) {
	var backends []string
	for i := range 2 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		t.Cleanup(func() { l.Close() })
		backends = append(backends, l.Addr().String())
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "backend %d\n", i)
				c.Close()
			}
		}()
	}
	dead, err := FreePort()
	require.NoError(t, err)
	p, err := NewProxy(backends[0], fmt.Sprintf("127.0.0.1:%d", dead), backends[1])
	require.NoError(t, err)
	defer p.Close()
	var got []string
	for range 4 {
		c, err := net.Dial("tcp", p.Addr())
		require.NoError(t, err)
		b, err := io.ReadAll(c)
		require.NoError(t, err)
		c.Close()
		got = append(got, strings.TrimSpace(string(b)))
	}
	assert.Equal(t, []string{"backend 0", "backend 1", "backend 0", "backend 1"}, got)
}
