// Package kubeapi runs a real Kubernetes API server (kube-apiserver and
// its etcd, built by 'make kube-apiserver') on loopback for tests: no
// kubelets, no controllers, RBAC and admission as in a cluster.
package kubeapi

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
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
)

// Server is a running API server.
type Server struct {
	// Admin is a cluster admin's configuration (group system:masters).
	Admin *rest.Config
	dir   string
}

// Bins returns the kube-apiserver and etcd binaries from KUBE_APISERVER_BIN
// and ETCD_BIN, or skips the test when they are not set.
func Bins(t testing.TB) (apiServer, etcd string) {
	t.Helper()
	apiServer, etcd = os.Getenv("KUBE_APISERVER_BIN"), os.Getenv("ETCD_BIN")
	if apiServer == "" || etcd == "" {
		t.Skip("KUBE_APISERVER_BIN and ETCD_BIN not set: 'make kube-test' builds a real API server and runs this test")
	}
	return apiServer, etcd
}

// Start runs etcd and kube-apiserver until the test ends (or skips the
// test, see Bins) and returns once the API server is ready.
func Start(t testing.TB) *Server {
	t.Helper()
	apiBin, etcdBin := Bins(t)
	dir := t.TempDir()
	etcdClient, etcdPeer, apiAddr := freeAddr(t), freeAddr(t), freeAddr(t)
	start(t, "etcd", etcdBin, "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", "http://"+etcdClient, "--listen-peer-urls", "http://"+etcdPeer)

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	saKey := filepath.Join(dir, "sa.key")
	require.NoError(t, os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600))
	token := rand.Text()
	tokens := filepath.Join(dir, "tokens.csv")
	require.NoError(t, os.WriteFile(tokens, []byte(token+",admin,admin,system:masters\n"), 0o600))
	_, port, _ := net.SplitHostPort(apiAddr)
	start(t, "kube-apiserver", apiBin, "--etcd-servers", "http://"+etcdClient,
		"--bind-address", "127.0.0.1", "--secure-port", port, "--cert-dir", filepath.Join(dir, "certs"),
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", saKey,
		"--service-account-signing-key-file", saKey, "--token-auth-file", tokens,
		"--authorization-mode", "RBAC", "--service-cluster-ip-range", "10.96.0.0/16")

	// Its serving certificate is self-signed, made at start.
	admin := &rest.Config{Host: "https://" + apiAddr, BearerToken: token, Timeout: 10 * time.Second,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}}
	kube := kubernetes.NewForConfigOrDie(admin)
	require.Eventually(t, func() bool {
		body, err := kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(context.Background())
		return err == nil && string(body) == "ok"
	}, 90*time.Second, 250*time.Millisecond, "kube-apiserver not ready")
	return &Server{Admin: admin, dir: dir}
}

// Apply creates the objects of the kinds named in a manifest file, as the
// admin; each kind must be there.
func (s *Server) Apply(t testing.TB, file string, kinds ...string) {
	t.Helper()
	kube := kubernetes.NewForConfigOrDie(s.Admin)
	data, err := os.ReadFile(file)
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
		if !slices.Contains(kinds, kind) {
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

// As returns a configuration that acts as user (the admin impersonating
// it, so RBAC and admission see user).
func (s *Server) As(user string, groups ...string) *rest.Config {
	c := rest.CopyConfig(s.Admin)
	c.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: append(groups, "system:authenticated")}
	return c
}

// Kubeconfig writes a kubeconfig file that acts as user and returns its
// path.
func (s *Server) Kubeconfig(t testing.TB, user string, groups ...string) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {server: %q, insecure-skip-tls-verify: true}\n", s.Admin.Host)
	fmt.Fprintf(&b, "users:\n- name: test\n  user:\n    token: %q\n    as: %q\n    as-groups: [", s.Admin.BearerToken, user)
	for i, g := range append(groups, "system:authenticated") {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%q", g)
	}
	b.WriteString("]\ncontexts:\n- name: test\n  context: {cluster: test, user: test}\ncurrent-context: test\n")
	f, err := os.CreateTemp(s.dir, "kubeconfig-*")
	require.NoError(t, err)
	_, err = f.WriteString(b.String())
	require.NoError(t, err)
	require.NoError(t, f.Close())
	return f.Name()
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

// lockedBuffer collects a process's output.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// start runs a server process until the test ends; the end of its output
// goes to the test log when the test fails.
func start(t testing.TB, name, bin string, args ...string) {
	t.Helper()
	out := &lockedBuffer{}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start(), name)
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			lines := strings.Split(out.String(), "\n")
			if len(lines) > 40 {
				lines = lines[len(lines)-40:]
			}
			t.Logf("%s output (last lines):\n%s", name, strings.Join(lines, "\n"))
		}
	})
}
