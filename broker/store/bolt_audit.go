package store

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/attested-dev/attested/broker/auditchain"
)

// Audit records live in bucketAudit under their big-endian sequence
// number; the chain's checkpoint in bucketAuditChain under
// checkpointKey, rewritten in every transaction that appends records.
var (
	bucketAuditChain = []byte("auditchain")
	checkpointKey    = []byte("checkpoint")
)

var errNoAuditChain = errors.New("store: the audit chain was not started (StartAuditChain)")

// StartAuditChain implements Store.
func (s *Bolt) StartAuditChain(ctx context.Context, k *auditchain.Key, now time.Time) error {
	if k == nil {
		return errors.New("store: no audit key")
	}
	err := s.update(ctx, func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketAuditChain)
		if err != nil {
			return err
		}
		if meta.Get(checkpointKey) != nil {
			return nil
		}
		audit := tx.Bucket(bucketAudit)
		return put(meta, checkpointKey, k.Start(audit.Sequence()+1, uint64(audit.Stats().KeyN), now))
	})
	if err != nil {
		return err
	}
	s.auditMu.Lock()
	s.auditKey = k
	s.auditMu.Unlock()
	return nil
}

// AppendAudit implements Store. It returns once the event is committed.
// Events from concurrent callers are group-committed: one writer takes
// everything queued, chains it in queue order and commits it in one
// transaction (one fsync), and starts over, so a lone call pays one commit
// and a burst does not queue for one fsync each. (bbolt's own Batch waits
// up to 10 ms to gather a batch, which is what every sequential release
// would pay.)
func (s *Bolt) AppendAudit(ctx context.Context, ev AuditEvent) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	req := auditReq{ev: ev, done: make(chan error, 1)}
	s.auditMu.Lock()
	if s.auditKey == nil {
		s.auditMu.Unlock()
		return errNoAuditChain
	}
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
		batch, key := s.auditQueue, s.auditKey
		s.auditQueue = nil
		if len(batch) == 0 {
			s.auditBusy = false
			s.auditMu.Unlock()
			return
		}
		s.auditMu.Unlock()
		err := s.db.Update(func(tx *bolt.Tx) error { return appendAudit(tx, key, batch) })
		for _, r := range batch {
			r.done <- err
		}
	}
}

// appendAudit chains and writes a batch of records, their key versions'
// counts and the new checkpoint, in one transaction.
func appendAudit(tx *bolt.Tx, key *auditchain.Key, batch []auditReq) error {
	meta := tx.Bucket(bucketAuditChain)
	if meta == nil {
		return errNoAuditChain
	}
	var cp auditchain.Checkpoint
	if err := get(meta, checkpointKey, &cp); errors.Is(err, ErrNotFound) {
		return errNoAuditChain
	} else if err != nil {
		return err
	}
	chain := key.Resume(cp)
	b := tx.Bucket(bucketAudit)
	for _, r := range batch {
		ev := r.ev.Stored() // JSON would change invalid UTF-8 after it was hashed
		seq, err := b.NextSequence()
		if err != nil {
			return err
		}
		ev.Seq = seq
		if ev.Chain, err = chain.Append(ev.Entry()); err != nil {
			return err
		}
		if err := put(b, binary.BigEndian.AppendUint64(nil, seq), ev); err != nil {
			return err
		}
		if err := countRelease(tx, ev); err != nil {
			return err
		}
	}
	return put(meta, checkpointKey, chain.Checkpoint())
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
			if !f.Matches(ev) {
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

// ScanAudit implements Store.
func (s *Bolt) ScanAudit(ctx context.Context, fn func(seq uint64, ev AuditEvent, decodeErr error) error) (*auditchain.Checkpoint, error) {
	var cp *auditchain.Checkpoint
	err := s.view(ctx, func(tx *bolt.Tx) error {
		if meta := tx.Bucket(bucketAuditChain); meta != nil {
			var c auditchain.Checkpoint
			switch err := get(meta, checkpointKey, &c); {
			case err == nil:
				cp = &c
			case errors.Is(err, ErrNotFound):
			default:
				// A checkpoint that does not decode is passed as an
				// empty one, whose MAC does not verify.
				cp = &auditchain.Checkpoint{}
			}
		}
		c := tx.Bucket(bucketAudit).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if err := ctx.Err(); err != nil {
				return err
			}
			var seq uint64
			if len(k) == 8 {
				seq = binary.BigEndian.Uint64(k)
			}
			var ev AuditEvent
			err := json.Unmarshal(v, &ev)
			if err := fn(seq, ev, err); err != nil {
				return err
			}
		}
		return nil
	})
	return cp, err
}
