package store

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Webhooks live in bucket "webhooks" (ID -> Webhook, counters included);
// each webhook's outbox is a bucket of its own under "outbox", keyed by a
// big-endian sequence number, so the oldest delivery is the first key and
// removing a webhook drops its outbox in one step. The buckets are created
// by the first write that needs them.
var (
	bucketWebhooks = []byte("webhooks")
	bucketOutbox   = []byte("outbox")
)

// webhookBuckets returns the two buckets, creating them in a writable
// transaction; in a read-only one they are nil until the first write.
func webhookBuckets(tx *bolt.Tx) (hooks, outbox *bolt.Bucket, err error) {
	if !tx.Writable() {
		return tx.Bucket(bucketWebhooks), tx.Bucket(bucketOutbox), nil
	}
	if hooks, err = tx.CreateBucketIfNotExists(bucketWebhooks); err != nil {
		return nil, nil, err
	}
	outbox, err = tx.CreateBucketIfNotExists(bucketOutbox)
	return hooks, outbox, err
}

func seqKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64(nil, seq)
}

// CreateWebhook implements Store.
func (s *Bolt) CreateWebhook(ctx context.Context, w Webhook) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		hooks, outbox, err := webhookBuckets(tx)
		if err != nil {
			return err
		}
		if hooks.Get([]byte(w.ID)) != nil {
			return fmt.Errorf("webhook %q: %w", w.ID, ErrExists)
		}
		// A fresh webhook starts with an empty outbox and no history.
		w.Pending, w.Delivered, w.Failed, w.FailedAttempts = 0, 0, 0, 0
		w.LastError, w.LastErrorAt, w.LastDelivered = "", time.Time{}, time.Time{}
		if outbox.Bucket([]byte(w.ID)) != nil {
			if err := outbox.DeleteBucket([]byte(w.ID)); err != nil {
				return err
			}
		}
		if _, err := outbox.CreateBucket([]byte(w.ID)); err != nil {
			return err
		}
		return put(hooks, []byte(w.ID), w)
	})
}

// GetWebhook implements Store.
func (s *Bolt) GetWebhook(ctx context.Context, id string) (Webhook, error) {
	var w Webhook
	err := s.view(ctx, func(tx *bolt.Tx) error {
		hooks, _, _ := webhookBuckets(tx)
		if hooks == nil {
			return ErrNotFound
		}
		return get(hooks, []byte(id), &w)
	})
	return w, err
}

// ListWebhooks implements Store.
func (s *Bolt) ListWebhooks(ctx context.Context) ([]Webhook, error) {
	var out []Webhook
	err := s.view(ctx, func(tx *bolt.Tx) error {
		hooks, _, _ := webhookBuckets(tx)
		if hooks == nil {
			return nil
		}
		return hooks.ForEach(func(_, v []byte) error {
			var w Webhook
			if err := json.Unmarshal(v, &w); err != nil {
				return err
			}
			out = append(out, w)
			return nil
		})
	})
	return out, err
}

// DeleteWebhook implements Store.
func (s *Bolt) DeleteWebhook(ctx context.Context, id string) (Webhook, error) {
	var w Webhook
	err := s.update(ctx, func(tx *bolt.Tx) error {
		hooks, outbox, err := webhookBuckets(tx)
		if err != nil {
			return err
		}
		if err := get(hooks, []byte(id), &w); err != nil {
			return err
		}
		if outbox.Bucket([]byte(id)) != nil {
			if err := outbox.DeleteBucket([]byte(id)); err != nil {
				return err
			}
		}
		return hooks.Delete([]byte(id))
	})
	return w, err
}

// EnqueueEvent implements Store. When no webhook is subscribed to the
// event's kind it writes nothing (a read transaction, no fsync), so a broker
// without webhooks pays nothing for its events.
func (s *Bolt) EnqueueEvent(ctx context.Context, ev OutboxEvent, maxPending int) (Enqueued, error) {
	wanted := false
	err := s.view(ctx, func(tx *bolt.Tx) error {
		hooks, _, _ := webhookBuckets(tx)
		if hooks == nil {
			return nil
		}
		return hooks.ForEach(func(_, v []byte) error {
			var w Webhook
			if json.Unmarshal(v, &w) == nil && w.Subscribed(ev.Kind) {
				wanted = true
			}
			return nil
		})
	})
	if err != nil || !wanted {
		return Enqueued{}, err
	}
	var res Enqueued
	err = s.update(ctx, func(tx *bolt.Tx) error {
		res = Enqueued{}
		hooks, outbox, err := webhookBuckets(tx)
		if err != nil {
			return err
		}
		var subscribed []Webhook
		err = hooks.ForEach(func(_, v []byte) error {
			var w Webhook
			if err := json.Unmarshal(v, &w); err != nil {
				return err
			}
			if w.Subscribed(ev.Kind) {
				subscribed = append(subscribed, w)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, w := range subscribed {
			box, err := outbox.CreateBucketIfNotExists([]byte(w.ID))
			if err != nil {
				return err
			}
			dropped := uint64(0)
			for maxPending > 0 && w.Pending >= uint64(maxPending) {
				k, _ := box.Cursor().First()
				if k == nil {
					w.Pending = 0
					break
				}
				if err := box.Delete(k); err != nil {
					return err
				}
				w.Pending--
				dropped++
			}
			if dropped > 0 {
				if res.Dropped == nil {
					res.Dropped = map[string]uint64{}
				}
				res.Dropped[w.ID] = dropped
				w.Failed += dropped
				w.LastError = fmt.Sprintf("outbox full (%d pending): %d oldest undelivered event(s) dropped", maxPending, dropped)
				w.LastErrorAt = ev.Created
			}
			seq, err := box.NextSequence()
			if err != nil {
				return err
			}
			d := Delivery{EventID: ev.ID, Kind: ev.Kind, Payload: ev.Payload, Created: ev.Created, NextAttempt: ev.Created}
			if err := put(box, seqKey(seq), d); err != nil {
				return err
			}
			w.Pending++
			res.Queued++
			if err := put(hooks, []byte(w.ID), w); err != nil {
				return err
			}
		}
		return nil
	})
	return res, err
}

// NextDeliveries implements Store.
func (s *Bolt) NextDeliveries(ctx context.Context) ([]Delivery, error) {
	var out []Delivery
	err := s.view(ctx, func(tx *bolt.Tx) error {
		_, outbox, _ := webhookBuckets(tx)
		if outbox == nil {
			return nil
		}
		return outbox.ForEachBucket(func(id []byte) error {
			k, v := outbox.Bucket(id).Cursor().First()
			if k == nil {
				return nil
			}
			var d Delivery
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("outbox of webhook %q: %w", id, err)
			}
			d.Webhook, d.Seq = string(id), binary.BigEndian.Uint64(k)
			out = append(out, d)
			return nil
		})
	})
	return out, err
}

// RecordAttempt implements Store.
func (s *Bolt) RecordAttempt(ctx context.Context, d Delivery, a Attempt) error {
	return s.update(ctx, func(tx *bolt.Tx) error {
		hooks, outbox, err := webhookBuckets(tx)
		if err != nil {
			return err
		}
		var w Webhook
		if err := get(hooks, []byte(d.Webhook), &w); err != nil {
			return err
		}
		box := outbox.Bucket([]byte(d.Webhook))
		if box == nil {
			return ErrNotFound
		}
		k := seqKey(d.Seq)
		var cur Delivery
		if err := get(box, k, &cur); err != nil {
			return err
		}
		switch a.Outcome {
		case Delivered:
			w.Delivered++
			w.LastDelivered = a.Time
		case RetryLater, GiveUp:
			w.FailedAttempts++
			w.LastError, w.LastErrorAt = a.Error, a.Time
		default:
			return fmt.Errorf("store: unknown delivery outcome %d", a.Outcome)
		}
		if a.Outcome == RetryLater {
			cur.Attempts++
			cur.NextAttempt = a.NextAttempt
			if err := put(box, k, cur); err != nil {
				return err
			}
		} else {
			if err := box.Delete(k); err != nil {
				return err
			}
			w.Pending--
			if a.Outcome == GiveUp {
				w.Failed++
			}
		}
		return put(hooks, []byte(w.ID), w)
	})
}

// ExpireDeliveries implements Store. Deliveries are queued in time order,
// so each outbox is read from its oldest until the first young enough; a
// read transaction first finds whether anything is due, so the delivery
// worker's regular call costs no write when nothing is.
func (s *Bolt) ExpireDeliveries(ctx context.Context, before, now time.Time, reason string) (map[string]uint64, error) {
	expired := func(v []byte) bool {
		var d Delivery
		return json.Unmarshal(v, &d) == nil && d.Created.Before(before)
	}
	due := false
	err := s.view(ctx, func(tx *bolt.Tx) error {
		_, outbox, _ := webhookBuckets(tx)
		if outbox == nil {
			return nil
		}
		return outbox.ForEachBucket(func(id []byte) error {
			if k, v := outbox.Bucket(id).Cursor().First(); k != nil && expired(v) {
				due = true
			}
			return nil
		})
	})
	if err != nil || !due {
		return nil, err
	}
	var out map[string]uint64
	err = s.update(ctx, func(tx *bolt.Tx) error {
		out = map[string]uint64{}
		hooks, outbox, err := webhookBuckets(tx)
		if err != nil {
			return err
		}
		var ids [][]byte
		if err := outbox.ForEachBucket(func(id []byte) error { ids = append(ids, id); return nil }); err != nil {
			return err
		}
		for _, id := range ids {
			box := outbox.Bucket(id)
			var dead [][]byte
			c := box.Cursor()
			for k, v := c.First(); k != nil && expired(v); k, v = c.Next() {
				dead = append(dead, append([]byte(nil), k...))
			}
			if len(dead) == 0 {
				continue
			}
			for _, k := range dead {
				if err := box.Delete(k); err != nil {
					return err
				}
			}
			var w Webhook
			if err := get(hooks, id, &w); err != nil {
				return err
			}
			n := uint64(len(dead))
			w.Pending -= min(w.Pending, n)
			w.Failed += n
			w.LastError, w.LastErrorAt = reason, now
			out[w.ID] = n
			if err := put(hooks, id, w); err != nil {
				return err
			}
		}
		return nil
	})
	return out, err
}
