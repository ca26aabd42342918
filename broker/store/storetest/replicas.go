package storetest

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
)

// RunReplicas checks what broker replicas sharing one database rely on:
// open(t) returns two handles on one fresh store (two connections to one
// database; a store that cannot be shared may return itself twice). Every
// check races the two handles against each other.
func RunReplicas(t *testing.T, open func(t *testing.T) (store.Store, store.Store)) {
	ctx := context.Background()
	const workers = 16
	// race runs f(i, replica) on workers goroutines at once, alternating
	// replicas.
	race := func(a, b store.Store, f func(i int, s store.Store)) {
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range workers {
			s := a
			if i%2 == 1 {
				s = b
			}
			wg.Go(func() { <-start; f(i, s) })
		}
		close(start)
		wg.Wait()
	}

	t.Run("NonceSpentOnceAcrossReplicas", func(t *testing.T) {
		a, b := open(t)
		require.NoError(t, a.CreateNode(ctx, store.Node{Name: "n", EKFingerprint: "ek", State: store.NodeActive}))
		now := time.Now()
		var mu sync.Mutex
		var wins, spent int
		var other []error
		race(a, b, func(i int, s store.Store) {
			_, err := s.Appraise(ctx, "n", store.SpentNonce{Nonce: []byte("one nonce"), Expires: now.Add(time.Minute)}, now,
				func(*store.Node, []store.Session) (store.Outcome, error) {
					return store.Outcome{Open: &store.Session{TokenHash: fmt.Appendf(nil, "tok-%d", i), Node: "n", Expires: now.Add(time.Minute)}}, nil
				})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				wins++
			case errors.Is(err, store.ErrNonceSpent):
				spent++
			default:
				other = append(other, err)
			}
		})
		assert.Empty(t, other)
		assert.Equal(t, 1, wins, "one appraisal spends the nonce")
		assert.Equal(t, workers-1, spent)
		live, err := b.NodeSessions(ctx, "n", now)
		require.NoError(t, err)
		assert.Len(t, live, 1, "and only its session opened")
	})

	t.Run("NodeUpdatesAreNotLost", func(t *testing.T) {
		a, b := open(t)
		require.NoError(t, a.CreateNode(ctx, store.Node{Name: "n", EKFingerprint: "ek", State: store.NodeActive}))
		race(a, b, func(i int, s store.Store) {
			_, err := s.UpdateNode(ctx, "n", func(n *store.Node) error { n.TagsVersion++; return nil })
			assert.NoError(t, err)
		})
		n, err := b.GetNode(ctx, "n")
		require.NoError(t, err)
		assert.Equal(t, uint32(workers), n.TagsVersion, "each read-modify-write saw the one before")
	})

	t.Run("RevocationIsSeenAtOnce", func(t *testing.T) {
		a, b := open(t)
		require.NoError(t, a.CreateNode(ctx, store.Node{Name: "n", EKFingerprint: "ek", State: store.NodeActive}))
		openSession(t, a, store.Session{TokenHash: []byte("tok"), Node: "n", Expires: time.Now().Add(time.Hour)})
		_, err := b.GetSession(ctx, []byte("tok"))
		require.NoError(t, err)
		_, err = a.UpdateNode(ctx, "n", func(n *store.Node) error { n.State = store.NodeRevoked; return nil })
		require.NoError(t, err)
		require.NoError(t, a.DeleteNodeSessions(ctx, "n"))
		n, err := b.GetNode(ctx, "n")
		require.NoError(t, err)
		assert.Equal(t, store.NodeRevoked, n.State)
		_, err = b.GetSession(ctx, []byte("tok"))
		assert.ErrorIs(t, err, store.ErrNotFound)
	})

	t.Run("AuditIsOneGaplessOrder", func(t *testing.T) {
		a, b := open(t)
		const each = 5
		race(a, b, func(i int, s store.Store) {
			for j := range each {
				assert.NoError(t, s.AppendAudit(ctx, store.AuditEvent{Time: time.Now(), Kind: "release", Node: fmt.Sprint(i), Reason: fmt.Sprint(j)}))
			}
		})
		evs, err := a.ListAudit(ctx, store.AuditFilter{})
		require.NoError(t, err)
		require.Len(t, evs, workers*each)
		last := map[string]int{}
		for i, e := range evs {
			assert.Equal(t, uint64(i+1), e.Seq, "sequence numbers are 1, 2, 3... in the order listed")
			var j int
			fmt.Sscan(e.Reason, &j)
			if prev, ok := last[e.Node]; ok {
				assert.Greater(t, j, prev, "one writer's records keep their order")
			}
			last[e.Node] = j
		}
	})

	t.Run("PendingCapHoldsAcrossReplicas", func(t *testing.T) {
		a, b := open(t)
		now := time.Now()
		lim := store.PendingLimits{Total: 5}
		var mu sync.Mutex
		var ok, limited int
		race(a, b, func(i int, s store.Store) {
			err := s.AddPending(ctx, pending(fmt.Sprint("n", i), fmt.Sprint("ek", i), now, time.Hour), lim, now)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, store.ErrLimit):
				limited++
			default:
				t.Error(err)
			}
		})
		assert.Equal(t, 5, ok)
		assert.Equal(t, workers-5, limited)
		got, err := b.ListPending(ctx, now)
		require.NoError(t, err)
		assert.Len(t, got, 5)
	})

	t.Run("JoinTokenAdmitsOneNode", func(t *testing.T) {
		a, b := open(t)
		now := time.Now()
		require.NoError(t, a.PutJoinToken(ctx, []byte("tok"), now.Add(time.Minute)))
		var mu sync.Mutex
		var ok int
		race(a, b, func(i int, s store.Store) {
			err := s.EnrollNode(ctx, store.Node{Name: fmt.Sprint("n", i), EKFingerprint: fmt.Sprint("ek", i), State: store.NodeActive}, []byte("tok"), now)
			if err == nil {
				mu.Lock()
				ok++
				mu.Unlock()
			} else {
				assert.ErrorIs(t, err, store.ErrJoinToken)
			}
		})
		assert.Equal(t, 1, ok)
		nodes, err := b.ListNodes(ctx)
		require.NoError(t, err)
		assert.Len(t, nodes, 1)
	})

	t.Run("OneNodePerNameAndEK", func(t *testing.T) {
		a, b := open(t)
		var mu sync.Mutex
		var ok int
		race(a, b, func(i int, s store.Store) {
			// Half the racers want the name, half the EK.
			n := store.Node{Name: "n", EKFingerprint: fmt.Sprint("ek", i), State: store.NodeActive}
			if i%4 >= 2 {
				n = store.Node{Name: fmt.Sprint("n", i), EKFingerprint: "ek", State: store.NodeActive}
			}
			err := s.EnrollNode(ctx, n, nil, time.Now())
			if err == nil {
				mu.Lock()
				ok++
				mu.Unlock()
			} else {
				assert.ErrorIs(t, err, store.ErrExists)
			}
		})
		nodes, err := b.ListNodes(ctx)
		require.NoError(t, err)
		assert.Equal(t, ok, len(nodes))
		names, eks := map[string]bool{}, map[string]bool{}
		for _, n := range nodes {
			assert.False(t, names[n.Name] || eks[n.EKFingerprint], "name %q or EK %q twice", n.Name, n.EKFingerprint)
			names[n.Name], eks[n.EKFingerprint] = true, true
		}
		assert.True(t, names["n"] || eks["ek"])
	})

	t.Run("PolicyRevisionsAreDistinct", func(t *testing.T) {
		a, b := open(t)
		var mu sync.Mutex
		var revs []int
		race(a, b, func(i int, s store.Store) {
			p, err := s.PutPolicy(ctx, store.Policy{Name: "p", YAML: fmt.Sprint(i)})
			assert.NoError(t, err)
			mu.Lock()
			revs = append(revs, int(p.Revision))
			mu.Unlock()
		})
		sort.Ints(revs)
		for i, r := range revs {
			assert.Equal(t, i+1, r)
		}
		p, err := a.GetPolicy(ctx, "p")
		require.NoError(t, err)
		assert.Equal(t, uint32(workers), p.Revision)
	})

	t.Run("OutboxAcrossReplicas", func(t *testing.T) {
		a, b := open(t)
		now := time.Now().UTC().Truncate(time.Millisecond)
		require.NoError(t, a.CreateWebhook(ctx, store.Webhook{ID: "wh", Events: []string{"status"}, Created: now}))
		race(a, b, func(i int, s store.Store) {
			_, err := s.EnqueueEvent(ctx, store.OutboxEvent{ID: fmt.Sprint("e", i), Kind: "status", Payload: []byte("{}"), Created: now}, 0)
			assert.NoError(t, err)
		})
		w, err := b.GetWebhook(ctx, "wh")
		require.NoError(t, err)
		assert.Equal(t, uint64(workers), w.Pending)
		seen := map[string]bool{}
		for i := range workers {
			s := a
			if i%2 == 1 {
				s = b
			}
			ds, err := s.NextDeliveries(ctx)
			require.NoError(t, err)
			require.Len(t, ds, 1)
			assert.False(t, seen[ds[0].EventID], "each event once")
			seen[ds[0].EventID] = true
			require.NoError(t, s.RecordAttempt(ctx, ds[0], store.Attempt{Outcome: store.Delivered, Time: now}))
			// The other replica, holding the same delivery, finds it done.
			other := b
			if s == b {
				other = a
			}
			assert.ErrorIs(t, other.RecordAttempt(ctx, ds[0], store.Attempt{Outcome: store.Delivered, Time: now}), store.ErrNotFound)
		}
		w, err = a.GetWebhook(ctx, "wh")
		require.NoError(t, err)
		assert.Zero(t, w.Pending)
		assert.Equal(t, uint64(workers), w.Delivered)
	})
}
