package labeler

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes/fake"

	nodeattest "github.com/attested-dev/attested/attest"
	_ "github.com/attested-dev/attested/attest/simtpm"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/conn"
)

// proxy forwards loopback TCP to the broker until it is cut, so a test
// can make the broker unreachable and bring it back.
type proxy struct {
	t        *testing.T
	addr     string
	upstream string
	mu       sync.Mutex
	lis      net.Listener
	conns    []net.Conn
}

func newProxy(t *testing.T, upstream string) *proxy {
	p := &proxy{t: t, upstream: upstream}
	p.up("127.0.0.1:0")
	t.Cleanup(p.cut)
	return p
}

func (p *proxy) up(addr string) {
	lis, err := net.Listen("tcp", addr)
	require.NoError(p.t, err)
	p.mu.Lock()
	p.lis, p.addr = lis, lis.Addr().String()
	p.mu.Unlock()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", p.upstream)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			go func() { io.Copy(u, c); u.Close() }()
			go func() { io.Copy(c, u); c.Close() }()
		}
	}()
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.lis != nil {
		p.lis.Close()
		p.lis = nil
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// The labeler against a real broker on loopback, through the real Admin
// API with the admin credential, a simulator TPM as the node.
func TestLabelerWithRealBroker(t *testing.T) {
	ctx := context.Background()
	b := brokertest.Start(t)
	p := newProxy(t, b.Addr)
	cc, err := conn.Dial(conn.Options{Addr: p.addr, CAFile: filepath.Join(b.DataDir, broker.CACertFile),
		AdminTokenFile: filepath.Join(b.DataDir, broker.AdminTokenFile), Timeout: 2 * time.Second})
	require.NoError(t, err)
	defer cc.Close()

	kube := fake.NewClientset(kubeNode("node-a", map[string]string{"team": "payments"}), kubeNode("node-b", nil))
	clk := &clock{t: time.Now()}
	l, err := New(apiv1.NewAdminClient(cc), kube.CoreV1().Nodes(), Config{
		Interval: 30 * time.Second, Grace: 2 * time.Minute, Timeout: 2 * time.Second, Now: clk.now,
		Log: slog.New(slog.NewTextHandler(t.Output(), nil)),
	})
	require.NoError(t, err)
	r := &rig{t: t, kube: kube}

	// Without the admin credential the broker tells nothing.
	noCred, err := New(b.NoCred, kube.CoreV1().Nodes(), Config{Timeout: 2 * time.Second})
	require.NoError(t, err)
	require.ErrorContains(t, noCred.Poll(ctx), "labeler: broker: list nodes")

	// Enrolled, never attested: not trusted. Not enrolled: not trusted.
	tok, err := b.Admin.CreateJoinToken(ctx, &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	tpm, err := nodeattest.OpenTPM(ctx, "simulator")
	require.NoError(t, err)
	st, _, err := nodeattest.Enroll(ctx, b.Node, tpm, nodeattest.EnrollOptions{Name: "node-a", JoinToken: tok.GetToken(), BrokerID: "broker-test"})
	tpm.Close()
	require.NoError(t, err)
	_, err = b.Admin.TagNode(ctx, &apiv1.TagNodeRequest{Name: "node-a", Set: map[string]string{"region": "EU"}})
	require.NoError(t, err)
	require.NoError(t, l.Step(ctx))
	assert.Equal(t, map[string]string{"team": "payments", TrustedLabel: "false"}, r.labels("node-a"))
	assert.Equal(t, map[string]string{TrustedLabel: "false"}, r.labels("node-b"))

	// The node attests, with its tags certified by its TPM.
	attestWithTags(t, b, st)
	nodes, err := b.Admin.ListNodes(ctx, &apiv1.ListNodesRequest{})
	require.NoError(t, err)
	require.Len(t, nodes.GetNodes(), 1)
	if nodes.GetNodes()[0].GetStatus() == "" {
		t.Skip("this broker reports no node status yet (Node.status): the trusted, outage and revocation legs need it")
	}
	require.Equal(t, StatusTrusted, nodes.GetNodes()[0].GetStatus(), nodes.GetNodes()[0].GetStatusReason())
	require.NoError(t, l.Step(ctx))
	want := map[string]string{"team": "payments", TrustedLabel: "true"}
	for k, v := range nodes.GetNodes()[0].GetCertifiedTags() {
		want[Prefix+k] = v
	}
	assert.Equal(t, "EU", want[Prefix+"region"], "the region tag is certified")
	assert.Equal(t, want, r.labels("node-a"))
	assert.Equal(t, map[string]string{TrustedLabel: "false"}, r.labels("node-b"))

	// The broker becomes unreachable: nothing changes within the grace
	// period, then every node is untrusted.
	p.cut()
	clk.add(time.Minute)
	err = l.Step(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "unreachable")
	assert.Equal(t, want, r.labels("node-a"))
	clk.add(time.Minute + time.Second)
	require.Error(t, l.Step(ctx))
	assert.Equal(t, map[string]string{"team": "payments", TrustedLabel: "false"}, r.labels("node-a"))

	// Back: trusted again.
	p.up(p.addr)
	require.Eventually(t, func() bool { return l.Step(ctx) == nil }, 10*time.Second, 100*time.Millisecond)
	assert.Equal(t, want, r.labels("node-a"))

	// Revoked: untrusted at the next poll, tags gone.
	_, err = b.Admin.RevokeNode(ctx, &apiv1.NodeRequest{Name: "node-a"})
	require.NoError(t, err)
	require.NoError(t, l.Step(ctx))
	assert.Equal(t, map[string]string{"team": "payments", TrustedLabel: "false"}, r.labels("node-a"))
}

// attestWithTags has the node write its tags into its TPM (as 'attested
// node tags sync' does) and attest again, so they are certified.
func attestWithTags(t *testing.T, b *brokertest.Broker, st *nodeattest.State) {
	t.Helper()
	ctx := context.Background()
	tpm, err := nodeattest.OpenTPM(ctx, "simulator")
	require.NoError(t, err)
	defer tpm.Close()
	s, err := nodeattest.NewSession(ctx, b.Node, tpm, st, nodeattest.Logs{})
	require.NoError(t, err)
	sealed, err := b.Node.NodeTags(ctx, &apiv1.NodeTagsRequest{SessionToken: s.Token})
	require.NoError(t, err)
	tags, err := s.OpenTags(tpm, sealed)
	require.NoError(t, err)
	require.NoError(t, tpm.WriteTags(tags.GetDigest()))
	_, err = nodeattest.NewSession(ctx, b.Node, tpm, st, nodeattest.Logs{})
	require.NoError(t, err)
}
