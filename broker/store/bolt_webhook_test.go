package store_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
)

// TestOutboxSurvivesReopen: a queued event is on disk when EnqueueEvent
// returns, so closing the database (a broker restart) loses none.
func TestOutboxSurvivesReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "broker.db")
	s, err := store.OpenBolt(path)
	require.NoError(t, err)
	require.NoError(t, s.CreateWebhook(ctx, store.Webhook{ID: "wh", Events: []string{"status"}, Created: time.Now()}))
	res, err := s.EnqueueEvent(ctx, store.OutboxEvent{ID: "e1", Kind: "status", Payload: []byte(`{"id":"e1"}`), Created: time.Now()}, 0)
	require.NoError(t, err)
	require.Equal(t, 1, res.Queued)
	require.NoError(t, s.Close())

	s, err = store.OpenBolt(path)
	require.NoError(t, err)
	defer s.Close()
	ds, err := s.NextDeliveries(ctx)
	require.NoError(t, err)
	require.Len(t, ds, 1)
	assert.Equal(t, "e1", ds[0].EventID)
	assert.Equal(t, []byte(`{"id":"e1"}`), ds[0].Payload)
}
