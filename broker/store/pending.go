package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Buckets of enrollment bookkeeping. They are created on first write, so
// databases from before them open unchanged; a missing bucket reads empty.
var (
	// bucketPending maps an EK fingerprint to its PendingEnrollment: one
	// pending enrollment per TPM, a newer one replacing it.
	bucketPending = []byte("pending")
	// bucketEnrollExp maps an in-flight enrollment's id to its expiry
	// (Unix nanoseconds), so counting them decodes nothing large.
	bucketEnrollExp = []byte("enrollexpiry")
)

// createNode is CreateNode inside a transaction.
func createNode(tx *bolt.Tx, n Node) error {
	nodes, eks := tx.Bucket(bucketNodes), tx.Bucket(bucketEKs)
	if owner := eks.Get([]byte(n.EKFingerprint)); owner != nil {
		return fmt.Errorf("this TPM's EK is already enrolled as node %q: %w", owner, ErrExists)
	}
	if nodes.Get([]byte(n.Name)) != nil {
		return fmt.Errorf("node name %q is enrolled with another TPM (EK): %w", n.Name, ErrExists)
	}
	if err := eks.Put([]byte(n.EKFingerprint), []byte(n.Name)); err != nil {
		return err
	}
	return put(nodes, []byte(n.Name), n)
}

// PutEnrollment implements Store.
func (s *Bolt) PutEnrollment(ctx context.Context, e Enrollment, limit int, now time.Time) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		enr := tx.Bucket(bucketEnroll)
		idx, err := tx.CreateBucketIfNotExists(bucketEnrollExp)
		if err != nil {
			return err
		}
		// Taken or expired enrollments leave index entries behind; they
		// are dropped here, so the index stays as small as the limit.
		var dead [][]byte
		live := 0
		err = idx.ForEach(func(k, v []byte) error {
			if len(v) != 8 || enr.Get(k) == nil || !now.Before(time.Unix(0, int64(binary.BigEndian.Uint64(v)))) {
				dead = append(dead, bytes.Clone(k))
			} else {
				live++
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range dead {
			if err := enr.Delete(k); err != nil {
				return err
			}
			if err := idx.Delete(k); err != nil {
				return err
			}
		}
		if limit > 0 && live >= limit {
			return fmt.Errorf("%d enrollments are in flight: %w", live, ErrLimit)
		}
		exp := make([]byte, 8)
		binary.BigEndian.PutUint64(exp, uint64(e.Expires.UnixNano()))
		if err := idx.Put([]byte(e.ID), exp); err != nil {
			return err
		}
		return put(enr, []byte(e.ID), e)
	})
}

// EnrollNode implements Store.
func (s *Bolt) EnrollNode(ctx context.Context, n Node, joinTokenHash []byte, now time.Time) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		if joinTokenHash != nil {
			var exp time.Time
			switch err := get(tx.Bucket(bucketJoin), joinTokenHash, &exp); err {
			case nil:
				if !now.Before(exp) {
					return ErrJoinToken
				}
			case ErrNotFound:
				return ErrJoinToken
			default:
				return err
			}
			if err := tx.Bucket(bucketJoin).Delete(joinTokenHash); err != nil {
				return err
			}
		}
		// An error here rolls the transaction back: the token is not spent.
		if err := createNode(tx, n); err != nil {
			return err
		}
		return supersedePending(tx, n.Name, n.EKFingerprint)
	})
}

// supersedePending drops the pending enrollments a new node makes moot:
// those of its name and that of its EK.
func supersedePending(tx *bolt.Tx, name, fp string) error {
	b := tx.Bucket(bucketPending)
	if b == nil {
		return nil
	}
	dead := [][]byte{[]byte(fp)}
	err := b.ForEach(func(k, v []byte) error {
		var p PendingEnrollment
		if json.Unmarshal(v, &p) != nil || p.Node.Name == name {
			dead = append(dead, bytes.Clone(k))
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
	return nil
}

// AddPending implements Store.
func (s *Bolt) AddPending(ctx context.Context, p PendingEnrollment, lim PendingLimits, now time.Time) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		n := p.Node
		if owner := tx.Bucket(bucketEKs).Get([]byte(n.EKFingerprint)); owner != nil {
			return fmt.Errorf("this TPM's EK is already enrolled as node %q: %w", owner, ErrExists)
		}
		if tx.Bucket(bucketNodes).Get([]byte(n.Name)) != nil {
			return fmt.Errorf("node name %q is enrolled with another TPM (EK): %w", n.Name, ErrExists)
		}
		b, err := tx.CreateBucketIfNotExists(bucketPending)
		if err != nil {
			return err
		}
		var dead [][]byte
		total, perName := 0, 0
		err = b.ForEach(func(k, v []byte) error {
			var old PendingEnrollment
			switch {
			case json.Unmarshal(v, &old) != nil || !now.Before(old.Expires):
				dead = append(dead, bytes.Clone(k))
			case string(k) == n.EKFingerprint:
				// Replaced below; it does not count.
			default:
				total++
				if old.Node.Name == n.Name {
					perName++
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
		if lim.PerName > 0 && perName >= lim.PerName {
			return fmt.Errorf("%d enrollments of node %q are already waiting for approval: %w", perName, n.Name, ErrLimit)
		}
		if lim.Total > 0 && total >= lim.Total {
			return fmt.Errorf("%d enrollments are already waiting for approval: %w", total, ErrLimit)
		}
		return put(b, []byte(n.EKFingerprint), p)
	})
}

// ListPending implements Store.
func (s *Bolt) ListPending(ctx context.Context, now time.Time) ([]PendingEnrollment, error) {
	var out []PendingEnrollment
	err := s.view(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketPending)
		if b == nil {
			return nil
		}
		return b.ForEach(func(_, v []byte) error {
			var p PendingEnrollment
			if err := json.Unmarshal(v, &p); err != nil {
				return err
			}
			if now.Before(p.Expires) {
				out = append(out, p)
			}
			return nil
		})
	})
	sort.SliceStable(out, func(i, j int) bool { return out[i].Node.EnrolledAt.Before(out[j].Node.EnrolledAt) })
	return out, err
}

// ApprovePending implements Store.
func (s *Bolt) ApprovePending(ctx context.Context, name, fp string, now time.Time) (Node, error) {
	var n Node
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketPending)
		if b == nil {
			return ErrNotFound
		}
		var p PendingEnrollment
		if err := get(b, []byte(fp), &p); err != nil {
			return err
		}
		if p.Node.Name != name || !now.Before(p.Expires) {
			return ErrNotFound
		}
		n = p.Node
		n.State = NodeActive
		if err := createNode(tx, n); err != nil {
			return err
		}
		return supersedePending(tx, n.Name, n.EKFingerprint)
	})
	return n, err
}

// DeletePending implements Store.
func (s *Bolt) DeletePending(ctx context.Context, name, fp string) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketPending)
		if b == nil {
			return ErrNotFound
		}
		var p PendingEnrollment
		if err := get(b, []byte(fp), &p); err != nil {
			return err
		}
		if p.Node.Name != name {
			return ErrNotFound
		}
		return b.Delete([]byte(fp))
	})
}

// expirePending drops pending enrollments past their expiry.
func expirePending(tx *bolt.Tx, now time.Time) error {
	b := tx.Bucket(bucketPending)
	if b == nil {
		return nil
	}
	var dead [][]byte
	err := b.ForEach(func(k, v []byte) error {
		var p PendingEnrollment
		if json.Unmarshal(v, &p) != nil || !now.Before(p.Expires) {
			dead = append(dead, bytes.Clone(k))
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
	return nil
}
