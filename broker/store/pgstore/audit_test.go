package pgstore_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/auditchain"
	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/store/pgstore"
	"github.com/attested-dev/attested/broker/store/pgstore/pgtest"
)

func auditKey(t testing.TB) *auditchain.Key {
	k, err := auditchain.NewKey(bytes.Repeat([]byte{3}, auditchain.KeySize))
	require.NoError(t, err)
	return k
}

// connect is a plain connection to the database url names: what someone
// with the database's credentials, and not the broker's key, can do.
func connect(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), url)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// trailStart is when every trail of these tests starts: fixed, so that
// trails written to different databases are identical, checkpoints
// included.
var trailStart = time.Date(2030, 1, 2, 3, 4, 5, 678901234, time.UTC)

const trailLen = 8

// writeTrail opens a store on url, starts the chain and appends trailLen
// records, and returns the store and the checkpoint as it was after
// trailLen-2 records (as stored: JSON).
func writeTrail(t *testing.T, url string) (*pgstore.Store, []byte) {
	t.Helper()
	ctx := context.Background()
	s := open(t, url)
	require.NoError(t, s.StartAuditChain(ctx, auditKey(t), trailStart))
	require.NoError(t, s.CreateKey(ctx, store.Key{Name: "app", Version: 1, Policy: "prod"}))
	var mid []byte
	for i := range trailLen {
		ev := store.AuditEvent{Time: trailStart.Add(time.Duration(i) * time.Second), Kind: "attest", Node: "n1", Allowed: i%2 == 0, Reason: fmt.Sprint("reason ", i)}
		if i%3 == 2 {
			ev.Kind, ev.Key, ev.KeyVersion, ev.LayerDigest, ev.Policy, ev.PolicyRevision = "release", "app", 1, "sha256:aa", "prod", 2
		}
		require.NoError(t, s.AppendAudit(ctx, ev))
		if i == trailLen-3 {
			require.NoError(t, connect(t, url).QueryRow(ctx, "SELECT checkpoint::text FROM audit_head").Scan(&mid))
		}
	}
	return s, mid
}

// TestAuditTamperingInPostgres: each way someone with write access to the
// database (and not the broker's key) can change the audit trail with
// SQL is reported by VerifyAudit at the record it affects, and an append
// onto a head or checkpoint that was tampered with fails rather than
// extending it.
func TestAuditTamperingInPostgres(t *testing.T) {
	c := pgtest.Need(t)
	ctx := context.Background()
	const n = trailLen
	k := auditKey(t)
	{
		s, _ := writeTrail(t, c.NewSchema(t))
		res, err := store.VerifyAudit(ctx, s, k)
		require.NoError(t, err)
		require.True(t, res.OK, res.Problem)
		require.EqualValues(t, n, res.Chained)
	}
	// moveUp makes room at seq at by moving every record from there up by
	// one (in two steps: the primary key is checked row by row).
	moveUp := func(db *pgx.Conn, at int) error {
		if _, err := db.Exec(ctx, "UPDATE audit SET seq = -seq WHERE seq >= $1", at); err != nil {
			return err
		}
		_, err := db.Exec(ctx, "UPDATE audit SET seq = 1 - seq WHERE seq < 0")
		return err
	}
	cases := []struct {
		name   string
		attack func(db *pgx.Conn, mid []byte) error
		bad    uint64
		detail string
	}{
		{"edit a record", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit SET reason = 'nothing happened' WHERE seq = 4")
			return err
		}, 4, "its content does not match its hash: the record was edited"},
		{"edit a record's decision", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit SET allowed = NOT allowed WHERE seq = 2")
			return err
		}, 2, "the record was edited"},
		{"move a record's time by a microsecond", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit SET time = time + interval '1 microsecond' WHERE seq = 3")
			return err
		}, 3, "the record was edited"},
		{"name another layer", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit SET layer_digest = 'sha256:bb' WHERE seq = 3")
			return err
		}, 3, "the record was edited"},
		{"a key version past uint32 that would read as the same", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit SET key_version = key_version + 4294967296 WHERE seq = 6")
			return err
		}, 6, "record seq 6 does not decode (audit record seq 6: no record holds its key_version)"},
		{"an infinite time", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit SET time = 'infinity' WHERE seq = 5")
			return err
		}, 5, "no record holds its time"},
		{"delete a record", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "DELETE FROM audit WHERE seq = 3")
			return err
		}, 4, "does not follow record seq 2: a record between them was deleted, inserted or moved"},
		{"delete the first record", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "DELETE FROM audit WHERE seq = 1")
			return err
		}, 2, "records before it were deleted"},
		{"insert a record", func(db *pgx.Conn, _ []byte) error {
			if err := moveUp(db, 4); err != nil {
				return err
			}
			_, err := db.Exec(ctx, `INSERT INTO audit SELECT 4, time, 'approve', node, key, true, 'approved by nobody', actor,
				key_version, layer_digest, policy, policy_revision, chain_prev, chain_hash, chain_mac FROM audit WHERE seq = 5`)
			return err
		}, 4, "record seq 4: its content does not match its hash"},
		{"insert a record with chain values of its own", func(db *pgx.Conn, _ []byte) error {
			if err := moveUp(db, 4); err != nil {
				return err
			}
			var prev []byte
			if err := db.QueryRow(ctx, "SELECT chain_hash FROM audit WHERE seq = 3").Scan(&prev); err != nil {
				return err
			}
			// The hash is right (it needs no key); the MAC cannot be.
			e := store.AuditEvent{Seq: 4, Time: trailStart, Kind: "approve", Node: "n1", Allowed: true, Reason: "approved by nobody"}
			h := auditchain.Hash(prev, e.Entry())
			_, err := db.Exec(ctx, `INSERT INTO audit (seq, time, kind, node, allowed, reason, chain_prev, chain_hash, chain_mac)
				VALUES (4, $1, 'approve', 'n1', true, 'approved by nobody', $2, $3, $3)`, trailStart, prev, h)
			return err
		}, 4, "its MAC does not verify"},
		{"append a forged record", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, fmt.Sprintf(`INSERT INTO audit SELECT %d, time, kind, node, key, allowed, reason, actor,
				key_version, layer_digest, policy, policy_revision, chain_prev, chain_hash, chain_mac FROM audit WHERE seq = %d`, n+1, n))
			return err
		}, n + 1, "the record was edited"},
		{"swap two records", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit SET seq = CASE seq WHEN 3 THEN -4 ELSE -3 END WHERE seq IN (3, 4)")
			if err == nil {
				_, err = db.Exec(ctx, "UPDATE audit SET seq = -seq WHERE seq < 0")
			}
			return err
		}, 3, "record seq 3: its content does not match its hash"},
		{"delete the newest records", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "DELETE FROM audit WHERE seq >= $1", n-1)
			return err
		}, n - 1, "the newest records were deleted"},
		{"delete every record", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "DELETE FROM audit")
			return err
		}, 1, "the newest records were deleted"},
		{"strip the chain values", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit SET chain_prev = NULL, chain_hash = NULL, chain_mac = NULL WHERE seq = 5")
			return err
		}, 5, "carries no chain values"},
		{"delete the newest records and set the checkpoint's count back", func(db *pgx.Conn, _ []byte) error {
			if _, err := db.Exec(ctx, "DELETE FROM audit WHERE seq = $1", n); err != nil {
				return err
			}
			_, err := db.Exec(ctx, `UPDATE audit_head SET seq = seq - 1,
				checkpoint = jsonb_set(jsonb_set(checkpoint::jsonb, '{count}', to_jsonb($1::int)), '{last}', to_jsonb($1::int))::json`, n-1)
			return err
		}, 0, "the audit checkpoint (count and head of the chain) does not verify under this broker's key"},
		{"delete the newest records and put an older checkpoint back", func(db *pgx.Conn, mid []byte) error {
			if _, err := db.Exec(ctx, "DELETE FROM audit WHERE seq > $1", n-2); err != nil {
				return err
			}
			_, err := db.Exec(ctx, "UPDATE audit_head SET seq = $1, checkpoint = $2", n-2, string(mid))
			return err
		}, 0, ""}, // verifies: what an older copy covers is intact (anchors outside the broker catch this)
		{"put an older checkpoint back over the newer records", func(db *pgx.Conn, mid []byte) error {
			_, err := db.Exec(ctx, "UPDATE audit_head SET checkpoint = $1", string(mid))
			return err
		}, n - 1, "the checkpoint was replaced by an older copy"},
		{"garble the checkpoint", func(db *pgx.Conn, _ []byte) error {
			_, err := db.Exec(ctx, `UPDATE audit_head SET checkpoint = '{"count": "many"}'`)
			return err
		}, 0, "the audit checkpoint (count and head of the chain) does not verify"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			url := c.NewSchema(t)
			s, mid := writeTrail(t, url)
			require.NoError(t, tc.attack(connect(t, url), mid))
			res, err := store.VerifyAudit(ctx, s, k)
			require.NoError(t, err)
			if tc.detail == "" {
				assert.True(t, res.OK, res.Problem)
				assert.EqualValues(t, n-2, res.HeadSeq)
				return
			}
			assert.False(t, res.OK, "tampering went unnoticed")
			assert.Equal(t, tc.bad, res.FirstBad, res.Problem)
			assert.Contains(t, res.Problem, tc.detail)
		})
	}

	t.Run("appends onto a tampered head fail", func(t *testing.T) {
		for _, attack := range []string{
			"UPDATE audit_head SET checkpoint = NULL",
			`UPDATE audit_head SET checkpoint = '{"count": "many"}'`,
			"UPDATE audit_head SET seq = 2",
			"DELETE FROM audit_head",
		} {
			url := c.NewSchema(t)
			s, _ := writeTrail(t, url)
			_, err := connect(t, url).Exec(ctx, attack)
			require.NoError(t, err)
			assert.Error(t, s.AppendAudit(ctx, store.AuditEvent{Kind: "attest"}), attack)
			var count int
			require.NoError(t, connect(t, url).QueryRow(ctx, "SELECT count(*) FROM audit").Scan(&count))
			assert.Equal(t, n, count, "%s: nothing was appended", attack)
		}
	})

	t.Run("a checkpoint deleted and started again over the records", func(t *testing.T) {
		url := c.NewSchema(t)
		s, _ := writeTrail(t, url)
		_, err := connect(t, url).Exec(ctx, "UPDATE audit_head SET checkpoint = NULL")
		require.NoError(t, err)
		// The broker restarts: a new chain over what is there, counting
		// every record as before the chain; the chained ones say otherwise.
		require.NoError(t, s.StartAuditChain(ctx, k, time.Now()))
		res, err := store.VerifyAudit(ctx, s, k)
		require.NoError(t, err)
		assert.False(t, res.OK)
		assert.EqualValues(t, 1, res.FirstBad)
		assert.Contains(t, res.Problem, "the checkpoint was deleted, and a new one started over the records")
		// The new chain's first record follows none of the old ones.
		require.NoError(t, s.AppendAudit(ctx, store.AuditEvent{Kind: "attest"}))
		res, err = store.VerifyAudit(ctx, s, k)
		require.NoError(t, err)
		assert.False(t, res.OK)
		assert.Contains(t, res.Problem, fmt.Sprintf("record seq %d does not follow record seq %d", n+1, n))
	})
}

// TestUpgradeFromSchemaWithoutChain: a database written by brokers before
// the audit chain (schema version 2) migrates in place: its records are
// counted as before the chain and deleting one is still detected, its
// policies' current revisions become their first kept ones, and its keys
// count releases from then on.
func TestUpgradeFromSchemaWithoutChain(t *testing.T) {
	c := pgtest.Need(t)
	ctx := context.Background()
	url := c.NewDatabase(t)
	db := connect(t, url)
	files, err := filepath.Glob("migrations/*.sql")
	require.NoError(t, err)
	sort.Strings(files)
	require.Greater(t, len(files), 2)
	_, err = db.Exec(ctx, "CREATE TABLE attested_schema (version integer PRIMARY KEY, name text NOT NULL, applied timestamptz NOT NULL DEFAULT now())")
	require.NoError(t, err)
	for i, f := range files[:2] {
		sql, err := os.ReadFile(f)
		require.NoError(t, err)
		_, err = db.Exec(ctx, string(sql))
		require.NoError(t, err, f)
		_, err = db.Exec(ctx, "INSERT INTO attested_schema (version, name) VALUES ($1, $2)", i+1, f)
		require.NoError(t, err)
	}
	// What a version-2 broker wrote.
	for seq := 1; seq <= 3; seq++ {
		_, err = db.Exec(ctx, "INSERT INTO audit (seq, time, kind, node, allowed, reason) VALUES ($1, now(), 'attest', 'n1', true, 'old')", seq)
		require.NoError(t, err)
	}
	_, err = db.Exec(ctx, "UPDATE audit_head SET seq = 3")
	require.NoError(t, err)
	_, err = db.Exec(ctx, `INSERT INTO policies (name, revision, record) VALUES ('prod', 4, '{"name":"prod","yaml":"name: prod\n","revision":0}')`)
	require.NoError(t, err)
	_, err = db.Exec(ctx, `INSERT INTO keys (name, version, record) VALUES ('app', 1, '{"name":"app","version":1,"policy":"prod"}')`)
	require.NoError(t, err)

	s := open(t, url)
	revs, err := s.PolicyRevisions(ctx, "prod")
	require.NoError(t, err)
	require.Len(t, revs, 1)
	assert.EqualValues(t, 4, revs[0].Revision)
	p, err := s.PutPolicy(ctx, store.Policy{Name: "prod", YAML: "name: prod\n"})
	require.NoError(t, err)
	assert.EqualValues(t, 4, p.Revision, "identical to the current revision: a no-op")
	p, err = s.PutPolicy(ctx, store.Policy{Name: "prod", YAML: "name: prod\npcrs: {}\n"})
	require.NoError(t, err)
	assert.EqualValues(t, 5, p.Revision)
	revs, err = s.PolicyRevisions(ctx, "prod")
	require.NoError(t, err)
	require.Len(t, revs, 2)
	assert.EqualValues(t, []uint32{4, 5}, []uint32{revs[0].Revision, revs[1].Revision})

	k := auditKey(t)
	require.NoError(t, s.StartAuditChain(ctx, k, time.Now()))
	require.NoError(t, s.AppendAudit(ctx, store.AuditEvent{Kind: "release", Key: "app", KeyVersion: 1, Allowed: true}))
	res, err := store.VerifyAudit(ctx, s, k)
	require.NoError(t, err)
	require.True(t, res.OK, res.Problem)
	assert.EqualValues(t, 4, res.Records)
	assert.EqualValues(t, 1, res.Chained)
	assert.EqualValues(t, 3, res.Before)
	assert.EqualValues(t, 4, res.HeadSeq)
	vs, err := s.KeyVersions(ctx, "app")
	require.NoError(t, err)
	require.Len(t, vs, 1)
	assert.EqualValues(t, 1, vs[0].Releases)

	_, err = db.Exec(ctx, "DELETE FROM audit WHERE seq = 2")
	require.NoError(t, err)
	res, err = store.VerifyAudit(ctx, s, k)
	require.NoError(t, err)
	assert.False(t, res.OK)
	assert.Contains(t, res.Problem, "records before the chain were deleted or inserted")
}

// TestScanAuditIsOneSnapshot: a verification that reads while replicas
// append sees the records and the checkpoint of one moment, so it passes
// however the two interleave, and it reads past one page of records.
func TestScanAuditIsOneSnapshot(t *testing.T) {
	c := pgtest.Need(t)
	ctx := context.Background()
	url := c.NewSchema(t)
	a, b := open(t, url), open(t, url)
	k := auditKey(t)
	require.NoError(t, a.StartAuditChain(ctx, k, time.Now()))
	require.NoError(t, b.StartAuditChain(ctx, k, time.Now()))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 16 {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := s.AppendAudit(ctx, store.AuditEvent{Kind: "attest", Time: time.Now()}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	var last uint64
	verifications := 0
	for deadline := time.Now().Add(time.Minute); last <= 2500 && time.Now().Before(deadline); verifications++ {
		res, err := store.VerifyAudit(ctx, b, k)
		require.NoError(t, err)
		require.True(t, res.OK, res.Problem)
		last = res.Records
	}
	close(stop)
	wg.Wait()
	res, err := store.VerifyAudit(ctx, a, k)
	require.NoError(t, err)
	require.True(t, res.OK, res.Problem)
	assert.GreaterOrEqual(t, res.Records, last)
	assert.Greater(t, last, uint64(2500), "the trail outgrew a page of the scan")
	t.Logf("%d verifications while replicas appended, the last of %d records; %d in all", verifications, last, res.Records)
}
