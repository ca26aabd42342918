package pgstore

import (
	"context"
	"encoding/json"
	"fmt"

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

// PutPolicy implements store.Store. The revision is bumped by the row's
// own upsert, so concurrent applications on any replica each get their
// own revision.
func (s *Store) PutPolicy(ctx context.Context, p store.Policy) (store.Policy, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	rec, err := json.Marshal(p)
	if err != nil {
		return p, err
	}
	var rev int64
	err = s.pool.QueryRow(ctx, `INSERT INTO policies (name, revision, record) VALUES ($1, 1, $2)
		ON CONFLICT (name) DO UPDATE SET revision = policies.revision + 1, record = EXCLUDED.record
		RETURNING revision`, p.Name, rec).Scan(&rev)
	p.Revision = uint32(rev)
	return p, err
}

func scanPolicy(rec []byte, rev int64) (store.Policy, error) {
	var p store.Policy
	if err := json.Unmarshal(rec, &p); err != nil {
		return p, fmt.Errorf("policy record: %w", err)
	}
	// The record was written before its revision was known.
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
