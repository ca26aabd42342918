package pgstore

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/attested-dev/attested/broker/store"
)

// Webhook deliveries are at least once: a replica that delivers an event
// and fails before recording it, or two replicas that both pick the head
// of one outbox, deliver it again (receivers tell events apart by ID).

// CreateWebhook implements store.Store.
func (s *Store) CreateWebhook(ctx context.Context, w store.Webhook) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	// A fresh webhook starts with an empty outbox and no history.
	w.Pending, w.Delivered, w.Failed, w.FailedAttempts = 0, 0, 0, 0
	w.LastError, w.LastErrorAt, w.LastDelivered = "", time.Time{}, time.Time{}
	rec, err := json.Marshal(w)
	if err != nil {
		return err
	}
	tag, err := s.pool.Exec(ctx, "INSERT INTO webhooks (id, record) VALUES ($1, $2) ON CONFLICT DO NOTHING", w.ID, rec)
	if err == nil && tag.RowsAffected() == 0 {
		return fmt.Errorf("webhook %q: %w", w.ID, store.ErrExists)
	}
	return err
}

func decodeWebhook(rec []byte) (store.Webhook, error) {
	var w store.Webhook
	if err := json.Unmarshal(rec, &w); err != nil {
		return w, fmt.Errorf("webhook record: %w", err)
	}
	return w, nil
}

// GetWebhook implements store.Store.
func (s *Store) GetWebhook(ctx context.Context, id string) (store.Webhook, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var rec []byte
	if err := s.pool.QueryRow(ctx, "SELECT record FROM webhooks WHERE id = $1", id).Scan(&rec); err != nil {
		return store.Webhook{}, notFound(err)
	}
	return decodeWebhook(rec)
}

// ListWebhooks implements store.Store.
func (s *Store) ListWebhooks(ctx context.Context) ([]store.Webhook, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	return queryRecords[store.Webhook](ctx, s.pool, "SELECT record FROM webhooks ORDER BY id")
}

// DeleteWebhook implements store.Store; its outbox goes with it (ON
// DELETE CASCADE).
func (s *Store) DeleteWebhook(ctx context.Context, id string) (store.Webhook, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var rec []byte
	if err := s.pool.QueryRow(ctx, "DELETE FROM webhooks WHERE id = $1 RETURNING record", id).Scan(&rec); err != nil {
		return store.Webhook{}, notFound(err)
	}
	return decodeWebhook(rec)
}

// lockWebhooks locks the webhooks that ids name, in ID order (every
// transaction locks them so), and returns them.
func lockWebhooks(ctx context.Context, tx pgx.Tx, ids []string) ([]store.Webhook, error) {
	return queryRecords[store.Webhook](ctx, tx, "SELECT record FROM webhooks WHERE id = ANY($1) ORDER BY id FOR UPDATE", ids)
}

func writeWebhook(ctx context.Context, tx pgx.Tx, w store.Webhook) error {
	rec, err := json.Marshal(w)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, "UPDATE webhooks SET record = $2 WHERE id = $1", w.ID, rec)
	return err
}

// EnqueueEvent implements store.Store. When no webhook is subscribed to
// the event's kind it writes nothing, so a broker without webhooks pays
// one read for its events.
func (s *Store) EnqueueEvent(ctx context.Context, ev store.OutboxEvent, maxPending int) (store.Enqueued, error) {
	hooks, err := s.ListWebhooks(ctx)
	if err != nil {
		return store.Enqueued{}, err
	}
	var ids []string
	for _, w := range hooks {
		if w.Subscribed(ev.Kind) {
			ids = append(ids, w.ID)
		}
	}
	if len(ids) == 0 {
		return store.Enqueued{}, nil
	}
	d := store.Delivery{EventID: ev.ID, Kind: ev.Kind, Payload: ev.Payload, Created: ev.Created, NextAttempt: ev.Created}
	drec, err := json.Marshal(d)
	if err != nil {
		return store.Enqueued{}, err
	}
	var res store.Enqueued
	err = s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		res = store.Enqueued{}
		locked, err := lockWebhooks(ctx, tx, ids)
		if err != nil {
			return err
		}
		for _, w := range locked {
			if !w.Subscribed(ev.Kind) { // changed since the read above
				continue
			}
			if maxPending > 0 && w.Pending >= uint64(maxPending) {
				want := w.Pending - uint64(maxPending) + 1
				tag, err := tx.Exec(ctx, `DELETE FROM outbox WHERE webhook = $1 AND seq IN
					(SELECT seq FROM outbox WHERE webhook = $1 ORDER BY seq LIMIT $2)`, w.ID, int64(want))
				if err != nil {
					return err
				}
				dropped := uint64(tag.RowsAffected())
				if dropped < want {
					w.Pending = 0 // the outbox is empty
				} else {
					w.Pending -= dropped
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
			}
			if _, err := tx.Exec(ctx, "INSERT INTO outbox (webhook, created, record) VALUES ($1, $2, $3)", w.ID, ev.Created, drec); err != nil {
				return err
			}
			w.Pending++
			res.Queued++
			if err := writeWebhook(ctx, tx, w); err != nil {
				return err
			}
		}
		return nil
	})
	return res, err
}

func scanDelivery(webhook string, seq int64, rec []byte) (store.Delivery, error) {
	var d store.Delivery
	if err := json.Unmarshal(rec, &d); err != nil {
		return d, fmt.Errorf("outbox of webhook %q: %w", webhook, err)
	}
	d.Webhook, d.Seq = webhook, uint64(seq)
	return d, nil
}

// NextDeliveries implements store.Store.
func (s *Store) NextDeliveries(ctx context.Context) ([]store.Delivery, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	rows, err := s.pool.Query(ctx, "SELECT DISTINCT ON (webhook) webhook, seq, record FROM outbox ORDER BY webhook, seq")
	if err != nil {
		return nil, err
	}
	var out []store.Delivery
	var webhook string
	var seq int64
	var rec []byte
	_, err = pgx.ForEachRow(rows, []any{&webhook, &seq, &rec}, func() error {
		d, err := scanDelivery(webhook, seq, rec)
		out = append(out, d)
		return err
	})
	return out, err
}

// RecordAttempt implements store.Store.
func (s *Store) RecordAttempt(ctx context.Context, d store.Delivery, a store.Attempt) error {
	switch a.Outcome {
	case store.Delivered, store.RetryLater, store.GiveUp:
	default:
		return fmt.Errorf("store: unknown delivery outcome %d", a.Outcome)
	}
	return s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		locked, err := lockWebhooks(ctx, tx, []string{d.Webhook})
		if err != nil {
			return err
		}
		if len(locked) == 0 {
			return store.ErrNotFound
		}
		w := locked[0]
		var rec []byte
		if err := tx.QueryRow(ctx, "SELECT record FROM outbox WHERE webhook = $1 AND seq = $2", d.Webhook, int64(d.Seq)).Scan(&rec); err != nil {
			return notFound(err)
		}
		cur, err := scanDelivery(d.Webhook, int64(d.Seq), rec)
		if err != nil {
			return err
		}
		switch a.Outcome {
		case store.Delivered:
			w.Delivered++
			w.LastDelivered = a.Time
		default:
			w.FailedAttempts++
			w.LastError, w.LastErrorAt = a.Error, a.Time
		}
		if a.Outcome == store.RetryLater {
			cur.Attempts++
			cur.NextAttempt = a.NextAttempt
			rec, err := json.Marshal(cur)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "UPDATE outbox SET record = $3 WHERE webhook = $1 AND seq = $2", d.Webhook, int64(d.Seq), rec); err != nil {
				return err
			}
		} else {
			if _, err := tx.Exec(ctx, "DELETE FROM outbox WHERE webhook = $1 AND seq = $2", d.Webhook, int64(d.Seq)); err != nil {
				return err
			}
			w.Pending -= min(w.Pending, 1)
			if a.Outcome == store.GiveUp {
				w.Failed++
			}
		}
		return writeWebhook(ctx, tx, w)
	})
}

// ExpireDeliveries implements store.Store. A read first finds whether
// anything is due, so the delivery worker's regular call writes nothing
// when nothing is.
func (s *Store) ExpireDeliveries(ctx context.Context, before, now time.Time, reason string) (map[string]uint64, error) {
	var ids []string
	err := func() error {
		ctx, cancel := s.bound(ctx)
		defer cancel()
		rows, err := s.pool.Query(ctx, "SELECT DISTINCT webhook FROM outbox WHERE created < $1", before)
		if err != nil {
			return err
		}
		ids, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	}()
	if err != nil || len(ids) == 0 {
		return nil, err
	}
	var out map[string]uint64
	err = s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		out = map[string]uint64{}
		locked, err := lockWebhooks(ctx, tx, ids)
		if err != nil {
			return err
		}
		for _, w := range locked {
			tag, err := tx.Exec(ctx, "DELETE FROM outbox WHERE webhook = $1 AND created < $2", w.ID, before)
			if err != nil {
				return err
			}
			n := uint64(tag.RowsAffected())
			if n == 0 {
				continue
			}
			w.Pending -= min(w.Pending, n)
			w.Failed += n
			w.LastError, w.LastErrorAt = reason, now
			out[w.ID] = n
			if err := writeWebhook(ctx, tx, w); err != nil {
				return err
			}
		}
		return nil
	})
	return out, err
}
