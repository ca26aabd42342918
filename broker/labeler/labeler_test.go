package labeler

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	k8stesting "k8s.io/client-go/testing"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// fakeBroker answers ListNodes with what the test sets.
type fakeBroker struct {
	mu    sync.Mutex
	nodes []*apiv1.Node
	err   error
	hang  bool
	calls int
}

func (b *fakeBroker) ListNodes(ctx context.Context, _ *apiv1.ListNodesRequest, _ ...grpc.CallOption) (*apiv1.ListNodesResponse, error) {
	b.mu.Lock()
	b.calls++
	hang, err, nodes := b.hang, b.err, b.nodes
	b.mu.Unlock()
	if hang {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if err != nil {
		return nil, err
	}
	return &apiv1.ListNodesResponse{Nodes: nodes}, nil
}

func (b *fakeBroker) set(nodes ...*apiv1.Node) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.nodes, b.err, b.hang = nodes, nil, false
}

func (b *fakeBroker) fail(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.err = err
}

func brokerNode(name, st string, certified map[string]string) *apiv1.Node {
	return &apiv1.Node{Name: name, State: apiv1.NodeState_NODE_STATE_ACTIVE, Status: st, StatusReason: "because " + st, CertifiedTags: certified}
}

func kubeNode(name string, labels map[string]string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type rig struct {
	t      *testing.T
	broker *fakeBroker
	kube   *fake.Clientset
	clock  *clock
	l      *Labeler
	log    *bytes.Buffer
}

func newRig(t *testing.T, nodes ...*corev1.Node) *rig {
	t.Helper()
	var objs []runtime.Object
	for _, n := range nodes {
		objs = append(objs, n)
	}
	r := &rig{t: t, broker: &fakeBroker{}, kube: fake.NewClientset(objs...), clock: &clock{t: time.Unix(1_800_000_000, 0)}, log: &bytes.Buffer{}}
	var err error
	r.l, err = New(r.broker, r.kube.CoreV1().Nodes(), Config{
		Interval: 30 * time.Second, Grace: 2 * time.Minute, Timeout: 200 * time.Millisecond,
		Log: slog.New(slog.NewTextHandler(&syncWriter{w: r.log}, &slog.HandlerOptions{Level: slog.LevelDebug})), Now: r.clock.now,
	})
	require.NoError(t, err)
	return r
}

// labels returns a node's labels as the API server holds them.
func (r *rig) labels(name string) map[string]string {
	r.t.Helper()
	n, err := r.kube.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	require.NoError(r.t, err)
	return n.Labels
}

func (r *rig) step() error { return r.l.Step(context.Background()) }

// patches returns the patch actions made since the last call.
func (r *rig) patches() []k8stesting.PatchAction {
	var out []k8stesting.PatchAction
	for _, a := range r.kube.Actions() {
		if p, ok := a.(k8stesting.PatchAction); ok {
			out = append(out, p)
		}
	}
	r.kube.ClearActions()
	return out
}

func TestTrustedNodeLabelledTrueWithCertifiedTags(t *testing.T) {
	r := newRig(t, kubeNode("node-a", map[string]string{"kubernetes.io/hostname": "node-a", "team": "payments"}))
	r.broker.set(brokerNode("node-a", "trusted", map[string]string{"region": "EU", "zone": "eu-west-1a"}))
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{
		"kubernetes.io/hostname": "node-a", "team": "payments",
		TrustedLabel: "true", Prefix + "region": "EU", Prefix + "zone": "eu-west-1a",
	}, r.labels("node-a"))

	// The change is one merge patch of labels only.
	ps := r.patches()
	require.Len(t, ps, 1)
	assert.Equal(t, types.MergePatchType, ps[0].GetPatchType())
	var body map[string]any
	require.NoError(t, json.Unmarshal(ps[0].GetPatch(), &body))
	assert.Equal(t, map[string]any{"metadata": map[string]any{"labels": map[string]any{
		TrustedLabel: "true", Prefix + "region": "EU", Prefix + "zone": "eu-west-1a",
	}}}, body)

	// Nothing to change: no API write.
	require.NoError(t, r.step())
	assert.Empty(t, r.patches())
	assert.Contains(t, r.log.String(), "node=node-a trusted=true")
}

func TestNotTrustedStatusesLabelledFalseWithoutTags(t *testing.T) {
	for _, st := range []string{"untrusted", "stale", "revoked", "pending", "", "trusted-ish", "TRUSTED"} {
		t.Run(st, func(t *testing.T) {
			r := newRig(t, kubeNode("node-a", map[string]string{TrustedLabel: "true", Prefix + "region": "EU", "team": "payments"}))
			r.broker.set(brokerNode("node-a", st, map[string]string{"region": "EU"}))
			require.NoError(t, r.step())
			assert.Equal(t, map[string]string{TrustedLabel: "false", "team": "payments"}, r.labels("node-a"))
		})
	}
}

func TestTrustedStatusOfInactiveNodeIsFalse(t *testing.T) {
	for _, state := range []apiv1.NodeState{apiv1.NodeState_NODE_STATE_REVOKED, apiv1.NodeState_NODE_STATE_PENDING, apiv1.NodeState_NODE_STATE_UNSPECIFIED} {
		r := newRig(t, kubeNode("node-a", nil))
		n := brokerNode("node-a", "trusted", nil)
		n.State = state
		r.broker.set(n)
		require.NoError(t, r.step())
		assert.Equal(t, "false", r.labels("node-a")[TrustedLabel], state.String())
	}
}

func TestStatusChangesFollowed(t *testing.T) {
	r := newRig(t, kubeNode("node-a", nil))
	r.broker.set(brokerNode("node-a", "trusted", map[string]string{"region": "EU"}))
	require.NoError(t, r.step())
	assert.Equal(t, "true", r.labels("node-a")[TrustedLabel])

	r.broker.set(brokerNode("node-a", "untrusted", map[string]string{"region": "EU"}))
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{TrustedLabel: "false"}, r.labels("node-a"))
	assert.Contains(t, r.log.String(), `why="status \"untrusted\": because untrusted"`)

	r.broker.set(brokerNode("node-a", "trusted", map[string]string{"region": "EU"}))
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{TrustedLabel: "true", Prefix + "region": "EU"}, r.labels("node-a"))
}

func TestCertifiedTagAddedAndRemoved(t *testing.T) {
	r := newRig(t, kubeNode("node-a", map[string]string{"team": "payments"}))
	r.broker.set(brokerNode("node-a", "trusted", map[string]string{"region": "EU"}))
	require.NoError(t, r.step())

	r.broker.set(brokerNode("node-a", "trusted", map[string]string{"region": "EU", "pci": "yes"}))
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{"team": "payments", TrustedLabel: "true", Prefix + "region": "EU", Prefix + "pci": "yes"}, r.labels("node-a"))

	// region changes value, pci is no longer certified.
	r.broker.set(brokerNode("node-a", "trusted", map[string]string{"region": "US"}))
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{"team": "payments", TrustedLabel: "true", Prefix + "region": "US"}, r.labels("node-a"))

	// An owned label the labeler did not set is removed too.
	_, err := r.kube.CoreV1().Nodes().Patch(context.Background(), "node-a", types.MergePatchType,
		[]byte(`{"metadata":{"labels":{"attested.dev/gpu":"h100"}}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	require.NoError(t, r.step())
	assert.NotContains(t, r.labels("node-a"), Prefix+"gpu")
}

func TestOtherLabelsUntouched(t *testing.T) {
	other := map[string]string{
		"kubernetes.io/hostname": "node-a", "node-role.kubernetes.io/worker": "",
		"attested.dev.example/trusted": "true", "example.com/attested.dev": "x", "attested": "yes",
	}
	labels := map[string]string{TrustedLabel: "true"}
	for k, v := range other {
		labels[k] = v
	}
	r := newRig(t, kubeNode("node-a", labels))
	r.broker.set(brokerNode("node-a", "revoked", nil))
	require.NoError(t, r.step())
	got := r.labels("node-a")
	for k, v := range other {
		assert.Equal(t, v, got[k], k)
	}
	assert.Equal(t, "false", got[TrustedLabel])
	assert.Len(t, got, len(other)+1)
}

func TestReservedAndInvalidTagsMakeNoLabel(t *testing.T) {
	r := newRig(t, kubeNode("node-a", nil))
	r.broker.set(brokerNode("node-a", "trusted", map[string]string{
		"region":  "EU",
		"Trusted": "true", // reserved, whatever the case
		"site/dc": "fra1", // a second '/' makes no label key
		"-edge":   "yes",  // must start with a letter or digit
		"owner":   "EU West",
		"descr":   strings.Repeat("x", 64),
	}))
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{TrustedLabel: "true", Prefix + "region": "EU"}, r.labels("node-a"))
	log := r.log.String()
	for _, want := range []string{`tag \"Trusted\" is reserved`, `tag \"site/dc\" makes no valid label key`, `tag \"-edge\" makes no valid label key`,
		`tag \"owner\": value \"EU West\" is no valid label value`, `tag \"descr\": value`} {
		assert.Contains(t, log, want)
	}
	// Reported once, not on every poll.
	n := strings.Count(log, "certified tag makes no label")
	require.NoError(t, r.step())
	assert.Equal(t, n, strings.Count(r.log.String(), "certified tag makes no label"))

	// The reserved tag cannot make an untrusted node trusted.
	r.broker.set(brokerNode("node-a", "untrusted", map[string]string{"trusted": "true"}))
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{TrustedLabel: "false"}, r.labels("node-a"))
}

func TestNodeUnknownToBrokerIsFalse(t *testing.T) {
	r := newRig(t, kubeNode("node-a", map[string]string{TrustedLabel: "true", Prefix + "region": "EU"}), kubeNode("node-b", nil))
	r.broker.set(brokerNode("node-b", "trusted", nil), brokerNode("not-in-cluster", "trusted", nil),
		brokerNode("NODE-A", "trusted", nil)) // names match exactly or not at all
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{TrustedLabel: "false"}, r.labels("node-a"))
	assert.Equal(t, map[string]string{TrustedLabel: "true"}, r.labels("node-b"))
}

func TestBrokerUnreachableWithinGraceLeavesLabels(t *testing.T) {
	r := newRig(t, kubeNode("node-a", nil))
	r.broker.set(brokerNode("node-a", "trusted", map[string]string{"region": "EU"}))
	require.NoError(t, r.step())
	r.patches()

	r.broker.fail(status.Error(codes.Unavailable, "connection refused"))
	for range 4 { // 4 polls, 30s apart: 2m, the grace period
		r.clock.add(30 * time.Second)
		err := r.step()
		require.Error(t, err)
		assert.NotContains(t, err.Error(), "rpc error")
		assert.Equal(t, map[string]string{TrustedLabel: "true", Prefix + "region": "EU"}, r.labels("node-a"))
	}
	assert.Empty(t, r.patches())
	assert.Contains(t, r.log.String(), "labels unchanged within the grace period")

	// One more failed poll, past the grace period: fail closed.
	r.clock.add(30 * time.Second)
	require.Error(t, r.step())
	assert.Equal(t, map[string]string{TrustedLabel: "false"}, r.labels("node-a"))
	assert.Contains(t, r.log.String(), "broker unreachable beyond the grace period")
	assert.Contains(t, r.log.String(), `why="broker unreachable: labeler: broker: list nodes: connection refused (Unavailable)"`)

	// The broker is back: labels follow it again.
	r.broker.set(brokerNode("node-a", "trusted", map[string]string{"region": "EU"}))
	require.NoError(t, r.step())
	assert.Equal(t, map[string]string{TrustedLabel: "true", Prefix + "region": "EU"}, r.labels("node-a"))

	// The grace period starts again from the last good poll.
	r.broker.fail(errors.New("boom"))
	r.clock.add(90 * time.Second)
	require.Error(t, r.step())
	assert.Equal(t, "true", r.labels("node-a")[TrustedLabel])
}

func TestBrokerUnreachableFromStart(t *testing.T) {
	// A labeler that starts while the broker is down leaves labels alone
	// for the grace period (a restart is no outage), then fails closed.
	r := newRig(t, kubeNode("node-a", map[string]string{TrustedLabel: "true"}))
	r.broker.fail(status.Error(codes.Unavailable, "connection refused"))
	require.Error(t, r.step())
	assert.Equal(t, "true", r.labels("node-a")[TrustedLabel])
	r.clock.add(2*time.Minute + time.Second)
	require.Error(t, r.step())
	assert.Equal(t, "false", r.labels("node-a")[TrustedLabel])
}

func TestBrokerCallHasDeadline(t *testing.T) {
	r := newRig(t, kubeNode("node-a", nil))
	r.broker.set()
	r.broker.hang = true
	start := time.Now()
	err := r.l.Poll(context.Background())
	require.Error(t, err)
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.Contains(t, err.Error(), "DeadlineExceeded")
}

func TestKubernetesCallsHaveDeadline(t *testing.T) {
	r := newRig(t, kubeNode("node-a", nil))
	r.broker.set(brokerNode("node-a", "trusted", nil))
	var deadlines []bool
	var mu sync.Mutex
	// The fake clientset does not pass contexts to reactors; wrap the
	// node client to see them.
	r.l.nodes = deadlineRecorder{NodeInterface: r.l.nodes, record: func(ok bool) { mu.Lock(); deadlines = append(deadlines, ok); mu.Unlock() }}
	require.NoError(t, r.step())
	require.Len(t, deadlines, 2) // list, patch
	for _, ok := range deadlines {
		assert.True(t, ok)
	}
}

func TestConfigRefusesFlappingGrace(t *testing.T) {
	_, err := New(&fakeBroker{}, fake.NewClientset().CoreV1().Nodes(), Config{Interval: time.Minute, Grace: 30 * time.Second})
	require.ErrorContains(t, err, "grace 30s is shorter than the poll interval 1m0s")
	_, err = New(&fakeBroker{}, fake.NewClientset().CoreV1().Nodes(), Config{Interval: time.Minute, Timeout: 2 * time.Minute})
	require.ErrorContains(t, err, "timeout")
	l, err := New(&fakeBroker{}, fake.NewClientset().CoreV1().Nodes(), Config{})
	require.NoError(t, err)
	assert.Equal(t, DefaultInterval, l.cfg.Interval)
	assert.Equal(t, DefaultGrace, l.cfg.Grace)
	assert.Equal(t, DefaultTimeout, l.cfg.Timeout)
}

// Run watches the nodes: a new node is labelled, and a change someone else
// makes to an owned label is undone, without waiting for the next poll.
func TestRunCorrectsTamperingAtOnce(t *testing.T) {
	r := newRig(t, kubeNode("node-a", nil))
	r.broker.set(brokerNode("node-a", "untrusted", nil), brokerNode("node-b", "trusted", map[string]string{"region": "EU"}))
	r.l.cfg.Interval = time.Hour // no second poll during the test
	r.l.nodes = noWatchList{r.l.nodes}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.l.Run(ctx) }()
	defer func() { cancel(); <-done }()

	eventually := func(name string, want map[string]string) {
		t.Helper()
		require.Eventually(t, func() bool {
			n, err := r.kube.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
			return err == nil && assert.ObjectsAreEqual(want, n.Labels)
		}, 10*time.Second, 10*time.Millisecond, "node %s labels %v", name, want)
	}
	eventually("node-a", map[string]string{TrustedLabel: "false"})

	// Someone (a compromised kubelet, a hand) claims node-a is trusted.
	_, err := r.kube.CoreV1().Nodes().Patch(ctx, "node-a", types.MergePatchType,
		[]byte(`{"metadata":{"labels":{"attested.dev/trusted":"true","attested.dev/region":"EU"}}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	eventually("node-a", map[string]string{TrustedLabel: "false"})

	// A node joins the cluster.
	_, err = r.kube.CoreV1().Nodes().Create(ctx, kubeNode("node-b", map[string]string{"team": "x"}), metav1.CreateOptions{})
	require.NoError(t, err)
	eventually("node-b", map[string]string{"team": "x", TrustedLabel: "true", Prefix + "region": "EU"})
	assert.Equal(t, 1, r.broker.calls)
}

func TestLabelPatch(t *testing.T) {
	p, changed := labelPatch(map[string]string{"a": "1", Prefix + "x": "1", Prefix + "trusted": "true"}, map[string]string{Prefix + "trusted": "true"})
	assert.True(t, changed)
	assert.Equal(t, map[string]any{"metadata": map[string]any{"labels": map[string]any{Prefix + "x": nil}}}, p)
	_, changed = labelPatch(map[string]string{"a": "1", Prefix + "trusted": "true"}, map[string]string{Prefix + "trusted": "true"})
	assert.False(t, changed)
	_, changed = labelPatch(nil, map[string]string{Prefix + "trusted": "false"})
	assert.True(t, changed)
}

// syncWriter serialises writes of the labeler's goroutines to a buffer.
type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// deadlineRecorder records whether each List and Patch has a deadline.
type deadlineRecorder struct {
	corev1client.NodeInterface
	record func(bool)
}

func (d deadlineRecorder) List(ctx context.Context, o metav1.ListOptions) (*corev1.NodeList, error) {
	_, ok := ctx.Deadline()
	d.record(ok)
	return d.NodeInterface.List(ctx, o)
}

func (d deadlineRecorder) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, o metav1.PatchOptions, sub ...string) (*corev1.Node, error) {
	_, ok := ctx.Deadline()
	d.record(ok)
	return d.NodeInterface.Patch(ctx, name, pt, data, o, sub...)
}

// noWatchList tells the reflector that the fake clientset does not speak
// the watch-list protocol (the fake Clientset says so; its typed clients
// do not).
type noWatchList struct{ corev1client.NodeInterface }

func (noWatchList) IsWatchListSemanticsUnSupported() bool { return true }
