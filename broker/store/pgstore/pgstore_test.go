package pgstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
	"github.com/attested-dev/attested/broker/store/pgstore"
	"github.com/attested-dev/attested/broker/store/pgstore/pgtest"
	"github.com/attested-dev/attested/broker/store/storetest"
)

func open(t *testing.T, url string) *pgstore.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := pgstore.Open(ctx, url, pgstore.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// TestPostgres runs the store conformance suite, and what only a shared
// database has, against a real PostgreSQL (one cluster for the package).
func TestPostgres(t *testing.T) {
	c := pgtest.Need(t)

	t.Run("Conformance", func(t *testing.T) {
		storetest.Run(t, func(t *testing.T) store.Store { return open(t, c.NewSchema(t)) })
	})
	t.Run("Replicas", func(t *testing.T) {
		// Two stores on one database are two replicas: everything the
		// suite checks of one store holds across them.
		storetest.RunReplicas(t, func(t *testing.T) (store.Store, store.Store) {
			url := c.NewSchema(t)
			return open(t, url), open(t, url)
		})
	})
}

// TestMigrationRunsOnce starts replicas together on an empty database:
// each migration is applied once, by one of them, and all of them open.
func TestMigrationRunsOnce(t *testing.T) {
	c := pgtest.Need(t)
	url := c.NewDatabase(t)
	const replicas = 6
	var buf [replicas]syncBuffer
	errs := make(chan error, replicas)
	start := make(chan struct{})
	for i := range replicas {
		go func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			s, err := pgstore.Open(ctx, url, pgstore.Options{Logger: slog.New(slog.NewTextHandler(&buf[i], nil))})
			if err == nil {
				s.Close()
			}
			errs <- err
		}()
	}
	close(start)
	for range replicas {
		require.NoError(t, <-errs)
	}
	applied := 0
	for i := range replicas {
		if strings.Contains(buf[i].String(), "applied schema migrations") {
			applied++
		} else {
			assert.Contains(t, buf[i].String(), "schema is current")
		}
	}
	assert.Equal(t, 1, applied, "one replica migrates")
	conn, err := pgx.Connect(context.Background(), url)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var n, max int
	require.NoError(t, conn.QueryRow(context.Background(), "SELECT count(*), max(version) FROM attested_schema").Scan(&n, &max))
	assert.Equal(t, pgstore.SchemaVersion(), n)
	assert.Equal(t, pgstore.SchemaVersion(), max)

	// A database a newer broker migrated is refused, saying so.
	_, err = conn.Exec(context.Background(), "INSERT INTO attested_schema (version, name) VALUES ($1, 'future')", max+1)
	require.NoError(t, err)
	_, err = pgstore.Open(context.Background(), url, pgstore.Options{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), fmt.Sprintf("schema is at version %d, newer than this broker's (%d)", max+1, max))
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestCallsWithoutDeadlineAreBounded: a call whose context has no deadline
// (the broker writes audit records so) still ends, after Options.Timeout,
// when the database makes it wait.
func TestCallsWithoutDeadlineAreBounded(t *testing.T) {
	c := pgtest.Need(t)
	url := c.NewDatabase(t)
	ctx := context.Background()
	s, err := pgstore.Open(ctx, url, pgstore.Options{Timeout: 300 * time.Millisecond})
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.CreateNode(ctx, store.Node{Name: "n", EKFingerprint: "ek"}))
	// Another client holds the node's row and the audit head.
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	tx, err := conn.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	_, err = tx.Exec(ctx, "SELECT 1 FROM nodes WHERE name = 'n' FOR UPDATE")
	require.NoError(t, err)
	_, err = tx.Exec(ctx, "UPDATE audit_head SET seq = seq")
	require.NoError(t, err)

	started := time.Now()
	_, err = s.UpdateNode(ctx, "n", func(*store.Node) error { return nil })
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(started), 5*time.Second)
	started = time.Now()
	err = s.AppendAudit(ctx, store.AuditEvent{Kind: "release"})
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(started), 5*time.Second)
}

func TestURLSecretsRefusedAndRedacted(t *testing.T) {
	for _, u := range []string{
		"postgres://broker:s3cret-pw@db.example/attested",
		"postgresql://broker:s3cret-pw@db1.example:5432,db2.example:5432/attested?sslmode=verify-full",
		"postgres://broker@db.example/attested?password=s3cret-pw",
		"postgres://db.example/attested?sslmode=verify-full&sslkey=k.pem&sslpassword=s3cret-pw",
	} {
		_, err := pgstore.Open(context.Background(), u, pgstore.Options{})
		require.Error(t, err, u)
		assert.Contains(t, err.Error(), "no place for secrets", u)
		assert.Contains(t, err.Error(), "PGPASSFILE", u)
		assert.NotContains(t, err.Error(), "s3cret-pw", u)
		assert.NotContains(t, pgstore.Redact(u), "s3cret-pw", u)
	}
	assert.Equal(t, "postgres://broker:xxxxx@db.example/attested?sslmode=verify-full&password=xxxxx",
		pgstore.Redact("postgres://broker:pw@db.example/attested?sslmode=verify-full&password=pw"))
	assert.Equal(t, "postgres://db.example/attested", pgstore.Redact("postgres://db.example/attested"))
	assert.Equal(t, "mysql://u:xxxxx@db/x", pgstore.Redact("mysql://u:pw@db/x"))

	_, err := pgstore.Open(context.Background(), "mysql://db.example/attested", pgstore.Options{})
	assert.ErrorContains(t, err, "is not a PostgreSQL URL")
}

// TestPasswordNeverInErrors connects with a wrong password from the
// environment: the refusal says what failed, never the password.
func TestPasswordNeverInErrors(t *testing.T) {
	c := pgtest.Need(t)
	t.Setenv("PGPASSWORD", "wrong-"+c.Password)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := pgstore.Open(ctx, c.TCPURL("postgres"), pgstore.Options{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "password authentication failed")
	assert.NotContains(t, err.Error(), c.Password)

	// The right one, from a passfile.
	pass, err := c.Passfile(t.TempDir())
	require.NoError(t, err)
	t.Setenv("PGPASSWORD", "")
	t.Setenv("PGPASSFILE", pass)
	var logs syncBuffer
	s, err := pgstore.Open(ctx, c.TCPURL("postgres"), pgstore.Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.NoError(t, err)
	s.Close()
	assert.NotContains(t, logs.String(), c.Password)
	assert.Contains(t, logs.String(), "store: PostgreSQL")
}

// TestUnauthenticatedRemoteDatabaseWarns: a database on another machine
// without a verified TLS connection is a warning at every start.
func TestUnauthenticatedRemoteDatabaseWarns(t *testing.T) {
	var logs syncBuffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	// Nothing listens there; the warning comes before the connection.
	_, err := pgstore.Open(ctx, "postgres://broker@192.0.2.1:1/attested?sslmode=require&connect_timeout=1", pgstore.Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.Error(t, err)
	assert.Contains(t, logs.String(), "SECURITY: the connection to PostgreSQL is not authenticated by TLS (sslmode=require)")

	logs = syncBuffer{}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel2()
	_, err = pgstore.Open(ctx2, "postgres://broker@192.0.2.1:1/attested?sslmode=verify-full&connect_timeout=1", pgstore.Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.Error(t, err)
	assert.NotContains(t, logs.String(), "SECURITY")
}

// BenchmarkReleaseReads is the store's share of one unwrap: the four reads
// of the release path, then its audit record, from 8 parallel callers.
func BenchmarkReleaseReads(bm *testing.B) {
	c := pgtest.Need(bm)
	ctx := context.Background()
	s, err := pgstore.Open(ctx, c.NewDatabase(bm), pgstore.Options{})
	require.NoError(bm, err)
	defer s.Close()
	require.NoError(bm, s.CreateNode(ctx, store.Node{Name: "n", EKFingerprint: "ek", State: store.NodeActive}))
	_, err = s.Appraise(ctx, "n", store.SpentNonce{Nonce: []byte("x"), Expires: time.Now().Add(time.Hour)}, time.Now(),
		func(*store.Node, []store.Session) (store.Outcome, error) {
			return store.Outcome{Open: &store.Session{TokenHash: []byte("tok"), Node: "n", Facts: []byte(`{"a":1}`), Expires: time.Now().Add(time.Hour)}}, nil
		})
	require.NoError(bm, err)
	require.NoError(bm, s.CreateKey(ctx, store.Key{Name: "k", Version: 1, Policy: "p", PublicKey: make([]byte, 1200), SealedPrivate: make([]byte, 2500)}))
	_, err = s.PutPolicy(ctx, store.Policy{Name: "p", YAML: strings.Repeat("x", 400)})
	require.NoError(bm, err)
	for _, audit := range []bool{false, true} {
		bm.Run(fmt.Sprintf("audit=%v", audit), func(bm *testing.B) {
			bm.SetParallelism(4)
			bm.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					_, err1 := s.GetSession(ctx, []byte("tok"))
					_, err2 := s.GetNode(ctx, "n")
					_, err3 := s.GetKey(ctx, "k", 1)
					_, err4 := s.GetPolicy(ctx, "p")
					var err5 error
					if audit {
						err5 = s.AppendAudit(ctx, store.AuditEvent{Time: time.Now(), Kind: "release", Node: "n", Key: "k", Allowed: true})
					}
					if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
						bm.Error(err)
						return
					}
				}
			})
			bm.ReportMetric(float64(bm.N)/bm.Elapsed().Seconds(), "releases/s")
		})
	}
}
