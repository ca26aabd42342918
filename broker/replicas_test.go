package broker_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	nodeattest "github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/store/pgstore/pgtest"
)

// replicas starts two brokers on one data directory (one master key, one
// CA) and one PostgreSQL database, as two replicas behind a load balancer.
func replicas(t *testing.T, c *pgtest.Cluster) (*brokertest.Broker, *brokertest.Broker) {
	t.Helper()
	url := c.NewDatabase(t)
	a := brokertest.Start(t, func(cfg *broker.Config) { cfg.Store = url })
	b := brokertest.Serve(t, a.DataDir, slog.New(slog.NewTextHandler(io.Discard, nil)))
	return a, b
}

// TestReplicasOnPostgres drives two broker servers sharing one database:
// what one decides binds the other on its next call.
func TestReplicasOnPostgres(t *testing.T) {
	c := pgtest.Need(t)
	ctx := context.Background()
	a, b := replicas(t, c)
	n := enroll(t, a, "node1")
	policyPinning(t, b, "prod", debugPCR)
	_, err := a.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "app", Policy: "prod"})
	require.NoError(t, err)
	optsdata := []byte(`{"symkey":"c2VjcmV0LWxheWVyLWtleS0zMi1ieXRlcy1sb25nIQ==","digest":"sha256:00","cipheroptions":{"nonce":"AAAA"}}`)
	ann := wrap(t, b, "app", optsdata)

	// One piece of evidence, for a challenge replica a issued, sent many
	// times at once to both replicas: one appraisal spends the nonce.
	ch, err := a.Node.Challenge(ctx, &apiv1.ChallengeRequest{Node: "node1"})
	require.NoError(t, err)
	tpm := openTPM(t)
	ev, err := nodeattest.Collect(tpm, n.state, ch.GetNonce(), nodeattest.Logs{})
	tpm.Close()
	require.NoError(t, err)
	const tries = 16
	var mu sync.Mutex
	var wins []*apiv1.AttestResponse
	var winner []*brokertest.Broker
	var refused []error
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range tries {
		r := a
		if i%2 == 1 {
			r = b
		}
		wg.Go(func() {
			<-start
			resp, err := r.Node.Attest(ctx, ev.Request)
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				wins, winner = append(wins, resp), append(winner, r)
			} else {
				refused = append(refused, err)
			}
		})
	}
	close(start)
	wg.Wait()
	require.Len(t, wins, 1, "the nonce is spent once across replicas")
	require.Len(t, refused, tries-1)
	for _, err := range refused {
		assert.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	}
	reasons := auditReasons(t, a, "node1")
	assert.Contains(t, reasons, "nonce already used (replayed evidence?)")

	// Attested at one, unwraps at the other.
	sess := ev.Session(wins[0])
	other := a
	if winner[0] == a {
		other = b
	}
	got, err := unwrap(&node{b: other, state: n.state}, sess, ann)
	require.NoError(t, err)
	assert.Equal(t, optsdata, got)

	// Revoked at one, refused by the other on its next call.
	_, err = winner[0].Admin.RevokeNode(ctx, &apiv1.NodeRequest{Name: "node1"})
	require.NoError(t, err)
	_, err = unwrap(&node{b: other, state: n.state}, sess, ann)
	require.Error(t, err, "a revocation at one replica binds the other")
	assert.Equal(t, codes.Unauthenticated, status.Code(err), "%v", err)
	assert.Contains(t, err.Error(), "session unknown, expired or ended", "revoking ended the node's sessions")
	_, err = (&node{b: other, state: n.state}).session(t)
	require.Error(t, err, "nor does the other appraise it")
	assert.Contains(t, err.Error(), "revoked")
}

// BenchmarkUnwrapThroughputPostgres is BenchmarkUnwrapThroughput with the
// store in PostgreSQL (one cluster on this machine, fsync on): the release
// path's reads (session, node, key, policy) and its audit commit each go
// to the database.
func BenchmarkUnwrapThroughputPostgres(bm *testing.B) {
	c := pgtest.Need(bm)
	t := &testing.T{}
	url := c.NewDatabase(bm)
	br := brokertest.Start(t, func(cfg *broker.Config) { cfg.Store = url })
	n := enroll(t, br, "node1")
	policyPinning(t, br, "prod", debugPCR)
	if _, err := br.Admin.CreateKey(context.Background(), &apiv1.CreateKeyRequest{Name: "app", Policy: "prod"}); err != nil {
		bm.Fatal(err)
	}
	ann := wrap(t, br, "app", []byte(`{"symkey":"c2VjcmV0LWxheWVyLWtleS0zMi1ieXRlcy1sb25nIQ==","digest":"sha256:00","cipheroptions":{"nonce":"AAAA"}}`))
	s, err := n.session(t)
	if err != nil {
		bm.Fatal(err)
	}
	req := &apiv1.UnwrapRequest{SessionToken: s.Token, Annotation: ann}
	bm.SetParallelism(8)
	bm.ResetTimer()
	bm.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := br.Node.Unwrap(context.Background(), req); err != nil {
				bm.Error(err)
				return
			}
		}
	})
	bm.ReportMetric(float64(bm.N)/bm.Elapsed().Seconds(), "unwraps/s")
}

// TestStoreSetting: broker.yaml's store names PostgreSQL by URL; anything
// else, or a URL carrying a password, keeps the broker from starting, with
// the setting redacted.
func TestStoreSetting(t *testing.T) {
	dir := t.TempDir()
	_, err := broker.Init(broker.InitOptions{DataDir: filepath.Join(dir, "broker"), CADir: filepath.Join(dir, "ca"), ID: "broker-test",
		Listen: "127.0.0.1:0", AdmitUncertifiedTPMs: true})
	require.NoError(t, err)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tc := range []struct{ store, want string }{
		{"mysql://broker:hunter2-secret@db/attested", `store "mysql://broker:xxxxx@db/attested" is not a PostgreSQL URL`},
		{"/var/lib/attested/broker.db", "is not a PostgreSQL URL"},
		{"postgres://broker:hunter2-secret@db/attested", "no place for secrets"},
	} {
		_, err := broker.Open(filepath.Join(dir, "broker"), log, func(c *broker.Config) { c.Store = tc.store })
		require.Error(t, err, tc.store)
		assert.Contains(t, err.Error(), tc.want)
		assert.NotContains(t, err.Error(), "hunter2-secret")
	}
	_, err = os.Stat(filepath.Join(dir, "broker", broker.DatabaseFile))
	assert.ErrorIs(t, err, os.ErrNotExist, "no embedded store was created on the way")
}
