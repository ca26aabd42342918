package pgstore

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
)

// migrations are the schema's versions, NNNN_name.sql, applied in order.
//
//go:embed migrations/*.sql
var migrations embed.FS

type migration struct {
	version int
	name    string
	sql     string
}

func loadMigrations() ([]migration, error) {
	files, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	var out []migration
	for _, f := range files {
		base := strings.TrimSuffix(path.Base(f), ".sql")
		num, name, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 {
			return nil, fmt.Errorf("migration %q is not named NNNN_name.sql", f)
		}
		data, err := migrations.ReadFile(f)
		if err != nil {
			return nil, err
		}
		out = append(out, migration{version: v, name: name, sql: string(data)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].version < out[j].version })
	for i, m := range out {
		if m.version != i+1 {
			return nil, fmt.Errorf("migration %d is missing (found %d_%s)", i+1, m.version, m.name)
		}
	}
	return out, nil
}

// migrateLock is the advisory lock under which the schema changes: the
// replicas that start together wait for the first, which applies the
// migrations; the others find the schema current.
const migrateLock = int64(0x61747465_7374656d) // "attestem"

// SchemaVersion is the schema version this store writes.
func SchemaVersion() int {
	ms, err := loadMigrations()
	if err != nil {
		return 0
	}
	return len(ms)
}

// migrate brings the schema up to date in one transaction, holding the
// migration lock until it commits: PostgreSQL's DDL is transactional, so a
// failed migration leaves the schema as it was, and two replicas starting
// together apply each migration once.
func (s *Store) migrate(ctx context.Context) error {
	ms, err := loadMigrations()
	if err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var applied []string
	var at int
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// Waiting for another replica's migration, and a long migration,
		// are bounded by ctx rather than by the per-statement timeout.
		if _, err := tx.Exec(ctx, "SET LOCAL statement_timeout = 0"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", migrateLock); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS attested_schema (
			version integer PRIMARY KEY,
			name    text NOT NULL,
			applied timestamptz NOT NULL DEFAULT now())`); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM attested_schema").Scan(&at); err != nil {
			return err
		}
		if at > len(ms) {
			return fmt.Errorf("the database's schema is at version %d, newer than this broker's (%d): a newer broker migrated it; run that version here too", at, len(ms))
		}
		for _, m := range ms[at:] {
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return fmt.Errorf("migration %d (%s): %w", m.version, m.name, err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO attested_schema (version, name) VALUES ($1, $2)", m.version, m.name); err != nil {
				return fmt.Errorf("migration %d (%s): %w", m.version, m.name, err)
			}
			applied = append(applied, fmt.Sprintf("%d_%s", m.version, m.name))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	if len(applied) > 0 {
		s.log.Info("store: applied schema migrations", "migrations", strings.Join(applied, ","), "version", len(ms))
	} else {
		s.log.Info("store: schema is current", "version", at)
	}
	return nil
}
