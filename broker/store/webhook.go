package store

import "time"

// Webhook is a receiver of events (node status changes, refusals). Its
// signing secret is sealed under the broker's master key before it reaches
// the store. The counters are kept by the store, in the transactions that
// change them.
type Webhook struct {
	ID     string   `json:"id"`
	URL    string   `json:"url"`
	Events []string `json:"events"`
	// SealedSecret is the HMAC secret, sealed under the master key with an
	// AAD naming the webhook.
	SealedSecret []byte    `json:"sealedSecret"`
	Created      time.Time `json:"created"`

	// Pending counts deliveries in the outbox.
	Pending uint64 `json:"pending"`
	// Delivered counts deliveries a receiver accepted (2xx).
	Delivered uint64 `json:"delivered"`
	// Failed counts deliveries given up: out of attempts, too old, or
	// pushed out of a full outbox. None is dropped without being counted.
	Failed uint64 `json:"failed"`
	// FailedAttempts counts attempts that did not get a 2xx answer.
	FailedAttempts uint64    `json:"failedAttempts"`
	LastError      string    `json:"lastError,omitempty"`
	LastErrorAt    time.Time `json:"lastErrorAt,omitzero"`
	LastDelivered  time.Time `json:"lastDelivered,omitzero"`
}

// Subscribed reports whether the webhook receives events of kind.
func (w Webhook) Subscribed(kind string) bool {
	for _, e := range w.Events {
		if e == kind {
			return true
		}
	}
	return false
}

// OutboxEvent is one event to deliver to every webhook subscribed to its
// kind.
type OutboxEvent struct {
	ID   string
	Kind string
	// Payload is the exact request body: fixed when the event is queued, so
	// every attempt sends (and signs) the same bytes.
	Payload []byte
	Created time.Time
}

// Delivery is one event waiting in one webhook's outbox.
type Delivery struct {
	// Webhook and Seq name the delivery; Seq orders a webhook's outbox.
	Webhook     string    `json:"-"`
	Seq         uint64    `json:"-"`
	EventID     string    `json:"eventId"`
	Kind        string    `json:"kind"`
	Payload     []byte    `json:"payload"`
	Created     time.Time `json:"created"`
	Attempts    uint32    `json:"attempts"`
	NextAttempt time.Time `json:"nextAttempt"`
}

// Enqueued is what EnqueueEvent did.
type Enqueued struct {
	// Queued counts the deliveries added (one per subscribed webhook).
	Queued int
	// Dropped counts, by webhook ID, the oldest deliveries pushed out of a
	// full outbox to make room (counted in the webhook's Failed).
	Dropped map[string]uint64
}

// DeliveryOutcome is what an attempt decided.
type DeliveryOutcome int

const (
	// Delivered: the receiver accepted; the delivery leaves the outbox.
	Delivered DeliveryOutcome = iota + 1
	// RetryLater: the attempt failed; try again at NextAttempt.
	RetryLater
	// GiveUp: the attempt failed and was the last; the delivery leaves the
	// outbox, counted as failed.
	GiveUp
)

// Attempt is the result of one delivery attempt.
type Attempt struct {
	Outcome     DeliveryOutcome
	Time        time.Time
	Error       string
	NextAttempt time.Time // for RetryLater
}
