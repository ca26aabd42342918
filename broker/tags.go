package broker

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// MaxTags bounds the tags on one node.
const MaxTags = 64

// TagNode implements apiv1.AdminServer. Tags attach to the node's EK
// identity; every change is audited with its before and after.
func (a adminServer) TagNode(ctx context.Context, req *apiv1.TagNodeRequest) (*apiv1.Node, error) {
	for k, v := range req.GetSet() {
		if !annotation.ValidTagName(k) || !validTagValue(v) {
			return nil, status.Errorf(codes.InvalidArgument, "tag %q=%q: names are 1-63 letters, digits, '.', '_', '/' or '-'; values are 1-256 printable characters without ','", k, v)
		}
	}
	var before string
	n, err := a.s.store.UpdateNode(ctx, req.GetName(), func(n *store.Node) error {
		before = tagString(n.Tags)
		if n.Tags == nil {
			n.Tags = map[string]string{}
		}
		for k, v := range req.GetSet() {
			n.Tags[k] = v
		}
		for _, k := range req.GetRemove() {
			delete(n.Tags, k)
		}
		if len(n.Tags) > MaxTags {
			return status.Errorf(codes.InvalidArgument, "a node holds at most %d tags", MaxTags)
		}
		n.TagsVersion++
		return nil
	})
	if err != nil {
		if _, ok := status.FromError(err); ok && !errors.Is(err, store.ErrNotFound) {
			return nil, err
		}
		return nil, storeErr(fmt.Sprintf("node %q", req.GetName()), err)
	}
	a.s.audit(ctx, store.AuditEvent{Kind: "tag", Node: n.Name, Allowed: true, Actor: "admin",
		Reason: fmt.Sprintf("tags version %d: %s -> %s", n.TagsVersion, dashIfEmpty(before), dashIfEmpty(tagString(n.Tags)))})
	return a.s.nodeToAPI(n), nil
}

func tagString(m map[string]string) string {
	parts := make([]string, 0, len(m))
	for k, v := range m {
		parts = append(parts, k+"="+v)
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

func dashIfEmpty(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// NodeTags implements apiv1.BrokerServer. The node needs its tags to write
// their digest into its TPM; they go to a live session of that node only,
// sealed to its key, so nobody else learns them.
func (s *Server) NodeTags(ctx context.Context, req *apiv1.NodeTagsRequest) (*apiv1.NodeTagsResponse, error) {
	sess, n, err := s.liveSession(ctx, req.GetSessionToken())
	if err != nil {
		return nil, err
	}
	sealed, err := s.sealToSession(sess, binding.TagsInfo(n.Name, sess.PublicKey),
		&apiv1.NodeTagSet{Tags: n.Tags, Digest: binding.TagDigest(n.Name, n.Tags)})
	if err != nil {
		return nil, err
	}
	return &apiv1.NodeTagsResponse{Sealed: sealed}, nil
}

// validTagValue admits printable text only: tag values are shown in lists,
// dashboards and Kubernetes labels, where control characters would break
// lines or drive a terminal.
func validTagValue(v string) bool {
	if v == "" || len(v) > 256 || !utf8.ValidString(v) || strings.Contains(v, ",") {
		return false
	}
	for _, r := range v {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}
