package broker_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"go/ast"
	"go/parser"
	gotoken "go/token"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
)

// auditRecords gives b an audit trail of a few admin records and sampled
// refusals of unauthenticated callers (one record, then one summary at
// shutdown), and returns how many records it holds.
func auditRecords(t *testing.T, b *brokertest.Broker, key string) int {
	t.Helper()
	ctx := context.Background()
	for range 3 {
		_, err := b.Admin.CreateJoinToken(ctx, &apiv1.CreateJoinTokenRequest{})
		require.NoError(t, err)
	}
	_, err := b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: prod\npcrs:\n  16: [\"" + strings.Repeat("00", 32) + "\"]\n"})
	require.NoError(t, err)
	_, err = b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: key, Policy: "prod"})
	require.NoError(t, err)
	for range 3 {
		_, err := b.Node.Attest(ctx, &apiv1.AttestRequest{Node: "victim", Nonce: []byte("forged nonce")})
		require.Equal(t, codes.PermissionDenied, status.Code(err))
	}
	evs, err := b.Admin.ListAudit(ctx, &apiv1.ListAuditRequest{})
	require.NoError(t, err)
	return len(evs.GetEvents())
}

func verifyAudit(t *testing.T, b *brokertest.Broker) *apiv1.VerifyAuditResponse {
	t.Helper()
	r, err := b.Admin.VerifyAudit(context.Background(), &apiv1.VerifyAuditRequest{})
	require.NoError(t, err)
	return r
}

// tamper edits the broker's database as an attacker with the file would
// (the broker stopped), with bbolt itself.
func tamper(t *testing.T, dataDir string, fn func(audit, chain *bolt.Bucket) error) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dataDir, broker.DatabaseFile), 0o600, nil)
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bolt.Tx) error { return fn(tx.Bucket([]byte("audit")), tx.Bucket([]byte("auditchain"))) }))
	require.NoError(t, db.Close())
}

func seqKey(seq uint64) []byte { return binary.BigEndian.AppendUint64(nil, seq) }

// editRecord rewrites record seq's JSON through fn.
func editRecord(audit *bolt.Bucket, seq uint64, fn func(map[string]any)) error {
	var rec map[string]any
	if err := json.Unmarshal(audit.Get(seqKey(seq)), &rec); err != nil {
		return err
	}
	fn(rec)
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return audit.Put(seqKey(seq), data)
}

// TestAuditTamperingIsDetected: each way of changing the audit trail in
// broker.db with the broker stopped (edit, delete, insert, reorder, delete
// the newest records, forge chain values, roll back the checkpoint) is
// reported by VerifyAudit at the record it affects.
func TestAuditTamperingIsDetected(t *testing.T) {
	b := brokertest.Start(t)
	auditRecords(t, b, "app")
	ok := verifyAudit(t, b)
	require.True(t, ok.GetOk(), ok.GetDetail())
	b.Stop() // writes the sampled refusals' summary: chained like any record
	dir := b.DataDir
	db := filepath.Join(dir, broker.DatabaseFile)
	pristine, err := os.ReadFile(db)
	require.NoError(t, err)

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	b = brokertest.Serve(t, dir, log)
	res := verifyAudit(t, b)
	require.True(t, res.GetOk(), "the summary written at shutdown is chained: %s", res.GetDetail())
	n := res.GetRecords()
	require.GreaterOrEqual(t, n, uint64(7))
	assert.Regexp(t, `^\d+ chained records verify .*head: seq \d+ at \S+, hash [0-9a-f]{64}$`, res.GetDetail())
	b.Stop()

	cases := []struct {
		name   string
		attack func(audit, chain *bolt.Bucket) error
		bad    uint64
		detail string
	}{
		{"edit a record", func(a, _ *bolt.Bucket) error {
			return editRecord(a, 4, func(r map[string]any) { r["reason"] = "nothing happened" })
		}, 4, "its content does not match its hash: the record was edited"},
		{"edit a record's decision", func(a, _ *bolt.Bucket) error {
			return editRecord(a, 2, func(r map[string]any) { r["allowed"] = false })
		}, 2, "the record was edited"},
		{"delete a record", func(a, _ *bolt.Bucket) error { return a.Delete(seqKey(3)) },
			4, "does not follow record seq 2: a record between them was deleted, inserted or moved"},
		{"delete the first record", func(a, _ *bolt.Bucket) error { return a.Delete(seqKey(1)) },
			2, "records before it were deleted"},
		{"insert a record", func(a, _ *bolt.Bucket) error {
			// Make room at seq 4: move the records after it up by one.
			for seq := n; seq >= 4; seq-- {
				if err := editRecord(a, seq, func(r map[string]any) { r["seq"] = seq + 1 }); err != nil {
					return err
				}
				if err := a.Put(seqKey(seq+1), a.Get(seqKey(seq))); err != nil {
					return err
				}
			}
			return editRecord(a, 4, func(r map[string]any) { r["seq"], r["kind"], r["reason"] = 4, "approve", "approved by nobody" })
		}, 4, "record seq 4: its content does not match its hash"},
		{"insert a record with chain values of its own", func(a, _ *bolt.Bucket) error {
			for seq := n; seq >= 4; seq-- {
				if err := editRecord(a, seq, func(r map[string]any) { r["seq"] = seq + 1 }); err != nil {
					return err
				}
				if err := a.Put(seqKey(seq+1), a.Get(seqKey(seq))); err != nil {
					return err
				}
			}
			// Chain values recomputed without the key: the hash is right,
			// the MAC cannot be.
			return editRecord(a, 4, func(r map[string]any) {
				r["seq"], r["kind"], r["reason"] = 4, "approve", "approved by nobody"
				r["chain"].(map[string]any)["mac"] = r["chain"].(map[string]any)["hash"]
			})
		}, 4, "its MAC does not verify"},
		{"append a forged record", func(a, _ *bolt.Bucket) error {
			if err := a.Put(seqKey(n+1), a.Get(seqKey(n))); err != nil {
				return err
			}
			return editRecord(a, n+1, func(r map[string]any) { r["seq"] = n + 1 })
		}, n + 1, "the record was edited"},
		{"swap two records", func(a, _ *bolt.Bucket) error {
			r3, r4 := a.Get(seqKey(3)), a.Get(seqKey(4))
			if err := a.Put(seqKey(3), r4); err != nil {
				return err
			}
			return a.Put(seqKey(4), r3)
		}, 3, "the record kept at seq 3 says it is seq 4: records were moved or copied"},
		{"delete the newest records", func(a, _ *bolt.Bucket) error {
			if err := a.Delete(seqKey(n)); err != nil {
				return err
			}
			return a.Delete(seqKey(n - 1))
		}, n - 1, "the newest records were deleted"},
		{"strip the chain values", func(a, _ *bolt.Bucket) error {
			return editRecord(a, 5, func(r map[string]any) { delete(r, "chain") })
		}, 5, "carries no chain values"},
		{"garble a record", func(a, _ *bolt.Bucket) error { return a.Put(seqKey(6), []byte("{")) },
			6, "does not decode"},
		{"delete the newest records and set the checkpoint back", func(a, c *bolt.Bucket) error {
			if err := a.Delete(seqKey(n)); err != nil {
				return err
			}
			var cp map[string]any
			if err := json.Unmarshal(c.Get([]byte("checkpoint")), &cp); err != nil {
				return err
			}
			cp["count"], cp["last"] = n-1, n-1
			data, _ := json.Marshal(cp)
			return c.Put([]byte("checkpoint"), data)
		}, 0, "the audit checkpoint (count and head of the chain) does not verify under this broker's key"},
		{"delete the checkpoint", func(_, c *bolt.Bucket) error { return c.Delete([]byte("checkpoint")) },
			// The broker starts a chain again over what is there, counting
			// every record as before the chain: the chained ones say
			// otherwise.
			1, "the checkpoint was deleted, and a new one started over the records"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			require.NoError(t, os.WriteFile(db, pristine, 0o600))
			tamper(t, dir, c.attack)
			b := brokertest.Serve(t, dir, log)
			defer b.Stop()
			res := verifyAudit(t, b)
			assert.False(t, res.GetOk(), "tampering went unnoticed: %s", res.GetDetail())
			assert.Equal(t, c.bad, res.GetFirstBadSeq(), res.GetDetail())
			assert.Contains(t, res.GetDetail(), c.detail)
			assert.Contains(t, res.GetDetail(), "the audit trail does NOT verify")
		})
	}
}

// TestAuditChainSurvivesRestartAndGrows: records written after a restart
// extend the same chain.
func TestAuditChainSurvivesRestartAndGrows(t *testing.T) {
	b := brokertest.Start(t)
	auditRecords(t, b, "app")
	b.Stop()
	b = brokertest.Serve(t, b.DataDir, slog.New(slog.NewTextHandler(io.Discard, nil)))
	before := verifyAudit(t, b).GetRecords()
	auditRecords(t, b, "app2")
	res := verifyAudit(t, b)
	require.True(t, res.GetOk(), res.GetDetail())
	assert.Greater(t, res.GetRecords(), before)
}

// TestListAuditFilters: kind, key and time window through the API; an
// unknown kind is an error naming the kinds.
func TestListAuditFilters(t *testing.T) {
	b := brokertest.Start(t)
	ctx := context.Background()
	start := time.Now()
	auditRecords(t, b, "app")
	mid := time.Now()
	time.Sleep(10 * time.Millisecond)
	_, err := b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "other", Policy: "prod"})
	require.NoError(t, err)

	list := func(req *apiv1.ListAuditRequest) []*apiv1.AuditEvent {
		t.Helper()
		r, err := b.Admin.ListAudit(ctx, req)
		require.NoError(t, err)
		return r.GetEvents()
	}
	keys := list(&apiv1.ListAuditRequest{Kind: "key"})
	require.Len(t, keys, 2)
	for _, e := range keys {
		assert.Len(t, e.GetHash(), 32, "records carry their chain hash")
		assert.EqualValues(t, 1, e.GetKeyVersion())
		assert.Equal(t, "prod", e.GetPolicy())
	}
	assert.Len(t, list(&apiv1.ListAuditRequest{Key: "other"}), 1)
	assert.Len(t, list(&apiv1.ListAuditRequest{Kind: "key", SinceUnixNano: mid.UnixNano()}), 1)
	assert.Len(t, list(&apiv1.ListAuditRequest{Kind: "key", SinceUnixNano: start.UnixNano(), UntilUnixNano: mid.UnixNano()}), 1)
	pol := list(&apiv1.ListAuditRequest{Kind: "policy"})
	require.Len(t, pol, 1)
	assert.EqualValues(t, 1, pol[0].GetPolicyRevision())

	_, err = b.Admin.ListAudit(ctx, &apiv1.ListAuditRequest{Kind: "nosuch"})
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
	assert.Contains(t, err.Error(), `unknown audit kind "nosuch"; the kinds are enroll, approve, revoke`)
	_, err = b.Admin.ListAudit(ctx, &apiv1.ListAuditRequest{SinceUnixNano: mid.UnixNano(), UntilUnixNano: start.UnixNano()})
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
}

// TestAuditKindsAreListed: every kind of record the broker writes is one
// 'audit list --kind' accepts.
func TestAuditKindsAreListed(t *testing.T) {
	fset := gotoken.NewFileSet()
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	used := map[string]bool{}
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		require.NoError(t, err)
		ast.Inspect(f, func(n ast.Node) bool {
			lit, ok := n.(*ast.CompositeLit)
			if !ok {
				return true
			}
			sel, ok := lit.Type.(*ast.SelectorExpr)
			if !ok || sel.Sel.Name != "AuditEvent" {
				return true
			}
			for _, el := range lit.Elts {
				kv, ok := el.(*ast.KeyValueExpr)
				if !ok || kv.Key.(*ast.Ident).Name != "Kind" {
					continue
				}
				if bl, ok := kv.Value.(*ast.BasicLit); ok {
					k, _ := strconv.Unquote(bl.Value)
					used[k] = true
					assert.Contains(t, broker.AuditKinds, k, "%s writes audit kind %q", fset.Position(bl.Pos()), k)
				}
			}
			return true
		})
	}
	used["refuse"] = true // the sampled refusals' default
	for _, k := range broker.AuditKinds {
		assert.True(t, used[k] || slices.Contains([]string{"revoke"}, k), "kind %q is listed but nothing writes it", k)
	}
}
