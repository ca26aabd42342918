//go:build e2e

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/attested-dev/attested/test/kubeapi"
)

// labelerBin makes sure attested-labeler is beside the attested under test
// ('attested labeler' runs it from there) and returns its path.
func labelerBin(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(filepath.Dir(shared.attested), "attested-labeler")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	require.Equal(t, shared.dir, filepath.Dir(shared.attested), "%s is missing beside ATTESTED_BIN: 'make build' builds both", bin)
	root, err := filepath.Abs("../..")
	require.NoError(t, err)
	require.NoError(t, goBuild(root, nil, "-o", bin, "./cmd/attested-labeler"))
	return bin
}

// 'attested labeler' from the built binaries, against a real broker
// (attested broker serve), an swtpm node and a real Kubernetes API server,
// with the example's RBAC and admission policy: the binary runs
// attested-labeler, which reads the broker with the admin credential file
// and labels the Nodes as the labeler's service account.
func TestLabelerBinary(t *testing.T) {
	api := kubeapi.Start(t)
	labelerBin(t)
	w := newWorld(t, worldOptions{noImage: true})
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(api.Admin)
	_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "attested"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	api.Apply(t, "../../examples/kubernetes/labeler.yaml", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
	for _, name := range []string{"node1", "node9"} {
		_, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	kubeconfig := api.Kubeconfig(t, "system:serviceaccount:attested:attested-labeler", "system:serviceaccounts", "system:serviceaccounts:attested")
	tokenFile := filepath.Join(w.brokerDir, "admin.token")
	labeler := func(tokenFile string) result {
		return w.run(runOpts{}, "attested labeler", shared.attested, "labeler", "--once", "--kubeconfig", kubeconfig,
			"--broker", w.brokerAddr, "--broker-ca", filepath.Join(w.brokerDir, "ca.pem"), "--admin-token-file", tokenFile)
	}
	labels := func(name string) map[string]string {
		n, err := admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		return n.Labels
	}

	// node1 attests; node9 is no broker node.
	r := w.attested(w.node1, "node", "attest")
	require.NoError(t, r.err, "%s", r.stderr)
	r = labeler(tokenFile)
	require.NoError(t, r.err, "attested labeler: %s", r.stderr)
	assert.Equal(t, "false", labels("node9")["attested.dev/trusted"])
	assert.Contains(t, string(r.stderr), `node=node9 trusted=false why="not enrolled at the broker under this name"`)
	// node1's evidence satisfies policy "prod": trusted.
	assert.Equal(t, "true", labels("node1")["attested.dev/trusted"], "%s", r.stderr)

	// Revoked: false.
	w.admin("node", "revoke", "node1")
	r = labeler(tokenFile)
	require.NoError(t, r.err, "attested labeler: %s", r.stderr)
	assert.Equal(t, "false", labels("node1")["attested.dev/trusted"])

	// A wrong admin credential: the broker refuses, the labeler says so and
	// fails; the labels stay (a restart is no outage); the credential is in
	// no output.
	bad := filepath.Join(w.dir, "bad.token")
	require.NoError(t, os.WriteFile(bad, []byte("not-the-admin-token\n"), 0o600))
	r = labeler(bad)
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "labeler: broker: list nodes")
	assert.NotContains(t, r.msg(), "rpc error")
	assert.Equal(t, "false", labels("node1")["attested.dev/trusted"])
	token, err := os.ReadFile(tokenFile)
	require.NoError(t, err)
	w.assertNoSecrets([]secret{{what: "admin token", raw: []byte(strings.TrimSpace(string(token)))}, {what: "bad token", raw: []byte("not-the-admin-token")}})
}

// Without attested-labeler installed, 'attested labeler' says what to do.
func TestLabelerNotInstalled(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "attested")
	data, err := os.ReadFile(shared.attested)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, data, 0o755))
	w := &world{t: t, dir: dir}
	r := w.run(runOpts{env: []string{"PATH=" + dir}}, "attested labeler", bin, "labeler", "--help")
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "attested-labeler is not installed beside this binary or on PATH")
}
