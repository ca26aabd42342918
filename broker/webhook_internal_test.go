package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"gopkg.in/yaml.v3"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/webhooksig"
)

// --- a receiver, as an operator would run one --------------------------------

type received struct {
	header http.Header
	body   []byte
	at     time.Time
}

// receiver is an HTTPS webhook receiver; answer gives the status code of
// its n-th request (from 0).
type receiver struct {
	srv    *httptest.Server
	caFile string
	answer func(n int, r *http.Request) int
	mu     sync.Mutex
	got    []received
}

func newReceiver(t *testing.T, answer func(n int, r *http.Request) int) *receiver {
	t.Helper()
	rc := &receiver{answer: answer}
	rc.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		rc.mu.Lock()
		n := len(rc.got)
		rc.got = append(rc.got, received{header: r.Header.Clone(), body: body, at: time.Now()})
		rc.mu.Unlock()
		code := http.StatusNoContent
		if rc.answer != nil {
			code = rc.answer(n, r)
		}
		if code >= 300 && code < 400 {
			w.Header().Set("Location", "https://elsewhere.example/collect")
		}
		w.WriteHeader(code)
		fmt.Fprintf(w, "answer %d", n)
	}))
	t.Cleanup(rc.srv.Close)
	rc.caFile = filepath.Join(t.TempDir(), "receiver-ca.pem")
	require.NoError(t, os.WriteFile(rc.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rc.srv.Certificate().Raw}), 0o600))
	return rc
}

func (rc *receiver) url() string { return rc.srv.URL + "/hooks/attested?token=path-credential" }

func (rc *receiver) requests() []received {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]received(nil), rc.got...)
}

// verify checks a request as a receiver must, and decodes it.
func verify(t *testing.T, secret string, r received) webhookPayload {
	t.Helper()
	require.NoError(t, webhooksig.Verify([]byte(secret), r.header.Get(webhooksig.Header), r.body, time.Now(), webhooksig.DefaultTolerance))
	var p webhookPayload
	require.NoError(t, json.Unmarshal(r.body, &p))
	assert.Equal(t, "application/json", r.header.Get("Content-Type"))
	assert.Equal(t, p.ID, r.header.Get("Attested-Event-Id"))
	return p
}

// --- a broker, opened and reopened on one data directory ---------------------

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type hookBroker struct {
	t      testing.TB
	dir    string
	log    *lockedBuffer
	s      *Server
	admin  adminServer
	cancel context.CancelFunc
	done   chan struct{}
}

// newHookBroker initialises a broker whose webhook settings are cfg.
func newHookBroker(t testing.TB, cfg WebhookConfig) *hookBroker {
	t.Helper()
	dir := t.TempDir()
	c, err := Init(InitOptions{DataDir: dir, CADir: t.TempDir(), ID: "broker-hooks", Listen: "127.0.0.1:0", AdmitUncertifiedTPMs: true})
	require.NoError(t, err)
	c.Webhooks = cfg
	data, err := yaml.Marshal(c)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, ConfigFile), data, 0o600))
	b := &hookBroker{t: t, dir: dir, log: &lockedBuffer{}}
	b.open()
	t.Cleanup(b.close)
	return b
}

// open opens the broker on its data directory (again) without running it.
func (b *hookBroker) open() {
	s, err := Open(b.dir, slog.New(slog.NewTextHandler(b.log, nil)))
	require.NoError(b.t, err)
	b.s, b.admin = s, adminServer{s: s}
}

// run starts the broker's background work, the webhook worker included.
func (b *hookBroker) run() {
	ctx, cancel := context.WithCancel(context.Background())
	b.cancel, b.done = cancel, make(chan struct{})
	go func() { b.s.Run(ctx); close(b.done) }()
}

// close stops the broker as 'broker serve' does on SIGTERM.
func (b *hookBroker) close() {
	if b.s == nil {
		return
	}
	if b.cancel != nil {
		b.cancel()
		<-b.done
		b.cancel = nil
	}
	require.NoError(b.t, b.s.Close())
	b.s = nil
}

func (b *hookBroker) add(url string, events ...string) *apiv1.Webhook {
	b.t.Helper()
	w, err := b.admin.AddWebhook(context.Background(), &apiv1.AddWebhookRequest{Url: url, Events: events})
	require.NoError(b.t, err)
	require.True(b.t, strings.HasPrefix(w.GetSecret(), "whsec_"))
	return w
}

func (b *hookBroker) webhook(id string) *apiv1.Webhook {
	b.t.Helper()
	l, err := b.admin.ListWebhooks(context.Background(), &apiv1.ListWebhooksRequest{})
	require.NoError(b.t, err)
	for _, w := range l.GetWebhooks() {
		if w.GetId() == id {
			return w
		}
	}
	b.t.Fatalf("webhook %s not listed", id)
	return nil
}

func (b *hookBroker) deliveries(result string) float64 {
	return gathered(b.t, b.s, "attested_broker_webhook_deliveries_total", "result", result)
}

// gathered reads a metric from the broker's registry, as a scrape would.
func gathered(t testing.TB, s *Server, name string, label ...string) float64 {
	t.Helper()
	mfs, err := s.Metrics().Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := len(label) == 0
			for _, lp := range m.GetLabel() {
				match = match || (lp.GetName() == label[0] && lp.GetValue() == label[1])
			}
			if !match {
				continue
			}
			if g := m.GetGauge(); g != nil {
				return g.GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("metric %s%v not registered", name, label)
	return 0
}

func (b *hookBroker) auditText() string {
	evs, err := b.s.store.ListAudit(context.Background(), store.AuditFilter{})
	require.NoError(b.t, err)
	var out []string
	for _, e := range evs {
		out = append(out, e.Kind+": "+e.Reason)
	}
	return strings.Join(out, "\n")
}

func statusEvent(node, from, to string) Event {
	return Event{Kind: EventStatus, Time: time.Now(), Node: node, PreviousStatus: from, Status: to, Reason: "node is now " + to}
}

const eventually = 10 * time.Second

// --- tests -------------------------------------------------------------------

func TestWebhookDeliveryIsSignedAndCounted(t *testing.T) {
	rc := newReceiver(t, nil)
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile})
	w := b.add(rc.url(), EventStatus)
	b.run()
	b.s.notify(context.Background(), statusEvent("node1", "trusted", "revoked"))
	require.Eventually(t, func() bool { return len(rc.requests()) == 1 }, eventually, 10*time.Millisecond)

	r := rc.requests()[0]
	p := verify(t, w.GetSecret(), r)
	assert.Equal(t, "status", p.Kind)
	assert.Equal(t, "node1", p.Node)
	assert.Equal(t, "revoked", p.Status)
	assert.Equal(t, "trusted", p.PreviousStatus)
	assert.Equal(t, "broker-hooks", p.Broker)
	assert.Regexp(t, `^evt_[0-9a-f]{24}$`, p.ID)
	assert.Contains(t, r.header.Get("User-Agent"), "attested-broker/")

	require.Eventually(t, func() bool { return b.webhook(w.GetId()).GetDelivered() == 1 }, eventually, 10*time.Millisecond)
	got := b.webhook(w.GetId())
	assert.Zero(t, got.GetPending())
	assert.Zero(t, got.GetFailedAttempts())
	assert.Empty(t, got.GetSecret(), "the secret is shown once, by add")
	assert.Equal(t, 1.0, b.deliveries("delivered"))

	// A refusal is not what this webhook asked for.
	b.s.notify(context.Background(), Event{Kind: EventRefusal, Node: "node1", Key: "app", Reason: "PCR 16 differs"})
	time.Sleep(200 * time.Millisecond)
	assert.Len(t, rc.requests(), 1, "only subscribed events are sent")
}

func TestWebhookRetriesWithBackoffThenDelivers(t *testing.T) {
	rc := newReceiver(t, func(n int, _ *http.Request) int {
		if n < 3 {
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile, RetryMin: 100 * time.Millisecond, RetryMax: time.Second})
	w := b.add(rc.url(), EventStatus)
	b.run()
	b.s.notify(context.Background(), statusEvent("node1", "trusted", "untrusted"))
	require.Eventually(t, func() bool { return b.webhook(w.GetId()).GetDelivered() == 1 }, eventually, 10*time.Millisecond)

	reqs := rc.requests()
	require.Len(t, reqs, 4, "three failures, then the delivery")
	for i, r := range reqs {
		verify(t, w.GetSecret(), r)
		assert.Equal(t, reqs[0].body, r.body, "attempt %d sends the same event", i)
	}
	// Waits of 100ms, 200ms, 400ms, each jittered to at least half.
	for i := 1; i < len(reqs); i++ {
		gap := reqs[i].at.Sub(reqs[i-1].at)
		floor := (100 * time.Millisecond << (i - 1)) / 2
		assert.GreaterOrEqual(t, gap, floor, "wait before attempt %d", i+1)
	}
	got := b.webhook(w.GetId())
	assert.Zero(t, got.GetPending())
	assert.Zero(t, got.GetFailedAttempts(), "delivered in the end: nothing given up")
	assert.Contains(t, got.GetLastError(), "receiver answered 500 Internal Server Error")
	assert.Equal(t, 3.0, b.deliveries("error"))
	assert.Equal(t, 1.0, b.deliveries("delivered"))
}

func TestWebhookGivesUpCountedAndAudited(t *testing.T) {
	rc := newReceiver(t, func(int, *http.Request) int { return http.StatusServiceUnavailable })
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile, MaxAttempts: 2, RetryMin: 10 * time.Millisecond, RetryMax: 10 * time.Millisecond})
	w := b.add(rc.url(), EventStatus)
	b.run()
	b.s.notify(context.Background(), statusEvent("node1", "trusted", "stale"))
	require.Eventually(t, func() bool { return b.webhook(w.GetId()).GetFailedAttempts() == 1 }, eventually, 10*time.Millisecond)
	got := b.webhook(w.GetId())
	assert.Zero(t, got.GetPending())
	assert.Contains(t, got.GetLastError(), "given up after 2 attempt(s): receiver answered 503")
	assert.Equal(t, 1.0, b.deliveries("failed"))
	assert.Len(t, rc.requests(), 2)
	require.Eventually(t, func() bool {
		return strings.Contains(b.auditText(), "webhook "+w.GetId()+": 1 event(s) given up undelivered")
	}, eventually, 10*time.Millisecond, "a loss is audited")
}

func TestWebhookDeliveryTooOldExpires(t *testing.T) {
	rc := newReceiver(t, func(int, *http.Request) int { return http.StatusBadGateway })
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile, MaxAge: 300 * time.Millisecond, RetryMin: time.Hour})
	w := b.add(rc.url(), EventStatus)
	b.run()
	b.s.notify(context.Background(), statusEvent("node1", "trusted", "stale"))
	require.Eventually(t, func() bool { return b.webhook(w.GetId()).GetFailedAttempts() == 1 }, eventually, 10*time.Millisecond)
	assert.Contains(t, b.webhook(w.GetId()).GetLastError(), "not delivered within webhooks.maxAge (300ms)")
	assert.Equal(t, 1.0, b.deliveries("expired"))
	assert.Len(t, rc.requests(), 1, "the retry was an hour away; the age bound ended it")
}

// TestWebhookEventsSurviveRestart is the check: events queued while
// the receiver is down are delivered, all and in order, by the broker
// reopened on the same data directory.
func TestWebhookEventsSurviveRestart(t *testing.T) {
	var mu sync.Mutex
	up := false
	rc := newReceiver(t, func(int, *http.Request) int {
		mu.Lock()
		defer mu.Unlock()
		if up {
			return http.StatusOK
		}
		return http.StatusServiceUnavailable
	})
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile, RetryMin: time.Hour})
	w := b.add(rc.url(), EventStatus, EventRefusal)
	b.run()
	want := []Event{
		statusEvent("node1", "trusted", "untrusted"),
		{Kind: EventRefusal, Node: "node1", Key: "app", Reason: "PCR 16 differs from policy prod"},
		statusEvent("node2", "pending", "trusted"),
	}
	for _, ev := range want {
		b.s.notify(context.Background(), ev)
	}
	require.Eventually(t, func() bool { return len(rc.requests()) >= 1 }, eventually, 10*time.Millisecond, "the first attempt fails")
	assert.Equal(t, uint64(3), b.webhook(w.GetId()).GetPending())
	b.close()

	mu.Lock()
	up = true
	mu.Unlock()
	// The retry is an hour away; a start tries every webhook at once.
	b.open()
	b.run()
	require.Eventually(t, func() bool { return b.webhook(w.GetId()).GetDelivered() == 3 }, eventually, 10*time.Millisecond)

	var got []webhookPayload
	for _, r := range rc.requests()[len(rc.requests())-3:] {
		got = append(got, verify(t, w.GetSecret(), r))
	}
	for i, ev := range want {
		assert.Equal(t, ev.Kind, got[i].Kind, "event %d in order", i)
		assert.Equal(t, ev.Node, got[i].Node, "event %d in order", i)
	}
	assert.Zero(t, b.webhook(w.GetId()).GetPending())
}

// TestReceiverVerificationRefusesTamperingAndReplay: what the broker sends
// verifies; the same request altered or replayed later does not.
func TestReceiverVerificationRefusesTamperingAndReplay(t *testing.T) {
	rc := newReceiver(t, nil)
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile})
	w := b.add(rc.url(), EventStatus)
	b.run()
	b.s.notify(context.Background(), statusEvent("node1", "trusted", "revoked"))
	require.Eventually(t, func() bool { return len(rc.requests()) == 1 }, eventually, 10*time.Millisecond)
	r := rc.requests()[0]
	secret, sig := []byte(w.GetSecret()), r.header.Get(webhooksig.Header)
	require.NoError(t, webhooksig.Verify(secret, sig, r.body, time.Now(), webhooksig.DefaultTolerance))

	forged := bytes.Replace(r.body, []byte(`"status":"revoked"`), []byte(`"status":"trusted"`), 1)
	require.NotEqual(t, r.body, forged)
	assert.ErrorContains(t, webhooksig.Verify(secret, sig, forged, time.Now(), webhooksig.DefaultTolerance), "does not match")
	assert.ErrorContains(t, webhooksig.Verify(secret, sig, r.body, time.Now().Add(6*time.Minute), webhooksig.DefaultTolerance), "more than the 5m0s allowed")
	assert.ErrorContains(t, webhooksig.Verify([]byte("whsec_someone-else"), sig, r.body, time.Now(), webhooksig.DefaultTolerance), "does not match")
}

// TestWebhookSecretIsNeverShownAgain: the secret is in the answer to add
// and nowhere else: not in the list, the audit, the log, the store file.
func TestWebhookSecretIsNeverShownAgain(t *testing.T) {
	rc := newReceiver(t, func(n int, _ *http.Request) int {
		if n == 0 {
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile, RetryMin: 10 * time.Millisecond})
	w := b.add(rc.url(), EventStatus)
	b.run()
	b.s.notify(context.Background(), statusEvent("node1", "trusted", "revoked"))
	require.Eventually(t, func() bool { return b.webhook(w.GetId()).GetDelivered() == 1 }, eventually, 10*time.Millisecond)
	tr, err := b.admin.TestWebhook(context.Background(), &apiv1.WebhookRequest{Id: w.GetId()})
	require.NoError(t, err)
	require.True(t, tr.GetDelivered(), tr.GetDetail())
	list, err := b.admin.ListWebhooks(context.Background(), &apiv1.ListWebhooksRequest{})
	require.NoError(t, err)
	listed, err := json.Marshal(list)
	require.NoError(t, err)
	audit := b.auditText()
	b.close()
	db, err := os.ReadFile(filepath.Join(b.dir, DatabaseFile))
	require.NoError(t, err)

	secret := w.GetSecret()
	for what, text := range map[string]string{"list": string(listed), "audit": audit, "log": b.log.String(), "store": string(db)} {
		assert.NotContains(t, text, secret, "the secret in the %s", what)
		assert.NotContains(t, text, strings.TrimPrefix(secret, "whsec_"), "the secret in the %s", what)
	}
	for what, text := range map[string]string{"audit": audit, "log": b.log.String()} {
		assert.NotContains(t, text, "path-credential", "the URL's path and query stay out of the %s", what)
		assert.Contains(t, text, w.GetId(), "the %s names the webhook", what)
	}
}

// TestSealedSecretIsBoundToItsWebhook: a sealed secret moved to another
// webhook's record does not open, so no one with write access to the store
// can make the broker sign for another receiver with a known secret.
func TestSealedSecretIsBoundToItsWebhook(t *testing.T) {
	rc := newReceiver(t, nil)
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile})
	w1 := b.add(rc.url(), EventStatus)
	w2 := b.add(rc.url(), EventStatus)
	ctx := context.Background()
	r1, err := b.s.store.GetWebhook(ctx, w1.GetId())
	require.NoError(t, err)
	r2, err := b.s.store.DeleteWebhook(ctx, w2.GetId())
	require.NoError(t, err)
	r2.SealedSecret = r1.SealedSecret
	require.NoError(t, b.s.store.CreateWebhook(ctx, r2))
	_, err = b.admin.TestWebhook(ctx, &apiv1.WebhookRequest{Id: w2.GetId()})
	assert.Equal(t, codes.FailedPrecondition, status.Code(err))
	assert.ErrorContains(t, err, "does not open under the master key")
	assert.Empty(t, rc.requests())
}

func TestWebhookURLsAreChecked(t *testing.T) {
	b := newHookBroker(t, WebhookConfig{})
	ctx := context.Background()
	insecure := metadata.NewIncomingContext(ctx, metadata.Pairs(InsecureHTTPMetadata, "true"))
	for _, tc := range []struct {
		ctx    context.Context
		url    string
		events []string
		want   string
	}{
		{ctx, "http://127.0.0.1:9000/hook", []string{"status"}, "is plain http"},
		{ctx, "HTTP://127.0.0.1:9000/hook", []string{"status"}, "is plain http"},
		{insecure, "ftp://alerts.example/hook", []string{"status"}, `scheme "ftp" is not https`},
		{insecure, "file:///etc/passwd", []string{"status"}, "is not an absolute URL"},
		{ctx, "gopher://alerts.example/", []string{"status"}, `scheme "gopher" is not https`},
		{ctx, "alerts.example/hook", []string{"status"}, "is not an absolute URL"},
		{ctx, "https://", []string{"status"}, "is not an absolute URL"},
		{ctx, "https://user:pw@alerts.example/hook", []string{"status"}, "carries credentials"},
		{ctx, "https://alerts.example/" + strings.Repeat("a", 3000), []string{"status"}, "at most 2048"},
		{ctx, "https://alerts.example/hook", []string{"status", "reboot"}, `unknown webhook event "reboot"`},
		{ctx, "https://alerts.example/hook", nil, "name the events"},
	} {
		_, err := b.admin.AddWebhook(tc.ctx, &apiv1.AddWebhookRequest{Url: tc.url, Events: tc.events})
		assert.Equal(t, codes.InvalidArgument, status.Code(err), tc.url)
		assert.ErrorContains(t, err, tc.want, tc.url)
	}
	assert.NotContains(t, b.auditText(), "pw@", "the credentials were not recorded")
	w, err := b.admin.AddWebhook(insecure, &apiv1.AddWebhookRequest{Url: "http://127.0.0.1:9000/hook", Events: []string{"refusal", "status", "status"}})
	require.NoError(t, err, "plain http when the admin says so")
	assert.Equal(t, []string{"refusal", "status"}, w.GetEvents())
	assert.Contains(t, b.auditText(), "plain http, allowed by --insecure-http")
	assert.Contains(t, b.log.String(), "SECURITY: webhook over plain http")

	l, err := b.admin.ListWebhooks(ctx, &apiv1.ListWebhooksRequest{})
	require.NoError(t, err)
	require.Len(t, l.GetWebhooks(), 1)
	_, err = b.admin.RemoveWebhook(ctx, &apiv1.WebhookRequest{Id: w.GetId()})
	require.NoError(t, err)
	_, err = b.admin.RemoveWebhook(ctx, &apiv1.WebhookRequest{Id: w.GetId()})
	assert.Equal(t, codes.NotFound, status.Code(err))
	for range MaxWebhooks {
		_, err := b.admin.AddWebhook(ctx, &apiv1.AddWebhookRequest{Url: "https://alerts.example/hook", Events: []string{"status"}})
		require.NoError(t, err)
	}
	_, err = b.admin.AddWebhook(ctx, &apiv1.AddWebhookRequest{Url: "https://alerts.example/hook", Events: []string{"status"}})
	assert.Equal(t, codes.ResourceExhausted, status.Code(err))
}

// TestHangingReceiverDoesNotBlockTheBroker: a receiver that never answers
// holds one attempt until webhooks.timeout; events are still queued at
// once, other webhooks still get theirs, and the broker stops promptly.
func TestHangingReceiverDoesNotBlockTheBroker(t *testing.T) {
	hang := make(chan struct{})
	hanging := newReceiver(t, func(_ int, r *http.Request) int {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
		return http.StatusOK
	})
	defer close(hang)
	healthy := newReceiver(t, nil)
	bundle := filepath.Join(t.TempDir(), "cas.pem")
	a, err := os.ReadFile(hanging.caFile)
	require.NoError(t, err)
	c, err := os.ReadFile(healthy.caFile)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bundle, append(a, c...), 0o600))
	b := newHookBroker(t, WebhookConfig{CAFile: bundle, Timeout: 500 * time.Millisecond, RetryMin: time.Hour})
	slow := b.add(hanging.url(), EventStatus)
	fast := b.add(healthy.url(), EventStatus)
	b.run()

	start := time.Now()
	b.s.notify(context.Background(), statusEvent("node1", "trusted", "revoked"))
	assert.Less(t, time.Since(start), 250*time.Millisecond, "notify does not wait for a receiver")
	require.Eventually(t, func() bool { return b.webhook(fast.GetId()).GetDelivered() == 1 }, eventually, 10*time.Millisecond,
		"the healthy receiver is served while the other hangs")
	require.Eventually(t, func() bool {
		return strings.Contains(b.webhook(slow.GetId()).GetLastError(), "no answer within webhooks.timeout (500ms)")
	}, eventually, 10*time.Millisecond)

	start = time.Now()
	tr, err := b.admin.TestWebhook(context.Background(), &apiv1.WebhookRequest{Id: slow.GetId()})
	require.NoError(t, err)
	assert.False(t, tr.GetDelivered())
	assert.Contains(t, tr.GetDetail(), "no answer within webhooks.timeout")
	assert.Less(t, time.Since(start), 3*time.Second)

	// Stopping while an attempt hangs: it is cancelled, not waited for.
	require.NoError(t, b.s.store.RecordAttempt(context.Background(), mustHead(t, b, slow.GetId()),
		store.Attempt{Outcome: store.RetryLater, Time: time.Now(), Error: "test: retry now", NextAttempt: time.Now()}))
	b.s.hooks.kick()
	require.Eventually(t, func() bool { return len(hanging.requests()) >= 3 }, eventually, 10*time.Millisecond)
	start = time.Now()
	b.close()
	assert.Less(t, time.Since(start), 2*time.Second, "Close does not wait for a hanging receiver")
}

func mustHead(t *testing.T, b *hookBroker, id string) store.Delivery {
	t.Helper()
	heads, err := b.s.store.NextDeliveries(context.Background())
	require.NoError(t, err)
	for _, d := range heads {
		if d.Webhook == id {
			return d
		}
	}
	t.Fatalf("no delivery pending for %s", id)
	return store.Delivery{}
}

func TestRedirectsAreNotFollowed(t *testing.T) {
	rc := newReceiver(t, func(int, *http.Request) int { return http.StatusFound })
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile})
	w := b.add(rc.url(), EventStatus)
	tr, err := b.admin.TestWebhook(context.Background(), &apiv1.WebhookRequest{Id: w.GetId()})
	require.NoError(t, err)
	assert.False(t, tr.GetDelivered())
	assert.Equal(t, int32(http.StatusFound), tr.GetStatusCode())
	assert.Contains(t, tr.GetDetail(), `redirect to "https://elsewhere.example/collect", which is not followed`)
	assert.Len(t, rc.requests(), 1)
}

func TestUntrustedReceiverCertificateIsRefused(t *testing.T) {
	rc := newReceiver(t, nil)
	b := newHookBroker(t, WebhookConfig{}) // system roots only
	w := b.add(rc.url(), EventStatus)
	tr, err := b.admin.TestWebhook(context.Background(), &apiv1.WebhookRequest{Id: w.GetId()})
	require.NoError(t, err)
	assert.False(t, tr.GetDelivered())
	assert.Contains(t, tr.GetDetail(), "not signed by a trusted CA (set webhooks.caFile")
	assert.Empty(t, rc.requests(), "nothing was sent over the unauthenticated connection")
}

// TestIdenticalRefusalsAreFolded: one alert per node, key and reason and
// minute; the next one says how many it stands for.
func TestIdenticalRefusalsAreFolded(t *testing.T) {
	rc := newReceiver(t, nil)
	b := newHookBroker(t, WebhookConfig{CAFile: rc.caFile})
	w := b.add(rc.url(), EventRefusal)
	b.run()
	t0 := time.Now()
	refusal := func(at time.Duration, key string) {
		b.s.notify(context.Background(), Event{Kind: EventRefusal, Time: t0.Add(at), Node: "node1", Key: key, Reason: "PCR 16 differs"})
	}
	for i := range 10 { // a refused pull of a 10-layer image
		refusal(time.Duration(i)*time.Millisecond, "app")
	}
	refusal(time.Second, "other") // another key is another alert
	refusal(61*time.Second, "app")
	require.Eventually(t, func() bool { return b.webhook(w.GetId()).GetDelivered() == 3 }, eventually, 10*time.Millisecond)
	var got []webhookPayload
	for _, r := range rc.requests() {
		got = append(got, verify(t, w.GetSecret(), r))
	}
	require.Len(t, got, 3)
	assert.Equal(t, "app", got[0].Key)
	assert.Zero(t, got[0].Repeated)
	assert.Equal(t, "other", got[1].Key)
	assert.Equal(t, "app", got[2].Key)
	assert.Equal(t, uint64(9), got[2].Repeated, "the nine folded refusals are accounted for")
	assert.Equal(t, 9.0, gathered(t, b.s, "attested_broker_webhook_events_folded_total"))
}

func TestFullOutboxDropsOldestCountedAndAudited(t *testing.T) {
	b := newHookBroker(t, WebhookConfig{MaxPending: 2})
	w := b.add("https://127.0.0.1:1/unreachable", EventStatus)
	for i := range 3 {
		b.s.notify(context.Background(), statusEvent(fmt.Sprint("node", i), "trusted", "stale"))
	}
	got := b.webhook(w.GetId())
	assert.Equal(t, uint64(2), got.GetPending())
	assert.Equal(t, uint64(1), got.GetFailedAttempts())
	assert.Contains(t, got.GetLastError(), "outbox full")
	assert.Equal(t, 1.0, b.deliveries("dropped"))
	assert.Equal(t, "node1", payloadOf(t, mustHead(t, b, w.GetId())).Node, "the oldest made room")
	b.close() // audits what was lost
	b.open()
	assert.Contains(t, b.auditText(), "webhook "+w.GetId()+": 1 event(s) given up undelivered")
	assert.Contains(t, b.auditText(), "outbox full (webhooks.maxPending 2)")
}

func payloadOf(t *testing.T, d store.Delivery) webhookPayload {
	var p webhookPayload
	require.NoError(t, json.Unmarshal(d.Payload, &p))
	return p
}

func TestRemovedWebhookGetsNothingMore(t *testing.T) {
	b := newHookBroker(t, WebhookConfig{})
	w := b.add("https://127.0.0.1:1/unreachable", EventStatus)
	b.s.notify(context.Background(), statusEvent("node1", "trusted", "stale"))
	gone, err := b.admin.RemoveWebhook(context.Background(), &apiv1.WebhookRequest{Id: w.GetId()})
	require.NoError(t, err)
	assert.Equal(t, uint64(1), gone.GetPending())
	assert.Contains(t, b.auditText(), "webhook "+w.GetId()+" removed (https://127.0.0.1:1/...); 1 pending deliveries discarded")
	heads, err := b.s.store.NextDeliveries(context.Background())
	require.NoError(t, err)
	assert.Empty(t, heads)
}

func TestWebhookSettingsAreChecked(t *testing.T) {
	for _, tc := range []struct {
		cfg  WebhookConfig
		want string
	}{
		{WebhookConfig{Timeout: 2 * time.Minute}, "webhooks.timeout"},
		{WebhookConfig{MaxAttempts: -1}, "webhooks.maxAttempts"},
		{WebhookConfig{RetryMin: time.Minute, RetryMax: time.Second}, "retryMin <= retryMax"},
		{WebhookConfig{MaxPending: -5}, "webhooks.maxPending"},
		{WebhookConfig{CAFile: "/nonexistent/ca.pem"}, "webhooks.caFile"},
	} {
		dir := t.TempDir()
		c, err := Init(InitOptions{DataDir: dir, CADir: t.TempDir(), ID: "b", Listen: "127.0.0.1:0", AdmitUncertifiedTPMs: true})
		require.NoError(t, err)
		c.Webhooks = tc.cfg
		data, err := yaml.Marshal(c)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, ConfigFile), data, 0o600))
		_, err = Open(dir, slog.New(slog.NewTextHandler(io.Discard, nil)))
		assert.ErrorContains(t, err, tc.want)
	}
	d, err := WebhookConfig{}.resolved()
	require.NoError(t, err)
	assert.Equal(t, DefaultWebhookConfig(), d)
}

func TestBackoffGrowsAndIsBounded(t *testing.T) {
	h := &hooks{cfg: WebhookConfig{RetryMin: time.Second, RetryMax: 10 * time.Minute}}
	for n, want := range map[uint32]time.Duration{1: time.Second, 2: 2 * time.Second, 4: 8 * time.Second, 10: 512 * time.Second, 11: 10 * time.Minute, 1000: 10 * time.Minute} {
		for range 20 {
			d := h.backoff(n)
			assert.GreaterOrEqual(t, d, want/2, "attempt %d", n)
			assert.LessOrEqual(t, d, want, "attempt %d", n)
		}
	}
}

// BenchmarkNotify measures what an event costs the operation that raises
// it (a refusal or a status change): with no webhook subscribed, and with
// one, where the event is committed to disk before notify returns.
func BenchmarkNotify(b *testing.B) {
	for _, subscribed := range []bool{false, true} {
		b.Run(fmt.Sprintf("subscribed=%v", subscribed), func(b *testing.B) {
			hb := newHookBroker(b, WebhookConfig{})
			if subscribed {
				hb.add("https://127.0.0.1:1/unreachable", EventStatus)
			}
			ev := statusEvent("node1", "trusted", "untrusted")
			b.ResetTimer()
			for range b.N {
				hb.s.notify(context.Background(), ev)
			}
		})
	}
}
