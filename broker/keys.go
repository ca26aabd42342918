package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/policy"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// Admin handlers for wrapping keys (create, rotate, disable, show) and
// policies (apply, list, history).

func (a adminServer) CreateKey(ctx context.Context, req *apiv1.CreateKeyRequest) (*apiv1.Key, error) {
	s := a.s
	if !annotation.ValidKeyName(req.GetName()) {
		return nil, status.Errorf(codes.InvalidArgument, "key name %q must be 1-63 letters, digits, '.', '_' or '-' (no ',' ':' or '=': clients split on them)", req.GetName())
	}
	if req.GetPolicy() == "" {
		return nil, status.Error(codes.InvalidArgument, "a key needs a policy (--policy); nothing is released without one")
	}
	if _, err := s.store.GetPolicy(ctx, req.GetPolicy()); errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.FailedPrecondition, "policy %q does not exist; apply it first with 'attested policy apply -f FILE'", req.GetPolicy())
	} else if err != nil {
		return nil, storeErr("policy", err)
	}
	if _, err := s.store.GetKey(ctx, req.GetName(), 0); err == nil {
		return nil, status.Errorf(codes.AlreadyExists, "key %s already exists (add a version with 'attested key rotate %s')", req.GetName(), req.GetName())
	}
	k, err := s.newKeyVersion(ctx, req.GetName(), 1, req.GetPolicy())
	if err != nil {
		return nil, err
	}
	s.audit(ctx, store.AuditEvent{Kind: "key", Key: k.Name, KeyVersion: k.Version, Policy: k.Policy, Allowed: true, Actor: "admin",
		Reason: fmt.Sprintf("created version %d (%s) with policy %s", k.Version, k.Suite, k.Policy)})
	return keyToAPI(k), nil
}

// newKeyVersion generates and stores a version of a key in the broker's
// default suite, its private part sealed under the master key.
func (s *Server) newKeyVersion(ctx context.Context, name string, version uint32, policyName string) (store.Key, error) {
	st := suite.Default()
	priv, pub, err := st.GenerateKey()
	if err != nil {
		return store.Key{}, status.Error(codes.Internal, err.Error())
	}
	k := store.Key{Name: name, Version: version, Policy: policyName, Suite: st.Name,
		PublicKey: pub, SealedPrivate: s.master.seal(priv, keyAAD(name, version)), Created: s.now()}
	clear(priv)
	if err := s.store.CreateKey(ctx, k); err != nil {
		if errors.Is(err, store.ErrExists) {
			return store.Key{}, status.Errorf(codes.AlreadyExists, "key %s version %d was created meanwhile (another admin rotated it?); look with 'attested key show %s'", name, version, name)
		}
		return store.Key{}, storeErr("key", err)
	}
	return k, nil
}

func keyToAPI(k store.Key) *apiv1.Key {
	out := &apiv1.Key{Name: k.Name, Version: k.Version, Policy: k.Policy, Suite: k.Suite,
		PublicKey: k.PublicKey, CreatedUnix: k.Created.Unix()}
	if !k.Disabled.IsZero() {
		out.DisabledUnix = k.Disabled.Unix()
	}
	return out
}

func (a adminServer) ListKeys(ctx context.Context, _ *apiv1.ListKeysRequest) (*apiv1.ListKeysResponse, error) {
	keys, err := a.s.store.ListKeys(ctx)
	if err != nil {
		return nil, storeErr("keys", err)
	}
	out := &apiv1.ListKeysResponse{}
	for _, k := range keys {
		out.Keys = append(out.Keys, keyToAPI(k))
	}
	return out, nil
}

// keyVersions returns a key's versions, oldest first, as an API error
// when there are none.
func (s *Server) keyVersions(ctx context.Context, name string) ([]store.KeyVersion, error) {
	if !annotation.ValidKeyName(name) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid key name %q", name)
	}
	vs, err := s.store.KeyVersions(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "no key %q on broker %s ('attested key list' shows the keys)", name, s.cfg.ID)
	}
	if err != nil {
		return nil, storeErr("key", err)
	}
	return vs, nil
}

// RotateKey adds a version of a key with the same policy, in the broker's
// default suite. New wraps use it (GetWrappingKey hands out the latest
// enabled version); layers wrapped under older versions still unwrap
// unless those are disabled. A request naming a version rotates only if
// that is still the latest, so two admins do not rotate twice.
func (a adminServer) RotateKey(ctx context.Context, req *apiv1.KeyRequest) (*apiv1.Key, error) {
	vs, err := a.s.keyVersions(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	latest := vs[len(vs)-1]
	if v := req.GetVersion(); v != 0 && v != latest.Version {
		return nil, status.Errorf(codes.FailedPrecondition, "key %s is at version %d, not %d: it was rotated meanwhile; look with 'attested key show %s'",
			latest.Name, latest.Version, v, latest.Name)
	}
	k, err := a.s.newKeyVersion(ctx, latest.Name, latest.Version+1, latest.Policy)
	if err != nil {
		return nil, err
	}
	reason := fmt.Sprintf("rotated: version %d (%s) with policy %s wraps new layers", k.Version, k.Suite, k.Policy)
	if enabled := enabledVersions(vs); len(enabled) == 1 {
		reason += "; layers wrapped under version " + enabled[0] + " still unwrap"
	} else if len(enabled) > 1 {
		reason += "; layers wrapped under versions " + strings.Join(enabled, ", ") + " still unwrap"
	}
	a.s.audit(ctx, store.AuditEvent{Kind: "key", Key: k.Name, KeyVersion: k.Version, Policy: k.Policy, Allowed: true, Actor: "admin", Reason: reason})
	return keyToAPI(k), nil
}

func enabledVersions(vs []store.KeyVersion) []string {
	var out []string
	for _, v := range vs {
		if v.Disabled.IsZero() {
			out = append(out, fmt.Sprint(v.Version))
		}
	}
	return out
}

// DisableKey stops releases of a key version (0: every version) at once:
// every release reads the version's state from the store. It cannot be
// undone; rotate to get a version that releases.
func (a adminServer) DisableKey(ctx context.Context, req *apiv1.KeyRequest) (*apiv1.Key, error) {
	s := a.s
	name := req.GetName()
	if !annotation.ValidKeyName(name) {
		return nil, status.Errorf(codes.InvalidArgument, "invalid key name %q", name)
	}
	all, disabled, err := s.store.DisableKey(ctx, name, req.GetVersion(), s.now())
	if errors.Is(err, store.ErrNotFound) {
		if req.GetVersion() != 0 {
			return nil, status.Errorf(codes.NotFound, "key %q has no version %d ('attested key show %s' lists them)", name, req.GetVersion(), name)
		}
		return nil, status.Errorf(codes.NotFound, "no key %q on broker %s", name, s.cfg.ID)
	}
	if err != nil {
		return nil, storeErr("key", err)
	}
	s.mu.Lock()
	for _, v := range disabled {
		delete(s.keys, fmt.Sprintf("%s/%d", name, v))
	}
	s.mu.Unlock()
	if len(disabled) > 0 {
		// Layer keys of other versions go too; they are opened again.
		s.layerKeys.Purge()
	}
	if len(disabled) > 0 {
		var vs []string
		for _, v := range disabled {
			vs = append(vs, fmt.Sprint(v))
		}
		ev := store.AuditEvent{Kind: "key", Key: name, Allowed: true, Actor: "admin",
			Reason: fmt.Sprintf("disabled version %s: no layer key wrapped under it is released from now on", strings.Join(vs, ", "))}
		if len(disabled) == 1 {
			ev.KeyVersion = disabled[0]
		}
		s.audit(ctx, ev)
	}
	shown := all[len(all)-1]
	for _, k := range all {
		if k.Version == req.GetVersion() {
			shown = k
		}
	}
	return keyToAPI(shown), nil
}

// GetKey shows a key's versions (version 0: all of them), its policy and
// each version's release and refusal counts.
func (a adminServer) GetKey(ctx context.Context, req *apiv1.KeyRequest) (*apiv1.KeyDetail, error) {
	vs, err := a.s.keyVersions(ctx, req.GetName())
	if err != nil {
		return nil, err
	}
	out := &apiv1.KeyDetail{}
	for _, v := range vs {
		if req.GetVersion() != 0 && v.Version != req.GetVersion() {
			continue
		}
		out.Versions = append(out.Versions, keyToAPI(v.Key))
		out.Counts = append(out.Counts, &apiv1.KeyVersionCounts{Version: v.Version, Releases: v.Releases, Refusals: v.Refusals})
	}
	if len(out.Versions) == 0 {
		return nil, status.Errorf(codes.NotFound, "key %q has no version %d", req.GetName(), req.GetVersion())
	}
	if p, err := a.s.store.GetPolicy(ctx, vs[len(vs)-1].Policy); err == nil {
		out.Policy = policyToAPI(p)
	} else if !errors.Is(err, store.ErrNotFound) {
		return nil, storeErr("policy", err)
	}
	return out, nil
}

// ApplyPolicy stores a policy as its next revision; the same YAML as the
// current revision changes nothing (no revision, no audit record).
func (a adminServer) ApplyPolicy(ctx context.Context, req *apiv1.ApplyPolicyRequest) (*apiv1.Policy, error) {
	p, err := policy.Parse([]byte(req.GetYaml()))
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	before, err := a.s.store.GetPolicy(ctx, p.Name)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return nil, storeErr("policy", err)
	}
	rec, err := a.s.store.PutPolicy(ctx, store.Policy{Name: p.Name, YAML: req.GetYaml(), Updated: a.s.now()})
	if err != nil {
		return nil, storeErr("policy", err)
	}
	if before.Revision != 0 && rec.Revision == before.Revision {
		return policyToAPI(rec), nil
	}
	a.s.audit(ctx, store.AuditEvent{Kind: "policy", Policy: rec.Name, PolicyRevision: rec.Revision, Allowed: true, Actor: "admin",
		Reason: fmt.Sprintf("applied policy %s revision %d", rec.Name, rec.Revision)})
	return policyToAPI(rec), nil
}

func policyToAPI(p store.Policy) *apiv1.Policy {
	return &apiv1.Policy{Name: p.Name, Yaml: p.YAML, Revision: p.Revision, UpdatedUnix: p.Updated.Unix()}
}

func (a adminServer) ListPolicies(ctx context.Context, _ *apiv1.ListPoliciesRequest) (*apiv1.ListPoliciesResponse, error) {
	ps, err := a.s.store.ListPolicies(ctx)
	if err != nil {
		return nil, storeErr("policies", err)
	}
	out := &apiv1.ListPoliciesResponse{}
	for _, p := range ps {
		out.Policies = append(out.Policies, policyToAPI(p))
	}
	return out, nil
}

// ListPolicyRevisions lists every kept revision of a policy, oldest first.
func (a adminServer) ListPolicyRevisions(ctx context.Context, req *apiv1.PolicyRequest) (*apiv1.ListPoliciesResponse, error) {
	ps, err := a.s.store.PolicyRevisions(ctx, req.GetName())
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "no policy %q ('attested policy list' shows the policies)", req.GetName())
	}
	if err != nil {
		return nil, storeErr("policy", err)
	}
	out := &apiv1.ListPoliciesResponse{}
	for _, p := range ps {
		out.Policies = append(out.Policies, policyToAPI(p))
	}
	return out, nil
}

// disabledError is the refusal of a release under a disabled version.
func disabledError(k store.Key) error {
	return fmt.Errorf("key %s version %d is disabled (since %s): no layer key wrapped under it is released",
		k.Name, k.Version, k.Disabled.UTC().Format(time.RFC3339))
}

// released is what a release (or a refusal) was about, for its audit
// record: the key version, the policy revision that decided, and the
// layer whose key was opened.
type released struct {
	keyVersion     uint32
	policy         string
	policyRevision uint32
	layerDigest    string
}

func (r released) audit(ev store.AuditEvent) store.AuditEvent {
	ev.KeyVersion, ev.Policy, ev.PolicyRevision, ev.LayerDigest = r.keyVersion, r.policy, r.policyRevision, r.layerDigest
	return ev
}

// wrappingVersion is the version of a key new wraps use: the latest one
// not disabled.
func (s *Server) wrappingVersion(ctx context.Context, name string) (store.Key, error) {
	vs, err := s.store.KeyVersions(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return store.Key{}, status.Errorf(codes.NotFound, "broker %s has no key %q; an admin creates it with 'attested key create %s --policy POLICY'", s.cfg.ID, name, name)
	}
	if err != nil {
		return store.Key{}, storeErr("key", err)
	}
	for i := len(vs) - 1; i >= 0; i-- {
		if vs[i].Disabled.IsZero() {
			return vs[i].Key, nil
		}
	}
	latest := vs[len(vs)-1]
	return store.Key{}, status.Errorf(codes.FailedPrecondition, "every version of key %q on broker %s is disabled (the latest, version %d, since %s), so nothing can be wrapped for it; an admin adds a version with 'attested key rotate %s'",
		name, s.cfg.ID, latest.Version, latest.Disabled.UTC().Format(time.RFC3339), name)
}

// allDisabled reports whether every version of key name among keys is
// disabled.
func allDisabled(keys []store.Key, name string) bool {
	return !slices.ContainsFunc(keys, func(k store.Key) bool { return k.Name == name && k.Disabled.IsZero() })
}
