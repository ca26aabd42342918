package store_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/attested-dev/attested/broker/auditchain"
	"github.com/attested-dev/attested/broker/store"
)

// TestEveryAuditFieldIsChained: a change to any field of an audit record
// but its chain values changes what the chain covers, so a field added to
// AuditEvent and not to Entry fails here.
func TestEveryAuditFieldIsChained(t *testing.T) {
	base := store.AuditEvent{Seq: 1, Time: time.Unix(1, 0)}
	h0 := auditchain.Hash(make([]byte, 32), base.Entry())
	typ := reflect.TypeFor[store.AuditEvent]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		if f.Name == "Chain" {
			continue
		}
		ev := base
		v := reflect.ValueOf(&ev).Elem().Field(i)
		switch v.Kind() {
		case reflect.String:
			v.SetString("x")
		case reflect.Bool:
			v.SetBool(true)
		case reflect.Uint32, reflect.Uint64:
			v.SetUint(v.Uint() + 7)
		case reflect.Struct:
			ev.Time = ev.Time.Add(time.Microsecond)
		default:
			t.Fatalf("field %s of kind %s: teach this test to change it", f.Name, v.Kind())
		}
		assert.NotEqual(t, h0, auditchain.Hash(make([]byte, 32), ev.Entry()), "AuditEvent.%s is not covered by the audit chain", f.Name)
	}
}

// TestAuditChainOverOlderRecords: a database written before audit
// chaining gets a checkpoint counting its records; they are reported as
// not covered, the chain covers what follows, and deleting one of the
// older records is still detected by the count.
func TestAuditChainOverOlderRecords(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "broker.db")
	s, err := store.OpenBolt(path)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	db, err := bolt.Open(path, 0o600, nil)
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("audit"))
		for range 3 {
			seq, _ := b.NextSequence()
			v, _ := json.Marshal(store.AuditEvent{Seq: seq, Time: time.Now(), Kind: "attest"})
			if err := b.Put(binary.BigEndian.AppendUint64(nil, seq), v); err != nil {
				return err
			}
		}
		return nil
	}))
	require.NoError(t, db.Close())

	s, err = store.OpenBolt(path)
	require.NoError(t, err)
	k, err := auditchain.NewKey(bytes.Repeat([]byte{1}, auditchain.KeySize))
	require.NoError(t, err)
	require.NoError(t, s.StartAuditChain(ctx, k, time.Now()))
	require.NoError(t, s.AppendAudit(ctx, store.AuditEvent{Kind: "release"}))
	res, err := store.VerifyAudit(ctx, s, k)
	require.NoError(t, err)
	require.True(t, res.OK, res.Problem)
	assert.EqualValues(t, 4, res.Records)
	assert.EqualValues(t, 1, res.Chained)
	assert.EqualValues(t, 3, res.Before)
	assert.EqualValues(t, 4, res.HeadSeq)
	require.NoError(t, s.Close())

	db, err = bolt.Open(path, 0o600, nil)
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("audit")).Delete(binary.BigEndian.AppendUint64(nil, 2))
	}))
	require.NoError(t, db.Close())
	s, err = store.OpenBolt(path)
	require.NoError(t, err)
	defer s.Close()
	res, err = store.VerifyAudit(ctx, s, k)
	require.NoError(t, err)
	assert.False(t, res.OK)
	assert.Contains(t, res.Problem, "records before the chain were deleted or inserted")
}

// BenchmarkAppendAudit measures an audit append on the release path: a
// release record (chained, and counted against its key version in the
// same transaction) against a record that is only chained, from one
// caller and from many (group commit).
func BenchmarkAppendAudit(b *testing.B) {
	for _, c := range []struct {
		name string
		ev   store.AuditEvent
	}{
		{"counted", store.AuditEvent{Kind: "release", Node: "node1", Key: "app", KeyVersion: 1, Allowed: true, LayerDigest: "sha256:" + strings.Repeat("ab", 32), Policy: "prod", PolicyRevision: 3, Reason: "policy satisfied (key app v1)"}},
		{"uncounted", store.AuditEvent{Kind: "attest", Node: "node1", Key: "app", Allowed: true, LayerDigest: "sha256:" + strings.Repeat("ab", 32), Policy: "prod", PolicyRevision: 3, Reason: "policy satisfied (key app v1)"}},
	} {
		for _, par := range []int{1, 16} {
			b.Run(fmt.Sprintf("%s/callers=%d", c.name, par), func(b *testing.B) {
				ctx := context.Background()
				s, err := store.OpenBolt(filepath.Join(b.TempDir(), "broker.db"))
				require.NoError(b, err)
				defer s.Close()
				k, err := auditchain.NewKey(bytes.Repeat([]byte{1}, auditchain.KeySize))
				require.NoError(b, err)
				require.NoError(b, s.StartAuditChain(ctx, k, time.Now()))
				require.NoError(b, s.CreateKey(ctx, store.Key{Name: "app", Version: 1, Policy: "prod"}))
				b.SetParallelism(par)
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if err := s.AppendAudit(ctx, c.ev); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}
