package keyprovider

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/attest"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// Releaser is the broker's release API as the node needs it.
type Releaser interface {
	Unwrap(ctx context.Context, in *apiv1.UnwrapRequest, opts ...grpc.CallOption) (*apiv1.UnwrapResponse, error)
}

// NodeUnwrapper has the broker release layer keys to this node's session.
type NodeUnwrapper struct {
	Broker   Releaser
	Sessions *attest.Sessions
	// BrokerID is the broker this node is enrolled with.
	BrokerID string
}

// Unwrap implements Unwrapper.
func (u *NodeUnwrapper) Unwrap(ctx context.Context, a annotation.Annotation, raw []byte) ([]byte, error) {
	if a.Broker != u.BrokerID {
		return nil, status.Errorf(codes.FailedPrecondition, "layer key was sealed by broker %s, but this node is enrolled with broker %s", a.Broker, u.BrokerID)
	}
	for attempt := 0; ; attempt++ {
		sess, err := u.Sessions.Get(ctx)
		if err != nil {
			return nil, err
		}
		resp, err := u.Broker.Unwrap(ctx, &apiv1.UnwrapRequest{SessionToken: sess.Token, Annotation: raw})
		if status.Code(err) == codes.Unauthenticated && attempt == 0 {
			// The broker ended the session (expiry, a reboot or PCR change
			// seen by a newer quote); attest once more.
			if err := u.Sessions.Invalidate(ctx, sess); err != nil {
				return nil, err
			}
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("unwrap: %w", err)
		}
		if !recipientOf(a, resp.GetKey(), resp.GetKeyVersion()) {
			return nil, errors.New("unwrap: broker released a key that is not on this layer")
		}
		optsdata, err := u.Sessions.Open(ctx, sess, resp.GetKey(), resp.GetKeyVersion(), resp.GetSealed())
		if errors.Is(err, attest.ErrSessionKeyLocked) && attempt == 0 {
			// A PCR moved since the check: the TPM refuses the session key,
			// and a new attestation shows the broker what changed.
			continue
		}
		return optsdata, err
	}
}

func recipientOf(a annotation.Annotation, key string, version uint32) bool {
	for _, r := range a.Recipients {
		if r.Key == key && r.KeyVersion == version {
			return true
		}
	}
	return false
}
