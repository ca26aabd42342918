package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/attested-dev/attested/broker/store"
)

// CreateKey implements store.Store.
func (s *Store) CreateKey(ctx context.Context, k store.Key) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	rec, err := json.Marshal(k)
	if err != nil {
		return err
	}
	tag, err := s.pool.Exec(ctx, "INSERT INTO keys (name, version, record) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
		k.Name, int64(k.Version), rec)
	if err == nil && tag.RowsAffected() == 0 {
		return fmt.Errorf("key %s version %d: %w", k.Name, k.Version, store.ErrExists)
	}
	return err
}

// GetKey implements store.Store.
func (s *Store) GetKey(ctx context.Context, name string, version uint32) (store.Key, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var rec []byte
	var err error
	if version == 0 {
		err = s.pool.QueryRow(ctx, "SELECT record FROM keys WHERE name = $1 ORDER BY version DESC LIMIT 1", name).Scan(&rec)
	} else {
		err = s.pool.QueryRow(ctx, "SELECT record FROM keys WHERE name = $1 AND version = $2", name, int64(version)).Scan(&rec)
	}
	var k store.Key
	if err != nil {
		return k, notFound(err)
	}
	if err := json.Unmarshal(rec, &k); err != nil {
		return k, fmt.Errorf("key record: %w", err)
	}
	return k, nil
}

// ListKeys implements store.Store.
func (s *Store) ListKeys(ctx context.Context) ([]store.Key, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	return queryRecords[store.Key](ctx, s.pool, "SELECT record FROM keys ORDER BY name, version")
}

// KeyVersions implements store.Store.
func (s *Store) KeyVersions(ctx context.Context, name string) ([]store.KeyVersion, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT k.record, coalesce(c.releases, 0), coalesce(c.refusals, 0)
		FROM keys k LEFT JOIN key_counts c ON c.name = k.name AND c.version = k.version
		WHERE k.name = $1 ORDER BY k.version`, name)
	if err != nil {
		return nil, err
	}
	var out []store.KeyVersion
	var rec []byte
	var rel, ref int64
	_, err = pgx.ForEachRow(rows, []any{&rec, &rel, &ref}, func() error {
		kv := store.KeyVersion{Releases: uint64(rel), Refusals: uint64(ref)}
		if err := json.Unmarshal(rec, &kv.Key); err != nil {
			return fmt.Errorf("key record: %w", err)
		}
		out = append(out, kv)
		return nil
	})
	if err == nil && len(out) == 0 {
		err = store.ErrNotFound
	}
	return out, err
}

// DisableKey implements store.Store. The key's rows are locked in version
// order from read to write (FOR NO KEY UPDATE, which leaves the audit
// append's count of a version free to go on), so concurrent disables on
// any replica apply one after another.
func (s *Store) DisableKey(ctx context.Context, name string, version uint32, at time.Time) ([]store.Key, []uint32, error) {
	var all []store.Key
	var disabled []uint32
	err := s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		all, disabled = nil, nil
		keys, err := queryRecords[store.Key](ctx, tx, "SELECT record FROM keys WHERE name = $1 ORDER BY version FOR NO KEY UPDATE", name)
		if err != nil {
			return err
		}
		found := false
		b := &pgx.Batch{}
		for _, k := range keys {
			if version == 0 || k.Version == version {
				found = true
				if k.Disabled.IsZero() {
					k.Disabled = at
					disabled = append(disabled, k.Version)
					rec, err := json.Marshal(k)
					if err != nil {
						return err
					}
					b.Queue("UPDATE keys SET record = $3 WHERE name = $1 AND version = $2", name, int64(k.Version), rec)
				}
			}
			all = append(all, k)
		}
		if !found {
			return store.ErrNotFound
		}
		if b.Len() == 0 {
			return nil
		}
		return tx.SendBatch(ctx, b).Close()
	})
	if err != nil {
		return nil, nil, err
	}
	return all, disabled, nil
}

// PutPolicy implements store.Store. The current revision's row is locked
// from read to write, so concurrent applications on any replica each get
// their own revision; two first applications of a name race on its
// primary key, and the loser runs again and finds the winner's.
func (s *Store) PutPolicy(ctx context.Context, p store.Policy) (store.Policy, error) {
	var out store.Policy
	err := s.tx(ctx, isUnique, func(ctx context.Context, tx pgx.Tx) error {
		var rec []byte
		var rev int64
		np := p
		switch err := tx.QueryRow(ctx, "SELECT record, revision FROM policies WHERE name = $1 FOR UPDATE", p.Name).Scan(&rec, &rev); {
		case errors.Is(err, pgx.ErrNoRows):
			np.Revision = 1
		case err != nil:
			return err
		default:
			old, err := scanPolicy(rec, rev)
			if err != nil {
				return err
			}
			if old.YAML == p.YAML {
				out = old
				return nil
			}
			np.Revision = old.Revision + 1
		}
		rec, err := json.Marshal(np)
		if err != nil {
			return err
		}
		b := &pgx.Batch{}
		if np.Revision == 1 {
			b.Queue("INSERT INTO policies (name, revision, record) VALUES ($1, $2, $3)", np.Name, int64(np.Revision), rec)
		} else {
			b.Queue("UPDATE policies SET revision = $2, record = $3 WHERE name = $1", np.Name, int64(np.Revision), rec)
		}
		b.Queue("INSERT INTO policy_revisions (name, revision, record) VALUES ($1, $2, $3)", np.Name, int64(np.Revision), rec)
		if err := tx.SendBatch(ctx, b).Close(); err != nil {
			return err
		}
		out = np
		return nil
	})
	return out, err
}

// PolicyRevisions implements store.Store, in one statement (one
// snapshot). A current revision missing from the kept ones (not written
// by this schema) is listed too.
func (s *Store) PolicyRevisions(ctx context.Context, name string) ([]store.Policy, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT record, revision FROM policy_revisions WHERE name = $1
		UNION ALL SELECT record, revision FROM policies p WHERE name = $1
			AND NOT EXISTS (SELECT 1 FROM policy_revisions r WHERE r.name = p.name AND r.revision = p.revision)
		ORDER BY revision`, name)
	if err != nil {
		return nil, err
	}
	var out []store.Policy
	var rec []byte
	var rev int64
	_, err = pgx.ForEachRow(rows, []any{&rec, &rev}, func() error {
		p, err := scanPolicy(rec, rev)
		if err != nil {
			return fmt.Errorf("policy %s revision %d: %w", name, rev, err)
		}
		out = append(out, p)
		return nil
	})
	if err == nil && len(out) == 0 {
		err = store.ErrNotFound
	}
	return out, err
}

func scanPolicy(rec []byte, rev int64) (store.Policy, error) {
	var p store.Policy
	if err := json.Unmarshal(rec, &p); err != nil {
		return p, fmt.Errorf("policy record: %w", err)
	}
	// Records written by an older broker were written before their
	// revision was known.
	p.Revision = uint32(rev)
	return p, nil
}

// GetPolicy implements store.Store.
func (s *Store) GetPolicy(ctx context.Context, name string) (store.Policy, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var rec []byte
	var rev int64
	if err := s.pool.QueryRow(ctx, "SELECT record, revision FROM policies WHERE name = $1", name).Scan(&rec, &rev); err != nil {
		return store.Policy{}, notFound(err)
	}
	return scanPolicy(rec, rev)
}

// ListPolicies implements store.Store.
func (s *Store) ListPolicies(ctx context.Context) ([]store.Policy, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	rows, err := s.pool.Query(ctx, "SELECT record, revision FROM policies ORDER BY name")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []store.Policy
	for rows.Next() {
		var rec []byte
		var rev int64
		if err := rows.Scan(&rec, &rev); err != nil {
			return nil, err
		}
		p, err := scanPolicy(rec, rev)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, rows.Err()
}
