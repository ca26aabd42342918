package labeler

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/attested-dev/attested/test/kubeapi"
)

const labelerUser = "system:serviceaccount:attested:attested-labeler"

func patchLabels(ctx context.Context, c kubernetes.Interface, node, labels string, sub ...string) error {
	_, err := c.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(`{"metadata":{"labels":`+labels+`}}`), metav1.PatchOptions{}, sub...)
	return err
}

// The labeler against a real API server: the example's RBAC is enough for
// it and allows nothing else, its watch sees changes at once, and the
// example's admission policy refuses attested.dev/ labels from anyone else
// (a kubelet labelling its own node trusted, a cluster admin).
func TestLabelerAgainstAPIServer(t *testing.T) {
	api := kubeapi.Start(t)
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(api.Admin)
	_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "attested"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	api.Apply(t, "../../examples/kubernetes/labeler.yaml", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
	for _, n := range []string{"node-a", "node-b"} {
		_, err := admin.CoreV1().Nodes().Create(ctx, kubeNode(n, map[string]string{"kubernetes.io/hostname": n}), metav1.CreateOptions{})
		require.NoError(t, err)
	}

	// Kubelets may patch nodes here (a stand-in for the Node authorizer,
	// which lets a kubelet change its own Node).
	_, err = admin.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "test-kubelet"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"nodes", "nodes/status"}, Verbs: []string{"get", "create", "patch", "update"}}}}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "test-kubelet"},
		RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "test-kubelet"},
		Subjects: []rbacv1.Subject{{Kind: "Group", APIGroup: "rbac.authorization.k8s.io", Name: "system:nodes"}}}, metav1.CreateOptions{})
	require.NoError(t, err)
	kubelet := kubernetes.NewForConfigOrDie(api.As("system:node:node-b", "system:nodes"))

	// The admission policy is loaded in the background: wait until it
	// refuses, changing a label of a node kept for that (a change that is
	// let through before is not one after).
	_, err = admin.CoreV1().Nodes().Create(ctx, kubeNode("probe", nil), metav1.CreateOptions{})
	require.NoError(t, err)
	probe := 0
	require.Eventually(t, func() bool {
		probe++
		err := patchLabels(ctx, kubelet, "probe", fmt.Sprintf(`{"attested.dev/probe":"%d"}`, probe))
		return apierrors.IsForbidden(err)
	}, 30*time.Second, 200*time.Millisecond, "the admission policy never refused a kubelet's attested.dev/ label")

	b := &fakeBroker{}
	b.set(brokerNode("node-a", "trusted", map[string]string{"region": "EU"}), brokerNode("node-b", "untrusted", nil))
	labelerCfg := api.As(labelerUser, "system:serviceaccounts", "system:serviceaccounts:attested")
	asLabeler := kubernetes.NewForConfigOrDie(labelerCfg)
	l, err := New(b, asLabeler.CoreV1().Nodes(), Config{Interval: time.Second, Grace: 5 * time.Second, Timeout: time.Second,
		Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- l.Run(runCtx) }()
	defer func() { cancel(); <-done }()

	eventually := func(name string, want map[string]string) {
		t.Helper()
		want["kubernetes.io/hostname"] = name
		require.Eventually(t, func() bool {
			n, err := admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			return err == nil && assert.ObjectsAreEqual(want, n.Labels)
		}, 20*time.Second, 50*time.Millisecond, "node %s labels %v", name, want)
	}
	eventually("node-a", map[string]string{TrustedLabel: "true", Prefix + "region": "EU"})
	eventually("node-b", map[string]string{TrustedLabel: "false"})

	// A compromised kubelet cannot call its node trusted, nor take labels
	// away, through the object or its status; other labels it may set.
	for _, tc := range []struct{ labels, sub string }{
		{`{"attested.dev/trusted":"true"}`, ""},
		{`{"attested.dev/region":"EU"}`, ""},
		{`{"attested.dev/trusted":null}`, ""},
		{`{"attested.dev/trusted":"true"}`, "status"},
	} {
		var sub []string
		if tc.sub != "" {
			sub = []string{tc.sub}
		}
		err := patchLabels(ctx, kubelet, "node-b", tc.labels, sub...)
		require.Error(t, err, tc)
		assert.Contains(t, err.Error(), "labels under attested.dev/ are set by the attested labeler only", tc)
	}
	require.NoError(t, patchLabels(ctx, kubelet, "node-b", `{"example.com/rack":"r1"}`))
	_, err = kubelet.CoreV1().Nodes().Create(ctx, kubeNode("node-c", map[string]string{TrustedLabel: "true"}), metav1.CreateOptions{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "attested labeler only")
	// Nor can a cluster admin.
	require.Error(t, patchLabels(ctx, admin, "node-a", `{"attested.dev/region":"US"}`))
	eventually("node-b", map[string]string{TrustedLabel: "false", "example.com/rack": "r1"})

	// The labeler's RBAC allows nothing but reading and patching nodes.
	_, err = asLabeler.CoreV1().Nodes().Update(ctx, kubeNode("node-a", nil), metav1.UpdateOptions{})
	assert.True(t, apierrors.IsForbidden(err), "update nodes: %v", err)
	assert.True(t, apierrors.IsForbidden(asLabeler.CoreV1().Nodes().Delete(ctx, "node-a", metav1.DeleteOptions{})), "delete nodes")
	_, err = asLabeler.CoreV1().Nodes().Create(ctx, kubeNode("node-d", nil), metav1.CreateOptions{})
	assert.True(t, apierrors.IsForbidden(err), "create nodes: %v", err)
	_, err = asLabeler.CoreV1().Secrets("attested").List(ctx, metav1.ListOptions{})
	assert.True(t, apierrors.IsForbidden(err), "list secrets: %v", err)
	_, err = asLabeler.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	assert.True(t, apierrors.IsForbidden(err), "list pods: %v", err)
	err = patchLabels(ctx, asLabeler, "node-a", `{"attested.dev/trusted":"true"}`, "status")
	assert.True(t, apierrors.IsForbidden(err), "patch nodes/status: %v", err)

	// The broker's view changes: the labels follow at the next poll; a
	// node that joins is labelled at once.
	b.set(brokerNode("node-a", "revoked", map[string]string{"region": "EU"}), brokerNode("node-b", "trusted", map[string]string{"pci": "yes"}),
		brokerNode("node-e", "trusted", nil))
	eventually("node-a", map[string]string{TrustedLabel: "false"})
	eventually("node-b", map[string]string{TrustedLabel: "true", Prefix + "pci": "yes", "example.com/rack": "r1"})
	_, err = admin.CoreV1().Nodes().Create(ctx, kubeNode("node-e", map[string]string{"kubernetes.io/hostname": "node-e"}), metav1.CreateOptions{})
	require.NoError(t, err)
	eventually("node-e", map[string]string{TrustedLabel: "true"})

}
