// Package store holds the broker's durable state: nodes, enrollments, join
// tokens, nonces, sessions, keys, policies and the audit trail.
//
// Every operation that checks and changes state (consume a nonce, take an
// enrollment, create a node) is atomic, so replicas sharing one database
// cannot both succeed.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/attested-dev/attested/broker/auditchain"
)

// Errors callers branch on.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	// ErrNonceSpent means a challenge was already answered.
	ErrNonceSpent = errors.New("nonce already used")
	// ErrLimit is a bound on records an unauthenticated caller can create.
	ErrLimit = errors.New("limit reached")
	// ErrJoinToken is a join token that is unknown, used or expired.
	ErrJoinToken = errors.New("join token invalid, expired or already used")
)

// NodeState mirrors the API's node states.
type NodeState string

const (
	NodePending NodeState = "pending"
	NodeActive  NodeState = "active"
	NodeRevoked NodeState = "revoked"
)

// Node is an enrolled node. Its identity is its EK. (State pending is
// only found in databases written before pending enrollments were kept
// apart, see PendingEnrollment.)
type Node struct {
	Name          string `json:"name"`
	EKFingerprint string `json:"ekFingerprint"`
	EKPublic      []byte `json:"ekPublic"`
	EKCertificate []byte `json:"ekCertificate,omitempty"`
	// EKIssuer names the manufacturer CA that issued a verified EK
	// certificate; empty when none was verified.
	EKIssuer string            `json:"ekIssuer,omitempty"`
	AKPublic []byte            `json:"akPublic"`
	State    NodeState         `json:"state"`
	Tags     map[string]string `json:"tags,omitempty"`
	// TagsVersion counts tag changes.
	TagsVersion uint32    `json:"tagsVersion,omitempty"`
	EnrolledAt  time.Time `json:"enrolledAt"`
	// Trust is the outcome of the last appraisal.
	Trust        string         `json:"trust,omitempty"`
	TrustReason  string         `json:"trustReason,omitempty"`
	LastAttested time.Time      `json:"lastAttested,omitzero"`
	ResetCount   uint32         `json:"resetCount"`
	RestartCount uint32         `json:"restartCount"`
	ClockSeen    bool           `json:"clockSeen"`
	LastPCRs     map[int][]byte `json:"lastPCRs,omitempty"`
	// LastFacts are the facts of the last accepted evidence (JSON), for
	// drafting policies from a known-good node.
	LastFacts json.RawMessage `json:"lastFacts,omitempty"`
	// LastSeen is when the broker last appraised evidence the node's AK
	// signed, accepted or not.
	LastSeen time.Time `json:"lastSeen,omitzero"`
	// CertifiedTagDigest is the tag digest the node's TPM certified in its
	// last accepted evidence.
	CertifiedTagDigest []byte `json:"certifiedTagDigest,omitempty"`
	// Status is what was last recorded as true of the node (trusted,
	// untrusted, stale, revoked, pending), why, and since when; History
	// keeps the latest changes, oldest first.
	Status       string         `json:"status,omitempty"`
	StatusReason string         `json:"statusReason,omitempty"`
	StatusSince  time.Time      `json:"statusSince,omitzero"`
	History      []StatusChange `json:"history,omitempty"`
}

// StatusChange is one entry of a node's status history.
type StatusChange struct {
	Time   time.Time `json:"time"`
	Status string    `json:"status"`
	Reason string    `json:"reason,omitempty"`
}

// PendingEnrollment is an enrollment whose credential activation
// succeeded but that nothing admitted yet (no join token): it waits for an
// admin to approve its EK. It is not a node: it holds no name and no EK, so
// a token-backed enrollment of either supersedes it, and several may name
// the same node.
type PendingEnrollment struct {
	// Node is the node it would become (State pending, EnrolledAt the
	// time credential activation succeeded).
	Node    Node      `json:"node"`
	Expires time.Time `json:"expires"`
}

// PendingLimits bound pending enrollments; zero means unbounded.
type PendingLimits struct {
	Total   int
	PerName int
}

// Enrollment is a credential activation in flight.
type Enrollment struct {
	ID         string `json:"id"`
	Node       Node   `json:"node"`
	SecretHash []byte `json:"secretHash"`
	// Approved admits the node without an admin once credential
	// activation succeeds (a join token, or a certified EK where the broker
	// is configured to trust certificates alone); otherwise it becomes a
	// pending enrollment.
	Approved bool `json:"approved"`
	// JoinTokenHash is the join token that will admit the node once
	// credential activation succeeds; it is spent only then.
	JoinTokenHash []byte    `json:"joinTokenHash,omitempty"`
	Expires       time.Time `json:"expires"`
}

// SpentNonce is a challenge that was answered with verified evidence. It is
// kept until Expires, past which the nonce itself is refused as stale, so
// the same evidence can never be accepted twice.
type SpentNonce struct {
	Nonce   []byte
	Expires time.Time
}

// Outcome is what one appraisal of a node's verified evidence decided,
// written together with the node in one transaction.
type Outcome struct {
	// EndAll ends every session of the node; End ends those listed (by
	// token hash).
	EndAll bool
	End    [][]byte
	// Open is the session to open, or nil.
	Open *Session
}

// Session is an appraised attestation. Tokens are stored by hash so a copy
// of the database does not yield usable tokens.
type Session struct {
	TokenHash []byte `json:"tokenHash"`
	Node      string `json:"node"`
	// EKFingerprint is the identity the session was opened for: a node
	// removed and enrolled again under the same name is another identity,
	// and inherits nothing.
	EKFingerprint string         `json:"ekFingerprint"`
	PublicKey     []byte         `json:"publicKey"`
	Suite         string         `json:"suite"`
	PCRs          map[int][]byte `json:"pcrs"`
	ResetCount    uint32         `json:"resetCount"`
	RestartCount  uint32         `json:"restartCount"`
	// Facts are what the event logs established (JSON).
	Facts   json.RawMessage `json:"facts,omitempty"`
	Created time.Time       `json:"created"`
	Expires time.Time       `json:"expires"`
}

// Stats are counts for metrics.
type Stats struct {
	// LiveSessions counts unexpired sessions.
	LiveSessions int
	// Bytes is the size of the store.
	Bytes int64
}

// Key is one version of a wrapping key. The private part is sealed under
// the broker's master key before it reaches the store.
type Key struct {
	Name          string    `json:"name"`
	Version       uint32    `json:"version"`
	Policy        string    `json:"policy"`
	Suite         string    `json:"suite"`
	PublicKey     []byte    `json:"publicKey"`
	SealedPrivate []byte    `json:"sealedPrivate"`
	Created       time.Time `json:"created"`
	// Disabled is when the version was disabled (zero while it releases):
	// nothing is released under it again, and no new wrap uses it.
	Disabled time.Time `json:"disabled,omitzero"`
}

// KeyVersion is a key version with the number of releases and refusals
// of its layer keys, counted in the transaction that appends their audit
// records.
type KeyVersion struct {
	Key
	Releases uint64
	Refusals uint64
}

// Policy is an applied policy document.
type Policy struct {
	Name     string    `json:"name"`
	YAML     string    `json:"yaml"`
	Revision uint32    `json:"revision"`
	Updated  time.Time `json:"updated"`
}

// AuditEvent is one entry of the audit trail. It never holds key material.
// Every field but Chain is covered by the audit chain (see Entry).
type AuditEvent struct {
	Seq     uint64    `json:"seq"`
	Time    time.Time `json:"time"`
	Kind    string    `json:"kind"`
	Node    string    `json:"node,omitempty"`
	Key     string    `json:"key,omitempty"`
	Allowed bool      `json:"allowed"`
	Reason  string    `json:"reason,omitempty"`
	Actor   string    `json:"actor,omitempty"`
	// KeyVersion, LayerDigest, Policy and PolicyRevision say what a
	// release or a refusal of a layer key was about: the key version, the
	// digest of the layer whose key it opened (never the key), and the
	// policy revision that decided.
	KeyVersion     uint32 `json:"keyVersion,omitempty"`
	LayerDigest    string `json:"layerDigest,omitempty"`
	Policy         string `json:"policy,omitempty"`
	PolicyRevision uint32 `json:"policyRevision,omitempty"`
	// Chain is the record's place in the audit chain, set by the store
	// when it appends the record.
	Chain auditchain.Link `json:"chain,omitzero"`
}

// Entry is what the audit chain covers of the record: every field but
// Chain, named one by one.
func (e AuditEvent) Entry() auditchain.Entry {
	return auditchain.Entry{Seq: e.Seq, Time: e.Time, Kind: e.Kind, Node: e.Node, Key: e.Key, Allowed: e.Allowed,
		Reason: e.Reason, Actor: e.Actor, KeyVersion: e.KeyVersion, LayerDigest: e.LayerDigest,
		Policy: e.Policy, PolicyRevision: e.PolicyRevision}
}

// AuditFilter selects audit events; zero fields match everything.
type AuditFilter struct {
	Node string
	Kind string
	Key  string
	// Since and Until bound the record's time (both inclusive).
	Since, Until time.Time
	Limit        int
}

// Matches reports whether ev passes the filter (Limit aside). Text is
// compared as records keep it (AuditEvent.Stored).
func (f AuditFilter) Matches(ev AuditEvent) bool {
	f = f.Stored()
	return (f.Node == "" || ev.Node == f.Node) && (f.Kind == "" || ev.Kind == f.Kind) && (f.Key == "" || ev.Key == f.Key) &&
		(f.Since.IsZero() || !ev.Time.Before(f.Since)) && (f.Until.IsZero() || !ev.Time.After(f.Until))
}

// Stored is the filter with its text as records keep it (see
// AuditEvent.Stored), so that it finds what it names.
func (f AuditFilter) Stored() AuditFilter {
	f.Node, f.Kind, f.Key = storedText(f.Node), storedText(f.Kind), storedText(f.Key)
	return f
}

// CountsRelease reports whether an audit record counts as a release or a
// refusal of its key version (KeyVersion.Releases and Refusals).
func CountsRelease(ev AuditEvent) (release, refusal bool) {
	if ev.Key == "" || ev.KeyVersion == 0 {
		return false, false
	}
	return ev.Kind == "release", ev.Kind == "refuse"
}

// Store is the broker's persistence. Implementations must be safe for
// concurrent use.
type Store interface {
	// CreateNode fails with ErrExists if the name or the EK is taken.
	CreateNode(ctx context.Context, n Node) error
	GetNode(ctx context.Context, name string) (Node, error)
	GetNodeByEK(ctx context.Context, fingerprint string) (Node, error)
	ListNodes(ctx context.Context) ([]Node, error)
	// UpdateNode applies fn to the node atomically.
	UpdateNode(ctx context.Context, name string, fn func(*Node) error) (Node, error)
	// DeleteNode removes a node, its EK binding and its sessions, so the EK
	// can enroll again.
	DeleteNode(ctx context.Context, name string) error

	// PutEnrollment records a credential activation in flight; ErrLimit
	// when limit (> 0) enrollments not yet expired at now are in flight.
	PutEnrollment(ctx context.Context, e Enrollment, limit int, now time.Time) error
	// TakeEnrollment returns and deletes it, so a challenge answers once.
	TakeEnrollment(ctx context.Context, id string) (Enrollment, error)

	// EnrollNode creates an active node, spending the join token
	// joinTokenHash (when not nil) in the same transaction, and drops every
	// pending enrollment of that name or EK. ErrExists if the name or the
	// EK is a node, ErrJoinToken if the token is unknown or expired at now;
	// either way nothing changes.
	EnrollNode(ctx context.Context, n Node, joinTokenHash []byte, now time.Time) error
	// AddPending records an enrollment waiting for admin approval,
	// replacing a pending one of the same EK. ErrExists if the name or the
	// EK is a node; ErrLimit if lim would be exceeded (entries expired at
	// now do not count).
	AddPending(ctx context.Context, p PendingEnrollment, lim PendingLimits, now time.Time) error
	// ListPending returns the pending enrollments not expired at now,
	// oldest first.
	ListPending(ctx context.Context, now time.Time) ([]PendingEnrollment, error)
	// ApprovePending makes the pending enrollment of name with EK
	// fingerprint fp an active node and drops every other pending
	// enrollment of that name or EK. ErrNotFound if no such enrollment is
	// pending at now; ErrExists if the name or EK became a node meanwhile.
	ApprovePending(ctx context.Context, name, fp string, now time.Time) (Node, error)
	// DeletePending drops the pending enrollment of name with EK
	// fingerprint fp; ErrNotFound if there is none.
	DeletePending(ctx context.Context, name, fp string) error

	PutJoinToken(ctx context.Context, hash []byte, expires time.Time) error
	// ConsumeJoinToken deletes the token and reports whether it was valid.
	ConsumeJoinToken(ctx context.Context, hash []byte, now time.Time) (bool, error)
	// JoinTokenValid reports whether the token exists and has not expired,
	// without using it up.
	JoinTokenValid(ctx context.Context, hash []byte, now time.Time) (bool, error)

	// Appraise records an appraisal of a node's verified evidence in one
	// transaction: it spends the nonce (ErrNonceSpent, and nothing written,
	// if it was spent before), applies fn to the node and its unexpired
	// sessions, and writes the node, ends the sessions the outcome names and
	// opens its new session. An error from fn aborts everything.
	Appraise(ctx context.Context, node string, nonce SpentNonce, now time.Time, fn func(n *Node, live []Session) (Outcome, error)) (Node, error)

	GetSession(ctx context.Context, tokenHash []byte) (Session, error)
	// NodeSessions returns a node's sessions that have not expired at now.
	NodeSessions(ctx context.Context, node string, now time.Time) ([]Session, error)
	// Stats counts what the store holds, for metrics.
	Stats(ctx context.Context, now time.Time) (Stats, error)
	// DeleteNodeSessions ends every session of a node.
	DeleteNodeSessions(ctx context.Context, node string) error
	// Expire drops spent nonces, sessions, enrollments, pending enrollments
	// and join tokens past their expiry, and pending nodes (from databases
	// older than PendingEnrollment) enrolled before pendingBefore.
	Expire(ctx context.Context, now, pendingBefore time.Time) error

	// CreateKey fails with ErrExists if that name and version exist.
	CreateKey(ctx context.Context, k Key) error
	// GetKey returns a version; version 0 means the latest.
	GetKey(ctx context.Context, name string, version uint32) (Key, error)
	ListKeys(ctx context.Context) ([]Key, error)

	// PutPolicy stores a policy as its next revision (kept, see
	// PolicyRevisions). A YAML identical to the current revision's changes
	// nothing: the current revision is returned.
	PutPolicy(ctx context.Context, p Policy) (Policy, error)
	GetPolicy(ctx context.Context, name string) (Policy, error)
	ListPolicies(ctx context.Context) ([]Policy, error)

	// AppendAudit appends ev to the audit chain (see the block below),
	// setting its Seq, Chain and Time (as auditchain.Time keeps it), in
	// one transaction with the chain's checkpoint and, for a release or a
	// refusal (CountsRelease) of a key version that exists, its count.
	AppendAudit(ctx context.Context, ev AuditEvent) error
	// ListAudit returns matching events, newest last; with a Limit, the
	// newest that many.
	ListAudit(ctx context.Context, f AuditFilter) ([]AuditEvent, error)

	// Webhooks and their durable outbox (webhook.go). An event is queued
	// once per subscribed webhook; each webhook's deliveries go out in
	// order, one at a time, so a receiver sees events in the order they
	// happened.
	//
	// CreateWebhook fails with ErrExists if the ID is taken.
	CreateWebhook(ctx context.Context, w Webhook) error
	GetWebhook(ctx context.Context, id string) (Webhook, error)
	ListWebhooks(ctx context.Context) ([]Webhook, error)
	// DeleteWebhook removes a webhook and its pending deliveries and
	// returns it as it was.
	DeleteWebhook(ctx context.Context, id string) (Webhook, error)
	// EnqueueEvent adds a delivery of ev to the outbox of every webhook
	// subscribed to ev.Kind, committed durably before it returns. A webhook
	// with maxPending deliveries pending first loses its oldest ones,
	// counted as failed and reported in Enqueued.Dropped.
	EnqueueEvent(ctx context.Context, ev OutboxEvent, maxPending int) (Enqueued, error)
	// NextDeliveries returns the oldest pending delivery of each webhook
	// that has one.
	NextDeliveries(ctx context.Context) ([]Delivery, error)
	// RecordAttempt records the result of an attempt at d and updates the
	// webhook's counters; ErrNotFound if the delivery is gone (its webhook
	// was removed, or it expired).
	RecordAttempt(ctx context.Context, d Delivery, a Attempt) error
	// ExpireDeliveries gives up every pending delivery queued before
	// before, counting it as failed with reason as the webhook's last error
	// (at now), and returns how many each webhook lost.
	ExpireDeliveries(ctx context.Context, before, now time.Time, reason string) (map[string]uint64, error)

	// Key lifecycle, policy history and the audit chain (issue 7).
	//
	// KeyVersions returns every version of a key, oldest first, with its
	// release and refusal counts; ErrNotFound if the key has none.
	KeyVersions(ctx context.Context, name string) ([]KeyVersion, error)
	// DisableKey marks a version of a key (0: every version) disabled at
	// at, in one transaction; versions already disabled keep their time.
	// It returns every version as it now is and the versions it disabled;
	// ErrNotFound if there is no such key or version.
	DisableKey(ctx context.Context, name string, version uint32, at time.Time) (all []Key, disabled []uint32, err error)
	// PolicyRevisions returns every kept revision of a policy, oldest
	// first; ErrNotFound if there is no such policy.
	PolicyRevisions(ctx context.Context, name string) ([]Policy, error)
	// StartAuditChain gives the store the key that MACs audit records; it
	// must be called before AppendAudit. On a store without a chain
	// checkpoint it writes the first one, counting the records already
	// there (written before audit chaining) as not covered.
	StartAuditChain(ctx context.Context, k *auditchain.Key, now time.Time) error
	// ScanAudit calls fn with every audit record, oldest first (in the
	// order of their sequence numbers), and returns the chain's checkpoint
	// (nil if there is none), all from one consistent snapshot. A record
	// that does not decode is passed as its sequence number with the
	// decode error. An error from fn ends the scan.
	ScanAudit(ctx context.Context, fn func(seq uint64, ev AuditEvent, decodeErr error) error) (*auditchain.Checkpoint, error)

	Close() error
}
