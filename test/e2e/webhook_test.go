//go:build e2e

package e2e

import (
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/brokertest"
)

var (
	webhookIDRe     = regexp.MustCompile(`webhook (wh_[0-9a-f]{16}) added`)
	webhookSecretRe = regexp.MustCompile(`whsec_[A-Za-z0-9_-]{43}`)
)

// TestWebhookDeliveryAcrossBrokerKill: an admin adds a webhook with the
// binary; a refused pull is delivered, signed; a refusal raised while the
// receiver is down waits in the outbox through a SIGKILL of the broker and
// is delivered, the same event, by the restarted broker.
func TestWebhookDeliveryAcrossBrokerKill(t *testing.T) {
	rc := brokertest.NewReceiver(t)
	var down atomic.Bool
	rc.SetAnswer(func(int) int {
		if down.Load() {
			return http.StatusServiceUnavailable
		}
		return http.StatusNoContent
	})
	w := newWorld(t, worldOptions{brokerConfig: fmt.Sprintf("webhooks:\n  caFile: %s\n  retryMin: 500ms\n  retryMax: 1s\n  maxAttempts: 1000\n", rc.CAFile)})
	n := w.node1

	// Plain http is refused unless the admin says so.
	r := w.attested(n, "webhook", "add", "http://127.0.0.1:9/hook")
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "is plain http")
	assert.Contains(t, r.msg(), "--insecure-http")

	// The secret is printed once: this stdout stays out of the leak corpus,
	// and the secret is searched for everywhere else.
	r = w.run(runOpts{secretStdout: true}, "attested webhook add", shared.attested, "--config", n.cfg,
		"webhook", "add", rc.URL, "--events", "status,refusal")
	require.NoError(t, r.err, "webhook add: %s", r.stderr)
	m := webhookIDRe.FindSubmatch(r.stdout)
	require.NotNil(t, m, "webhook add printed %q", r.stdout)
	id, hookSecret := string(m[1]), webhookSecretRe.FindString(string(r.stdout))
	require.NotEmpty(t, hookSecret)

	out := w.admin("webhook", "test", id)
	assert.Contains(t, out, "receiver answered 204 No Content")
	evs := rc.Events(t, hookSecret)
	require.Len(t, evs, 1)
	assert.Equal(t, "test", evs[0].Kind)
	assert.Equal(t, w.brokerID, evs[0].Broker)

	// A refused pull reaches the receiver, signed.
	n.tpm.ExtendPCR(16, []byte("a debugger was attached"))
	w.refusedPull(n, execMode)
	refusal := waitWebhookEvent(t, rc, hookSecret, 0, func(e brokertest.WebhookEvent) bool { return e.Kind == "refusal" })
	assert.Equal(t, "node1", refusal.Node)
	assert.Equal(t, "app", refusal.Key)
	assert.Contains(t, refusal.Reason, "PCR 16")

	// The receiver goes down; the next refusal (another PCR value, so not
	// folded into the last) waits in the outbox.
	down.Store(true)
	seen := len(rc.Requests())
	n.tpm.ExtendPCR(16, []byte("and a second one"))
	w.refusedPull(n, execMode)
	pending := waitWebhookEvent(t, rc, hookSecret, seen, func(e brokertest.WebhookEvent) bool {
		return e.Kind == "refusal" && e.ID != refusal.ID
	})
	require.Regexp(t, webhookRow(id, `[1-9]\d*`), w.admin("webhook", "list"), "the refusal is pending")

	require.NoError(t, w.broker.cmd.Process.Kill())
	<-w.broker.done
	down.Store(false)
	killed := len(rc.Requests())
	require.NoError(t, w.serveBroker(w.brokerAddr))

	delivered := waitWebhookEvent(t, rc, hookSecret, killed, func(e brokertest.WebhookEvent) bool { return e.ID == pending.ID })
	assert.Equal(t, pending, delivered, "the same event, byte for byte in its fields")
	require.Eventually(t, func() bool {
		return regexp.MustCompile(webhookRow(id, "0")).MatchString(w.admin("webhook", "list"))
	}, 15*time.Second, 100*time.Millisecond, "nothing left pending")

	w.assertNoSecrets([]secret{{what: "webhook signing secret", raw: []byte(hookSecret)}})
}

// webhookRow matches the 'webhook list' row of id with the given pending
// count.
func webhookRow(id, pending string) string {
	return `(?m)^` + id + `\s+https://\S+\s+refusal,status\s+` + pending + `\s`
}

// waitWebhookEvent waits for a request after the first skip ones whose
// verified event matches, and returns that event.
func waitWebhookEvent(t *testing.T, rc *brokertest.Receiver, secret string, skip int, match func(brokertest.WebhookEvent) bool) brokertest.WebhookEvent {
	t.Helper()
	var found brokertest.WebhookEvent
	require.Eventually(t, func() bool {
		reqs := rc.Requests()
		for _, req := range reqs[min(skip, len(reqs)):] {
			ev, err := brokertest.VerifyDelivery(secret, req)
			require.NoError(t, err, "a delivery that does not verify: %s", strings.TrimSpace(string(req.Body)))
			if match(ev) {
				found = ev
				return true
			}
		}
		return false
	}, 20*time.Second, 50*time.Millisecond, "webhook event")
	return found
}
