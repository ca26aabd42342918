package brokertest

import (
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/webhooksig"
)

// Receiver is an HTTPS webhook receiver on loopback that records every
// request. Its certificate is in CAFile, for broker.yaml's webhooks.caFile.
type Receiver struct {
	// URL is where it listens: https://127.0.0.1:PORT/hook.
	URL    string
	CAFile string
	srv    *httptest.Server

	mu     sync.Mutex
	got    []Request
	answer func(n int) int
}

// Request is one request the receiver got.
type Request struct {
	Header http.Header
	Body   []byte
	At     time.Time
}

// WebhookEvent is the body of a delivery.
type WebhookEvent struct {
	ID             string `json:"id"`
	Broker         string `json:"broker"`
	Kind           string `json:"kind"`
	Time           string `json:"time"`
	Node           string `json:"node"`
	Status         string `json:"status"`
	PreviousStatus string `json:"previousStatus"`
	Key            string `json:"key"`
	Reason         string `json:"reason"`
	Repeated       uint64 `json:"repeated"`
}

// NewReceiver starts a receiver until the test ends; it answers 204 until
// SetAnswer says otherwise.
func NewReceiver(t testing.TB) *Receiver {
	t.Helper()
	r := &Receiver{}
	r.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(req.Body, 1<<20))
		r.mu.Lock()
		n := len(r.got)
		r.got = append(r.got, Request{Header: req.Header.Clone(), Body: body, At: time.Now()})
		answer := r.answer
		r.mu.Unlock()
		code := http.StatusNoContent
		if answer != nil {
			code = answer(n)
		}
		w.WriteHeader(code)
	}))
	t.Cleanup(r.srv.Close)
	r.URL = r.srv.URL + "/hook"
	r.CAFile = filepath.Join(t.TempDir(), "receiver-ca.pem")
	require.NoError(t, os.WriteFile(r.CAFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.srv.Certificate().Raw}), 0o600))
	return r
}

// SetAnswer sets the status code of the n-th request (from 0) and after.
func (r *Receiver) SetAnswer(answer func(n int) int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.answer = answer
}

// Requests returns what it got so far.
func (r *Receiver) Requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Request(nil), r.got...)
}

// Events verifies every request with secret, as a receiver must, and
// returns the events of those it would accept (2xx answered or not);
// a request that does not verify fails the test.
func (r *Receiver) Events(t testing.TB, secret string) []WebhookEvent {
	t.Helper()
	var out []WebhookEvent
	for i, req := range r.Requests() {
		ev, err := VerifyDelivery(secret, req)
		require.NoError(t, err, "request %d", i)
		out = append(out, ev)
	}
	return out
}

// VerifyDelivery checks a request's signature and decodes its event.
func VerifyDelivery(secret string, req Request) (WebhookEvent, error) {
	var ev WebhookEvent
	if err := webhooksig.Verify([]byte(secret), req.Header.Get(webhooksig.Header), req.Body, time.Now(), webhooksig.DefaultTolerance); err != nil {
		return ev, err
	}
	if err := json.Unmarshal(req.Body, &ev); err != nil {
		return ev, err
	}
	if got := req.Header.Get("Attested-Event-Id"); got != ev.ID {
		return ev, fmt.Errorf("Attested-Event-Id %q is not the body's id %q", got, ev.ID)
	}
	return ev, nil
}
