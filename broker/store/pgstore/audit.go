package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/attested-dev/attested/broker/auditchain"
	"github.com/attested-dev/attested/broker/store"
)

// maxAuditBatch bounds the records one audit transaction writes.
const maxAuditBatch = 1000

// scanPage is how many records ScanAudit reads per statement: each
// statement stays short (statement_timeout) however long the trail.
const scanPage = 2000

var errNoAuditChain = errors.New("store: the audit chain was not started (StartAuditChain)")

type auditReq struct {
	ev   store.AuditEvent
	done chan error
}

// StartAuditChain implements store.Store. Replicas starting together take
// turns on the head row's lock: the first writes the checkpoint, counting
// the records already there (written before the chain) as not covered;
// the others find it.
func (s *Store) StartAuditChain(ctx context.Context, k *auditchain.Key, now time.Time) error {
	if k == nil {
		return errors.New("store: no audit key")
	}
	err := s.tx(ctx, nil, func(ctx context.Context, tx pgx.Tx) error {
		seq, cp, err := lockAuditHead(ctx, tx)
		if err != nil || cp != nil {
			return err
		}
		var before int64
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM audit").Scan(&before); err != nil {
			return err
		}
		rec, err := json.Marshal(k.Start(uint64(seq)+1, uint64(before), now))
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "UPDATE audit_head SET checkpoint = $1 WHERE id = 1", rec)
		return err
	})
	if err != nil {
		return fmt.Errorf("store: start the audit chain: %w", err)
	}
	s.auditMu.Lock()
	s.auditKey = k
	s.auditMu.Unlock()
	return nil
}

// lockAuditHead locks audit_head's one row until the transaction ends and
// returns the last sequence number given out and the chain's checkpoint as
// stored (nil before the chain started).
func lockAuditHead(ctx context.Context, tx pgx.Tx) (int64, []byte, error) {
	var seq int64
	var cp []byte
	err := tx.QueryRow(ctx, "SELECT seq, checkpoint FROM audit_head WHERE id = 1 FOR UPDATE").Scan(&seq, &cp)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil, errors.New("audit: the audit_head row is missing (was it deleted?)")
	}
	return seq, cp, err
}

// AppendAudit implements store.Store. It returns once the record is
// committed. Records from concurrent callers of this replica are
// group-committed, as in the embedded store: one writer takes everything
// queued and commits it in one transaction, so a burst of releases does
// not wait for one commit each.
func (s *Store) AppendAudit(ctx context.Context, ev store.AuditEvent) error {
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
		batch, key := s.auditQueue[:n:n], s.auditKey
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
		err := s.writeAudit(ctx, key, batch)
		cancel()
		for _, r := range batch {
			r.done <- err
		}
	}
}

// writeAudit chains and writes a batch in one transaction: it locks the
// head row (the last sequence number and the checkpoint), chains the
// records in order after it, and inserts them, rewrites the head and
// counts releases and refusals in one round trip before the commit.
// Holding the head row's lock from the read to the commit is what makes
// sequence numbers gap-free and the chain follow commit order across every
// replica. Not retried: a failure after the commit was sent leaves its
// outcome unknown, and a retry could record events twice.
func (s *Store) writeAudit(ctx context.Context, key *auditchain.Key, batch []auditReq) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		seq, raw, err := lockAuditHead(ctx, tx)
		if err != nil {
			return err
		}
		if raw == nil {
			return errNoAuditChain
		}
		var cp auditchain.Checkpoint
		if err := json.Unmarshal(raw, &cp); err != nil {
			return fmt.Errorf("audit: the chain's checkpoint does not decode (%v): it was edited; 'attested audit verify' says more", err)
		}
		chain := key.Resume(cp)
		n := len(batch)
		c := auditColumns{
			seq: make([]int64, n), time: make([]time.Time, n), allowed: make([]bool, n),
			kind: make([]string, n), node: make([]string, n), key: make([]string, n), reason: make([]string, n),
			actor: make([]string, n), layer: make([]string, n), policy: make([]string, n),
			keyVersion: make([]int64, n), policyRevision: make([]int64, n),
			prev: make([][]byte, n), hash: make([][]byte, n), mac: make([][]byte, n),
		}
		var counts releaseCounts
		for i, r := range batch {
			// Chained as stored, so that what a scan reads is what was
			// hashed.
			ev := r.ev.Stored()
			seq++
			ev.Seq = uint64(seq)
			if ev.Chain, err = chain.Append(ev.Entry()); err != nil {
				return err
			}
			c.set(i, ev)
			counts.add(ev)
		}
		head, err := json.Marshal(chain.Checkpoint())
		if err != nil {
			return err
		}
		b := &pgx.Batch{}
		b.Queue(`INSERT INTO audit (seq, time, kind, node, key, allowed, reason, actor,
				key_version, layer_digest, policy, policy_revision, chain_prev, chain_hash, chain_mac)
			SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::boolean[], $7::text[], $8::text[],
				$9::bigint[], $10::text[], $11::text[], $12::bigint[], $13::bytea[], $14::bytea[], $15::bytea[])`,
			c.seq, c.time, c.kind, c.node, c.key, c.allowed, c.reason, c.actor,
			c.keyVersion, c.layer, c.policy, c.policyRevision, c.prev, c.hash, c.mac).
			Exec(func(tag pgconn.CommandTag) error {
				if tag.RowsAffected() != int64(n) {
					return fmt.Errorf("audit: %d of %d records written", tag.RowsAffected(), n)
				}
				return nil
			})
		b.Queue("UPDATE audit_head SET seq = $1, checkpoint = $2 WHERE id = 1", seq, head)
		if len(counts.names) > 0 {
			// Versions that do not exist count nowhere, so a caller naming
			// made-up versions grows nothing.
			b.Queue(`INSERT INTO key_counts AS c (name, version, releases, refusals)
				SELECT n.name, n.version, n.rel, n.ref FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS n(name, version, rel, ref)
				WHERE EXISTS (SELECT 1 FROM keys k WHERE k.name = n.name AND k.version = n.version)
				ON CONFLICT (name, version) DO UPDATE SET releases = c.releases + EXCLUDED.releases, refusals = c.refusals + EXCLUDED.refusals`,
				counts.names, counts.versions, counts.releases, counts.refusals)
		}
		return tx.SendBatch(ctx, b).Close()
	})
}

// releaseCounts sums a batch's releases and refusals per key version, one
// row each (an upsert may not touch a row twice).
type releaseCounts struct {
	at                           map[keyVersion]int
	names                        []string
	versions, releases, refusals []int64
}

type keyVersion struct {
	name    string
	version uint32
}

func (c *releaseCounts) add(ev store.AuditEvent) {
	rel, ref := store.CountsRelease(ev)
	if !rel && !ref {
		return
	}
	id := keyVersion{ev.Key, ev.KeyVersion}
	i, ok := c.at[id]
	if !ok {
		if c.at == nil {
			c.at = map[keyVersion]int{}
		}
		i = len(c.names)
		c.at[id] = i
		c.names, c.versions = append(c.names, ev.Key), append(c.versions, int64(ev.KeyVersion))
		c.releases, c.refusals = append(c.releases, 0), append(c.refusals, 0)
	}
	if rel {
		c.releases[i]++
	} else {
		c.refusals[i]++
	}
}

// auditColumns are a batch of records, column by column, for one INSERT
// from unnest (one statement however many records).
type auditColumns struct {
	seq, keyVersion, policyRevision               []int64
	time                                          []time.Time
	allowed                                       []bool
	kind, node, key, reason, actor, layer, policy []string
	prev, hash, mac                               [][]byte
}

func (c *auditColumns) set(i int, e store.AuditEvent) {
	c.seq[i], c.time[i], c.allowed[i] = int64(e.Seq), e.Time, e.Allowed
	c.kind[i], c.node[i], c.key[i], c.reason[i], c.actor[i] = e.Kind, e.Node, e.Key, e.Reason, e.Actor
	c.keyVersion[i], c.layer[i], c.policy[i], c.policyRevision[i] = int64(e.KeyVersion), e.LayerDigest, e.Policy, int64(e.PolicyRevision)
	c.prev[i], c.hash[i], c.mac[i] = e.Chain.Prev, e.Chain.Hash, e.Chain.MAC
}

// auditSelect reads records in the order auditRow scans them.
const auditSelect = `SELECT seq, time, kind, node, key, allowed, reason, actor,
	key_version, layer_digest, policy, policy_revision, chain_prev, chain_hash, chain_mac FROM audit`

// auditRow scans one record. Columns are scanned as nullable and range
// checked, so that a row someone edited into what a record cannot hold (a
// NULL, a version past uint32, an infinite time) is reported as a record
// that does not decode rather than ending the scan or being read as
// another value.
type auditRow struct {
	seq, keyVersion, policyRevision               pgtype.Int8
	time                                          pgtype.Timestamptz
	kind, node, key, reason, actor, layer, policy pgtype.Text
	allowed                                       pgtype.Bool
	prev, hash, mac                               []byte
}

func (r *auditRow) dest() []any {
	return []any{&r.seq, &r.time, &r.kind, &r.node, &r.key, &r.allowed, &r.reason, &r.actor,
		&r.keyVersion, &r.layer, &r.policy, &r.policyRevision, &r.prev, &r.hash, &r.mac}
}

// event returns the record, its sequence number as stored, and why it
// does not decode (nil if it does).
func (r *auditRow) event() (store.AuditEvent, uint64, error) {
	seq := uint64(r.seq.Int64)
	var bad []string
	u32 := func(name string, v pgtype.Int8) uint32 {
		if !v.Valid || v.Int64 < 0 || v.Int64 > math.MaxUint32 {
			bad = append(bad, name)
			return 0
		}
		return uint32(v.Int64)
	}
	str := func(name string, v pgtype.Text) string {
		if !v.Valid {
			bad = append(bad, name)
		}
		return v.String
	}
	if !r.seq.Valid || r.seq.Int64 <= 0 {
		bad = append(bad, "seq")
	}
	if !r.time.Valid || r.time.InfinityModifier != pgtype.Finite {
		bad = append(bad, "time")
	}
	if !r.allowed.Valid {
		bad = append(bad, "allowed")
	}
	e := store.AuditEvent{Seq: seq, Time: r.time.Time.UTC(), Kind: str("kind", r.kind), Node: str("node", r.node), Key: str("key", r.key),
		Allowed: r.allowed.Bool, Reason: str("reason", r.reason), Actor: str("actor", r.actor),
		KeyVersion: u32("key_version", r.keyVersion), LayerDigest: str("layer_digest", r.layer),
		Policy: str("policy", r.policy), PolicyRevision: u32("policy_revision", r.policyRevision),
		Chain: auditchain.Link{Prev: r.prev, Hash: r.hash, MAC: r.mac}}
	if len(bad) > 0 {
		return e, seq, fmt.Errorf("audit record seq %d: no record holds its %s", r.seq.Int64, strings.Join(bad, ", "))
	}
	return e, seq, nil
}

// ListAudit implements store.Store.
func (s *Store) ListAudit(ctx context.Context, f store.AuditFilter) ([]store.AuditEvent, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	f = f.Stored()
	// Built per filter rather than "($1 = '' OR node = $1)", so that each
	// shape is planned for its own index.
	var where []string
	var args []any
	cond := func(sql string, arg any) {
		args = append(args, arg)
		where = append(where, fmt.Sprintf(sql, len(args)))
	}
	if f.Node != "" {
		cond("node = $%d", f.Node)
	}
	if f.Kind != "" {
		cond("kind = $%d", f.Kind)
	}
	if f.Key != "" {
		cond("key = $%d", f.Key)
	}
	// Records keep whole microseconds, bounds may be finer: a record is at
	// or after since when it is at or after since rounded up, and at or
	// before until when at or before until rounded down.
	if !f.Since.IsZero() {
		since := f.Since.Truncate(time.Microsecond)
		if since.Before(f.Since) {
			since = since.Add(time.Microsecond)
		}
		cond("time >= $%d", since)
	}
	if !f.Until.IsZero() {
		cond("time <= $%d", f.Until.Truncate(time.Microsecond))
	}
	q := auditSelect
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
	var r auditRow
	_, err = pgx.ForEachRow(rows, r.dest(), func() error {
		e, _, err := r.event()
		if err != nil {
			return err
		}
		out = append(out, e)
		return nil
	})
	// Read newest first; callers read oldest first.
	slices.Reverse(out)
	return out, err
}

// ScanAudit implements store.Store: the checkpoint and every record from
// one snapshot (a read-only REPEATABLE READ transaction), page by page in
// sequence order.
func (s *Store) ScanAudit(ctx context.Context, fn func(seq uint64, ev store.AuditEvent, decodeErr error) error) (*auditchain.Checkpoint, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	var cp *auditchain.Checkpoint
	err := pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		cp = nil
		var raw []byte
		switch err := tx.QueryRow(ctx, "SELECT checkpoint FROM audit_head WHERE id = 1").Scan(&raw); {
		case errors.Is(err, pgx.ErrNoRows):
		case err != nil:
			return err
		case raw != nil:
			var c auditchain.Checkpoint
			if json.Unmarshal(raw, &c) != nil {
				// One that does not decode is passed as an empty one,
				// whose MAC does not verify.
				c = auditchain.Checkpoint{}
			}
			cp = &c
		}
		after := int64(math.MinInt64)
		first := true
		for {
			q, args := auditSelect+" WHERE seq > $1 ORDER BY seq LIMIT $2", []any{after, scanPage}
			if first {
				q, args = auditSelect+" ORDER BY seq LIMIT $1", []any{scanPage}
			}
			rows, err := tx.Query(ctx, q, args...)
			if err != nil {
				return err
			}
			var r auditRow
			n := 0
			_, err = pgx.ForEachRow(rows, r.dest(), func() error {
				n++
				after = r.seq.Int64
				e, seq, derr := r.event()
				return fn(seq, e, derr)
			})
			if err != nil {
				return err
			}
			if n < scanPage {
				return nil
			}
			first = false
		}
	})
	return cp, err
}
