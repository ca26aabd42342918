package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
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

func keyID(name string, version uint32) []byte {
	k := append([]byte(name), 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(k[len(name)+1:], version)
	return k
}

// CreateKey implements Store.
func (s *Bolt) CreateKey(ctx context.Context, k Key) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		id := keyID(k.Name, k.Version)
		if b.Get(id) != nil {
			return fmt.Errorf("key %s version %d: %w", k.Name, k.Version, ErrExists)
		}
		return put(b, id, k)
	})
}

// GetKey implements Store.
func (s *Bolt) GetKey(ctx context.Context, name string, version uint32) (Key, error) {
	var k Key
	err := s.view(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		if version != 0 {
			return get(b, keyID(name, version), &k)
		}
		prefix := append([]byte(name), 0)
		c := b.Cursor()
		var last []byte
		for kk, v := c.Seek(prefix); kk != nil && bytes.HasPrefix(kk, prefix) && len(kk) == len(prefix)+4; kk, v = c.Next() {
			last = v
		}
		if last == nil {
			return ErrNotFound
		}
		return json.Unmarshal(last, &k)
	})
	return k, err
}

// ListKeys implements Store.
func (s *Bolt) ListKeys(ctx context.Context) ([]Key, error) {
	var out []Key
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketKeys).ForEach(func(_, v []byte) error {
			var k Key
			if err := json.Unmarshal(v, &k); err != nil {
				return err
			}
			out = append(out, k)
			return nil
		})
	})
	return out, err
}

// PutPolicy implements Store.
func (s *Bolt) PutPolicy(ctx context.Context, p Policy) (Policy, error) {
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketPolicies)
		var old Policy
		switch err := get(b, []byte(p.Name), &old); err {
		case nil:
			p.Revision = old.Revision + 1
		case ErrNotFound:
			p.Revision = 1
		default:
			return err
		}
		return put(b, []byte(p.Name), p)
	})
	return p, err
}

// GetPolicy implements Store.
func (s *Bolt) GetPolicy(ctx context.Context, name string) (Policy, error) {
	var p Policy
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return get(tx.Bucket(bucketPolicies), []byte(name), &p)
	})
	return p, err
}

// ListPolicies implements Store.
func (s *Bolt) ListPolicies(ctx context.Context) ([]Policy, error) {
	var out []Policy
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPolicies).ForEach(func(_, v []byte) error {
			var p Policy
			if err := json.Unmarshal(v, &p); err != nil {
				return err
			}
			out = append(out, p)
			return nil
		})
	})
	return out, err
}

// AppendAudit implements Store. It returns once the event is committed.
// Events from concurrent callers are group-committed: one writer takes
// everything queued, commits it in one transaction (one fsync), and starts
// over, so a lone call pays one commit and a burst does not queue for one
// fsync each. (bbolt's own Batch waits up to 10 ms to gather a batch, which
// is what every sequential release would pay.)
func (s *Bolt) AppendAudit(ctx context.Context, ev AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	req := auditReq{ev: ev, done: make(chan error, 1)}
	s.auditMu.Lock()
	s.auditQueue = append(s.auditQueue, req)
	start := !s.auditBusy
	s.auditBusy = true
	s.auditMu.Unlock()
	if start {
		go s.commitAudit()
	}
	return <-req.done
}

type auditReq struct {
	ev   AuditEvent
	done chan error
}

func (s *Bolt) commitAudit() {
	for {
		s.auditMu.Lock()
		batch := s.auditQueue
		s.auditQueue = nil
		if len(batch) == 0 {
			s.auditBusy = false
			s.auditMu.Unlock()
			return
		}
		s.auditMu.Unlock()
		err := s.db.Update(func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketAudit)
			for _, r := range batch {
				seq, err := b.NextSequence()
				if err != nil {
					return err
				}
				r.ev.Seq = seq
				k := make([]byte, 8)
				binary.BigEndian.PutUint64(k, seq)
				if err := put(b, k, r.ev); err != nil {
					return err
				}
			}
			return nil
		})
		for _, r := range batch {
			r.done <- err
		}
	}
}

// ListAudit implements Store.
func (s *Bolt) ListAudit(ctx context.Context, f AuditFilter) ([]AuditEvent, error) {
	var out []AuditEvent
	err := s.view(ctx, func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAudit).Cursor()
		for k, v := c.Last(); k != nil; k, v = c.Prev() {
			var ev AuditEvent
			if err := json.Unmarshal(v, &ev); err != nil {
				return err
			}
			if (f.Node != "" && ev.Node != f.Node) || (f.Kind != "" && ev.Kind != f.Kind) {
				continue
			}
			out = append(out, ev)
			if f.Limit > 0 && len(out) >= f.Limit {
				break
			}
		}
		return nil
	})
	// Collected newest first; callers read oldest first.
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, err
}
