package broker

import (
	"bytes"
	"context"
	"crypto/hpke"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/evidence"
	"github.com/attested-dev/attested/broker/policy"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider/annotation"
	"github.com/hashicorp/golang-lru/v2/expirable"
)

// GetWrappingKey implements apiv1.BrokerServer. Public parts need no
// credential: a pipeline that encrypts holds no secret.
func (s *Server) GetWrappingKey(ctx context.Context, req *apiv1.GetWrappingKeyRequest) (*apiv1.WrappingKey, error) {
	if !annotation.ValidKeyName(req.GetName()) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid key name %q", req.GetName())
	}
	k, err := s.wrappingVersion(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	wk := &apiv1.WrappingKey{Name: k.Name, Version: k.Version, Suite: k.Suite, PublicKey: k.PublicKey, BrokerId: s.cfg.ID}
	// A pipeline verifies this signature each time it seals to the key, so
	// a cache entry or a key from anywhere but this broker is refused. A
	// broker without a signer (initialised before) sends the key unsigned
	// and pipelines say what to do; serve warned at start.
	if s.signer != nil {
		if err := s.signer.Sign(wk); err != nil {
			return nil, status.Errorf(codes.Internal, "signing wrapping key %q: %v", k.Name, err)
		}
	}
	return wk, nil
}

// Unwrap implements apiv1.BrokerServer.
func (s *Server) Unwrap(ctx context.Context, req *apiv1.UnwrapRequest) (*apiv1.UnwrapResponse, error) {
	start := time.Now()
	resp, err := s.unwrap(ctx, req)
	result := "released"
	switch status.Code(err) {
	case codes.OK:
		s.ops.releases.Inc()
	case codes.Unauthenticated:
		result = "refused"
		s.ops.refusals.WithLabelValues(RefusalSession).Inc()
	case codes.PermissionDenied:
		result = "refused"
		s.ops.refusals.WithLabelValues(RefusalPolicy).Inc()
	case codes.InvalidArgument, codes.FailedPrecondition, codes.NotFound:
		result = "refused"
		s.ops.refusals.WithLabelValues(RefusalKey).Inc()
	default:
		result = "error"
	}
	s.ops.release.WithLabelValues(result).Observe(time.Since(start).Seconds())
	return resp, err
}

func (s *Server) unwrap(ctx context.Context, req *apiv1.UnwrapRequest) (*apiv1.UnwrapResponse, error) {
	sess, n, err := s.liveSession(ctx, req.GetSessionToken())
	if err != nil {
		if sess.Node != "" {
			s.audit(ctx, store.AuditEvent{Kind: "refuse", Node: sess.Node, Reason: status.Convert(err).Message()})
		}
		return nil, err
	}
	a, err := annotation.Parse(req.GetAnnotation())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if a.Broker != s.cfg.ID {
		return nil, status.Errorf(codes.FailedPrecondition, "layer key was sealed by broker %s, this is broker %s", a.Broker, s.cfg.ID)
	}
	claims, err := s.sessionClaims(n, sess, s.now())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	var reasons []string
	stale := false
	for _, r := range a.Recipients {
		var rel released
		optsdata, err := s.release(ctx, a, r, claims, &rel)
		if err != nil {
			stale = stale || errors.Is(err, errStaleClaims)
			reasons = append(reasons, err.Error())
			s.audit(ctx, rel.audit(store.AuditEvent{Kind: "refuse", Node: n.Name, Key: r.Key, Reason: err.Error()}))
			continue
		}
		st, err := suite.Lookup(sess.Suite)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		sealed, err := st.Seal(sess.PublicKey, binding.ReleaseInfo(n.Name, sess.PublicKey, r.Key, r.KeyVersion), optsdata)
		clear(optsdata)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "sealing to session: %v", err)
		}
		// No release without its audit record: one that cannot be written
		// (a full disk, a lost database) is a refusal.
		if err := s.audit(ctx, rel.audit(store.AuditEvent{Kind: "release", Node: n.Name, Key: r.Key, Allowed: true,
			Reason: fmt.Sprintf("policy satisfied (key %s v%d)", r.Key, r.KeyVersion)})); err != nil {
			return nil, status.Errorf(codes.Internal, "broker %s could not write the audit record of this release to its store, so it released nothing: %v", s.cfg.ID, err)
		}
		return &apiv1.UnwrapResponse{Sealed: sealed, Key: r.Key, KeyVersion: r.KeyVersion}, nil
	}
	reason := strings.Join(reasons, "; ")
	if stale {
		// A policy changed after this session's appraisal in a way the
		// kept claims cannot decide: the node attests again and the new
		// evidence decides; nothing is concluded about the node.
		return nil, status.Errorf(codes.Unauthenticated, "broker %s: %s; attest again", s.cfg.ID, reason)
	}
	s.notify(ctx, Event{Kind: "refusal", Time: s.now(), Node: n.Name, Key: a.Recipients[0].Key, Reason: reason})
	return nil, status.Errorf(codes.PermissionDenied, "broker %s refused node %s: %s", s.cfg.ID, n.Name, reason)
}

// errStaleClaims marks a refusal the session's kept claims could not
// decide.
var errStaleClaims = errors.New("the session's appraisal predates the policy")

// liveSession returns the session behind a token and its node, if the
// session has not expired, was opened for the identity the node still
// has, the node may still attest, and its TPM has not rebooted since (a
// newer quote showed other reset/restart counters). The session is
// returned with the error when one was found, for the audit.
func (s *Server) liveSession(ctx context.Context, token []byte) (store.Session, store.Node, error) {
	sess, err := s.store.GetSession(ctx, hashToken(token))
	now := s.now()
	if errors.Is(err, store.ErrNotFound) || (err == nil && now.After(sess.Expires)) {
		return store.Session{}, store.Node{}, status.Error(codes.Unauthenticated, "session unknown, expired or ended; attest again")
	}
	if err != nil {
		return store.Session{}, store.Node{}, storeErr("session", err)
	}
	if now.Before(sess.Created) {
		// Opened "in the future": the clock stepped back since. Its age
		// cannot be told, so it is over.
		return sess, store.Node{}, status.Error(codes.Unauthenticated, "session was opened after the broker's current time (the clock stepped back); attest again")
	}
	n, err := s.store.GetNode(ctx, sess.Node)
	if errors.Is(err, store.ErrNotFound) || (err == nil && n.EKFingerprint != sess.EKFingerprint) {
		return sess, n, status.Errorf(codes.Unauthenticated, "node %q was removed or enrolled again since this session was opened; attest again", sess.Node)
	}
	if err != nil {
		return sess, n, storeErr("node", err)
	}
	if err := s.stateError(n); err != nil {
		return sess, n, err
	}
	if n.ResetCount != sess.ResetCount || n.RestartCount != sess.RestartCount {
		return sess, n, status.Errorf(codes.Unauthenticated, "node %q rebooted since this session was opened; attest again", n.Name)
	}
	return sess, n, nil
}

// claimsRecord is what a session keeps of its appraisal: the facts without
// the IMA measurement list (which can be megabytes), and the verdict of
// every policy's IMA clause at that time.
type claimsRecord struct {
	Facts       evidence.Facts
	IMAVerdicts map[string]policy.Clause `json:",omitempty"`
}

// maxCachedClaims bounds the decoded claims kept in memory.
const maxCachedClaims = 4096

// sessionClaims are what a session established about its node. A session's
// record never changes, so it is decoded once and kept.
func (s *Server) sessionClaims(n store.Node, sess store.Session, now time.Time) (policy.Claims, error) {
	c := policy.Claims{Node: n.Name, PCRs: sess.PCRs, Tags: n.Tags, SessionAge: now.Sub(sess.Created)}
	key := string(sess.TokenHash)
	s.mu.Lock()
	rec, ok := s.claims[key]
	s.mu.Unlock()
	if !ok && len(sess.Facts) > 0 {
		if err := json.Unmarshal(sess.Facts, &rec); err != nil {
			return c, fmt.Errorf("session facts: %v", err)
		}
		s.mu.Lock()
		if len(s.claims) >= maxCachedClaims {
			for k := range s.claims { // evict one, any one
				delete(s.claims, k)
				break
			}
		}
		s.claims[key] = rec
		s.mu.Unlock()
	}
	c.Facts, c.IMAVerdicts = rec.Facts, rec.IMAVerdicts
	return c, nil
}

// imaVerdicts evaluates every stored policy's IMA clause against claims
// that still hold the measurement list.
func (s *Server) imaVerdicts(ctx context.Context, c policy.Claims) (map[string]policy.Clause, error) {
	if c.Facts.IMA == nil {
		return nil, nil
	}
	ps, err := s.store.ListPolicies(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]policy.Clause{}
	for _, rec := range ps {
		p, err := s.policy(ctx, rec.Name)
		if err != nil {
			continue // a policy that no longer parses releases nothing anyway
		}
		if key, v, ok := p.IMAVerdict(c); ok {
			out[key] = v
		}
	}
	return out, nil
}

// Explain implements apiv1.BrokerServer: the session's facts and every
// key's policy evaluated clause by clause, sealed to the session key so a
// stolen token alone reads nothing. Nothing is released.
func (s *Server) Explain(ctx context.Context, req *apiv1.ExplainRequest) (*apiv1.ExplainResponse, error) {
	sess, n, err := s.liveSession(ctx, req.GetSessionToken())
	if err != nil {
		return nil, err
	}
	claims, err := s.sessionClaims(n, sess, s.now())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	out := &apiv1.Explanation{Node: n.Name, Facts: claims.Facts.Lines()}
	keys, err := s.store.ListKeys(ctx)
	if err != nil {
		return nil, storeErr("keys", err)
	}
	seen := map[string]bool{}
	for i := len(keys) - 1; i >= 0; i-- { // latest version of each key
		k := keys[i]
		if seen[k.Name] {
			continue
		}
		seen[k.Name] = true
		ka := &apiv1.KeyAppraisal{Key: k.Name, Policy: k.Policy}
		p, err := s.policy(ctx, k.Policy)
		if err != nil {
			ka.Clauses = []*apiv1.Clause{{Name: "policy", Detail: err.Error()}}
		} else {
			res := p.Evaluate(claims)
			ka.Allowed = res.Allowed
			for _, c := range res.Clauses {
				ka.Clauses = append(ka.Clauses, &apiv1.Clause{Name: c.Name, Ok: c.OK, Detail: c.Detail})
			}
		}
		if allDisabled(keys, k.Name) {
			ka.Allowed = false
			ka.Clauses = append(ka.Clauses, &apiv1.Clause{Name: "key", Detail: "every version of key " + k.Name + " is disabled: nothing wrapped under it is released"})
		}
		out.Keys = append(out.Keys, ka)
	}
	sealed, err := s.sealToSession(sess, binding.ExplainInfo(n.Name, sess.PublicKey), out)
	if err != nil {
		return nil, err
	}
	return &apiv1.ExplainResponse{Sealed: sealed}, nil
}

// sealToSession seals an answer for the session's node only.
func (s *Server) sealToSession(sess store.Session, info []byte, m proto.Message) ([]byte, error) {
	data, err := proto.Marshal(m)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "answer: %v", err)
	}
	st, err := suite.Lookup(sess.Suite)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	sealed, err := st.Seal(sess.PublicKey, info, data)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sealing to session: %v", err)
	}
	return sealed, nil
}

// release evaluates one recipient's policy and, if it holds, opens the
// layer key. Errors are refusal reasons for the operator; rel receives
// what is known of the release either way, for its audit record.
func (s *Server) release(ctx context.Context, a annotation.Annotation, r annotation.Recipient, claims policy.Claims, rel *released) ([]byte, error) {
	rel.keyVersion = r.KeyVersion
	k, err := s.store.GetKey(ctx, r.Key, r.KeyVersion)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("key %s version %d does not exist on this broker", r.Key, r.KeyVersion)
	}
	if err != nil {
		return nil, fmt.Errorf("key %s: store: %v", r.Key, err)
	}
	rel.policy = k.Policy
	if !k.Disabled.IsZero() {
		return nil, disabledError(k)
	}
	if k.Suite != r.Suite {
		return nil, fmt.Errorf("key %s v%d uses suite %s, the layer says %s", r.Key, r.KeyVersion, k.Suite, r.Suite)
	}
	rec, p, err := s.policyRecord(ctx, k.Policy)
	rel.policyRevision = rec.Revision
	if err != nil {
		return nil, fmt.Errorf("key %s: %v", r.Key, err)
	}
	if res := p.Evaluate(claims); !res.Allowed {
		if res.Stale {
			return nil, fmt.Errorf("key %s: %s: %w", r.Key, res.Error(), errStaleClaims)
		}
		return nil, fmt.Errorf("key %s: %s", r.Key, res.Error())
	}
	optsdata, err := s.openLayerKey(k, annotation.Info(a.Broker, r), r.Ciphertext)
	if err != nil {
		return nil, err
	}
	rel.layerDigest = layerDigest(optsdata)
	return optsdata, nil
}

// Layer keys opened recently are kept, so that a fleet pulling one image
// opens each layer's key once (an ML-KEM-768 and an X25519 decapsulation,
// about a quarter of a release) rather than once per node. Only the
// decryption is skipped: every release still reads the key version, its
// state and its policy from the store and evaluates the node's claims, so a
// disabled key or a changed policy takes effect at once, at every replica.
// The broker already holds, in memory, the private keys that open every
// layer; these are no more than what those keys would give. Bounded in
// count and age, dropped when a key is disabled, zeroed when dropped.
const (
	layerKeysMax = 4096
	layerKeysTTL = 10 * time.Minute
)

func newLayerKeys() *expirable.LRU[[sha256.Size]byte, []byte] {
	return expirable.NewLRU(layerKeysMax, func(_ [sha256.Size]byte, v []byte) { clear(v) }, layerKeysTTL)
}

// openLayerKey opens a layer key sealed to key version k under info. The
// caller owns (and clears) what it gets.
func (s *Server) openLayerKey(k store.Key, info, ciphertext []byte) ([]byte, error) {
	id := layerKeyID(k, info, ciphertext)
	if v, ok := s.layerKeys.Get(id); ok {
		return bytes.Clone(v), nil
	}
	priv, err := s.privateKey(k)
	if err != nil {
		return nil, err
	}
	st, err := suite.Lookup(k.Suite)
	if err != nil {
		return nil, err
	}
	optsdata, err := st.OpenWith(priv, info, ciphertext)
	if err != nil {
		return nil, fmt.Errorf("key %s v%d: the layer key does not open (corrupt or altered annotation)", k.Name, k.Version)
	}
	s.layerKeys.Add(id, bytes.Clone(optsdata))
	return optsdata, nil
}

// layerKeyID names a sealed layer key: the key version, the suite, the
// HPKE info and the ciphertext, each length-prefixed.
func layerKeyID(k store.Key, info, ciphertext []byte) [sha256.Size]byte {
	h := sha256.New()
	for _, f := range [][]byte{[]byte(k.Name), binary.BigEndian.AppendUint32(nil, k.Version), []byte(k.Suite), info, ciphertext} {
		h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(f))))
		h.Write(f)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

// policy returns the parsed policy, reparsing only when its revision moved.
func (s *Server) policy(ctx context.Context, name string) (*policy.Policy, error) {
	_, p, err := s.policyRecord(ctx, name)
	return p, err
}

// policyRecord is policy with its stored record.
func (s *Server) policyRecord(ctx context.Context, name string) (store.Policy, *policy.Policy, error) {
	rec, err := s.store.GetPolicy(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return rec, nil, fmt.Errorf("policy %s does not exist, so nothing is released", name)
	}
	if err != nil {
		return rec, nil, fmt.Errorf("policy %s: store: %v", name, err)
	}
	p, err := s.policyAt(rec)
	return rec, p, err
}

// privateKey opens a key version's private part; versions are immutable,
// so the parsed key is cached.
func (s *Server) privateKey(k store.Key) (hpke.PrivateKey, error) {
	id := fmt.Sprintf("%s/%d", k.Name, k.Version)
	s.mu.Lock()
	priv, ok := s.keys[id]
	s.mu.Unlock()
	if ok {
		return priv, nil
	}
	raw, err := s.master.open(k.SealedPrivate, keyAAD(k.Name, k.Version))
	if err != nil {
		return nil, err
	}
	defer clear(raw)
	st, err := suite.Lookup(k.Suite)
	if err != nil {
		return nil, err
	}
	priv, err = st.KEM.NewPrivateKey(raw)
	if err != nil {
		return nil, fmt.Errorf("key %s: private key does not parse", id)
	}
	s.mu.Lock()
	s.keys[id] = priv
	s.mu.Unlock()
	return priv, nil
}

func keyAAD(name string, version uint32) []byte {
	return fmt.Appendf(nil, "attested/v1/key\x00%s\x00%d", name, version)
}
