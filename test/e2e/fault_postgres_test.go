//go:build e2e

package e2e

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store/pgstore/pgtest"
	"github.com/attested-dev/attested/test/load"
)

// TestPostgresRestartUnderLoad: two broker replicas on one PostgreSQL
// database behind a round-robin TCP proxy serve a fleet whose nodes often
// attest at one replica and unwrap at the other. PostgreSQL is killed
// (SIGKILL, as a crash) in the middle of the storm and started again: the
// nodes' failures meanwhile name the broker's store, the replicas recover
// without a restart, no node that fails policy gets a key, and every
// release any node received is in the audit.
func TestPostgresRestartUnderLoad(t *testing.T) {
	const nodes, failing = 12, 2
	pg := pgtest.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	db, err := pg.CreateDatabase(ctx)
	require.NoError(t, err)
	dir, err := os.MkdirTemp(shared.dir, "w")
	require.NoError(t, err)
	w := &world{t: t, dir: dir, brokerExtra: ekTrust(t, true) + "---\n" + stormLimits(t, nodes)}
	t.Cleanup(func() {
		if t.Failed() {
			w.dumpLogs()
		}
	})
	passfile, err := pg.Passfile(w.dir)
	require.NoError(t, err)
	a, b := w.initReplicas(pg.TCPURL(db), []string{"PGPASSFILE=" + passfile})
	w.serveReplica(a)
	w.serveReplica(b)
	proxy, err := load.NewProxy(a.addr, b.addr)
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	w.brokerDir, w.brokerAddr, w.brokerID = a.dir, proxy.Addr(), brokerIDOf(t, a.dir)
	s := newStorm(t, w, nodes, failing, true)

	stop := s.start()
	s.waitReleases(300)
	pg.Kill()
	time.Sleep(2 * time.Second) // the nodes pull against replicas without a store
	require.NoError(t, pg.Restart())
	during := stop()
	t.Logf("storm: %d pulls, %d layer keys received, %d refusals of failing nodes; errors: %v",
		during.Pulls, s.released.Load(), during.Refusals, load.SortedErrors(during.Errors))
	require.Positive(t, during.ErrorCount, "the nodes did not notice PostgreSQL went away")
	for msg := range during.Errors {
		assert.Regexp(t, `broker store: |could not write the audit record of this release to its store`, msg, "a node's error does not say the broker's store failed")
	}
	for _, r := range []*replica{a, b} {
		require.False(t, r.proc.exited(), "replica %s exited when PostgreSQL went away", r.name)
	}
	after := s.recovered()
	s.checkAudit(during, after)
}
