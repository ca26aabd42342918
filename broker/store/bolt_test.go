package store_test

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/store/storetest"
)

func TestBoltConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		s, err := store.OpenBolt(filepath.Join(t.TempDir(), "broker.db"))
		require.NoError(t, err)
		t.Cleanup(func() { s.Close() })
		return s
	})
}

// TestBoltReplicas races one handle against itself: bbolt is not shared by
// replicas, but what RunReplicas checks holds of one broker's concurrent
// calls too.
func TestBoltReplicas(t *testing.T) {
	storetest.RunReplicas(t, func(t *testing.T) (store.Store, store.Store) {
		s, err := store.OpenBolt(filepath.Join(t.TempDir(), "broker.db"))
		require.NoError(t, err)
		t.Cleanup(func() { s.Close() })
		return s, s
	})
}
