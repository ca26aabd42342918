package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/auditchain"
	"github.com/attested-dev/attested/broker/store"
)

// AuditKinds are the kinds of record the broker writes to its audit trail
// (a test holds every store.AuditEvent the broker writes to this list).
var AuditKinds = []string{
	"enroll", "approve", "revoke", "remove", // nodes
	"attest", "release", "refuse", // evidence and layer keys
	"key", "policy", "token", "tag", "webhook", "login", // admin
}

// ListAudit implements apiv1.AdminServer.
func (a adminServer) ListAudit(ctx context.Context, req *apiv1.ListAuditRequest) (*apiv1.ListAuditResponse, error) {
	f := store.AuditFilter{Node: req.GetNode(), Kind: req.GetKind(), Key: req.GetKey(), Limit: int(req.GetLimit())}
	if f.Kind != "" && !slices.Contains(AuditKinds, f.Kind) {
		return nil, status.Errorf(codes.InvalidArgument, "unknown audit kind %q; the kinds are %s", f.Kind, strings.Join(AuditKinds, ", "))
	}
	if n := req.GetSinceUnixNano(); n != 0 {
		f.Since = time.Unix(0, n)
	}
	if n := req.GetUntilUnixNano(); n != 0 {
		f.Until = time.Unix(0, n)
	}
	if !f.Since.IsZero() && !f.Until.IsZero() && f.Until.Before(f.Since) {
		return nil, status.Errorf(codes.InvalidArgument, "the audit window ends (%s) before it starts (%s)",
			f.Until.UTC().Format(time.RFC3339Nano), f.Since.UTC().Format(time.RFC3339Nano))
	}
	evs, err := a.s.store.ListAudit(ctx, f)
	if err != nil {
		return nil, storeErr("audit", err)
	}
	out := &apiv1.ListAuditResponse{}
	for _, e := range evs {
		out.Events = append(out.Events, auditToAPI(e))
	}
	return out, nil
}

func auditToAPI(e store.AuditEvent) *apiv1.AuditEvent {
	return &apiv1.AuditEvent{Seq: e.Seq, TimeUnixNano: e.Time.UnixNano(), Kind: e.Kind, Node: e.Node, Key: e.Key,
		Allowed: e.Allowed, Reason: e.Reason, Actor: e.Actor, KeyVersion: e.KeyVersion, LayerDigest: e.LayerDigest,
		Policy: e.Policy, PolicyRevision: e.PolicyRevision, Hash: e.Chain.Hash}
}

// VerifyAudit implements apiv1.AdminServer: the whole trail against its
// hash chain, each record's MAC and the MACed checkpoint, from one
// snapshot of the store.
func (a adminServer) VerifyAudit(ctx context.Context, _ *apiv1.VerifyAuditRequest) (*apiv1.VerifyAuditResponse, error) {
	res, err := store.VerifyAudit(ctx, a.s.store, a.s.master.audit)
	if err != nil {
		return nil, storeErr("audit", err)
	}
	if !res.OK {
		a.s.log.Error("the audit trail does not verify", "records", res.Records, "firstBadSeq", res.FirstBad, "problem", res.Problem)
	}
	return &apiv1.VerifyAuditResponse{Ok: res.OK, Records: res.Records, FirstBadSeq: res.FirstBad, Detail: verifyDetail(res)}, nil
}

// verifyDetail says what a verification proved, and what it could not.
func verifyDetail(r auditchain.Result) string {
	var b strings.Builder
	if !r.OK {
		fmt.Fprintf(&b, "the audit trail does NOT verify: %s", r.Problem)
		if r.Chained > 0 {
			fmt.Fprintf(&b, "; the records up to seq %d (hash %s) verified", r.HeadSeq, r.HeadHash)
		}
		return b.String()
	}
	if r.Chained == 0 {
		fmt.Fprintf(&b, "no chained records yet")
	} else {
		fmt.Fprintf(&b, "%d chained records verify (each MACed, each following the one before, the last at the MACed checkpoint); head: seq %d at %s, hash %s",
			r.Chained, r.HeadSeq, r.HeadTime.UTC().Format(time.RFC3339Nano), r.HeadHash)
	}
	if r.Before > 0 {
		fmt.Fprintf(&b, "; %d earlier records predate the chain (started %s) and are not covered", r.Before, r.Started.UTC().Format(time.RFC3339))
	}
	return b.String()
}

// digestRe is the OCI image-spec digest grammar, bounded.
var digestRe = regexp.MustCompile(`^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{1,256}$`)

// layerDigest is the digest of the layer whose key optsdata holds, for the
// audit: optsdata is ocicrypt's PrivateLayerBlockCipherOptions as JSON
// (symkey, digest, cipheroptions), and only the digest is read. It is ""
// when there is none, or what there is is not a digest (whoever wrapped
// the layer chose it).
func layerDigest(optsdata []byte) string {
	var o struct {
		Digest string `json:"digest"`
	}
	if json.Unmarshal(optsdata, &o) != nil || len(o.Digest) > 300 || !digestRe.MatchString(o.Digest) {
		return ""
	}
	return o.Digest
}
