//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/test/h2attack"
)

// The review's resource-exhaustion attacks, without any credential, against
// 'attested broker serve' as built: raw HTTP/2 (test/h2attack) so that the
// attacker's side stays small while the broker process is measured.

// brokerOnly starts a broker with extra broker.yaml settings and nothing
// else (no registry, no node).
func brokerOnly(t *testing.T, brokerConfig string) *world {
	t.Helper()
	dir, err := os.MkdirTemp(shared.dir, "w")
	require.NoError(t, err)
	w := &world{t: t, dir: dir, brokerExtra: ekTrust(t, true)}
	if brokerConfig != "" {
		w.brokerExtra += "---\n" + brokerConfig
	}
	t.Cleanup(func() {
		if t.Failed() {
			w.dumpLogs()
		}
	})
	w.startBroker()
	return w
}

func (w *world) attacker(laddr string) (*h2attack.Conn, error) {
	cfg, err := h2attack.TLSConfig(filepath.Join(w.brokerDir, "ca.pem"))
	if err != nil {
		return nil, err
	}
	return h2attack.Dial(context.Background(), w.brokerAddr, cfg, laddr)
}

// brokerAdmin runs an admin command against the world's broker with the
// admin credential.
func (w *world) brokerAdmin(args ...string) string {
	w.t.Helper()
	r := w.run(runOpts{}, "attested "+strings.Join(args, " "), shared.attested, append([]string{
		"--broker", w.brokerAddr, "--broker-ca", filepath.Join(w.brokerDir, "ca.pem"),
		"--admin-token-file", filepath.Join(w.brokerDir, "admin.token"),
	}, args...)...)
	require.NoError(w.t, r.err, "attested %v: %s", args, r.stderr)
	return string(r.stdout)
}

// memKiB reads a field (VmRSS, VmHWM) of /proc/PID/status.
func memKiB(t *testing.T, pid int, field string) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// TestUnauthenticatedAdminBodiesAreNotRead: 32 concurrent 16 MiB ApplyPolicy
// calls without the credential took the broker from 40 MB to 1.38 GB. Now
// each is refused from its headers, the broker's peak memory hardly moves,
// and the audit keeps one sampled record for the lot.
func TestUnauthenticatedAdminBodiesAreNotRead(t *testing.T) {
	w := brokerOnly(t, "")
	pid := w.broker.cmd.Process.Pid
	const calls, conns = 32, 4
	const fill = 16<<20 - 64
	cs := make([]*h2attack.Conn, conns)
	for i := range cs {
		c, err := w.attacker("")
		require.NoError(t, err)
		defer c.Close()
		cs[i] = c
	}
	before := memKiB(t, pid, "VmRSS")
	results := make([]h2attack.Result, calls)
	var wg sync.WaitGroup
	for i := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = cs[i%conns].Call("/attested.broker.v1.Admin/ApplyPolicy",
				map[string]string{"authorization": "Bearer atk_guessed"},
				h2attack.BytesField(1, fill), fill, 'a', 60*time.Second)
		}()
	}
	wg.Wait()
	peak := memKiB(t, pid, "VmHWM")
	t.Logf("broker RSS before %d MiB, peak %d MiB", before>>10, peak>>10)
	for i, r := range results {
		require.NoError(t, r.Err, "call %d", i)
		assert.Equal(t, 16, r.Code, "call %d: want Unauthenticated, got %d %s", i, r.Code, r.Message)
		assert.LessOrEqual(t, r.Sent, int64(64<<10), "call %d: the broker read %d bytes of the body", i, r.Sent)
	}
	assert.Less(t, peak-before, 64<<10, "the broker's peak memory grew by %d MiB", (peak-before)>>10)

	out := w.brokerAdmin("audit", "list", "--json", "--kind", "refuse")
	records := strings.Count(out, `"kind":"refuse"`)
	assert.Equal(t, 1, records, "one sampled record for %d refusals:\n%s", calls, out)
	assert.Contains(t, out, "ApplyPolicy request refused before it was read")
}

// TestOversizedEvidenceIsRefusedFromItsLengthPrefix: an Attest over its
// limit, or a Challenge with a large body, is refused before the broker
// reads it, with the limit to raise named.
func TestOversizedEvidenceIsRefusedFromItsLengthPrefix(t *testing.T) {
	w := brokerOnly(t, "limits:\n  maxMessageSize:\n    Attest: 1MiB\n")
	c, err := w.attacker("")
	require.NoError(t, err)
	defer c.Close()
	r := c.Call("/attested.broker.v1.Broker/Attest", nil, h2attack.BytesField(9, 2<<20), 2<<20, 0, 30*time.Second)
	require.NoError(t, r.Err)
	assert.Equal(t, 8, r.Code, r.Message) // ResourceExhausted
	assert.Contains(t, r.Message, "Attest request is 2097157 bytes; this broker accepts at most 1048576 (1MiB) for Attest (limits.maxMessageSize.Attest)")
	assert.LessOrEqual(t, r.Sent, int64(64<<10))
}

// TestIdleConnectionsAreReaped: 400 idle HTTP/2 connections stayed open
// for good. Now the broker closes a connection idle for limits.idleTimeout.
func TestIdleConnectionsAreReaped(t *testing.T) {
	w := brokerOnly(t, "limits:\n  idleTimeout: 1s\n")
	const n = 100
	cs := make([]*h2attack.Conn, n)
	for i := range cs {
		c, err := w.attacker("")
		require.NoError(t, err)
		defer c.Close()
		cs[i] = c
	}
	deadline := time.After(10 * time.Second)
	for i, c := range cs {
		select {
		case <-c.Done():
		case <-deadline:
			t.Fatalf("connection %d of %d still open 10 s after it went idle", i, n)
		}
		_, debug, ok := c.GoAway()
		assert.True(t, ok && debug == "max_idle", "connection %d: closed with GOAWAY %q", i, debug)
	}
}

// TestConnectionsOverTheCapAreRefused: --max-connections-per-source caps a
// source's connections at accept; another source still gets in.
func TestConnectionsOverTheCapAreRefused(t *testing.T) {
	w := brokerOnly(t, "limits:\n  maxConnectionsPerSource: 4\n")
	for i := range 4 {
		c, err := w.attacker("127.0.0.1")
		require.NoError(t, err, "connection %d", i)
		defer c.Close()
	}
	_, err := w.attacker("127.0.0.1")
	require.Error(t, err, "a fifth connection from one source")
	c, err := w.attacker("127.0.0.2")
	require.NoError(t, err, "another source")
	c.Close()
}
