package load

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	"github.com/attested-dev/attested/attest"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/keyprovider"
	"github.com/attested-dev/attested/test/swtpm"
)

// FailingPCR is the PCR a failing node has extended after enrollment: the
// load policy pins it, so such a node must be refused every key.
const FailingPCR = 16

// Node is one simulated node: its own swtpm, enrolled with the broker
// under its own EK, with its own broker connection and session, unwrapping
// through the product's keyprovider Handler as the agent does.
type Node struct {
	Name string
	TPM  *swtpm.TPM
	// Failing nodes have PCR FailingPCR extended: every release to one is
	// a wrong release.
	Failing bool
	State   *attest.State

	cc, attestCC *grpc.ClientConn
	broker       *timedBroker
	Sessions     *attest.Sessions
	Handler      *keyprovider.Handler
}

// Fleet is a set of nodes enrolled with one broker (or one address in
// front of several replicas).
type Fleet struct {
	Nodes []*Node
	rec   *Recorder
}

// FleetOptions configures NewFleet.
type FleetOptions struct {
	// Dir holds the TPMs' state.
	Dir string
	CA  *swtpm.CA
	// Nodes is how many nodes; the first Failing of them fail policy.
	Nodes, Failing int
	// Addrs are the broker addresses; node i uses Addrs[i%len(Addrs)].
	Addrs    []string
	CAFile   string
	BrokerID string
	// Admin is an admin client of the broker (join tokens).
	Admin apiv1.AdminClient
	// Timeout bounds each broker call and TPM operation of a node, as
	// node.yaml's timeout does.
	Timeout time.Duration
	// Parallel bounds how many TPMs are manufactured and nodes enrolled
	// at once.
	Parallel int
	// Progress, when set, is told how far set-up is.
	Progress func(format string, args ...any)
	// NamePrefix names the nodes (default "load-").
	NamePrefix string
	// SplitConns gives each node a second broker connection for its
	// attestations: through a round-robin balancer in front of replicas,
	// a node then often attests at one replica and unwraps at another.
	SplitConns bool
}

// NewFleet manufactures and starts a TPM per node, enrolls each node with
// a join token from the admin API, and extends PCR FailingPCR on the
// failing ones. Close stops it all.
func NewFleet(ctx context.Context, o FleetOptions) (*Fleet, error) {
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	if o.Parallel <= 0 {
		o.Parallel = 16
	}
	if o.NamePrefix == "" {
		o.NamePrefix = "load-"
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string, ...any) {}
	}
	f := &Fleet{rec: NewRecorder()}
	f.Nodes = make([]*Node, o.Nodes)
	for i := range f.Nodes {
		f.Nodes[i] = &Node{Name: fmt.Sprintf("%s%04d", o.NamePrefix, i), Failing: i < o.Failing}
	}
	start := time.Now()
	err := each(o.Parallel, f.Nodes, func(i int, n *Node) error {
		t, err := swtpm.Launch(o.CA, filepath.Join(o.Dir, n.Name, "tpm"))
		if err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
		n.TPM = t
		return nil
	})
	if err != nil {
		f.Close()
		return nil, err
	}
	progress("%d TPMs manufactured and running in %s", len(f.Nodes), time.Since(start).Round(time.Millisecond))
	start = time.Now()
	var done atomic.Int64
	err = each(o.Parallel, f.Nodes, func(i int, n *Node) error {
		if err := f.enroll(ctx, o, n, o.Addrs[i%len(o.Addrs)]); err != nil {
			return err
		}
		if d := done.Add(1); len(f.Nodes) >= 500 && d%int64(len(f.Nodes)/5) == 0 && int(d) < len(f.Nodes) {
			progress("%d of %d nodes enrolled (%s)", d, len(f.Nodes), time.Since(start).Round(time.Second))
		}
		return nil
	})
	if err != nil {
		f.Close()
		return nil, err
	}
	progress("%d nodes enrolled with join tokens in %s", len(f.Nodes), time.Since(start).Round(time.Millisecond))
	return f, nil
}

func (f *Fleet) enroll(ctx context.Context, o FleetOptions, n *Node, addr string) error {
	cc, err := conn.Dial(conn.Options{Addr: addr, CAFile: o.CAFile, Timeout: o.Timeout})
	if err != nil {
		return err
	}
	n.cc = cc
	n.broker = &timedBroker{BrokerClient: apiv1.NewBrokerClient(cc), rec: f.rec, node: n}
	n.broker.attest = n.broker.BrokerClient
	if o.SplitConns {
		if n.attestCC, err = conn.Dial(conn.Options{Addr: addr, CAFile: o.CAFile, Timeout: o.Timeout}); err != nil {
			return err
		}
		n.broker.attest = apiv1.NewBrokerClient(n.attestCC)
	}
	ctx, cancel := context.WithTimeout(ctx, 4*o.Timeout)
	defer cancel()
	tok, err := o.Admin.CreateJoinToken(ctx, &apiv1.CreateJoinTokenRequest{TtlSeconds: 3600})
	if err != nil {
		return fmt.Errorf("node %s: join token: %w", n.Name, err)
	}
	t, err := attest.OpenTPM(ctx, n.TPM.URI())
	if err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	st, rec, err := attest.Enroll(ctx, n.broker.BrokerClient, t, attest.EnrollOptions{Name: n.Name, JoinToken: tok.GetToken(), BrokerID: o.BrokerID})
	t.Close()
	if err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	if rec.GetState() != apiv1.NodeState_NODE_STATE_ACTIVE {
		return fmt.Errorf("node %s: enrolled as %s, not active", n.Name, rec.GetState())
	}
	n.State = st
	if n.Failing {
		if err := n.TPM.Extend(FailingPCR, []byte("attested-load: a boot component policy does not allow")); err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
	}
	n.Sessions = &attest.Sessions{Broker: n.broker, State: st,
		TPM: func(ctx context.Context) (*attest.TPM, error) { return attest.OpenTPM(ctx, n.TPM.URI()) }}
	n.Handler = &keyprovider.Handler{Unwrapper: &keyprovider.NodeUnwrapper{Broker: n.broker, Sessions: n.Sessions, BrokerID: st.Broker}}
	return nil
}

// Close stops every TPM and closes the broker connections.
func (f *Fleet) Close() {
	var wg sync.WaitGroup
	for _, n := range f.Nodes {
		for _, cc := range []*grpc.ClientConn{n.cc, n.attestCC} {
			if cc != nil {
				cc.Close()
			}
		}
		if n.TPM != nil {
			wg.Go(n.TPM.Stop)
		}
	}
	wg.Wait()
}

// Errors returns the failures of the run in progress (or the last one),
// by message, and their total.
func (f *Fleet) Errors() (map[string]int, int) { return f.rec.Errors() }

// TPMPIDs are the swtpm processes' ids.
func (f *Fleet) TPMPIDs() []int {
	var out []int
	for _, n := range f.Nodes {
		if n.TPM != nil && n.TPM.PID() != 0 {
			out = append(out, n.TPM.PID())
		}
	}
	return out
}

// each runs fn for every item, at most parallel at once, and returns the
// first error (the others still finish).
func each[T any](parallel int, items []T, fn func(int, T) error) error {
	sem := make(chan struct{}, parallel)
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for i, it := range items {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := fn(i, it); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errs[0]
	}
	return fmt.Errorf("%w (and %d more failures)", errs[0], len(errs)-1)
}
