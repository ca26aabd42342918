package broker_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// failingAudit is a store whose audit appends of one kind fail on demand,
// as they do when the broker's disk is full.
type failingAudit struct {
	store.Store
	kind string
	fail atomic.Bool
}

func (f *failingAudit) AppendAudit(ctx context.Context, ev store.AuditEvent) error {
	if f.fail.Load() && ev.Kind == f.kind {
		return fmt.Errorf("write broker.db: %w", syscall.ENOSPC)
	}
	return f.Store.AppendAudit(ctx, ev)
}

// TestReleaseWithoutAuditRecordIsRefused: a release whose audit record
// cannot be written is refused, saying why; the key is not sent. (Before,
// the failure was logged and the key released: on a full disk a broker
// released tens of thousands of keys the audit never saw; see
// test/e2e TestBrokerDiskFull.)
func TestReleaseWithoutAuditRecordIsRefused(t *testing.T) {
	fa := &failingAudit{kind: "release"}
	d, _ := startDirect(t, time.Now, func(s store.Store) store.Store { fa.Store = s; return fa })
	st := enrollDirect(t, d)
	ctx := context.Background()
	admin := d.srv.AdminServer()
	_, err := admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: fmt.Sprintf("name: prod\npcrs:\n  %d: [%q]\n", debugPCR, fmt.Sprintf("%x", pcrValue(t, debugPCR)))})
	require.NoError(t, err)
	_, err = admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "app", Policy: "prod"})
	require.NoError(t, err)
	// Seal a layer key as keywrap does.
	wk, err := d.srv.GetWrappingKey(ctx, &apiv1.GetWrappingKeyRequest{Name: "app"})
	require.NoError(t, err)
	s, err := suite.Lookup(wk.GetSuite())
	require.NoError(t, err)
	r := annotation.Recipient{Key: wk.GetName(), KeyVersion: wk.GetVersion(), Suite: s.Name}
	r.Ciphertext, err = s.Seal(wk.GetPublicKey(), annotation.Info(wk.GetBrokerId(), r), []byte(`{"symkey":"a2V5"}`))
	require.NoError(t, err)
	ann, err := annotation.New(wk.GetBrokerId(), r).Marshal()
	require.NoError(t, err)

	sess, err := sessionDirect(t, d, st)
	require.NoError(t, err)
	_, err = d.srv.Unwrap(ctx, &apiv1.UnwrapRequest{SessionToken: sess.Token, Annotation: ann})
	require.NoError(t, err, "the release works while its audit record can be written")

	fa.fail.Store(true)
	resp, err := d.srv.Unwrap(ctx, &apiv1.UnwrapRequest{SessionToken: sess.Token, Annotation: ann})
	require.Error(t, err, "a key was released without its audit record")
	assert.Nil(t, resp)
	assert.Equal(t, codes.Internal, status.Code(err))
	assert.Contains(t, err.Error(), "could not write the audit record of this release to its store, so it released nothing")
	assert.Contains(t, err.Error(), "no space left on device")

	fa.fail.Store(false)
	_, err = d.srv.Unwrap(ctx, &apiv1.UnwrapRequest{SessionToken: sess.Token, Annotation: ann})
	require.NoError(t, err, "the broker releases again once the audit can be written")
}
