package broker

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/webhooksig"
)

// Webhooks: every event (Event, events.go) is written to a durable outbox
// in the store, once per subscribed webhook, before notify returns; a
// delivery worker started by Run POSTs each webhook's events in order, one
// at a time, signed (webhooksig), retrying with exponential backoff and
// jitter until the receiver answers 2xx, the attempts run out or the event
// is too old. Whatever is given up is counted (the webhook's failed count,
// attested_broker_webhook_deliveries_total) and audited; nothing is dropped
// silently. Delivery is at least once: a broker stopped between a
// receiver's answer and its record sends that event again, with the same
// id.

// Event kinds a webhook may subscribe to.
const (
	EventStatus  = "status"
	EventRefusal = "refusal"
	// eventTest is sent by TestWebhook only.
	eventTest = "test"
)

var webhookEventKinds = []string{EventStatus, EventRefusal}

// InsecureHTTPMetadata is the gRPC metadata key by which AddWebhook's caller
// (attested webhook add --insecure-http) allows a plain http:// URL. The
// API has no field for it yet; without it, http:// is refused.
const InsecureHTTPMetadata = "attested-insecure-http"

// Bounds on webhooks.
const (
	MaxWebhooks     = 32
	maxWebhookURL   = 2048
	maxLastError    = 300
	maxResponseRead = 64 << 10 // drained from a response so its connection can be reused
	// refusalFoldWindow: identical refusals (same node, key and reason)
	// within it raise one event; the next one after it says how many were
	// folded. A refused pull of a 10-layer image is one alert, not ten.
	refusalFoldWindow = time.Minute
	maxFoldKeys       = 4096
	// lossAuditInterval: lost deliveries are audited as one record per
	// webhook and interval, however many they are.
	lossAuditInterval = time.Minute
)

// WebhookConfig is broker.yaml's "webhooks" section; zero fields take the
// defaults of DefaultWebhookConfig.
type WebhookConfig struct {
	// CAFile is a PEM bundle of the CAs trusted for https:// receivers;
	// when set it replaces the system roots (to trust both, put both in the
	// file).
	CAFile string `yaml:"caFile,omitempty"`
	// Timeout bounds one attempt: connect, TLS, request and answer.
	Timeout time.Duration `yaml:"timeout,omitempty"`
	// MaxAttempts and MaxAge bound the retries of one delivery; past either
	// it is given up, counted and audited.
	MaxAttempts int           `yaml:"maxAttempts,omitempty"`
	MaxAge      time.Duration `yaml:"maxAge,omitempty"`
	// RetryMin is the wait after the first failed attempt; each further
	// failure doubles it, up to RetryMax (each wait jittered to between
	// half and all of it).
	RetryMin time.Duration `yaml:"retryMin,omitempty"`
	RetryMax time.Duration `yaml:"retryMax,omitempty"`
	// MaxPending bounds each webhook's outbox; when it is full, the oldest
	// delivery makes room for the new one (counted as failed and audited):
	// the newest state is what an operator needs, and a broker must not
	// refuse to refuse because a receiver is down.
	MaxPending int `yaml:"maxPending,omitempty"`
}

// DefaultWebhookConfig is what unset webhook settings take.
func DefaultWebhookConfig() WebhookConfig {
	return WebhookConfig{Timeout: 10 * time.Second, MaxAttempts: 25, MaxAge: 24 * time.Hour,
		RetryMin: time.Second, RetryMax: 10 * time.Minute, MaxPending: 10000}
}

func (c WebhookConfig) resolved() (WebhookConfig, error) {
	d := DefaultWebhookConfig()
	if c.Timeout == 0 {
		c.Timeout = d.Timeout
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = d.MaxAttempts
	}
	if c.MaxAge == 0 {
		c.MaxAge = d.MaxAge
	}
	if c.RetryMin == 0 {
		c.RetryMin = d.RetryMin
	}
	if c.RetryMax == 0 {
		c.RetryMax = max(d.RetryMax, c.RetryMin)
	}
	if c.MaxPending == 0 {
		c.MaxPending = d.MaxPending
	}
	switch {
	case c.Timeout < 0 || c.Timeout > time.Minute:
		return c, fmt.Errorf("webhooks.timeout %s is out of range (0-1m): a receiver must answer within it", c.Timeout)
	case c.MaxAttempts < 0 || c.MaxAttempts > 1000:
		return c, fmt.Errorf("webhooks.maxAttempts %d is out of range (1-1000)", c.MaxAttempts)
	case c.MaxAge < 0 || c.MaxAge > 30*24*time.Hour:
		return c, fmt.Errorf("webhooks.maxAge %s is out of range (up to 720h)", c.MaxAge)
	case c.RetryMin < 0 || c.RetryMax < c.RetryMin || c.RetryMax > 24*time.Hour:
		return c, fmt.Errorf("webhooks.retryMin %s and retryMax %s: want 0 < retryMin <= retryMax <= 24h", c.RetryMin, c.RetryMax)
	case c.MaxPending < 0 || c.MaxPending > 1_000_000:
		return c, fmt.Errorf("webhooks.maxPending %d is out of range (1-1000000)", c.MaxPending)
	}
	return c, nil
}

// webhookPayload is the JSON body POSTed for an event: the event with its
// id (the same in every attempt and every webhook; receivers dedupe on it)
// and the broker that raised it.
type webhookPayload struct {
	ID     string `json:"id"`
	Broker string `json:"broker"`
	Event
	// Repeated counts identical refusals folded into this event since the
	// last one was raised (see refusalFoldWindow).
	Repeated uint64 `json:"repeated,omitempty"`
}

// hooks is the broker's webhook machinery.
type hooks struct {
	s      *Server
	cfg    WebhookConfig
	client *http.Client
	wake   chan struct{}

	deliveries    *prometheus.CounterVec
	folded        prometheus.Counter
	enqueueFailed prometheus.Counter

	mu       sync.Mutex
	running  bool
	closed   bool
	cancel   context.CancelFunc
	inflight map[string]bool // webhook ID -> a delivery is being attempted
	fold     map[foldKey]*foldState
	losses   map[string]*lossTally
	lossAt   time.Time // when losses were last audited
	wg       sync.WaitGroup
}

type foldKey struct{ node, key, reason string }

type foldState struct {
	raised time.Time
	folded uint64
}

type lossTally struct {
	n       uint64
	since   time.Time
	lastErr string
}

// initWebhooks sets up delivery (TLS roots, client) and the metrics.
func (s *Server) initWebhooks() error {
	cfg, err := s.cfg.Webhooks.resolved()
	if err != nil {
		return fmt.Errorf("broker: %s: %w", ConfigFile, err)
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return fmt.Errorf("broker: webhooks.caFile: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("broker: webhooks.caFile %q holds no PEM certificate", cfg.CAFile)
		}
		tlsCfg.RootCAs = pool
	}
	tr := &http.Transport{
		Proxy:                  http.ProxyFromEnvironment,
		DialContext:            (&net.Dialer{Timeout: cfg.Timeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:        tlsCfg,
		TLSHandshakeTimeout:    cfg.Timeout,
		ResponseHeaderTimeout:  cfg.Timeout,
		MaxResponseHeaderBytes: 64 << 10,
		IdleConnTimeout:        90 * time.Second,
		MaxIdleConnsPerHost:    2,
		ForceAttemptHTTP2:      true,
	}
	h := &hooks{s: s, cfg: cfg, wake: make(chan struct{}, 1),
		client: &http.Client{Transport: tr, Timeout: cfg.Timeout,
			// A redirect would send a signed event somewhere the admin did
			// not name; the answer is reported instead.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		inflight: map[string]bool{}, fold: map[foldKey]*foldState{}, losses: map[string]*lossTally{},
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attested_broker_webhook_deliveries_total",
			Help: "Webhook delivery attempts and losses, by result: delivered (2xx), error (failed, will retry), failed (failed, out of attempts), expired (older than webhooks.maxAge), dropped (pushed out of a full outbox).",
		}, []string{"result"}),
		folded: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "attested_broker_webhook_events_folded_total",
			Help: "Refusal events not raised because an identical one (node, key, reason) was raised within the last minute; the next one carries the count.",
		}),
		enqueueFailed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "attested_broker_webhook_enqueue_failures_total",
			Help: "Events that could not be written to the webhook outbox (store errors); each is also logged.",
		}),
	}
	for _, r := range []string{"delivered", "error", "failed", "expired", "dropped"} {
		h.deliveries.WithLabelValues(r)
	}
	pending := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "attested_broker_webhook_pending",
		Help: "Webhook deliveries waiting in the outbox, over all webhooks.",
	}, func() float64 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		ws, err := s.store.ListWebhooks(ctx)
		if err != nil {
			return -1
		}
		var n uint64
		for _, w := range ws {
			n += w.Pending
		}
		return float64(n)
	})
	s.metrics.reg.MustRegister(h.deliveries, h.folded, h.enqueueFailed, pending)
	s.hooks = h
	return nil
}

// enqueue writes ev to the outbox of every subscribed webhook; see notify.
func (h *hooks) enqueue(ctx context.Context, ev Event) {
	s := h.s
	if ev.Time.IsZero() {
		ev.Time = s.now()
	}
	var repeated uint64
	if ev.Kind == EventRefusal {
		var ok bool
		if ok, repeated = h.admitRefusal(ev); !ok {
			h.folded.Inc()
			return
		}
	}
	p := webhookPayload{ID: "evt_" + hex.EncodeToString(randomBytes(12)), Broker: s.cfg.ID, Event: ev, Repeated: repeated}
	body, err := json.Marshal(p)
	if err != nil {
		s.log.Error("webhook event not queued: encoding failed", "kind", ev.Kind, "node", ev.Node, "err", err)
		h.enqueueFailed.Inc()
		return
	}
	// The event is recorded even when the caller has gone away; the
	// store's commit is what makes it survive a restart.
	res, err := s.store.EnqueueEvent(context.WithoutCancel(ctx),
		store.OutboxEvent{ID: p.ID, Kind: ev.Kind, Payload: body, Created: s.now()}, h.cfg.MaxPending)
	if err != nil {
		s.log.Error("webhook event not queued: the outbox write failed", "kind", ev.Kind, "node", ev.Node, "event", p.ID, "err", err)
		h.enqueueFailed.Inc()
		return
	}
	for id, n := range res.Dropped {
		h.deliveries.WithLabelValues("dropped").Add(float64(n))
		h.noteLoss(id, n, fmt.Sprintf("outbox full (webhooks.maxPending %d): oldest undelivered event(s) dropped", h.cfg.MaxPending))
	}
	if res.Queued > 0 {
		h.kick()
	}
}

// admitRefusal folds identical refusals (see refusalFoldWindow): it reports
// whether ev is raised, and how many were folded since the last one.
func (h *hooks) admitRefusal(ev Event) (bool, uint64) {
	k := foldKey{ev.Node, ev.Key, ev.Reason}
	h.mu.Lock()
	defer h.mu.Unlock()
	st := h.fold[k]
	if st != nil && ev.Time.Sub(st.raised) < refusalFoldWindow && st.raised.Sub(ev.Time) < refusalFoldWindow {
		st.folded++
		return false, 0
	}
	if st == nil {
		if len(h.fold) >= maxFoldKeys {
			for fk, fs := range h.fold {
				if ev.Time.Sub(fs.raised) >= refusalFoldWindow {
					delete(h.fold, fk)
				}
			}
		}
		if len(h.fold) >= maxFoldKeys {
			// Too many distinct refusals to track: raise them all rather
			// than fold any unseen.
			return true, 0
		}
		st = &foldState{}
		h.fold[k] = st
	}
	folded := st.folded
	st.raised, st.folded = ev.Time, 0
	return true, folded
}

func (h *hooks) kick() {
	select {
	case h.wake <- struct{}{}:
	default:
	}
}

// startWebhooks starts the delivery worker until ctx ends or Close.
func (s *Server) startWebhooks(ctx context.Context) {
	h := s.hooks
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.running || h.closed {
		return
	}
	ctx, h.cancel = context.WithCancel(ctx)
	h.running = true
	h.wg.Go(func() { h.run(ctx) })
}

// stopWebhooks stops the worker and waits for attempts in flight (they are
// cancelled and stay pending, to be sent again at the next start), then
// audits the losses not yet audited.
func (s *Server) stopWebhooks() {
	h := s.hooks
	h.mu.Lock()
	h.closed = true
	cancel := h.cancel
	h.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	h.wg.Wait()
	h.auditLosses(context.Background(), true)
}

func (h *hooks) run(ctx context.Context) {
	// At start every webhook's oldest delivery is tried at once, whatever
	// its backoff: a restart is often what fixed the path to a receiver.
	timer := time.NewTimer(h.pass(ctx, true))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-h.wake:
		}
		timer.Reset(h.pass(ctx, false))
	}
}

// pass gives up deliveries past maxAge, starts an attempt at each
// webhook's oldest delivery that is due (all of them, at start), audits
// losses, and returns how long to sleep until the next is due.
func (h *hooks) pass(ctx context.Context, start bool) time.Duration {
	s := h.s
	now := s.now()
	wait := time.Minute
	lost, err := s.store.ExpireDeliveries(ctx, now.Add(-h.cfg.MaxAge), now,
		fmt.Sprintf("not delivered within webhooks.maxAge (%s): given up", h.cfg.MaxAge))
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("webhook outbox: expiring old deliveries failed", "err", err)
		}
		return time.Second
	}
	for id, n := range lost {
		h.deliveries.WithLabelValues("expired").Add(float64(n))
		h.noteLoss(id, n, fmt.Sprintf("not delivered within webhooks.maxAge (%s)", h.cfg.MaxAge))
	}
	heads, err := s.store.NextDeliveries(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("webhook outbox: reading it failed", "err", err)
		}
		return time.Second
	}
	h.mu.Lock()
	for _, d := range heads {
		// Wake when the oldest delivery is due to expire, too.
		wait = min(wait, max(d.Created.Add(h.cfg.MaxAge).Sub(now), 10*time.Millisecond))
		if h.inflight[d.Webhook] {
			continue
		}
		if due := d.NextAttempt.Sub(now); due > 0 && !start {
			wait = min(wait, due)
			continue
		}
		h.inflight[d.Webhook] = true
		h.wg.Go(func() { h.attempt(ctx, d) })
	}
	h.mu.Unlock()
	h.auditLosses(ctx, false)
	return wait
}

// attempt sends one delivery and records the result.
func (h *hooks) attempt(ctx context.Context, d store.Delivery) {
	s := h.s
	defer func() {
		h.mu.Lock()
		delete(h.inflight, d.Webhook)
		h.mu.Unlock()
		h.kick()
	}()
	w, err := s.store.GetWebhook(ctx, d.Webhook)
	if err != nil {
		// Removed meanwhile: its outbox went with it.
		return
	}
	var sendErr error
	secret, err := h.secret(w)
	if err != nil {
		sendErr = err
	} else {
		_, sendErr = h.post(ctx, w.URL, secret, d.EventID, d.Payload)
	}
	if ctx.Err() != nil {
		// Stopping: the delivery stays as it was, for the next start.
		return
	}
	now := s.now()
	a := store.Attempt{Outcome: store.Delivered, Time: now}
	result := "delivered"
	if sendErr != nil {
		a.Error = truncate(sendErr.Error(), maxLastError)
		attempts := d.Attempts + 1
		if int(attempts) >= h.cfg.MaxAttempts || now.Sub(d.Created) >= h.cfg.MaxAge {
			a.Outcome, result = store.GiveUp, "failed"
			a.Error = fmt.Sprintf("given up after %d attempt(s): %s", attempts, a.Error)
		} else {
			a.Outcome, result = store.RetryLater, "error"
			a.NextAttempt = now.Add(h.backoff(attempts))
		}
		args := []any{"webhook", w.ID, "url", redactURL(w.URL), "event", d.EventID, "attempt", attempts, "err", a.Error}
		if a.Outcome == store.RetryLater {
			args = append(args, "retryAt", a.NextAttempt.UTC().Format(time.RFC3339))
		}
		s.log.Warn("webhook delivery failed", args...)
	}
	if err := s.store.RecordAttempt(context.WithoutCancel(ctx), d, a); err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			s.log.Error("webhook outbox: recording a delivery attempt failed", "webhook", w.ID, "event", d.EventID, "err", err)
		}
		return
	}
	h.deliveries.WithLabelValues(result).Inc()
	if a.Outcome == store.GiveUp {
		h.noteLoss(w.ID, 1, a.Error)
	}
}

// backoff is the wait after the n-th failed attempt: retryMin doubled per
// earlier failure, capped at retryMax, jittered to [d/2, d] so that
// receivers coming back are not hit by every broker at once.
func (h *hooks) backoff(n uint32) time.Duration {
	d := h.cfg.RetryMin
	for i := uint32(1); i < n && d < h.cfg.RetryMax; i++ {
		d *= 2
	}
	d = min(d, h.cfg.RetryMax)
	return d/2 + rand.N(d/2+1)
}

// secret opens a webhook's signing secret.
func (h *hooks) secret(w store.Webhook) ([]byte, error) {
	secret, err := h.s.master.open(w.SealedSecret, webhookAAD(w.ID))
	if err != nil {
		return nil, fmt.Errorf("the webhook's secret does not open under the master key (wrong master key or tampered store); remove the webhook and add it again")
	}
	return secret, nil
}

func webhookAAD(id string) []byte {
	return fmt.Appendf(nil, "attested/v1/webhook-secret\x00%s", id)
}

// post sends one signed request and says why it failed, in words that
// never carry the URL (its path or query may be a credential) or the
// secret.
func (h *hooks) post(ctx context.Context, rawURL string, secret []byte, eventID string, body []byte) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, rawURL, bytes.NewReader(body))
	if err != nil {
		return 0, errors.New("the webhook URL does not make a request")
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "attested-broker/"+Version)
	req.Header.Set("Attested-Event-Id", eventID)
	req.Header.Set(webhooksig.Header, webhooksig.Sign(secret, h.s.now(), body))
	resp, err := h.client.Do(req)
	if err != nil {
		return 0, h.describe(err)
	}
	defer resp.Body.Close()
	head, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseRead))
	code := resp.StatusCode
	switch {
	case code >= 200 && code < 300:
		return code, nil
	case code >= 300 && code < 400:
		return code, fmt.Errorf("receiver answered %d %s with a redirect to %q, which is not followed: configure the final URL",
			code, http.StatusText(code), truncate(resp.Header.Get("Location"), 100))
	}
	msg := fmt.Sprintf("receiver answered %d %s", code, http.StatusText(code))
	if len(head) > 0 {
		msg += fmt.Sprintf(": %q", head)
	}
	return code, errors.New(msg)
}

// describe turns a client error into a reason without the URL.
func (h *hooks) describe(err error) error {
	var uerr *url.Error
	if errors.As(err, &uerr) {
		err = uerr.Err
	}
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	switch {
	case errors.Is(err, context.DeadlineExceeded) || (uerr != nil && uerr.Timeout()):
		return fmt.Errorf("no answer within webhooks.timeout (%s)", h.cfg.Timeout)
	case errors.Is(err, context.Canceled):
		return errors.New("cancelled")
	case errors.As(err, &unknownCA):
		return fmt.Errorf("TLS: the receiver's certificate is not signed by a trusted CA (set webhooks.caFile to its CA bundle): %v", err)
	case errors.As(err, &hostErr):
		return fmt.Errorf("TLS: the receiver's certificate is not for this host: %v", err)
	}
	return err
}

// noteLoss tallies given-up deliveries for the audit.
func (h *hooks) noteLoss(id string, n uint64, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	l := h.losses[id]
	if l == nil {
		l = &lossTally{since: h.s.now()}
		h.losses[id] = l
	}
	l.n += n
	l.lastErr = reason
}

// auditLosses writes one audit record (and log line) per webhook that lost
// deliveries, at most once per lossAuditInterval unless forced.
func (h *hooks) auditLosses(ctx context.Context, force bool) {
	now := h.s.now()
	h.mu.Lock()
	if len(h.losses) == 0 || (!force && now.Sub(h.lossAt) < lossAuditInterval && h.lossAt.Sub(now) < lossAuditInterval) {
		h.mu.Unlock()
		return
	}
	losses := h.losses
	h.losses, h.lossAt = map[string]*lossTally{}, now
	h.mu.Unlock()
	for id, l := range losses {
		reason := fmt.Sprintf("webhook %s: %d event(s) given up undelivered since %s; last reason: %s", id, l.n, l.since.UTC().Format(time.RFC3339), l.lastErr)
		h.s.log.Warn("webhook deliveries lost", "webhook", id, "count", l.n, "reason", l.lastErr)
		h.s.audit(ctx, store.AuditEvent{Kind: "webhook", Reason: reason})
	}
}

// checkWebhookURL refuses what is not an absolute https:// URL (or http://
// when the admin allowed it).
func checkWebhookURL(raw string, allowHTTP bool) (*url.URL, error) {
	if len(raw) > maxWebhookURL {
		return nil, fmt.Errorf("webhook URL is %d bytes long; at most %d", len(raw), maxWebhookURL)
	}
	u, err := url.Parse(raw)
	if err != nil || u.Opaque != "" || u.Host == "" || u.Hostname() == "" {
		return nil, fmt.Errorf("webhook URL %q is not an absolute URL like https://alerts.example.com/attested", raw)
	}
	switch strings.ToLower(u.Scheme) {
	case "https":
	case "http":
		if !allowHTTP {
			return nil, fmt.Errorf("webhook URL %q is plain http: events would cross the network in clear and could be altered, delaying or hiding an alert; use https, or --insecure-http for a receiver on this host", raw)
		}
	default:
		return nil, fmt.Errorf("webhook URL %q: scheme %q is not https (or http with --insecure-http)", raw, u.Scheme)
	}
	if u.User != nil {
		return nil, fmt.Errorf("webhook URL %q carries credentials (user@ or user:password@); they would show in 'webhook list': the Attested-Signature header authenticates the broker to the receiver", redactURL(raw))
	}
	return u, nil
}

// redactURL keeps a URL's scheme and host: its path and query may be a
// credential (many receivers put a token there), so logs and the audit
// name the host only.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "(unparsable URL)"
	}
	out := u.Scheme + "://" + u.Host
	if u.Path != "" || u.RawQuery != "" {
		out += "/..."
	}
	return out
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

func webhookToAPI(w store.Webhook) *apiv1.Webhook {
	// failed_attempts carries the deliveries given up (not the attempts
	// that failed and were retried, which last_error and the metrics show).
	return &apiv1.Webhook{Id: w.ID, Url: w.URL, Events: w.Events, CreatedUnix: w.Created.Unix(),
		Pending: w.Pending, Delivered: w.Delivered, FailedAttempts: w.Failed, LastError: w.LastError}
}

func (a adminServer) AddWebhook(ctx context.Context, req *apiv1.AddWebhookRequest) (*apiv1.Webhook, error) {
	s := a.s
	md, _ := metadata.FromIncomingContext(ctx)
	allowHTTP := slices.Contains(md.Get(InsecureHTTPMetadata), "true")
	u, err := checkWebhookURL(req.GetUrl(), allowHTTP)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	var events []string
	for _, e := range req.GetEvents() {
		e = strings.TrimSpace(e)
		if !slices.Contains(webhookEventKinds, e) {
			return nil, status.Errorf(codes.InvalidArgument, "unknown webhook event %q: want %s", e, strings.Join(webhookEventKinds, ", "))
		}
		if !slices.Contains(events, e) {
			events = append(events, e)
		}
	}
	if len(events) == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "name the events the webhook receives (--events): %s", strings.Join(webhookEventKinds, ", "))
	}
	slices.Sort(events)
	existing, err := s.store.ListWebhooks(ctx)
	if err != nil {
		return nil, storeErr("webhooks", err)
	}
	if len(existing) >= MaxWebhooks {
		return nil, status.Errorf(codes.ResourceExhausted, "this broker has %d webhooks, the most it keeps; remove one first ('attested webhook remove ID')", len(existing))
	}
	id := "wh_" + hex.EncodeToString(randomBytes(8))
	// The secret is used as it is printed (the whole string is the HMAC
	// key), so receivers need not decode it.
	secret := "whsec_" + base64.RawURLEncoding.EncodeToString(randomBytes(32))
	w := store.Webhook{ID: id, URL: u.String(), Events: events, Created: s.now(),
		SealedSecret: s.master.seal([]byte(secret), webhookAAD(id))}
	if err := s.store.CreateWebhook(ctx, w); err != nil {
		return nil, storeErr("webhook", err)
	}
	reason := fmt.Sprintf("webhook %s added: %s, events %s", id, redactURL(w.URL), strings.Join(events, ","))
	if u.Scheme == "http" {
		reason += " (plain http, allowed by --insecure-http)"
		s.log.Warn("SECURITY: webhook over plain http: its events cross the network in clear and can be altered or withheld on the way", "webhook", id, "url", redactURL(w.URL))
	}
	s.audit(ctx, store.AuditEvent{Kind: "webhook", Allowed: true, Actor: "admin", Reason: reason})
	out := webhookToAPI(w)
	out.Secret = secret
	return out, nil
}

func (a adminServer) ListWebhooks(ctx context.Context, _ *apiv1.ListWebhooksRequest) (*apiv1.ListWebhooksResponse, error) {
	ws, err := a.s.store.ListWebhooks(ctx)
	if err != nil {
		return nil, storeErr("webhooks", err)
	}
	slices.SortFunc(ws, func(x, y store.Webhook) int { return x.Created.Compare(y.Created) })
	out := &apiv1.ListWebhooksResponse{}
	for _, w := range ws {
		out.Webhooks = append(out.Webhooks, webhookToAPI(w))
	}
	return out, nil
}

func (a adminServer) RemoveWebhook(ctx context.Context, req *apiv1.WebhookRequest) (*apiv1.Webhook, error) {
	w, err := a.s.store.DeleteWebhook(ctx, req.GetId())
	if err != nil {
		return nil, storeErr(fmt.Sprintf("webhook %q", req.GetId()), err)
	}
	a.s.audit(ctx, store.AuditEvent{Kind: "webhook", Allowed: true, Actor: "admin",
		Reason: fmt.Sprintf("webhook %s removed (%s); %d pending deliveries discarded", w.ID, redactURL(w.URL), w.Pending)})
	return webhookToAPI(w), nil
}

func (a adminServer) TestWebhook(ctx context.Context, req *apiv1.WebhookRequest) (*apiv1.TestWebhookResponse, error) {
	s, h := a.s, a.s.hooks
	w, err := s.store.GetWebhook(ctx, req.GetId())
	if err != nil {
		return nil, storeErr(fmt.Sprintf("webhook %q", req.GetId()), err)
	}
	secret, err := h.secret(w)
	if err != nil {
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	p := webhookPayload{ID: "evt_" + hex.EncodeToString(randomBytes(12)), Broker: s.cfg.ID,
		Event: Event{Kind: eventTest, Time: s.now(), Reason: "test event sent by 'attested webhook test'"}}
	body, err := json.Marshal(p)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	code, err := h.post(ctx, w.URL, secret, p.ID, body)
	out := &apiv1.TestWebhookResponse{Delivered: err == nil, StatusCode: int32(code)}
	if err != nil {
		out.Detail = truncate(err.Error(), maxLastError)
	} else {
		out.Detail = fmt.Sprintf("receiver answered %d %s to event %s", code, http.StatusText(code), p.ID)
	}
	s.audit(ctx, store.AuditEvent{Kind: "webhook", Allowed: err == nil, Actor: "admin",
		Reason: fmt.Sprintf("webhook %s tested: %s", w.ID, out.Detail)})
	return out, nil
}
