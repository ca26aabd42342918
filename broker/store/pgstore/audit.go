package pgstore

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/attested-dev/attested/broker/store"
)

// maxAuditBatch bounds the records one audit transaction writes.
const maxAuditBatch = 1000

type auditReq struct {
	ev   store.AuditEvent
	done chan error
}

// AppendAudit implements store.Store. It returns once the record is
// committed. Records from concurrent callers of this replica are
// group-committed, as in the embedded store: one writer takes everything
// queued and commits it in one statement, so a burst of releases does not
// wait for one commit each.
//
// Sequence numbers come from audit_head's one row, which the statement
// updates: the row lock is held until commit, so replicas writing at once
// take turns, numbers have no gaps, and seq order is commit order.
func (s *Store) AppendAudit(ctx context.Context, ev store.AuditEvent) error {
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
	ctx, cancel := s.bound(ctx)
	defer cancel()
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("audit record not confirmed: %w", ctx.Err())
	}
}

func (s *Store) commitAudit() {
	for {
		s.auditMu.Lock()
		n := min(len(s.auditQueue), maxAuditBatch)
		batch := s.auditQueue[:n:n]
		s.auditQueue = s.auditQueue[n:]
		if n == 0 {
			s.auditQueue = nil
			s.auditBusy = false
			s.auditIdle.Broadcast()
			s.auditMu.Unlock()
			return
		}
		s.auditMu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
		err := s.writeAudit(ctx, batch)
		cancel()
		for _, r := range batch {
			r.done <- err
		}
	}
}

// writeAudit inserts a batch in one statement (one round trip, one
// commit). Not retried: a failure after the commit was sent leaves its
// outcome unknown, and a retry could record events twice.
func (s *Store) writeAudit(ctx context.Context, batch []auditReq) error {
	n := len(batch)
	times := make([]time.Time, n)
	kinds, nodes, keys, reasons, actors := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	allowed := make([]bool, n)
	for i, r := range batch {
		e := r.ev
		times[i], allowed[i] = e.Time, e.Allowed
		kinds[i], nodes[i], keys[i], reasons[i], actors[i] = text(e.Kind), text(e.Node), text(e.Key), text(e.Reason), text(e.Actor)
	}
	tag, err := s.pool.Exec(ctx, `WITH head AS (UPDATE audit_head SET seq = seq + $1 WHERE id = 1 RETURNING seq)
		INSERT INTO audit (seq, time, kind, node, key, allowed, reason, actor)
		SELECT head.seq - $1 + e.ord, e.time, e.kind, e.node, e.key, e.allowed, e.reason, e.actor
		FROM head, unnest($2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::boolean[], $7::text[], $8::text[])
			WITH ORDINALITY AS e(time, kind, node, key, allowed, reason, actor, ord)`,
		int64(n), times, kinds, nodes, keys, allowed, reasons, actors)
	if err == nil && tag.RowsAffected() != int64(n) {
		err = fmt.Errorf("audit: %d of %d records written (is the audit_head row missing?)", tag.RowsAffected(), n)
	}
	return err
}

// text makes s storable in a text column, which holds neither NUL nor
// invalid UTF-8: a record must never be lost for the bytes an attacker
// chose. (JSON, which the embedded store writes, replaces invalid UTF-8
// the same way.)
func text(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	return strings.ReplaceAll(s, "\x00", "\uFFFD")
}

// ListAudit implements store.Store.
func (s *Store) ListAudit(ctx context.Context, f store.AuditFilter) ([]store.AuditEvent, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	// Built per filter rather than "($1 = '' OR node = $1)", so that each
	// shape is planned for its own index.
	var where []string
	var args []any
	if f.Node != "" {
		args = append(args, f.Node)
		where = append(where, fmt.Sprintf("node = $%d", len(args)))
	}
	if f.Kind != "" {
		args = append(args, f.Kind)
		where = append(where, fmt.Sprintf("kind = $%d", len(args)))
	}
	q := "SELECT seq, time, kind, node, key, allowed, reason, actor FROM audit"
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY seq DESC"
	if f.Limit > 0 {
		args = append(args, f.Limit)
		q += fmt.Sprintf(" LIMIT $%d", len(args))
	}
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	var out []store.AuditEvent
	var e store.AuditEvent
	var seq int64
	_, err = pgx.ForEachRow(rows, []any{&seq, &e.Time, &e.Kind, &e.Node, &e.Key, &e.Allowed, &e.Reason, &e.Actor}, func() error {
		e.Seq = uint64(seq)
		out = append(out, e)
		return nil
	})
	// Read newest first; callers read oldest first.
	slices.Reverse(out)
	return out, err
}
