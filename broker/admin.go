package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// Join token lifetimes.
const (
	DefaultJoinTokenTTL = time.Hour
	MaxJoinTokenTTL     = 7 * 24 * time.Hour
)

// adminServer is the Admin service; the authorize interceptor has already
// checked the admin credential for every call that reaches it.
type adminServer struct {
	apiv1.UnimplementedAdminServer
	s *Server
}

var _ apiv1.AdminServer = adminServer{}

func (a adminServer) CreateJoinToken(ctx context.Context, req *apiv1.CreateJoinTokenRequest) (*apiv1.CreateJoinTokenResponse, error) {
	ttl := time.Duration(req.GetTtlSeconds()) * time.Second
	if ttl == 0 {
		ttl = DefaultJoinTokenTTL
	}
	if ttl < 0 || ttl > MaxJoinTokenTTL {
		return nil, status.Errorf(codes.InvalidArgument, "join token lifetime must be between 1s and %s", MaxJoinTokenTTL)
	}
	token := "ajt_" + fmt.Sprintf("%x", randomBytes(24))
	exp := a.s.now().Add(ttl)
	if err := a.s.store.PutJoinToken(ctx, hashToken([]byte(token)), exp); err != nil {
		return nil, storeErr("join token", err)
	}
	a.s.audit(ctx, store.AuditEvent{Kind: "token", Allowed: true, Actor: "admin", Reason: "join token created, expires " + exp.UTC().Format(time.RFC3339)})
	return &apiv1.CreateJoinTokenResponse{Token: token, ExpiresUnix: exp.Unix()}, nil
}

func (a adminServer) setState(ctx context.Context, name string, to store.NodeState, kind string) (*apiv1.Node, error) {
	var change *statusChange
	n, err := a.s.store.UpdateNode(ctx, name, func(n *store.Node) error {
		if to == store.NodeActive && n.State == store.NodeRevoked {
			return status.Errorf(codes.FailedPrecondition, "node %q is revoked; a revoked node must be removed and enrolled again", name)
		}
		n.State = to
		change = a.s.recordStatus(n, a.s.now())
		return nil
	})
	if err != nil {
		if _, ok := status.FromError(err); ok && !errors.Is(err, store.ErrNotFound) {
			return nil, err
		}
		return nil, storeErr(fmt.Sprintf("node %q", name), err)
	}
	if to == store.NodeRevoked {
		// Revocation takes effect at once: no session survives it.
		if err := a.s.store.DeleteNodeSessions(ctx, name); err != nil {
			return nil, storeErr("sessions", err)
		}
	}
	a.s.audit(ctx, store.AuditEvent{Kind: kind, Node: name, Allowed: true, Actor: "admin", Reason: "node is now " + string(to)})
	a.s.announce(ctx, change)
	return a.s.nodeToAPI(n), nil
}

// ApproveNode admits the pending enrollment of a name whose EK is the one
// the admin names: the fingerprint the node printed at enrollment. Anyone
// can make an enrollment wait under any name; only the fingerprint, checked
// out of band, says which machine is being admitted.
func (a adminServer) ApproveNode(ctx context.Context, req *apiv1.NodeRequest) (*apiv1.Node, error) {
	s := a.s
	name := req.GetName()
	if !annotation.ValidName(name) {
		return nil, status.Errorf(codes.InvalidArgument, "node name %q must be 1-63 letters, digits, '.', '_' or '-'", name)
	}
	if req.GetEkFingerprint() == "" {
		return nil, status.Errorf(codes.InvalidArgument, "an approval names the TPM: give the EK fingerprint node %q printed at enrollment (--ek SHA256:...); %s", name, a.pendingFor(ctx, name))
	}
	fp, err := ParseFingerprint(req.GetEkFingerprint())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	n, err := s.store.ApprovePending(ctx, name, fp, s.now())
	switch {
	case errors.Is(err, store.ErrNotFound):
		return a.approveLegacy(ctx, name, fp)
	case errors.Is(err, store.ErrExists):
		return nil, status.Errorf(codes.FailedPrecondition, "cannot approve: %v; remove that node first ('attested node remove')", err)
	case err != nil:
		return nil, storeErr("pending enrollment", err)
	}
	s.audit(ctx, store.AuditEvent{Kind: "approve", Node: name, Allowed: true, Actor: "admin", Reason: fmt.Sprintf(
		"approved EK %s (EK certificate %s); other enrollments pending under this name or EK dropped", DisplayFingerprint(fp), ekCertState(n.EKIssuer))})
	return s.nodeToAPI(n), nil
}

// approveLegacy handles a name with no matching pending enrollment: a
// node that is already enrolled (approving it again changes nothing, if
// the EK matches), or a pending node from a database older than pending
// enrollments.
func (a adminServer) approveLegacy(ctx context.Context, name, fp string) (*apiv1.Node, error) {
	n, err := a.s.store.GetNode(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.FailedPrecondition, "no enrollment of node %q with EK %s is waiting for approval (expired, superseded, or never made); %s",
			name, DisplayFingerprint(fp), a.pendingFor(ctx, name))
	}
	if err != nil {
		return nil, storeErr("node", err)
	}
	if n.EKFingerprint != fp {
		return nil, status.Errorf(codes.FailedPrecondition, "no enrollment of node %q with EK %s is waiting for approval: node %q is enrolled with EK %s (an enrollment with a join token or an approval supersedes the others of its name)",
			name, DisplayFingerprint(fp), name, DisplayFingerprint(n.EKFingerprint))
	}
	return a.setState(ctx, name, store.NodeActive, "approve")
}

// pendingFor says what is waiting for approval under name, for refusals.
func (a adminServer) pendingFor(ctx context.Context, name string) string {
	ps, err := a.s.store.ListPending(ctx, a.s.now())
	if err != nil {
		return "pending enrollments could not be listed: " + err.Error()
	}
	var lines []string
	for _, p := range ps {
		if p.Node.Name == name {
			lines = append(lines, fmt.Sprintf("EK %s (EK certificate %s, enrolled %s)", DisplayFingerprint(p.Node.EKFingerprint),
				ekCertState(p.Node.EKIssuer), p.Node.EnrolledAt.UTC().Format(time.RFC3339)))
		}
	}
	if len(lines) == 0 {
		return fmt.Sprintf("nothing is waiting for approval under %q", name)
	}
	return fmt.Sprintf("waiting for approval under %q: %s", name, strings.Join(lines, "; "))
}

func (a adminServer) RevokeNode(ctx context.Context, req *apiv1.NodeRequest) (*apiv1.Node, error) {
	return a.setState(ctx, req.GetName(), store.NodeRevoked, "revoke")
}

// RemoveNode deletes a node, or, given an EK fingerprint that matches no
// node of that name, rejects that pending enrollment.
func (a adminServer) RemoveNode(ctx context.Context, req *apiv1.NodeRequest) (*apiv1.Node, error) {
	var fp string
	if req.GetEkFingerprint() != "" {
		var err error
		if fp, err = ParseFingerprint(req.GetEkFingerprint()); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
	}
	n, err := a.s.store.GetNode(ctx, req.GetName())
	if fp != "" && (errors.Is(err, store.ErrNotFound) || (err == nil && n.EKFingerprint != fp)) {
		return a.rejectPending(ctx, req.GetName(), fp)
	}
	if err != nil {
		return nil, storeErr(fmt.Sprintf("node %q", req.GetName()), err)
	}
	if err := a.s.store.DeleteNode(ctx, n.Name); err != nil {
		return nil, storeErr(fmt.Sprintf("node %q", n.Name), err)
	}
	a.s.audit(ctx, store.AuditEvent{Kind: "remove", Node: n.Name, Allowed: true, Actor: "admin",
		Reason: fmt.Sprintf("node removed; EK %s may enroll again", DisplayFingerprint(n.EKFingerprint))})
	return a.s.nodeToAPI(n), nil
}

func (a adminServer) rejectPending(ctx context.Context, name, fp string) (*apiv1.Node, error) {
	err := a.s.store.DeletePending(ctx, name, fp)
	if errors.Is(err, store.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "no node %q with EK %s, and no such enrollment waiting for approval; %s", name, DisplayFingerprint(fp), a.pendingFor(ctx, name))
	}
	if err != nil {
		return nil, storeErr("pending enrollment", err)
	}
	a.s.audit(ctx, store.AuditEvent{Kind: "remove", Node: name, Allowed: true, Actor: "admin",
		Reason: fmt.Sprintf("pending enrollment with EK %s rejected", DisplayFingerprint(fp))})
	return &apiv1.Node{Name: name, EkFingerprint: fp, State: apiv1.NodeState_NODE_STATE_PENDING}, nil
}

func (a adminServer) ListNodes(ctx context.Context, _ *apiv1.ListNodesRequest) (*apiv1.ListNodesResponse, error) {
	nodes, err := a.s.store.ListNodes(ctx)
	if err != nil {
		return nil, storeErr("nodes", err)
	}
	pending, err := a.s.store.ListPending(ctx, a.s.now())
	if err != nil {
		return nil, storeErr("pending enrollments", err)
	}
	out := &apiv1.ListNodesResponse{}
	for _, n := range nodes {
		out.Nodes = append(out.Nodes, a.s.nodeToAPI(n))
	}
	for _, p := range pending {
		n := a.s.nodeToAPI(p.Node)
		n.PendingExpiresUnix = p.Expires.Unix()
		out.Pending = append(out.Pending, n)
	}
	return out, nil
}
