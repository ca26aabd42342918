package storetest

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/auditchain"
	"github.com/attested-dev/attested/broker/store"
)

// testAuditKey is an audit MAC key for tests.
func testAuditKey(t *testing.T) *auditchain.Key {
	k, err := auditchain.NewKey(bytes.Repeat([]byte{7}, auditchain.KeySize))
	require.NoError(t, err)
	return k
}

// runLifecycle covers what issue 7 added: the audit chain, audit filters
// and fields, key versions (disabled state, counts) and policy history.
func runLifecycle(t *testing.T, open func(t *testing.T) store.Store) {
	ctx := context.Background()
	now := time.Now()

	t.Run("AuditNeedsTheChain", func(t *testing.T) {
		s := open(t)
		assert.Error(t, s.AppendAudit(ctx, store.AuditEvent{Kind: "attest"}), "an append before StartAuditChain would go unchained")
	})

	t.Run("AuditChainVerifies", func(t *testing.T) {
		s := open(t)
		k := testAuditKey(t)
		res, err := store.VerifyAudit(ctx, s, k)
		require.NoError(t, err)
		assert.True(t, res.OK, "no records, no checkpoint: %s", res.Problem)

		require.NoError(t, s.StartAuditChain(ctx, k, now))
		// Concurrent appends are chained in the order they commit.
		var wg sync.WaitGroup
		for i := range 40 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				assert.NoError(t, s.AppendAudit(ctx, store.AuditEvent{Kind: "attest", Node: fmt.Sprint("n", i%3),
					Time: now.Add(time.Duration(i) * time.Nanosecond), Reason: "r"}))
			}()
		}
		wg.Wait()
		require.NoError(t, s.StartAuditChain(ctx, k, now.Add(time.Hour)), "starting again (a restart) keeps the chain")
		require.NoError(t, s.AppendAudit(ctx, store.AuditEvent{Kind: "release", Node: "n0", Time: now}))

		res, err = store.VerifyAudit(ctx, s, k)
		require.NoError(t, err)
		require.True(t, res.OK, res.Problem)
		assert.EqualValues(t, 41, res.Records)
		assert.EqualValues(t, 41, res.Chained)
		assert.Zero(t, res.Before)

		var seqs []uint64
		cp, err := s.ScanAudit(ctx, func(seq uint64, ev store.AuditEvent, derr error) error {
			require.NoError(t, derr)
			assert.Equal(t, seq, ev.Seq)
			assert.True(t, ev.Chain.Chained())
			assert.Equal(t, ev.Time, auditchain.Time(ev.Time), "the time is kept as the chain covers it")
			seqs = append(seqs, seq)
			return nil
		})
		require.NoError(t, err)
		require.NotNil(t, cp)
		assert.EqualValues(t, 41, cp.Count)
		assert.Equal(t, seqs[len(seqs)-1], cp.Last)
		assert.IsIncreasing(t, seqs)

		other, err := auditchain.NewKey(bytes.Repeat([]byte{8}, auditchain.KeySize))
		require.NoError(t, err)
		res, err = store.VerifyAudit(ctx, s, other)
		require.NoError(t, err)
		assert.False(t, res.OK, "another broker's key")
	})

	t.Run("AuditFieldsAndFilters", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.StartAuditChain(ctx, testAuditKey(t), now))
		t0 := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
		evs := []store.AuditEvent{
			{Time: t0, Kind: "release", Node: "a", Key: "k", Allowed: true, KeyVersion: 2, LayerDigest: "sha256:aa", Policy: "p", PolicyRevision: 3, Actor: "node"},
			{Time: t0.Add(time.Minute), Kind: "refuse", Node: "b", Key: "k", KeyVersion: 1, Policy: "p", PolicyRevision: 3},
			{Time: t0.Add(2 * time.Minute), Kind: "release", Node: "a", Key: "j", Allowed: true},
			{Time: t0.Add(3 * time.Minute), Kind: "attest", Node: "a"},
		}
		for _, ev := range evs {
			require.NoError(t, s.AppendAudit(ctx, ev))
		}
		all, err := s.ListAudit(ctx, store.AuditFilter{})
		require.NoError(t, err)
		require.Len(t, all, 4)
		got := all[0]
		assert.Equal(t, evs[0].KeyVersion, got.KeyVersion)
		assert.Equal(t, evs[0].LayerDigest, got.LayerDigest)
		assert.Equal(t, evs[0].Policy, got.Policy)
		assert.Equal(t, evs[0].PolicyRevision, got.PolicyRevision)
		assert.Equal(t, evs[0].Actor, got.Actor)
		assert.True(t, got.Time.Equal(t0))
		assert.Len(t, got.Chain.Hash, auditchain.HashSize)

		count := func(f store.AuditFilter) int {
			t.Helper()
			out, err := s.ListAudit(ctx, f)
			require.NoError(t, err)
			return len(out)
		}
		assert.Equal(t, 2, count(store.AuditFilter{Key: "k"}))
		assert.Equal(t, 1, count(store.AuditFilter{Key: "k", Node: "b"}))
		assert.Equal(t, 2, count(store.AuditFilter{Kind: "release"}))
		assert.Equal(t, 3, count(store.AuditFilter{Since: t0.Add(time.Minute)}), "since is inclusive")
		assert.Equal(t, 2, count(store.AuditFilter{Until: t0.Add(time.Minute)}), "until is inclusive")
		assert.Equal(t, 2, count(store.AuditFilter{Since: t0.Add(30 * time.Second), Until: t0.Add(150 * time.Second)}))
		assert.Equal(t, 1, count(store.AuditFilter{Node: "a", Limit: 1}))
	})

	t.Run("KeyVersionsCountsAndDisable", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.StartAuditChain(ctx, testAuditKey(t), now))
		for v := uint32(1); v <= 2; v++ {
			require.NoError(t, s.CreateKey(ctx, store.Key{Name: "k", Version: v, Policy: "p", Created: now}))
		}
		require.NoError(t, s.CreateKey(ctx, store.Key{Name: "k2", Version: 1, Policy: "p"}))
		for _, ev := range []store.AuditEvent{
			{Kind: "release", Key: "k", KeyVersion: 1},
			{Kind: "release", Key: "k", KeyVersion: 1},
			{Kind: "refuse", Key: "k", KeyVersion: 2},
			{Kind: "refuse", Key: "k", KeyVersion: 99}, // no such version: counted nowhere
			{Kind: "refuse", Key: "k"},                 // no version known
			{Kind: "key", Key: "k", KeyVersion: 1},     // not a release
			{Kind: "release", Key: "k2", KeyVersion: 1},
		} {
			require.NoError(t, s.AppendAudit(ctx, ev))
		}
		vs, err := s.KeyVersions(ctx, "k")
		require.NoError(t, err)
		require.Len(t, vs, 2)
		assert.Equal(t, uint32(1), vs[0].Version)
		assert.Equal(t, [2]uint64{2, 0}, [2]uint64{vs[0].Releases, vs[0].Refusals})
		assert.Equal(t, [2]uint64{0, 1}, [2]uint64{vs[1].Releases, vs[1].Refusals})
		_, err = s.KeyVersions(ctx, "nope")
		assert.ErrorIs(t, err, store.ErrNotFound)

		t1 := now.Add(time.Minute).Round(0)
		all, disabled, err := s.DisableKey(ctx, "k", 1, t1)
		require.NoError(t, err)
		assert.Equal(t, []uint32{1}, disabled)
		require.Len(t, all, 2)
		assert.True(t, all[0].Disabled.Equal(t1))
		assert.True(t, all[1].Disabled.IsZero(), "only the version named")
		got, err := s.GetKey(ctx, "k", 1)
		require.NoError(t, err)
		assert.True(t, got.Disabled.Equal(t1), "a release reads the disabled state")

		_, disabled, err = s.DisableKey(ctx, "k", 0, t1.Add(time.Minute))
		require.NoError(t, err)
		assert.Equal(t, []uint32{2}, disabled, "every version; version 1 keeps its time")
		vs, err = s.KeyVersions(ctx, "k")
		require.NoError(t, err)
		assert.True(t, vs[0].Disabled.Equal(t1))
		assert.True(t, vs[1].Disabled.Equal(t1.Add(time.Minute)))
		assert.EqualValues(t, 2, vs[0].Releases, "counts survive disabling")

		_, disabled, err = s.DisableKey(ctx, "k", 2, t1.Add(time.Hour))
		require.NoError(t, err)
		assert.Empty(t, disabled, "already disabled")
		_, _, err = s.DisableKey(ctx, "k", 3, t1)
		assert.ErrorIs(t, err, store.ErrNotFound)
		_, _, err = s.DisableKey(ctx, "nope", 0, t1)
		assert.ErrorIs(t, err, store.ErrNotFound)
		k2, err := s.KeyVersions(ctx, "k2")
		require.NoError(t, err)
		assert.True(t, k2[0].Disabled.IsZero(), "other keys untouched")
		assert.EqualValues(t, 1, k2[0].Releases)
	})

	t.Run("PolicyHistory", func(t *testing.T) {
		s := open(t)
		apply := func(yaml string) store.Policy {
			t.Helper()
			p, err := s.PutPolicy(ctx, store.Policy{Name: "p", YAML: yaml, Updated: time.Now()})
			require.NoError(t, err)
			return p
		}
		assert.Equal(t, uint32(1), apply("a").Revision)
		first := apply("a")
		assert.Equal(t, uint32(1), first.Revision, "identical: no new revision")
		assert.Equal(t, uint32(2), apply("b").Revision)
		assert.Equal(t, uint32(2), apply("b").Revision)
		assert.Equal(t, uint32(3), apply("a").Revision, "going back is a new revision")
		revs, err := s.PolicyRevisions(ctx, "p")
		require.NoError(t, err)
		require.Len(t, revs, 3)
		for i, want := range []string{"a", "b", "a"} {
			assert.Equal(t, uint32(i+1), revs[i].Revision)
			assert.Equal(t, want, revs[i].YAML)
		}
		cur, err := s.GetPolicy(ctx, "p")
		require.NoError(t, err)
		assert.Equal(t, uint32(3), cur.Revision)
		_, err = s.PolicyRevisions(ctx, "nope")
		assert.ErrorIs(t, err, store.ErrNotFound)
	})
}
