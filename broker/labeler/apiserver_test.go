package labeler

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// apiServer is a real kube-apiserver on loopback with its own etcd.
type apiServer struct {
	admin *rest.Config
}

// startAPIServer runs KUBE_APISERVER_BIN and ETCD_BIN ('make
// kube-apiserver' builds both) until the test ends, or skips the test when
// they are not given.
func startAPIServer(t *testing.T) *apiServer {
	t.Helper()
	apiBin, etcdBin := os.Getenv("KUBE_APISERVER_BIN"), os.Getenv("ETCD_BIN")
	if apiBin == "" || etcdBin == "" {
		t.Skip("KUBE_APISERVER_BIN and ETCD_BIN not set: 'make kube-test' builds a real API server and runs this test")
	}
	dir := t.TempDir()
	etcdClient, etcdPeer, apiPort := freePort(t), freePort(t), freePort(t)
	start(t, "etcd", etcdBin, "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", "http://"+etcdClient, "--listen-peer-urls", "http://"+etcdPeer)

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	saKey := filepath.Join(dir, "sa.key")
	require.NoError(t, os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600))
	token := rand.Text()
	tokens := filepath.Join(dir, "tokens.csv")
	require.NoError(t, os.WriteFile(tokens, []byte(token+",admin,admin,system:masters\n"), 0o600))
	_, port, _ := net.SplitHostPort(apiPort)
	certDir := filepath.Join(dir, "certs")
	start(t, "kube-apiserver", apiBin, "--etcd-servers", "http://"+etcdClient,
		"--bind-address", "127.0.0.1", "--secure-port", port, "--cert-dir", certDir,
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", saKey,
		"--service-account-signing-key-file", saKey, "--token-auth-file", tokens,
		"--authorization-mode", "RBAC", "--service-cluster-ip-range", "10.96.0.0/16")

	admin := &rest.Config{Host: "https://" + apiPort, BearerToken: token, Timeout: 10 * time.Second,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}} // its serving certificate is self-signed, made at start
	kube := kubernetes.NewForConfigOrDie(admin)
	require.Eventually(t, func() bool {
		body, err := kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(context.Background())
		return err == nil && string(body) == "ok"
	}, 90*time.Second, 250*time.Millisecond, "kube-apiserver not ready")
	return &apiServer{admin: admin}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

// start runs a server process until the test ends; its output goes to
// the test log when the test fails.
func start(t *testing.T, name, bin string, args ...string) {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("%s output:\n%s", name, lastLines(out.String(), 40))
		}
	})
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// as returns a client that acts as user (admin impersonating it).
func (a *apiServer) as(user string, groups ...string) *rest.Config {
	c := rest.CopyConfig(a.admin)
	c.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: append(groups, "system:authenticated")}
	return c
}

const labelerUser = "system:serviceaccount:attested:attested-labeler"

// applyExample creates the objects of an example manifest that the test
// names by kind.
func applyExample(t *testing.T, kube kubernetes.Interface, file string, kinds ...string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("../../examples/kubernetes", file))
	require.NoError(t, err)
	dec := yaml.NewDecoder(bytes.NewReader(data))
	ctx := context.Background()
	applied := map[string]int{}
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else {
			require.NoError(t, err)
		}
		kind, _ := doc["kind"].(string)
		if !contains(kinds, kind) {
			continue
		}
		raw, err := yaml.Marshal(doc)
		require.NoError(t, err)
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(raw, nil, nil)
		require.NoError(t, err, kind)
		switch o := obj.(type) {
		case *corev1.ServiceAccount:
			_, err = kube.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.ClusterRole:
			_, err = kube.RbacV1().ClusterRoles().Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.ClusterRoleBinding:
			_, err = kube.RbacV1().ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{})
		case *admissionv1.ValidatingAdmissionPolicy:
			_, err = kube.AdmissionregistrationV1().ValidatingAdmissionPolicies().Create(ctx, o, metav1.CreateOptions{})
		case *admissionv1.ValidatingAdmissionPolicyBinding:
			_, err = kube.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Create(ctx, o, metav1.CreateOptions{})
		default:
			err = fmt.Errorf("kind %s: teach applyExample", kind)
		}
		require.NoError(t, err, kind)
		applied[kind]++
	}
	for _, k := range kinds {
		require.Positive(t, applied[k], "%s has no %s", file, k)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func patchLabels(ctx context.Context, c kubernetes.Interface, node, labels string, sub ...string) error {
	_, err := c.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, []byte(`{"metadata":{"labels":`+labels+`}}`), metav1.PatchOptions{}, sub...)
	return err
}

// The labeler against a real API server: the example's RBAC is enough for
// it and allows nothing else, its watch sees changes at once, and the
// example's admission policy refuses attested.dev/ labels from anyone else
// (a kubelet labelling its own node trusted, a cluster admin).
func TestLabelerAgainstAPIServer(t *testing.T) {
	api := startAPIServer(t)
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(api.admin)
	_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "attested"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	applyExample(t, admin, "labeler.yaml", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
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
	kubelet := kubernetes.NewForConfigOrDie(api.as("system:node:node-b", "system:nodes"))

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
	labelerCfg := api.as(labelerUser, "system:serviceaccounts", "system:serviceaccounts:attested")
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
