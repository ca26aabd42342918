package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/attested-dev/attested/broker/auditchain"
	bolterrors "go.etcd.io/bbolt/errors"
)

var (
	bucketNodes     = []byte("nodes")
	bucketEKs       = []byte("eks")
	bucketEnroll    = []byte("enrollments")
	bucketJoin      = []byte("jointokens")
	bucketNonces    = []byte("nonces")
	bucketSessions  = []byte("sessions")
	bucketNodeSess  = []byte("nodesessions")
	bucketKeys      = []byte("keys")
	bucketPolicies  = []byte("policies")
	bucketAudit     = []byte("audit")
	allBuckets      = [][]byte{bucketNodes, bucketEKs, bucketEnroll, bucketJoin, bucketNonces, bucketSessions, bucketNodeSess, bucketKeys, bucketPolicies, bucketAudit}
	openLockTimeout = 5 * time.Second
)

// Bolt is the embedded store: one bbolt file, crash-safe by bbolt's
// copy-on-write pages and fsync on commit.
type Bolt struct {
	db *bolt.DB

	auditMu    sync.Mutex
	auditQueue []auditReq
	auditBusy  bool
	auditKey   *auditchain.Key // set by StartAuditChain, under auditMu
}

// OpenBolt opens (creating if needed) the database at path with mode 0600.
func OpenBolt(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: openLockTimeout})
	if errors.Is(err, bolterrors.ErrTimeout) {
		// bbolt holds an exclusive lock on the file while open.
		return nil, fmt.Errorf("store: %s is in use: another broker serves this data directory (a second one cannot share its embedded store; use a PostgreSQL store for replicas)", path)
	}
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("store: init %s: %w", path, err)
	}
	return &Bolt{db: db}, nil
}

// Close closes the database.
func (s *Bolt) Close() error { return s.db.Close() }

func put(b *bolt.Bucket, k []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(k, data)
}

func get(b *bolt.Bucket, k []byte, v any) error {
	data := b.Get(k)
	if data == nil {
		return ErrNotFound
	}
	return json.Unmarshal(data, v)
}

func (s *Bolt) update(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.Update(fn)
}

func (s *Bolt) view(ctx context.Context, fn func(tx *bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.View(fn)
}

// CreateNode implements Store.
func (s *Bolt) CreateNode(ctx context.Context, n Node) error {
	return s.update(ctx, func(tx *bolt.Tx) error { return createNode(tx, n) })
}

// GetNode implements Store.
func (s *Bolt) GetNode(ctx context.Context, name string) (Node, error) {
	var n Node
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return get(tx.Bucket(bucketNodes), []byte(name), &n)
	})
	return n, err
}

// GetNodeByEK implements Store.
func (s *Bolt) GetNodeByEK(ctx context.Context, fp string) (Node, error) {
	var n Node
	err := s.view(ctx, func(tx *bolt.Tx) error {
		name := tx.Bucket(bucketEKs).Get([]byte(fp))
		if name == nil {
			return ErrNotFound
		}
		return get(tx.Bucket(bucketNodes), name, &n)
	})
	return n, err
}

// ListNodes implements Store.
func (s *Bolt) ListNodes(ctx context.Context) ([]Node, error) {
	var out []Node
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketNodes).ForEach(func(_, v []byte) error {
			var n Node
			if err := json.Unmarshal(v, &n); err != nil {
				return err
			}
			out = append(out, n)
			return nil
		})
	})
	return out, err
}

// UpdateNode implements Store.
func (s *Bolt) UpdateNode(ctx context.Context, name string, fn func(*Node) error) (Node, error) {
	var n Node
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketNodes)
		if err := get(b, []byte(name), &n); err != nil {
			return err
		}
		if err := fn(&n); err != nil {
			return err
		}
		return put(b, []byte(name), n)
	})
	return n, err
}

// DeleteNode implements Store.
func (s *Bolt) DeleteNode(ctx context.Context, name string) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		var n Node
		if err := get(tx.Bucket(bucketNodes), []byte(name), &n); err != nil {
			return err
		}
		if err := tx.Bucket(bucketEKs).Delete([]byte(n.EKFingerprint)); err != nil {
			return err
		}
		if err := deleteNodeSessions(tx, name); err != nil {
			return err
		}
		return tx.Bucket(bucketNodes).Delete([]byte(name))
	})
}

// TakeEnrollment implements Store.
func (s *Bolt) TakeEnrollment(ctx context.Context, id string) (Enrollment, error) {
	var e Enrollment
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketEnroll)
		if err := get(b, []byte(id), &e); err != nil {
			return err
		}
		return b.Delete([]byte(id))
	})
	return e, err
}

// PutJoinToken implements Store.
func (s *Bolt) PutJoinToken(ctx context.Context, hash []byte, expires time.Time) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		return put(tx.Bucket(bucketJoin), hash, expires)
	})
}

// ConsumeJoinToken implements Store.
func (s *Bolt) ConsumeJoinToken(ctx context.Context, hash []byte, now time.Time) (bool, error) {
	ok := false
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketJoin)
		var exp time.Time
		if err := get(b, hash, &exp); err != nil {
			if err == ErrNotFound {
				return nil
			}
			return err
		}
		ok = now.Before(exp)
		return b.Delete(hash)
	})
	return ok, err
}

// JoinTokenValid implements Store.
func (s *Bolt) JoinTokenValid(ctx context.Context, hash []byte, now time.Time) (bool, error) {
	ok := false
	err := s.view(ctx, func(tx *bolt.Tx) error {
		var exp time.Time
		switch err := get(tx.Bucket(bucketJoin), hash, &exp); err {
		case nil:
			ok = now.Before(exp)
		case ErrNotFound:
		default:
			return err
		}
		return nil
	})
	return ok, err
}

// Appraise implements Store.
func (s *Bolt) Appraise(ctx context.Context, node string, nonce SpentNonce, now time.Time, fn func(*Node, []Session) (Outcome, error)) (Node, error) {
	var n Node
	err := s.update(ctx, func(tx *bolt.Tx) error {
		spent := tx.Bucket(bucketNonces)
		if spent.Get(nonce.Nonce) != nil {
			return ErrNonceSpent
		}
		if err := put(spent, nonce.Nonce, struct {
			Expires time.Time `json:"expires"`
		}{nonce.Expires}); err != nil {
			return err
		}
		nodes := tx.Bucket(bucketNodes)
		if err := get(nodes, []byte(node), &n); err != nil {
			return err
		}
		live, err := nodeSessions(tx, node, now)
		if err != nil {
			return err
		}
		out, err := fn(&n, live)
		if err != nil {
			return err
		}
		if out.EndAll {
			if err := deleteNodeSessions(tx, node); err != nil {
				return err
			}
		}
		for _, h := range out.End {
			if err := deleteSession(tx, node, h); err != nil {
				return err
			}
		}
		if out.Open != nil {
			if out.Open.Node != node {
				return fmt.Errorf("store: session for node %q opened in an appraisal of %q", out.Open.Node, node)
			}
			if err := tx.Bucket(bucketNodeSess).Put(nodeSessKey(node, out.Open.TokenHash), nil); err != nil {
				return err
			}
			if err := put(tx.Bucket(bucketSessions), out.Open.TokenHash, out.Open); err != nil {
				return err
			}
		}
		return put(nodes, []byte(node), n)
	})
	return n, err
}

// NodeSessions implements Store.
func (s *Bolt) NodeSessions(ctx context.Context, node string, now time.Time) ([]Session, error) {
	var out []Session
	err := s.view(ctx, func(tx *bolt.Tx) error {
		var err error
		out, err = nodeSessions(tx, node, now)
		return err
	})
	return out, err
}

// Stats implements Store.
func (s *Bolt) Stats(ctx context.Context, now time.Time) (Stats, error) {
	var st Stats
	err := s.view(ctx, func(tx *bolt.Tx) error {
		st.Bytes = tx.Size()
		return tx.Bucket(bucketSessions).ForEach(func(_, v []byte) error {
			var sess struct {
				Expires time.Time `json:"expires"`
			}
			if json.Unmarshal(v, &sess) == nil && now.Before(sess.Expires) {
				st.LiveSessions++
			}
			return nil
		})
	})
	return st, err
}

// nodeSessions returns a node's sessions that have not expired.
func nodeSessions(tx *bolt.Tx, node string, now time.Time) ([]Session, error) {
	idx, sessions := tx.Bucket(bucketNodeSess), tx.Bucket(bucketSessions)
	prefix := append([]byte(node), 0)
	var out []Session
	c := idx.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		var sess Session
		switch err := get(sessions, k[len(prefix):], &sess); err {
		case nil:
			if now.Before(sess.Expires) {
				out = append(out, sess)
			}
		case ErrNotFound:
		default:
			return nil, err
		}
	}
	return out, nil
}

func deleteSession(tx *bolt.Tx, node string, hash []byte) error {
	if err := tx.Bucket(bucketSessions).Delete(hash); err != nil {
		return err
	}
	return tx.Bucket(bucketNodeSess).Delete(nodeSessKey(node, hash))
}

func nodeSessKey(node string, hash []byte) []byte {
	return append(append([]byte(node), 0), hash...)
}

// GetSession implements Store.
func (s *Bolt) GetSession(ctx context.Context, hash []byte) (Session, error) {
	var sess Session
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return get(tx.Bucket(bucketSessions), hash, &sess)
	})
	return sess, err
}

// DeleteNodeSessions implements Store.
func (s *Bolt) DeleteNodeSessions(ctx context.Context, node string) error {
	return s.update(ctx, func(tx *bolt.Tx) error { return deleteNodeSessions(tx, node) })
}

func deleteNodeSessions(tx *bolt.Tx, node string) error {
	idx, sessions := tx.Bucket(bucketNodeSess), tx.Bucket(bucketSessions)
	prefix := append([]byte(node), 0)
	var keys [][]byte
	c := idx.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		keys = append(keys, bytes.Clone(k))
	}
	for _, k := range keys {
		if err := sessions.Delete(k[len(prefix):]); err != nil {
			return err
		}
		if err := idx.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// Expire implements Store.
func (s *Bolt) Expire(ctx context.Context, now, pendingBefore time.Time) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		nodes := tx.Bucket(bucketNodes)
		var stale []Node
		err := nodes.ForEach(func(_, v []byte) error {
			var n Node
			if json.Unmarshal(v, &n) == nil && n.State == NodePending && n.EnrolledAt.Before(pendingBefore) {
				stale = append(stale, n)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, n := range stale {
			if err := tx.Bucket(bucketEKs).Delete([]byte(n.EKFingerprint)); err != nil {
				return err
			}
			if err := nodes.Delete([]byte(n.Name)); err != nil {
				return err
			}
		}
		// Spent nonces are kept until the nonces themselves expire.
		for _, name := range [][]byte{bucketNonces, bucketSessions, bucketEnroll, bucketJoin} {
			if err := expireBucket(tx, name, now); err != nil {
				return err
			}
		}
		return expirePending(tx, now)
	})
}

// expireBucket deletes records whose "expires" is past. Join tokens are
// stored as a bare time; everything else as an object with "expires".
func expireBucket(tx *bolt.Tx, name []byte, now time.Time) error {
	b := tx.Bucket(name)
	var dead, deadIdx [][]byte
	err := b.ForEach(func(k, v []byte) error {
		var rec struct {
			Expires time.Time `json:"expires"`
			Node    string    `json:"node"`
		}
		if bytes.Equal(name, bucketJoin) {
			if json.Unmarshal(v, &rec.Expires) != nil {
				return nil
			}
		} else if json.Unmarshal(v, &rec) != nil {
			return nil
		}
		if now.After(rec.Expires) {
			dead = append(dead, bytes.Clone(k))
			if bytes.Equal(name, bucketSessions) {
				deadIdx = append(deadIdx, nodeSessKey(rec.Node, k))
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, k := range dead {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	for _, k := range deadIdx {
		if err := tx.Bucket(bucketNodeSess).Delete(k); err != nil {
			return err
		}
	}
	return nil
}
