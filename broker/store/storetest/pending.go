package storetest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
)

func pending(name, ek string, enrolled time.Time, ttl time.Duration) store.PendingEnrollment {
	return store.PendingEnrollment{
		Node:    store.Node{Name: name, EKFingerprint: ek, State: store.NodePending, EnrolledAt: enrolled},
		Expires: enrolled.Add(ttl),
	}
}

// runEnrollment checks enrollment bookkeeping: in-flight challenges are
// bounded, pending enrollments are kept apart from nodes, bounded, expire,
// and never block a node.
func runEnrollment(t *testing.T, open func(t *testing.T) store.Store) {
	ctx := context.Background()
	now := time.Now()
	noLimit := store.PendingLimits{}

	t.Run("EnrollmentsInFlightAreBounded", func(t *testing.T) {
		s := open(t)
		for i := range 3 {
			require.NoError(t, s.PutEnrollment(ctx, store.Enrollment{ID: fmt.Sprint(i), Expires: now.Add(time.Minute)}, 3, now))
		}
		assert.ErrorIs(t, s.PutEnrollment(ctx, store.Enrollment{ID: "x", Expires: now.Add(time.Minute)}, 3, now), store.ErrLimit)
		_, err := s.TakeEnrollment(ctx, "0")
		require.NoError(t, err)
		require.NoError(t, s.PutEnrollment(ctx, store.Enrollment{ID: "x", Expires: now.Add(time.Minute)}, 3, now), "a taken enrollment frees its slot")
		assert.ErrorIs(t, s.PutEnrollment(ctx, store.Enrollment{ID: "y", Expires: now.Add(time.Minute)}, 3, now), store.ErrLimit)
		later := now.Add(2 * time.Minute)
		require.NoError(t, s.PutEnrollment(ctx, store.Enrollment{ID: "y", Expires: later.Add(time.Minute)}, 3, later), "expired enrollments free their slots")
		_, err = s.TakeEnrollment(ctx, "1")
		assert.ErrorIs(t, err, store.ErrNotFound, "an expired enrollment is gone")
	})

	t.Run("PendingIsNotANode", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.AddPending(ctx, pending("n", "ek-squat", now, time.Hour), noLimit, now))
		require.NoError(t, s.AddPending(ctx, pending("n", "ek-real", now.Add(time.Second), time.Hour), noLimit, now), "several may wait under one name")
		_, err := s.GetNode(ctx, "n")
		assert.ErrorIs(t, err, store.ErrNotFound)
		_, err = s.GetNodeByEK(ctx, "ek-real")
		assert.ErrorIs(t, err, store.ErrNotFound)
		got, err := s.ListPending(ctx, now)
		require.NoError(t, err)
		require.Len(t, got, 2)
		assert.Equal(t, "ek-squat", got[0].Node.EKFingerprint, "oldest first")
		nodes, err := s.ListNodes(ctx)
		require.NoError(t, err)
		assert.Empty(t, nodes)
	})

	t.Run("OnePendingPerEK", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.AddPending(ctx, pending("a", "ek", now, time.Hour), noLimit, now))
		require.NoError(t, s.AddPending(ctx, pending("b", "ek", now, time.Hour), store.PendingLimits{Total: 1, PerName: 1}, now),
			"a TPM's new enrollment replaces its old one and does not count against the limits")
		got, err := s.ListPending(ctx, now)
		require.NoError(t, err)
		require.Len(t, got, 1)
		assert.Equal(t, "b", got[0].Node.Name)
	})

	t.Run("PendingIsBounded", func(t *testing.T) {
		s := open(t)
		lim := store.PendingLimits{Total: 3, PerName: 2}
		require.NoError(t, s.AddPending(ctx, pending("a", "ek1", now, time.Hour), lim, now))
		require.NoError(t, s.AddPending(ctx, pending("a", "ek2", now, time.Hour), lim, now))
		assert.ErrorIs(t, s.AddPending(ctx, pending("a", "ek3", now, time.Hour), lim, now), store.ErrLimit, "per name")
		require.NoError(t, s.AddPending(ctx, pending("b", "ek3", now, time.Hour), lim, now))
		assert.ErrorIs(t, s.AddPending(ctx, pending("c", "ek4", now, time.Hour), lim, now), store.ErrLimit, "in total")
		later := now.Add(2 * time.Hour)
		require.NoError(t, s.AddPending(ctx, pending("c", "ek4", later, time.Hour), lim, later), "expired entries do not count")
		got, err := s.ListPending(ctx, later)
		require.NoError(t, err)
		require.Len(t, got, 1)
	})

	t.Run("PendingExpires", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.AddPending(ctx, pending("old", "ek-old", now.Add(-2*time.Hour), time.Hour), noLimit, now.Add(-2*time.Hour)))
		require.NoError(t, s.AddPending(ctx, pending("new", "ek-new", now, time.Hour), noLimit, now))
		got, err := s.ListPending(ctx, now)
		require.NoError(t, err)
		require.Len(t, got, 1)
		assert.Equal(t, "new", got[0].Node.Name)
		_, err = s.ApprovePending(ctx, "old", "ek-old", now)
		assert.ErrorIs(t, err, store.ErrNotFound, "an expired enrollment cannot be approved")
		require.NoError(t, s.Expire(ctx, now, now.Add(-time.Hour)))
		assert.ErrorIs(t, s.DeletePending(ctx, "old", "ek-old"), store.ErrNotFound, "Expire drops it")
	})

	t.Run("PendingRefusedForEnrolledNameOrEK", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "n", EKFingerprint: "ek", State: store.NodeActive}))
		assert.ErrorIs(t, s.AddPending(ctx, pending("n", "ek2", now, time.Hour), noLimit, now), store.ErrExists)
		assert.ErrorIs(t, s.AddPending(ctx, pending("m", "ek", now, time.Hour), noLimit, now), store.ErrExists)
	})

	t.Run("ApprovalNamesTheEK", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.AddPending(ctx, pending("n", "ek-squat", now, time.Hour), noLimit, now))
		require.NoError(t, s.AddPending(ctx, pending("n", "ek-real", now, time.Hour), noLimit, now))
		require.NoError(t, s.AddPending(ctx, pending("m", "ek-m", now, time.Hour), noLimit, now))
		_, err := s.ApprovePending(ctx, "m", "ek-real", now)
		assert.ErrorIs(t, err, store.ErrNotFound, "name and EK must both match")
		n, err := s.ApprovePending(ctx, "n", "ek-real", now)
		require.NoError(t, err)
		assert.Equal(t, store.NodeActive, n.State)
		got, err := s.GetNodeByEK(ctx, "ek-real")
		require.NoError(t, err)
		assert.Equal(t, "n", got.Name)
		assert.Equal(t, store.NodeActive, got.State)
		left, err := s.ListPending(ctx, now)
		require.NoError(t, err)
		require.Len(t, left, 1, "the other enrollment of the name is dropped")
		assert.Equal(t, "m", left[0].Node.Name)
	})

	t.Run("ApprovalRefusedWhenNameTaken", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.AddPending(ctx, pending("n", "ek-p", now, time.Hour), noLimit, now))
		// A node of that name appears by a path that does not supersede
		// (an older broker replica): the approval must not overwrite it.
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "n", EKFingerprint: "ek-other", State: store.NodeActive}))
		_, err := s.ApprovePending(ctx, "n", "ek-p", now)
		assert.ErrorIs(t, err, store.ErrExists)
		got, err := s.GetNode(ctx, "n")
		require.NoError(t, err)
		assert.Equal(t, "ek-other", got.EKFingerprint)
	})

	t.Run("EnrollNodeSupersedesPending", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.AddPending(ctx, pending("victim", "ek-squat", now, time.Hour), noLimit, now))
		require.NoError(t, s.AddPending(ctx, pending("first-try", "ek-real", now, time.Hour), noLimit, now))
		require.NoError(t, s.AddPending(ctx, pending("bystander", "ek-b", now, time.Hour), noLimit, now))
		require.NoError(t, s.PutJoinToken(ctx, []byte("tok"), now.Add(time.Minute)))
		require.NoError(t, s.EnrollNode(ctx, store.Node{Name: "victim", EKFingerprint: "ek-real", State: store.NodeActive}, []byte("tok"), now))
		left, err := s.ListPending(ctx, now)
		require.NoError(t, err)
		require.Len(t, left, 1, "pending enrollments of the name and of the EK are superseded")
		assert.Equal(t, "bystander", left[0].Node.Name)
		ok, err := s.JoinTokenValid(ctx, []byte("tok"), now)
		require.NoError(t, err)
		assert.False(t, ok, "the token is spent")
	})

	t.Run("EnrollNodeIsAtomic", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "taken", EKFingerprint: "ek-t"}))
		require.NoError(t, s.PutJoinToken(ctx, []byte("tok"), now.Add(time.Minute)))
		assert.ErrorIs(t, s.EnrollNode(ctx, store.Node{Name: "taken", EKFingerprint: "ek-new"}, []byte("tok"), now), store.ErrExists)
		assert.ErrorIs(t, s.EnrollNode(ctx, store.Node{Name: "new", EKFingerprint: "ek-t"}, []byte("tok"), now), store.ErrExists)
		ok, err := s.JoinTokenValid(ctx, []byte("tok"), now)
		require.NoError(t, err)
		assert.True(t, ok, "a refused enrollment does not spend the token")
		assert.ErrorIs(t, s.EnrollNode(ctx, store.Node{Name: "new", EKFingerprint: "ek-new"}, []byte("nope"), now), store.ErrJoinToken)
		assert.ErrorIs(t, s.EnrollNode(ctx, store.Node{Name: "new", EKFingerprint: "ek-new"}, []byte("tok"), now.Add(time.Hour)), store.ErrJoinToken, "expired")
		_, err = s.GetNode(ctx, "new")
		assert.ErrorIs(t, err, store.ErrNotFound, "no node without a valid token")
		require.NoError(t, s.EnrollNode(ctx, store.Node{Name: "new", EKFingerprint: "ek-new"}, []byte("tok"), now))
		assert.ErrorIs(t, s.EnrollNode(ctx, store.Node{Name: "new2", EKFingerprint: "ek-new2"}, []byte("tok"), now), store.ErrJoinToken, "single use")
		require.NoError(t, s.EnrollNode(ctx, store.Node{Name: "new2", EKFingerprint: "ek-new2"}, nil, now), "without a token (a certified EK)")
	})

	t.Run("DeletePending", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.AddPending(ctx, pending("n", "ek", now, time.Hour), noLimit, now))
		assert.ErrorIs(t, s.DeletePending(ctx, "other", "ek"), store.ErrNotFound)
		require.NoError(t, s.DeletePending(ctx, "n", "ek"))
		got, err := s.ListPending(ctx, now)
		require.NoError(t, err)
		assert.Empty(t, got)
	})
}
