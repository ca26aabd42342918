package broker

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/store/pgstore"
)

// storeOpenTimeout bounds reaching PostgreSQL and migrating its schema at
// start; a broker that cannot is better restarted by its supervisor than
// left waiting.
const storeOpenTimeout = time.Minute

// openStore opens the store cfg.Store names: the embedded bbolt file in
// dataDir when it is empty, or a PostgreSQL database that several broker
// replicas share.
func openStore(dataDir string, cfg *Config, log *slog.Logger) (store.Store, error) {
	if cfg.Store == "" {
		return store.OpenBolt(filepath.Join(dataDir, DatabaseFile))
	}
	if !pgstore.IsURL(cfg.Store) {
		return nil, fmt.Errorf("broker: store %q is not a PostgreSQL URL (postgres://USER@HOST/DB?sslmode=verify-full); "+
			"leave store empty for the embedded store in the data directory", pgstore.Redact(cfg.Store))
	}
	if f := filepath.Join(dataDir, DatabaseFile); exists(f) {
		log.Warn("the embedded store in the data directory is not used: this broker's store is PostgreSQL", "file", f)
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeOpenTimeout)
	defer cancel()
	st, err := pgstore.Open(ctx, cfg.Store, pgstore.Options{Logger: log})
	if err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	return st, nil
}
