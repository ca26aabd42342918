package pgstore

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/attested-dev/attested/broker/store"
)

// Appraise implements store.Store in one transaction: the nonce is spent
// by inserting it (a concurrent appraisal with the same nonce, on any
// replica, waits for this one and then finds it spent), the node's row is
// locked from read to write, and the sessions change with it. Reads and
// writes each go as one pipelined batch.
func (s *Store) Appraise(ctx context.Context, node string, nonce store.SpentNonce, now time.Time, fn func(*store.Node, []store.Session) (store.Outcome, error)) (store.Node, error) {
	var n store.Node
	err := s.txOnce(ctx, func(ctx context.Context, tx pgx.Tx) error {
		b := &pgx.Batch{}
		b.Queue("INSERT INTO spent_nonces (nonce, expires) VALUES ($1, $2) ON CONFLICT (nonce) DO NOTHING", nonce.Nonce, nonce.Expires)
		b.Queue("SELECT record FROM nodes WHERE name = $1 FOR UPDATE", node)
		b.Queue("SELECT record FROM sessions WHERE node = $1 AND expires > $2 ORDER BY token_hash", node, now)
		br := tx.SendBatch(ctx, b)
		var live []store.Session
		err := func() error {
			defer br.Close()
			tag, err := br.Exec()
			if err != nil {
				return err
			}
			if tag.RowsAffected() == 0 {
				return store.ErrNonceSpent
			}
			if n, err = scanNode(br.QueryRow()); err != nil {
				return err
			}
			rows, err := br.Query()
			if err != nil {
				return err
			}
			var rec []byte
			_, err = pgx.ForEachRow(rows, []any{&rec}, func() error {
				var sess store.Session
				if err := json.Unmarshal(rec, &sess); err != nil {
					return fmt.Errorf("session record: %w", err)
				}
				live = append(live, sess)
				return nil
			})
			return err
		}()
		if err != nil {
			return err
		}
		name, ek := n.Name, n.EKFingerprint
		out, err := fn(&n, live)
		if err != nil {
			return err
		}
		w := &pgx.Batch{}
		if out.EndAll {
			w.Queue("DELETE FROM sessions WHERE node = $1", node)
		} else if len(out.End) > 0 {
			w.Queue("DELETE FROM sessions WHERE node = $1 AND token_hash = ANY($2)", node, out.End)
		}
		if out.Open != nil {
			if out.Open.Node != node {
				return fmt.Errorf("store: session for node %q opened in an appraisal of %q", out.Open.Node, node)
			}
			rec, err := json.Marshal(out.Open)
			if err != nil {
				return err
			}
			w.Queue("INSERT INTO sessions (token_hash, node, expires, record) VALUES ($1, $2, $3, $4)",
				out.Open.TokenHash, node, out.Open.Expires, rec)
		}
		if n.Name != name || n.EKFingerprint != ek {
			return fmt.Errorf("store: an appraisal of node %q may not change its name or EK", node)
		}
		rec, err := json.Marshal(n)
		if err != nil {
			return err
		}
		w.Queue("UPDATE nodes SET state = $2, enrolled_at = $3, record = $4 WHERE name = $1", node, string(n.State), n.EnrolledAt, rec)
		return tx.SendBatch(ctx, w).Close()
	})
	return n, err
}

// GetSession implements store.Store.
func (s *Store) GetSession(ctx context.Context, hash []byte) (store.Session, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var sess store.Session
	var rec []byte
	if err := s.pool.QueryRow(ctx, "SELECT record FROM sessions WHERE token_hash = $1", hash).Scan(&rec); err != nil {
		return sess, notFound(err)
	}
	if err := json.Unmarshal(rec, &sess); err != nil {
		return sess, fmt.Errorf("session record: %w", err)
	}
	return sess, nil
}

// NodeSessions implements store.Store.
func (s *Store) NodeSessions(ctx context.Context, node string, now time.Time) ([]store.Session, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	return queryRecords[store.Session](ctx, s.pool,
		"SELECT record FROM sessions WHERE node = $1 AND expires > $2 ORDER BY token_hash", node, now)
}

// DeleteNodeSessions implements store.Store.
func (s *Store) DeleteNodeSessions(ctx context.Context, node string) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	_, err := s.pool.Exec(ctx, "DELETE FROM sessions WHERE node = $1", node)
	return err
}

// Stats implements store.Store. Bytes is the size of the store's tables
// with their indexes and TOAST data, not of the whole database.
func (s *Store) Stats(ctx context.Context, now time.Time) (store.Stats, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var st store.Stats
	err := s.pool.QueryRow(ctx, `SELECT
		(SELECT count(*) FROM sessions WHERE expires > $1),
		(SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c
			JOIN pg_namespace ns ON ns.oid = c.relnamespace
			WHERE ns.nspname = current_schema() AND c.relkind = 'r')`, now).Scan(&st.LiveSessions, &st.Bytes)
	return st, err
}

// Expire implements store.Store, in one transaction.
func (s *Store) Expire(ctx context.Context, now, pendingBefore time.Time) error {
	return s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		b := &pgx.Batch{}
		b.Queue("DELETE FROM nodes WHERE state = $1 AND enrolled_at < $2", string(store.NodePending), pendingBefore)
		// Spent nonces are kept until the nonces themselves expire.
		for _, table := range []string{"spent_nonces", "sessions", "enrollments", "join_tokens"} {
			b.Queue("DELETE FROM "+table+" WHERE expires < $1", now)
		}
		b.Queue("DELETE FROM pending WHERE expires <= $1", now)
		return tx.SendBatch(ctx, b).Close()
	})
}
