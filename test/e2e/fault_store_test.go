//go:build e2e

package e2e

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/test/load"
)

// storm is a fleet of simulated nodes (test/load: each its own swtpm,
// enrolled with a join token, running the node code in this process)
// releasing the layer keys of a 4-layer image from the world's broker.
type storm struct {
	w        *world
	fleet    *load.Fleet
	img      *load.Image
	admin    apiv1.AdminClient
	failing  map[string]bool
	released atomic.Int64
}

const stormLayers = 4

// stormLimits raises the broker's per-source limits for nodes simulated
// nodes, all of which connect from 127.0.0.1.
func stormLimits(t *testing.T, nodes int) string {
	y, err := load.LimitsYAML(load.LoadLimits(nodes, stormLayers), nodes)
	require.NoError(t, err)
	return y
}

// newStorm enrolls nodes nodes with w's broker, the first failing of
// which fail policy "storm" (PCR 16 extended), and wraps the image for
// key "storm" under that policy. With split, each node attests over a
// connection of its own (see load.FleetOptions.SplitConns).
func newStorm(t *testing.T, w *world, nodes, failing int, split bool) *storm {
	cc, err := conn.Dial(conn.Options{Addr: w.brokerAddr, CAFile: filepath.Join(w.brokerDir, "ca.pem"),
		AdminTokenFile: filepath.Join(w.brokerDir, "admin.token"), Timeout: 20 * time.Second})
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close() })
	s := &storm{w: w, admin: apiv1.NewAdminClient(cc), failing: map[string]bool{}}
	ctx := context.Background()
	s.fleet, err = load.NewFleet(ctx, load.FleetOptions{Dir: filepath.Join(w.dir, "storm"), CA: shared.ca, Nodes: nodes, Failing: failing,
		Addrs: []string{w.brokerAddr}, CAFile: filepath.Join(w.brokerDir, "ca.pem"), BrokerID: w.brokerID, Admin: s.admin,
		Timeout: 10 * time.Second, NamePrefix: "storm-", Progress: t.Logf, SplitConns: split})
	require.NoError(t, err)
	t.Cleanup(s.fleet.Close)
	good := s.fleet.Nodes[nodes-1]
	pcrs := map[int][]byte{}
	for _, i := range []int{0, load.FailingPCR} {
		pcrs[i], err = good.TPM.PCR(i)
		require.NoError(t, err)
	}
	s.img, err = load.Setup(ctx, s.admin, cc, filepath.Join(w.brokerDir, "ca.pem"), w.brokerAddr, "storm", pcrs, stormLayers)
	require.NoError(t, err)
	for _, n := range s.fleet.Nodes {
		s.failing[n.Name] = n.Failing
	}
	return s
}

// start has every node pull over and over, attesting afresh before every
// third pull, until the returned function is called; that function
// returns what the nodes saw.
func (s *storm) start() func() *load.Result { return s.startAttesting(3) }

// startAttesting is start with fresh attestations before every
// attestEvery-th pull (0: only the first).
func (s *storm) startAttesting(attestEvery int) func() *load.Result {
	stop := make(chan struct{})
	done := make(chan *load.Result, 1)
	go func() {
		done <- s.fleet.Run(stop, load.Workload{Image: s.img, AttestEvery: attestEvery, Timeout: 10 * time.Second,
			OnRelease: func(*load.Node) { s.released.Add(1) }})
	}()
	return func() *load.Result {
		close(stop)
		return <-done
	}
}

// waitReleases waits until the nodes received n more layer keys.
func (s *storm) waitReleases(n int64) {
	s.w.t.Helper()
	target := s.released.Load() + n
	deadline := time.Now().Add(60 * time.Second)
	for s.released.Load() < target {
		require.True(s.w.t, time.Now().Before(deadline), "the nodes received %d layer keys in 60s, want %d", s.released.Load(), target)
		time.Sleep(10 * time.Millisecond)
	}
}

// checkAudit requires every release the nodes of runs received to have
// its audit record, and no release to a failing node.
func (s *storm) checkAudit(runs ...*load.Result) {
	t := s.w.t
	t.Helper()
	seen := map[string]int{}
	for _, r := range runs {
		for node, n := range r.Releases {
			seen[node] += n
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	audited, err := load.AuditReleases(ctx, s.admin)
	require.NoError(t, err)
	total := 0
	for _, n := range seen {
		total += n
	}
	require.Positive(t, total, "the nodes received no layer key")
	assert.Empty(t, load.CheckAudit(seen, audited, s.failing), "releases the nodes received and the audit's records")
	for _, r := range runs {
		assert.Zero(t, r.WrongReleases, "keys released to nodes that fail policy")
	}
	if !t.Failed() {
		t.Logf("audit holds the record of each of the %d layer keys the nodes received", total)
	}
}

// recovered waits until a storm of every node runs without error (gRPC
// clients reconnect with backoff after a broker outage) and returns it.
func (s *storm) recovered() *load.Result {
	t := s.w.t
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		stop := s.start()
		time.Sleep(2 * time.Second)
		r := stop()
		if r.ErrorCount == 0 {
			return r
		}
		require.True(t, time.Now().Before(deadline), "the nodes still fail 60s after the fault ended: %v", load.SortedErrors(r.Errors))
	}
}

// auditIntact checks, through 'attested audit list', that every record
// the store holds reads back whole, in order.
func (w *world) auditIntact() {
	w.t.Helper()
	evs := w.audit()
	require.NotEmpty(w.t, evs)
	for i := 1; i < len(evs); i++ {
		require.Greater(w.t, evs[i].Seq, evs[i-1].Seq, "audit records out of order or repeated at %d", i)
	}
	for _, e := range evs {
		require.NotEmpty(w.t, e.Kind, "audit record %d has no kind", e.Seq)
	}
}

// TestBrokerKilledDuringReleaseStorm: a broker SIGKILLed while a fleet
// pulls (every layer key a release with its audit record, written before
// the answer) restarts on its store, which holds the record of every
// release any node received, and nothing half-written; nodes that fail
// policy got nothing; the nodes resume once it is back.
func TestBrokerKilledDuringReleaseStorm(t *testing.T) {
	const nodes, failing = 12, 2
	w := newWorld(t, worldOptions{noImage: true, brokerConfig: stormLimits(t, nodes)})
	s := newStorm(t, w, nodes, failing, false)

	stop := s.start()
	s.waitReleases(300)
	require.NoError(t, w.broker.cmd.Process.Kill())
	<-w.broker.done
	time.Sleep(500 * time.Millisecond) // the nodes see the broker gone
	during := stop()
	t.Logf("storm: %d pulls, %d layer keys received, %d refusals of failing nodes; errors: %v",
		during.Pulls, s.released.Load(), during.Refusals, load.SortedErrors(during.Errors))
	require.Positive(t, during.ErrorCount, "the nodes did not notice the broker was killed")
	for msg := range during.Errors {
		assert.Regexp(t, `broker 127\.0\.0\.1:PORT (is unreachable|did not answer in time)`, msg, "a node's error does not name the broker")
	}

	require.NoError(t, w.serveBroker(w.brokerAddr), "the broker does not start on its store after SIGKILL")
	s.checkAudit(during)
	w.auditIntact()
	after := s.recovered()
	s.checkAudit(during, after)
}

// TestBrokerDiskFull: the broker's data directory is on a small file
// system that fills up while a fleet pulls. The broker refuses what it
// cannot record (a release whose audit record cannot be written is not
// released), saying the disk is full; every release a node received is in
// the audit; when space returns the broker serves again without a
// restart, and after one its store holds everything it acknowledged.
func TestBrokerDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs for the broker's data directory needs root")
	}
	const nodes, failing = 6, 1
	w := newWorld(t, worldOptions{brokerConfig: stormLimits(t, nodes)})
	s := newStorm(t, w, nodes, failing, false)
	n := w.node1
	n.ocicryptConfig(grpcMode) // node1's agent is up and warm
	w.mustPull(n, grpcMode)

	// Move the broker's data directory onto a 16 MiB tmpfs. It is
	// unmounted after the broker stops (cleanups run last first).
	w.broker.stop()
	mnt := filepath.Join(w.dir, "small-disk")
	require.NoError(t, os.Mkdir(mnt, 0o700))
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", mnt).CombinedOutput()
	require.NoError(t, err, "mount: %s", out)
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	out, err = exec.Command("cp", "-a", w.brokerDir+"/.", mnt).CombinedOutput()
	require.NoError(t, err, "cp: %s", out)
	w.brokerDir = mnt
	require.NoError(t, w.serveBroker(w.brokerAddr))
	before := s.recovered()

	// Fill the disk while the fleet pulls on warm sessions (no new
	// attestation, which the full disk would refuse first), until the
	// broker refuses a release.
	stop := s.startAttesting(0)
	s.waitReleases(100)
	filler := filepath.Join(mnt, "filler")
	fill(t, filler)
	deadline := time.Now().Add(90 * time.Second)
	for _, failed := s.fleet.Errors(); failed == 0 && time.Now().Before(deadline); _, failed = s.fleet.Errors() {
		time.Sleep(200 * time.Millisecond)
	}
	full := stop()
	t.Logf("disk full: %d layer keys released, errors: %v", sum(full.Releases), load.SortedErrors(full.Errors))
	// Whatever the broker released, it recorded.
	s.checkAudit(before, full)
	require.Positive(t, full.ErrorCount, "the broker released for 90s on a full disk and refused nothing")
	for msg := range full.Errors {
		assert.Contains(t, msg, "no space left on device", "a node's error does not say the broker's disk is full")
	}
	// Through the built binary, in the words an operator reads.
	refused := false
	for i := 0; i < 20 && !refused; i++ {
		r, _ := w.pull(n, grpcMode)
		if r.err != nil {
			refused = true
			assert.Contains(t, r.msg(), "no space left on device")
			assert.Contains(t, r.msg(), "audit")
			t.Logf("a pull on the full disk printed:\n%s", r.stderr)
		}
	}
	assert.True(t, refused, "20 pulls on a full disk all succeeded")
	s.checkAudit(before, full)

	require.NoError(t, os.Remove(filler))
	after := s.recovered()
	w.mustPull(n, grpcMode)
	s.checkAudit(before, full, after)

	w.broker.stop()
	require.NoError(t, w.serveBroker(w.brokerAddr))
	s.checkAudit(before, full, after)
	w.auditIntact()
}

// fill writes path until its file system has no space left.
func fill(t *testing.T, path string) {
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			require.True(t, errors.Is(err, syscall.ENOSPC), "filling the disk: %v", err)
			break
		}
	}
	// Smaller writes take the last pages.
	for _, n := range []int{4096, 512, 1} {
		for {
			if _, err := f.Write(buf[:n]); err != nil {
				break
			}
		}
	}
}

func sum(m map[string]int) int {
	t := 0
	for _, v := range m {
		t += v
	}
	return t
}
