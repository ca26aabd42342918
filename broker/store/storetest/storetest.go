// Package storetest is the conformance suite every broker store passes.
package storetest

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
)

// openSession opens sess through an appraisal of its node, as the broker does.
func openSession(t *testing.T, s store.Store, sess store.Session) {
	t.Helper()
	_, err := s.Appraise(context.Background(), sess.Node, store.SpentNonce{Nonce: append([]byte("nonce-"), sess.TokenHash...), Expires: time.Now().Add(time.Minute)},
		time.Now().Add(-time.Hour), func(*store.Node, []store.Session) (store.Outcome, error) {
			return store.Outcome{Open: &sess}, nil
		})
	require.NoError(t, err)
}

// Run exercises open(t), a fresh empty store per subtest.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	ctx := context.Background()
	now := time.Now()
	t.Run("Webhooks", func(t *testing.T) { runWebhooks(t, open) })

	t.Run("NodeIdentityIsUnique", func(t *testing.T) {
		s := open(t)
		n := store.Node{Name: "n1", EKFingerprint: "ek1", State: store.NodeActive}
		require.NoError(t, s.CreateNode(ctx, n))
		assert.ErrorIs(t, s.CreateNode(ctx, store.Node{Name: "n1", EKFingerprint: "ek2"}), store.ErrExists)
		assert.ErrorIs(t, s.CreateNode(ctx, store.Node{Name: "n2", EKFingerprint: "ek1"}), store.ErrExists)
		got, err := s.GetNodeByEK(ctx, "ek1")
		require.NoError(t, err)
		assert.Equal(t, "n1", got.Name)
		_, err = s.GetNode(ctx, "nope")
		assert.ErrorIs(t, err, store.ErrNotFound)
		up, err := s.UpdateNode(ctx, "n1", func(n *store.Node) error { n.State = store.NodeRevoked; return nil })
		require.NoError(t, err)
		assert.Equal(t, store.NodeRevoked, up.State)
		nodes, err := s.ListNodes(ctx)
		require.NoError(t, err)
		assert.Len(t, nodes, 1)
		openSession(t, s, store.Session{TokenHash: []byte("s"), Node: "n1", Expires: now.Add(time.Minute)})
		require.NoError(t, s.DeleteNode(ctx, "n1"))
		_, err = s.GetSession(ctx, []byte("s"))
		assert.ErrorIs(t, err, store.ErrNotFound, "removing a node ends its sessions")
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "n3", EKFingerprint: "ek1"}), "the EK is free again")
		assert.ErrorIs(t, s.DeleteNode(ctx, "nope"), store.ErrNotFound)
	})

	t.Run("PendingNodesExpire", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "old", EKFingerprint: "ek-old", State: store.NodePending, EnrolledAt: now.Add(-48 * time.Hour)}))
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "new", EKFingerprint: "ek-new", State: store.NodePending, EnrolledAt: now}))
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "active", EKFingerprint: "ek-a", State: store.NodeActive, EnrolledAt: now.Add(-48 * time.Hour)}))
		require.NoError(t, s.Expire(ctx, now, now.Add(-24*time.Hour)))
		_, err := s.GetNode(ctx, "old")
		assert.ErrorIs(t, err, store.ErrNotFound)
		_, err = s.GetNodeByEK(ctx, "ek-old")
		assert.ErrorIs(t, err, store.ErrNotFound, "the EK is free again")
		for _, name := range []string{"new", "active"} {
			_, err = s.GetNode(ctx, name)
			assert.NoError(t, err, name)
		}
	})

	t.Run("NonceIsSingleUseUnderConcurrency", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "a", EKFingerprint: "ek-a", State: store.NodeActive}))
		var wins, spent atomic.Int32
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := s.Appraise(ctx, "a", store.SpentNonce{Nonce: []byte("n"), Expires: now.Add(time.Minute)}, now,
					func(n *store.Node, _ []store.Session) (store.Outcome, error) {
						return store.Outcome{Open: &store.Session{TokenHash: []byte{byte(i)}, Node: "a", Expires: now.Add(time.Minute)}}, nil
					})
				switch {
				case err == nil:
					wins.Add(1)
				case errors.Is(err, store.ErrNonceSpent):
					spent.Add(1)
				}
			}()
		}
		wg.Wait()
		assert.Equal(t, int32(1), wins.Load())
		assert.Equal(t, int32(7), spent.Load())
	})

	t.Run("AppraisalIsOneTransaction", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "a", EKFingerprint: "ek-a", State: store.NodeActive}))
		openSession(t, s, store.Session{TokenHash: []byte("old1"), Node: "a", Expires: now.Add(time.Minute)})
		openSession(t, s, store.Session{TokenHash: []byte("old2"), Node: "a", Expires: now.Add(time.Minute)})
		openSession(t, s, store.Session{TokenHash: []byte("gone"), Node: "a", Expires: now.Add(-time.Minute)})

		// An aborted appraisal writes nothing, and leaves the nonce unspent.
		_, err := s.Appraise(ctx, "a", store.SpentNonce{Nonce: []byte("n1"), Expires: now.Add(time.Minute)}, now,
			func(n *store.Node, live []store.Session) (store.Outcome, error) {
				n.Trust = "changed"
				return store.Outcome{EndAll: true}, errors.New("abort")
			})
		require.Error(t, err)
		got, err := s.GetNode(ctx, "a")
		require.NoError(t, err)
		assert.Empty(t, got.Trust)
		_, err = s.GetSession(ctx, []byte("old1"))
		require.NoError(t, err)

		// fn sees only live sessions; ending one and opening another is
		// atomic with the node's change.
		n, err := s.Appraise(ctx, "a", store.SpentNonce{Nonce: []byte("n1"), Expires: now.Add(time.Minute)}, now,
			func(n *store.Node, live []store.Session) (store.Outcome, error) {
				assert.Len(t, live, 2, "expired sessions are not live")
				n.Trust = "trusted"
				return store.Outcome{End: [][]byte{[]byte("old1")}, Open: &store.Session{TokenHash: []byte("new"), Node: "a", Expires: now.Add(time.Minute)}}, nil
			})
		require.NoError(t, err)
		assert.Equal(t, "trusted", n.Trust)
		_, err = s.GetSession(ctx, []byte("old1"))
		assert.ErrorIs(t, err, store.ErrNotFound)
		for _, h := range []string{"old2", "new"} {
			_, err = s.GetSession(ctx, []byte(h))
			assert.NoError(t, err, h)
		}
		_, err = s.Appraise(ctx, "a", store.SpentNonce{Nonce: []byte("n1"), Expires: now.Add(time.Minute)}, now,
			func(*store.Node, []store.Session) (store.Outcome, error) { return store.Outcome{}, nil })
		assert.ErrorIs(t, err, store.ErrNonceSpent)

		_, err = s.Appraise(ctx, "a", store.SpentNonce{Nonce: []byte("n2"), Expires: now.Add(time.Minute)}, now,
			func(*store.Node, []store.Session) (store.Outcome, error) { return store.Outcome{EndAll: true}, nil })
		require.NoError(t, err)
		for _, h := range []string{"old2", "new"} {
			_, err = s.GetSession(ctx, []byte(h))
			assert.ErrorIs(t, err, store.ErrNotFound, h)
		}
		_, err = s.Appraise(ctx, "nope", store.SpentNonce{Nonce: []byte("n3"), Expires: now.Add(time.Minute)}, now,
			func(*store.Node, []store.Session) (store.Outcome, error) { return store.Outcome{}, nil })
		assert.ErrorIs(t, err, store.ErrNotFound)
	})

	t.Run("SpentNoncesExpire", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "a", EKFingerprint: "ek-a", State: store.NodeActive}))
		none := func(*store.Node, []store.Session) (store.Outcome, error) { return store.Outcome{}, nil }
		_, err := s.Appraise(ctx, "a", store.SpentNonce{Nonce: []byte("n"), Expires: now.Add(time.Minute)}, now, none)
		require.NoError(t, err)
		require.NoError(t, s.Expire(ctx, now, now.Add(-time.Hour)))
		_, err = s.Appraise(ctx, "a", store.SpentNonce{Nonce: []byte("n"), Expires: now.Add(time.Minute)}, now, none)
		assert.ErrorIs(t, err, store.ErrNonceSpent, "kept until it expires")
		require.NoError(t, s.Expire(ctx, now.Add(2*time.Minute), now.Add(-time.Hour)))
		_, err = s.Appraise(ctx, "a", store.SpentNonce{Nonce: []byte("n"), Expires: now.Add(time.Minute)}, now, none)
		assert.NoError(t, err, "dropped once expired")
	})

	t.Run("JoinTokenSingleUseAndExpiry", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.PutJoinToken(ctx, []byte("t"), now.Add(time.Minute)))
		valid, err := s.JoinTokenValid(ctx, []byte("t"), now)
		require.NoError(t, err)
		assert.True(t, valid, "checking does not spend it")
		ok, err := s.ConsumeJoinToken(ctx, []byte("t"), now)
		require.NoError(t, err)
		assert.True(t, ok)
		ok, err = s.ConsumeJoinToken(ctx, []byte("t"), now)
		require.NoError(t, err)
		assert.False(t, ok)
		require.NoError(t, s.PutJoinToken(ctx, []byte("old"), now.Add(-time.Second)))
		ok, err = s.ConsumeJoinToken(ctx, []byte("old"), now)
		require.NoError(t, err)
		assert.False(t, ok)
	})

	t.Run("EnrollmentTakenOnce", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.PutEnrollment(ctx, store.Enrollment{ID: "e", Expires: now.Add(time.Minute)}, 0, now))
		_, err := s.TakeEnrollment(ctx, "e")
		require.NoError(t, err)
		_, err = s.TakeEnrollment(ctx, "e")
		assert.ErrorIs(t, err, store.ErrNotFound)
	})

	runEnrollment(t, open)
	runRecords(t, open)

	t.Run("SessionsEndPerNodeAndExpire", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "a", EKFingerprint: "ek-a", State: store.NodeActive}))
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "b", EKFingerprint: "ek-b", State: store.NodeActive}))
		for _, sess := range []store.Session{
			{TokenHash: []byte("a1"), Node: "a", Expires: now.Add(time.Minute)},
			{TokenHash: []byte("a2"), Node: "a", Expires: now.Add(time.Minute)},
			{TokenHash: []byte("b1"), Node: "b", Expires: now.Add(time.Minute)},
			{TokenHash: []byte("b2"), Node: "b", Expires: now.Add(-time.Minute)},
		} {
			openSession(t, s, sess)
		}
		require.NoError(t, s.DeleteNodeSessions(ctx, "a"))
		for _, h := range []string{"a1", "a2"} {
			_, err := s.GetSession(ctx, []byte(h))
			assert.ErrorIs(t, err, store.ErrNotFound)
		}
		_, err := s.GetSession(ctx, []byte("b1"))
		require.NoError(t, err)
		require.NoError(t, s.Expire(ctx, now, now.Add(-time.Hour)))
		_, err = s.GetSession(ctx, []byte("b2"))
		assert.ErrorIs(t, err, store.ErrNotFound)
		_, err = s.GetSession(ctx, []byte("b1"))
		assert.NoError(t, err)
	})

	t.Run("KeyVersions", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateKey(ctx, store.Key{Name: "k", Version: 1}))
		require.NoError(t, s.CreateKey(ctx, store.Key{Name: "k", Version: 2}))
		require.NoError(t, s.CreateKey(ctx, store.Key{Name: "k2", Version: 1}))
		assert.ErrorIs(t, s.CreateKey(ctx, store.Key{Name: "k", Version: 2}), store.ErrExists)
		latest, err := s.GetKey(ctx, "k", 0)
		require.NoError(t, err)
		assert.Equal(t, uint32(2), latest.Version)
		v1, err := s.GetKey(ctx, "k", 1)
		require.NoError(t, err)
		assert.Equal(t, uint32(1), v1.Version)
		_, err = s.GetKey(ctx, "missing", 0)
		assert.ErrorIs(t, err, store.ErrNotFound)
	})

	t.Run("PolicyRevisions", func(t *testing.T) {
		s := open(t)
		p, err := s.PutPolicy(ctx, store.Policy{Name: "p", YAML: "a"})
		require.NoError(t, err)
		assert.Equal(t, uint32(1), p.Revision)
		p, err = s.PutPolicy(ctx, store.Policy{Name: "p", YAML: "b"})
		require.NoError(t, err)
		assert.Equal(t, uint32(2), p.Revision)
		got, err := s.GetPolicy(ctx, "p")
		require.NoError(t, err)
		assert.Equal(t, "b", got.YAML)
	})

	t.Run("AuditOrderAndFilter", func(t *testing.T) {
		s := open(t)
		for i, k := range []string{"attest", "release", "attest"} {
			require.NoError(t, s.AppendAudit(ctx, store.AuditEvent{Kind: k, Node: "n", Reason: string(rune('a' + i))}))
		}
		all, err := s.ListAudit(ctx, store.AuditFilter{})
		require.NoError(t, err)
		require.Len(t, all, 3)
		assert.Less(t, all[0].Seq, all[2].Seq)
		att, err := s.ListAudit(ctx, store.AuditFilter{Kind: "attest", Limit: 1})
		require.NoError(t, err)
		require.Len(t, att, 1)
		assert.Equal(t, "c", att[0].Reason, "limit keeps the newest")
	})
}
