package broker

import (
	"context"
	"time"
)

// Event is something operators are told about as it happens: a node's
// status changed, or a release or an attestation was refused. Events go to
// webhooks (through a durable outbox) and to metrics.
type Event struct {
	// Kind is "status" or "refusal".
	Kind string    `json:"kind"`
	Time time.Time `json:"time"`
	Node string    `json:"node,omitempty"`
	// Status and PreviousStatus are set for status events.
	Status         string `json:"status,omitempty"`
	PreviousStatus string `json:"previousStatus,omitempty"`
	// Key is the refused key, for refusals of a release.
	Key    string `json:"key,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// notify hands an event to whoever listens. It never fails the operation
// that caused it: delivery is the outbox's business. When it returns, the
// event is committed to the outbox of every subscribed webhook (see
// webhook.go); with no webhook subscribed it costs one read transaction.
// Call it after the store transaction that made the change, never inside
// one: the embedded store has one writer, and the outbox write would wait
// for the transaction it is called from.
func (s *Server) notify(ctx context.Context, ev Event) {
	s.hooks.enqueue(ctx, ev)
}
