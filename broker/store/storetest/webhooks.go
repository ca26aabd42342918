package storetest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
)

// runWebhooks checks webhooks and their outbox.
func runWebhooks(t *testing.T, open func(t *testing.T) store.Store) {
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Millisecond)
	event := func(id, kind string, at time.Time) store.OutboxEvent {
		return store.OutboxEvent{ID: id, Kind: kind, Payload: []byte(`{"id":"` + id + `"}`), Created: at}
	}
	get := func(t *testing.T, s store.Store, id string) store.Webhook {
		t.Helper()
		w, err := s.GetWebhook(ctx, id)
		require.NoError(t, err)
		return w
	}
	heads := func(t *testing.T, s store.Store) map[string]store.Delivery {
		t.Helper()
		ds, err := s.NextDeliveries(ctx)
		require.NoError(t, err)
		out := map[string]store.Delivery{}
		for _, d := range ds {
			_, dup := out[d.Webhook]
			require.False(t, dup, "one delivery per webhook")
			out[d.Webhook] = d
		}
		return out
	}

	t.Run("WebhookLifecycle", func(t *testing.T) {
		s := open(t)
		hooks, err := s.ListWebhooks(ctx)
		require.NoError(t, err)
		assert.Empty(t, hooks)
		_, err = s.GetWebhook(ctx, "wh_a")
		assert.ErrorIs(t, err, store.ErrNotFound)
		w := store.Webhook{ID: "wh_a", URL: "https://a.example/hook", Events: []string{"status"}, SealedSecret: []byte("sealed"), Created: now,
			Delivered: 7, LastError: "carried over"}
		require.NoError(t, s.CreateWebhook(ctx, w))
		assert.ErrorIs(t, s.CreateWebhook(ctx, w), store.ErrExists)
		got := get(t, s, "wh_a")
		assert.Equal(t, "https://a.example/hook", got.URL)
		assert.Equal(t, []string{"status"}, got.Events)
		assert.Equal(t, []byte("sealed"), got.SealedSecret)
		assert.True(t, now.Equal(got.Created))
		assert.Zero(t, got.Delivered, "a new webhook starts with no history")
		assert.Empty(t, got.LastError)

		_, err = s.EnqueueEvent(ctx, event("e1", "status", now), 0)
		require.NoError(t, err)
		gone, err := s.DeleteWebhook(ctx, "wh_a")
		require.NoError(t, err)
		assert.Equal(t, uint64(1), gone.Pending, "returned as it was")
		_, err = s.GetWebhook(ctx, "wh_a")
		assert.ErrorIs(t, err, store.ErrNotFound)
		assert.Empty(t, heads(t, s), "its outbox went with it")
		_, err = s.DeleteWebhook(ctx, "wh_a")
		assert.ErrorIs(t, err, store.ErrNotFound)

		require.NoError(t, s.CreateWebhook(ctx, w), "the ID may be used again")
		assert.Empty(t, heads(t, s), "and starts with an empty outbox")
	})

	t.Run("EventsFanOutBySubscription", func(t *testing.T) {
		s := open(t)
		res, err := s.EnqueueEvent(ctx, event("e0", "status", now), 0)
		require.NoError(t, err)
		assert.Zero(t, res.Queued, "no webhook, nothing queued")
		require.NoError(t, s.CreateWebhook(ctx, store.Webhook{ID: "wh_s", Events: []string{"status"}, Created: now}))
		require.NoError(t, s.CreateWebhook(ctx, store.Webhook{ID: "wh_sr", Events: []string{"status", "refusal"}, Created: now}))
		res, err = s.EnqueueEvent(ctx, event("e1", "refusal", now), 0)
		require.NoError(t, err)
		assert.Equal(t, 1, res.Queued)
		res, err = s.EnqueueEvent(ctx, event("e2", "status", now.Add(time.Second)), 0)
		require.NoError(t, err)
		assert.Equal(t, 2, res.Queued)
		assert.Empty(t, res.Dropped)
		assert.Equal(t, uint64(1), get(t, s, "wh_s").Pending)
		assert.Equal(t, uint64(2), get(t, s, "wh_sr").Pending)

		h := heads(t, s)
		require.Len(t, h, 2)
		assert.Equal(t, "e2", h["wh_s"].EventID)
		assert.Equal(t, "e1", h["wh_sr"].EventID, "the oldest goes first")
		assert.Equal(t, "refusal", h["wh_sr"].Kind)
		assert.Equal(t, []byte(`{"id":"e1"}`), h["wh_sr"].Payload, "the body is kept byte for byte")
		assert.True(t, now.Equal(h["wh_sr"].Created))
		assert.True(t, now.Equal(h["wh_sr"].NextAttempt), "due at once")
		assert.Zero(t, h["wh_sr"].Attempts)
	})

	t.Run("AttemptsAreRecorded", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateWebhook(ctx, store.Webhook{ID: "wh", Events: []string{"status"}, Created: now}))
		for i := range 3 {
			_, err := s.EnqueueEvent(ctx, event(fmt.Sprint("e", i), "status", now.Add(time.Duration(i)*time.Second)), 0)
			require.NoError(t, err)
		}
		d := heads(t, s)["wh"]
		next := now.Add(time.Minute)
		require.NoError(t, s.RecordAttempt(ctx, d, store.Attempt{Outcome: store.RetryLater, Time: now, Error: "receiver answered 500", NextAttempt: next}))
		d2 := heads(t, s)["wh"]
		assert.Equal(t, "e0", d2.EventID, "a retried delivery stays first")
		assert.Equal(t, uint32(1), d2.Attempts)
		assert.True(t, next.Equal(d2.NextAttempt))
		w := get(t, s, "wh")
		assert.Equal(t, uint64(3), w.Pending)
		assert.Equal(t, uint64(1), w.FailedAttempts)
		assert.Equal(t, "receiver answered 500", w.LastError)
		assert.True(t, now.Equal(w.LastErrorAt))

		require.NoError(t, s.RecordAttempt(ctx, d2, store.Attempt{Outcome: store.Delivered, Time: next}))
		w = get(t, s, "wh")
		assert.Equal(t, uint64(2), w.Pending)
		assert.Equal(t, uint64(1), w.Delivered)
		assert.True(t, next.Equal(w.LastDelivered))
		assert.ErrorIs(t, s.RecordAttempt(ctx, d2, store.Attempt{Outcome: store.Delivered, Time: next}), store.ErrNotFound, "a delivery is recorded once")

		d3 := heads(t, s)["wh"]
		assert.Equal(t, "e1", d3.EventID)
		require.NoError(t, s.RecordAttempt(ctx, d3, store.Attempt{Outcome: store.GiveUp, Time: next, Error: "out of attempts"}))
		w = get(t, s, "wh")
		assert.Equal(t, uint64(1), w.Pending)
		assert.Equal(t, uint64(1), w.Failed, "given up is counted, never silently gone")
		assert.Equal(t, uint64(2), w.FailedAttempts)
		assert.Equal(t, "e2", heads(t, s)["wh"].EventID)

		_, err := s.DeleteWebhook(ctx, "wh")
		require.NoError(t, err)
		assert.ErrorIs(t, s.RecordAttempt(ctx, d3, store.Attempt{Outcome: store.Delivered, Time: next}), store.ErrNotFound)
	})

	t.Run("FullOutboxDropsOldestCounted", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateWebhook(ctx, store.Webhook{ID: "wh", Events: []string{"refusal"}, Created: now}))
		for i := range 2 {
			res, err := s.EnqueueEvent(ctx, event(fmt.Sprint("e", i), "refusal", now), 2)
			require.NoError(t, err)
			assert.Empty(t, res.Dropped)
		}
		res, err := s.EnqueueEvent(ctx, event("e2", "refusal", now), 2)
		require.NoError(t, err)
		assert.Equal(t, map[string]uint64{"wh": 1}, res.Dropped)
		w := get(t, s, "wh")
		assert.Equal(t, uint64(2), w.Pending)
		assert.Equal(t, uint64(1), w.Failed)
		assert.Contains(t, w.LastError, "outbox full")
		assert.Equal(t, "e1", heads(t, s)["wh"].EventID, "the oldest made room")
	})

	t.Run("OldDeliveriesExpireCounted", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateWebhook(ctx, store.Webhook{ID: "wh", Events: []string{"status"}, Created: now}))
		require.NoError(t, s.CreateWebhook(ctx, store.Webhook{ID: "wh2", Events: []string{"status"}, Created: now}))
		for i, at := range []time.Time{now.Add(-2 * time.Hour), now.Add(-90 * time.Minute), now} {
			_, err := s.EnqueueEvent(ctx, event(fmt.Sprint("e", i), "status", at), 0)
			require.NoError(t, err)
		}
		lost, err := s.ExpireDeliveries(ctx, now.Add(-time.Hour), now, "older than 1h")
		require.NoError(t, err)
		assert.Equal(t, map[string]uint64{"wh": 2, "wh2": 2}, lost)
		w := get(t, s, "wh")
		assert.Equal(t, uint64(1), w.Pending)
		assert.Equal(t, uint64(2), w.Failed)
		assert.Equal(t, "older than 1h", w.LastError)
		assert.Equal(t, "e2", heads(t, s)["wh"].EventID)
		lost, err = s.ExpireDeliveries(ctx, now.Add(-time.Hour), now, "older than 1h")
		require.NoError(t, err)
		assert.Empty(t, lost)
	})

	t.Run("ConcurrentEventsAllQueued", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateWebhook(ctx, store.Webhook{ID: "wh", Events: []string{"status"}, Created: now}))
		var wg sync.WaitGroup
		for i := range 16 {
			wg.Go(func() {
				_, err := s.EnqueueEvent(ctx, event(fmt.Sprint("e", i), "status", now), 0)
				assert.NoError(t, err)
			})
		}
		wg.Wait()
		assert.Equal(t, uint64(16), get(t, s, "wh").Pending)
		seen := map[string]bool{}
		for range 16 {
			d := heads(t, s)["wh"]
			require.NotEmpty(t, d.EventID)
			assert.False(t, seen[d.EventID], "each event once")
			seen[d.EventID] = true
			require.NoError(t, s.RecordAttempt(ctx, d, store.Attempt{Outcome: store.Delivered, Time: now}))
		}
		assert.Empty(t, heads(t, s))
		w := get(t, s, "wh")
		assert.Zero(t, w.Pending)
		assert.Equal(t, uint64(16), w.Delivered)
	})
}
