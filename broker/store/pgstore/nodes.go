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

func scanNode(row pgx.Row) (store.Node, error) {
	var rec []byte
	var n store.Node
	if err := row.Scan(&rec); err != nil {
		return n, notFound(err)
	}
	if err := json.Unmarshal(rec, &n); err != nil {
		return n, fmt.Errorf("node record: %w", err)
	}
	return n, nil
}

// CreateNode implements store.Store.
func (s *Store) CreateNode(ctx context.Context, n store.Node) error {
	return s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		if err := lockEnroll(ctx, tx); err != nil {
			return err
		}
		return createNode(ctx, tx, n)
	})
}

// createNode inserts a node, naming what is taken when its name or EK is.
// Its callers hold the enrollment lock; the unique constraints back it.
func createNode(ctx context.Context, tx pgx.Tx, n store.Node) error {
	var owner string
	switch err := tx.QueryRow(ctx, "SELECT name FROM nodes WHERE ek_fingerprint = $1", n.EKFingerprint).Scan(&owner); {
	case err == nil:
		return fmt.Errorf("this TPM's EK is already enrolled as node %q: %w", owner, store.ErrExists)
	case !errors.Is(err, pgx.ErrNoRows):
		return err
	}
	var one int
	switch err := tx.QueryRow(ctx, "SELECT 1 FROM nodes WHERE name = $1", n.Name).Scan(&one); {
	case err == nil:
		return fmt.Errorf("node name %q is enrolled with another TPM (EK): %w", n.Name, store.ErrExists)
	case !errors.Is(err, pgx.ErrNoRows):
		return err
	}
	rec, err := json.Marshal(n)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, "INSERT INTO nodes (name, ek_fingerprint, state, enrolled_at, record) VALUES ($1, $2, $3, $4, $5)",
		n.Name, n.EKFingerprint, string(n.State), n.EnrolledAt, rec)
	if isUnique(err) {
		return fmt.Errorf("node %q or its EK is already enrolled: %w", n.Name, store.ErrExists)
	}
	return err
}

// GetNode implements store.Store.
func (s *Store) GetNode(ctx context.Context, name string) (store.Node, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	return scanNode(s.pool.QueryRow(ctx, "SELECT record FROM nodes WHERE name = $1", name))
}

// GetNodeByEK implements store.Store.
func (s *Store) GetNodeByEK(ctx context.Context, fp string) (store.Node, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	return scanNode(s.pool.QueryRow(ctx, "SELECT record FROM nodes WHERE ek_fingerprint = $1", fp))
}

// ListNodes implements store.Store.
func (s *Store) ListNodes(ctx context.Context) ([]store.Node, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	return queryRecords[store.Node](ctx, s.pool, "SELECT record FROM nodes ORDER BY name")
}

// queryRecords decodes the record column of every row.
func queryRecords[T any](ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, sql string, args ...any) ([]T, error) {
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	var out []T
	var rec []byte
	_, err = pgx.ForEachRow(rows, []any{&rec}, func() error {
		var v T
		if err := json.Unmarshal(rec, &v); err != nil {
			return fmt.Errorf("record: %w", err)
		}
		out = append(out, v)
		return nil
	})
	return out, err
}

// UpdateNode implements store.Store. The node's row is locked from read
// to write, so concurrent updates on any replica apply one after another.
func (s *Store) UpdateNode(ctx context.Context, name string, fn func(*store.Node) error) (store.Node, error) {
	var n store.Node
	err := s.txOnce(ctx, func(ctx context.Context, tx pgx.Tx) error {
		var err error
		if n, err = scanNode(tx.QueryRow(ctx, "SELECT record FROM nodes WHERE name = $1 FOR UPDATE", name)); err != nil {
			return err
		}
		ek := n.EKFingerprint
		if err := fn(&n); err != nil {
			return err
		}
		return writeNode(ctx, tx, name, ek, n)
	})
	return n, err
}

// writeNode replaces a node's record. Its identity (name and EK) is the
// row's key: an update may not change it.
func writeNode(ctx context.Context, tx pgx.Tx, name, ek string, n store.Node) error {
	if n.Name != name || n.EKFingerprint != ek {
		return fmt.Errorf("store: an update of node %q may not change its name or EK", name)
	}
	rec, err := json.Marshal(n)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, "UPDATE nodes SET state = $2, enrolled_at = $3, record = $4 WHERE name = $1", name, string(n.State), n.EnrolledAt, rec)
	return err
}

// DeleteNode implements store.Store. Its sessions go with it (ON DELETE
// CASCADE).
func (s *Store) DeleteNode(ctx context.Context, name string) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	tag, err := s.pool.Exec(ctx, "DELETE FROM nodes WHERE name = $1", name)
	if err == nil && tag.RowsAffected() == 0 {
		return store.ErrNotFound
	}
	return err
}

// PutEnrollment implements store.Store.
func (s *Store) PutEnrollment(ctx context.Context, e store.Enrollment, limit int, now time.Time) error {
	rec, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		if err := lockEnroll(ctx, tx); err != nil {
			return err
		}
		// Expired enrollments free their slots (and are gone).
		if _, err := tx.Exec(ctx, "DELETE FROM enrollments WHERE expires <= $1", now); err != nil {
			return err
		}
		if limit > 0 {
			var live int
			if err := tx.QueryRow(ctx, "SELECT count(*) FROM enrollments").Scan(&live); err != nil {
				return err
			}
			if live >= limit {
				return fmt.Errorf("%d enrollments are in flight: %w", live, store.ErrLimit)
			}
		}
		_, err := tx.Exec(ctx, `INSERT INTO enrollments (id, expires, record) VALUES ($1, $2, $3)
			ON CONFLICT (id) DO UPDATE SET expires = EXCLUDED.expires, record = EXCLUDED.record`, e.ID, e.Expires, rec)
		return err
	})
}

// TakeEnrollment implements store.Store.
func (s *Store) TakeEnrollment(ctx context.Context, id string) (store.Enrollment, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var e store.Enrollment
	var rec []byte
	if err := s.pool.QueryRow(ctx, "DELETE FROM enrollments WHERE id = $1 RETURNING record", id).Scan(&rec); err != nil {
		return e, notFound(err)
	}
	err := json.Unmarshal(rec, &e)
	return e, err
}

// EnrollNode implements store.Store.
func (s *Store) EnrollNode(ctx context.Context, n store.Node, joinTokenHash []byte, now time.Time) error {
	return s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		if err := lockEnroll(ctx, tx); err != nil {
			return err
		}
		if joinTokenHash != nil {
			var exp time.Time
			err := tx.QueryRow(ctx, "DELETE FROM join_tokens WHERE hash = $1 RETURNING expires", joinTokenHash).Scan(&exp)
			if errors.Is(err, pgx.ErrNoRows) || (err == nil && !now.Before(exp)) {
				return store.ErrJoinToken
			}
			if err != nil {
				return err
			}
		}
		// An error from here on rolls the transaction back: the token is
		// not spent.
		if err := createNode(ctx, tx, n); err != nil {
			return err
		}
		return supersedePending(ctx, tx, n.Name, n.EKFingerprint)
	})
}

// supersedePending drops the pending enrollments a new node makes moot:
// those of its name and that of its EK.
func supersedePending(ctx context.Context, tx pgx.Tx, name, fp string) error {
	_, err := tx.Exec(ctx, "DELETE FROM pending WHERE ek_fingerprint = $1 OR name = $2", fp, name)
	return err
}

// AddPending implements store.Store.
func (s *Store) AddPending(ctx context.Context, p store.PendingEnrollment, lim store.PendingLimits, now time.Time) error {
	n := p.Node
	rec, err := json.Marshal(p)
	if err != nil {
		return err
	}
	return s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		if err := lockEnroll(ctx, tx); err != nil {
			return err
		}
		var owner string
		switch err := tx.QueryRow(ctx, "SELECT name FROM nodes WHERE ek_fingerprint = $1", n.EKFingerprint).Scan(&owner); {
		case err == nil:
			return fmt.Errorf("this TPM's EK is already enrolled as node %q: %w", owner, store.ErrExists)
		case !errors.Is(err, pgx.ErrNoRows):
			return err
		}
		var one int
		switch err := tx.QueryRow(ctx, "SELECT 1 FROM nodes WHERE name = $1", n.Name).Scan(&one); {
		case err == nil:
			return fmt.Errorf("node name %q is enrolled with another TPM (EK): %w", n.Name, store.ErrExists)
		case !errors.Is(err, pgx.ErrNoRows):
			return err
		}
		if _, err := tx.Exec(ctx, "DELETE FROM pending WHERE expires <= $1", now); err != nil {
			return err
		}
		// This TPM's earlier enrollment is replaced below; it does not count.
		var total, perName int
		if err := tx.QueryRow(ctx, "SELECT count(*), count(*) FILTER (WHERE name = $2) FROM pending WHERE ek_fingerprint <> $1",
			n.EKFingerprint, n.Name).Scan(&total, &perName); err != nil {
			return err
		}
		if lim.PerName > 0 && perName >= lim.PerName {
			return fmt.Errorf("%d enrollments of node %q are already waiting for approval: %w", perName, n.Name, store.ErrLimit)
		}
		if lim.Total > 0 && total >= lim.Total {
			return fmt.Errorf("%d enrollments are already waiting for approval: %w", total, store.ErrLimit)
		}
		_, err := tx.Exec(ctx, `INSERT INTO pending (ek_fingerprint, name, enrolled_at, expires, record) VALUES ($1, $2, $3, $4, $5)
			ON CONFLICT (ek_fingerprint) DO UPDATE SET name = EXCLUDED.name, enrolled_at = EXCLUDED.enrolled_at,
				expires = EXCLUDED.expires, record = EXCLUDED.record`,
			n.EKFingerprint, n.Name, n.EnrolledAt, p.Expires, rec)
		return err
	})
}

// ListPending implements store.Store.
func (s *Store) ListPending(ctx context.Context, now time.Time) ([]store.PendingEnrollment, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	return queryRecords[store.PendingEnrollment](ctx, s.pool,
		"SELECT record FROM pending WHERE expires > $1 ORDER BY enrolled_at, ek_fingerprint", now)
}

// ApprovePending implements store.Store.
func (s *Store) ApprovePending(ctx context.Context, name, fp string, now time.Time) (store.Node, error) {
	var n store.Node
	err := s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		if err := lockEnroll(ctx, tx); err != nil {
			return err
		}
		var rec []byte
		if err := tx.QueryRow(ctx, "SELECT record FROM pending WHERE ek_fingerprint = $1 AND name = $2 AND expires > $3",
			fp, name, now).Scan(&rec); err != nil {
			return notFound(err)
		}
		var p store.PendingEnrollment
		if err := json.Unmarshal(rec, &p); err != nil {
			return fmt.Errorf("pending enrollment record: %w", err)
		}
		n = p.Node
		n.State = store.NodeActive
		if err := createNode(ctx, tx, n); err != nil {
			return err
		}
		return supersedePending(ctx, tx, n.Name, n.EKFingerprint)
	})
	return n, err
}

// DeletePending implements store.Store.
func (s *Store) DeletePending(ctx context.Context, name, fp string) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	tag, err := s.pool.Exec(ctx, "DELETE FROM pending WHERE ek_fingerprint = $1 AND name = $2", fp, name)
	if err == nil && tag.RowsAffected() == 0 {
		return store.ErrNotFound
	}
	return err
}

// PutJoinToken implements store.Store.
func (s *Store) PutJoinToken(ctx context.Context, hash []byte, expires time.Time) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	_, err := s.pool.Exec(ctx, `INSERT INTO join_tokens (hash, expires) VALUES ($1, $2)
		ON CONFLICT (hash) DO UPDATE SET expires = EXCLUDED.expires`, hash, expires)
	return err
}

// ConsumeJoinToken implements store.Store.
func (s *Store) ConsumeJoinToken(ctx context.Context, hash []byte, now time.Time) (bool, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var exp time.Time
	err := s.pool.QueryRow(ctx, "DELETE FROM join_tokens WHERE hash = $1 RETURNING expires", hash).Scan(&exp)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	return err == nil && now.Before(exp), err
}

// JoinTokenValid implements store.Store.
func (s *Store) JoinTokenValid(ctx context.Context, hash []byte, now time.Time) (bool, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var exp time.Time
	err := s.pool.QueryRow(ctx, "SELECT expires FROM join_tokens WHERE hash = $1", hash).Scan(&exp)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	return err == nil && now.Before(exp), err
}
