package pgstore_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/store/pgstore"
	"github.com/attested-dev/attested/broker/store/pgstore/pgtest"
	"github.com/attested-dev/attested/broker/store/storetest"
)

func open(t *testing.T, url string) *pgstore.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := pgstore.Open(ctx, url, pgstore.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// TestPostgres runs the store conformance suite, and what only a shared
// database has, against a real PostgreSQL (one cluster for the package).
func TestPostgres(t *testing.T) {
	c := pgtest.Need(t)

	t.Run("Conformance", func(t *testing.T) {
		storetest.Run(t, func(t *testing.T) store.Store { return open(t, c.NewSchema(t)) })
	})
	t.Run("Replicas", func(t *testing.T) {
		// Two stores on one database are two replicas: everything the
		// suite checks of one store holds across them.
		storetest.RunReplicas(t, func(t *testing.T) (store.Store, store.Store) {
			url := c.NewSchema(t)
			return open(t, url), open(t, url)
		})
	})
}
