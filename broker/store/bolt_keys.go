package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Key versions live in bucketKeys under keyID(name, version), so a key's
// versions are adjacent and in order. Their release and refusal counts
// live apart, in bucketKeyCounts under the same ID (two big-endian uint64),
// so counting a release rewrites 16 bytes, not the sealed key. Every
// revision of a policy is kept in bucketPolicyRevs under name, 0, revision
// (big-endian uint32); bucketPolicies holds the current one. Both buckets
// are created by the first write that needs them.
var (
	bucketKeyCounts  = []byte("keycounts")
	bucketPolicyRevs = []byte("policyrevisions")
)

func keyID(name string, version uint32) []byte {
	k := append([]byte(name), 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(k[len(name)+1:], version)
	return k
}

// keyVersions calls fn for every version of a key, oldest first.
func keyVersions(b *bolt.Bucket, name string, fn func(id []byte, k Key) error) error {
	prefix := append([]byte(name), 0)
	c := b.Cursor()
	for id, v := c.Seek(prefix); id != nil && bytes.HasPrefix(id, prefix); id, v = c.Next() {
		if len(id) != len(prefix)+4 {
			continue
		}
		var k Key
		if err := json.Unmarshal(v, &k); err != nil {
			return fmt.Errorf("key %s: %w", id[:len(prefix)-1], err)
		}
		if err := fn(bytes.Clone(id), k); err != nil {
			return err
		}
	}
	return nil
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

// KeyVersions implements Store.
func (s *Bolt) KeyVersions(ctx context.Context, name string) ([]KeyVersion, error) {
	var out []KeyVersion
	err := s.view(ctx, func(tx *bolt.Tx) error {
		counts := tx.Bucket(bucketKeyCounts)
		err := keyVersions(tx.Bucket(bucketKeys), name, func(id []byte, k Key) error {
			kv := KeyVersion{Key: k}
			if counts != nil {
				kv.Releases, kv.Refusals = decodeCounts(counts.Get(id))
			}
			out = append(out, kv)
			return nil
		})
		if err == nil && len(out) == 0 {
			return ErrNotFound
		}
		return err
	})
	return out, err
}

func decodeCounts(v []byte) (releases, refusals uint64) {
	if len(v) != 16 {
		return 0, 0
	}
	return binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:])
}

// countRelease adds a release or refusal to a key version's counts, in
// the audit append's transaction; records of versions that do not exist
// count nowhere, so a caller naming made-up versions grows nothing.
func countRelease(tx *bolt.Tx, ev AuditEvent) error {
	release, refusal := CountsRelease(ev)
	if !release && !refusal {
		return nil
	}
	id := keyID(ev.Key, ev.KeyVersion)
	if tx.Bucket(bucketKeys).Get(id) == nil {
		return nil
	}
	b, err := tx.CreateBucketIfNotExists(bucketKeyCounts)
	if err != nil {
		return err
	}
	rel, ref := decodeCounts(b.Get(id))
	if release {
		rel++
	} else {
		ref++
	}
	v := binary.BigEndian.AppendUint64(make([]byte, 0, 16), rel)
	return b.Put(id, binary.BigEndian.AppendUint64(v, ref))
}

// DisableKey implements Store.
func (s *Bolt) DisableKey(ctx context.Context, name string, version uint32, at time.Time) ([]Key, []uint32, error) {
	var all []Key
	var disabled []uint32
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		found := false
		err := keyVersions(b, name, func(id []byte, k Key) error {
			if version == 0 || k.Version == version {
				found = true
				if k.Disabled.IsZero() {
					k.Disabled = at
					disabled = append(disabled, k.Version)
					if err := put(b, id, k); err != nil {
						return err
					}
				}
			}
			all = append(all, k)
			return nil
		})
		if err != nil {
			return err
		}
		if !found {
			return ErrNotFound
		}
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	return all, disabled, nil
}

func policyRevID(name string, rev uint32) []byte { return keyID(name, rev) }

// PutPolicy implements Store.
func (s *Bolt) PutPolicy(ctx context.Context, p Policy) (Policy, error) {
	err := s.update(ctx, func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketPolicies)
		var old Policy
		switch err := get(b, []byte(p.Name), &old); err {
		case nil:
			if old.YAML == p.YAML {
				p = old
				return nil
			}
			p.Revision = old.Revision + 1
		case ErrNotFound:
			p.Revision = 1
		default:
			return err
		}
		revs, err := tx.CreateBucketIfNotExists(bucketPolicyRevs)
		if err != nil {
			return err
		}
		if err := put(revs, policyRevID(p.Name, p.Revision), p); err != nil {
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

// PolicyRevisions implements Store. A policy last applied by a broker that
// kept no history has its current revision only.
func (s *Bolt) PolicyRevisions(ctx context.Context, name string) ([]Policy, error) {
	var out []Policy
	err := s.view(ctx, func(tx *bolt.Tx) error {
		var cur Policy
		if err := get(tx.Bucket(bucketPolicies), []byte(name), &cur); err != nil {
			return err
		}
		if revs := tx.Bucket(bucketPolicyRevs); revs != nil {
			prefix := append([]byte(name), 0)
			c := revs.Cursor()
			for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
				if len(k) != len(prefix)+4 {
					continue
				}
				var p Policy
				if err := json.Unmarshal(v, &p); err != nil {
					return fmt.Errorf("policy %s revision %d: %w", name, binary.BigEndian.Uint32(k[len(prefix):]), err)
				}
				out = append(out, p)
			}
		}
		if len(out) == 0 || out[len(out)-1].Revision != cur.Revision {
			out = append(out, cur)
		}
		return nil
	})
	return out, err
}
