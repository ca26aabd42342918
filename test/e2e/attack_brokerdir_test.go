//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/suite"
	"github.com/attested-dev/attested/keyprovider/annotation"
	"github.com/attested-dev/attested/test/swtpm"
)

// certifiedWorld is a world whose broker runs as 'broker init' leaves it
// (requireEKCertificate: true) with the suite's swtpm CA as the only EK
// root, so every node TPM the harness makes enrolls with its certificate.
func certifiedWorld(t *testing.T, o worldOptions) *world {
	t.Helper()
	// swtpm_localca creates the CA when it first signs; make sure it has.
	swtpm.Start(t, shared.ca, filepath.Join(t.TempDir(), "tpm")).Stop()
	o.brokerConfig += fmt.Sprintf("ekRoots:\n  - %s\n  - %s\n",
		filepath.Join(shared.ca.Dir, "swtpm-localca-rootca-cert.pem"), filepath.Join(shared.ca.Dir, "issuercert.pem"))
	return newWorld(t, o)
}

// keyCacheEntry is the cache file node n keeps for key name.
func (n *node) keyCacheEntry(name string) string {
	n.w.t.Helper()
	m, err := filepath.Glob(filepath.Join(n.dir, "cache", "keys", "*", name+".json"))
	require.NoError(n.w.t, err)
	require.Len(n.w.t, m, 1, "one cache entry for key %s", name)
	return m[0]
}

// layerAnnotations returns the attested annotation of every layer of ref.
func (w *world) layerAnnotations(ref string) []annotation.Annotation {
	w.t.Helper()
	var out []annotation.Annotation
	for i, l := range w.inspect(ref).Layers {
		v, ok := l.Annotations[providerAnnotation]
		require.True(w.t, ok, "layer %d has no attested annotation", i)
		raw, err := base64.StdEncoding.DecodeString(v)
		require.NoError(w.t, err)
		a, err := annotation.Parse(raw)
		require.NoError(w.t, err)
		out = append(out, a)
	}
	return out
}

// TestAttackPlantedWrappingKeyCache (finding 6): a cache entry holding the
// attacker's public key with a fetched time that never expires made keywrap
// seal every layer key to the attacker. Now the pipeline refuses the
// unsigned entry, fetches the broker's signed key, and the image opens for
// attested nodes only; a cache others can write is refused outright.
func TestAttackPlantedWrappingKeyCache(t *testing.T) {
	w := certifiedWorld(t, worldOptions{})
	n := w.node1
	entry := n.keyCacheEntry("app")

	evilPriv, evilPub, err := suite.Default().GenerateKey()
	require.NoError(t, err)
	planted, err := json.Marshal(map[string]any{
		"fetched": time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC), "name": "app", "version": 1,
		"suite": suite.DefaultName, "publicKey": evilPub, "brokerId": w.brokerID,
	})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(entry, planted, 0o600))

	image := "docker://" + w.registry + "/app:planted"
	r := w.imgcopy(n, execMode, "copy", "--quiet", "--encryption-key", "provider:attested:key=app",
		"--dest-tls-verify=false", "oci:"+shared.srcImage+":latest", image)
	require.NoError(t, r.err, "encrypt: %s", r.stderr)
	for i, a := range w.layerAnnotations(image) {
		for _, rc := range a.Recipients {
			_, err := suite.Default().Open(evilPriv, annotation.Info(a.Broker, rc), rc.Ciphertext)
			assert.Error(t, err, "layer %d: the attacker's key opens the layer key", i)
		}
	}
	w.image = image
	w.mustPull(n, execMode)

	// ocicrypt drops a provider's stderr on success; asked directly, the
	// keyprovider says why it did not use the entry.
	require.NoError(t, os.WriteFile(entry, planted, 0o600))
	r = n.keyprovider(wrapRequest("app"), false)
	require.NoError(t, r.err, "%s", r.stderr)
	assert.Contains(t, r.msg(), "not used: carries no broker signature")

	// A cache entry others may write is refused, with the fix.
	require.NoError(t, os.Chmod(entry, 0o666))
	r = w.imgcopy(n, execMode, "copy", "--quiet", "--encryption-key", "provider:attested:key=app",
		"--dest-tls-verify=false", "oci:"+shared.srcImage+":latest", "docker://"+w.registry+"/app:refused")
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "key cache refused")
	assert.Contains(t, r.msg(), "chmod 644")
}

// runBounded runs the binary with a deadline: a broker that should refuse
// to start but serves instead must not hang the test.
func (w *world) runBounded(d time.Duration, args ...string) result {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	cmd := exec.CommandContext(ctx, shared.attested, args...)
	cmd.Dir = w.dir
	cmd.Env = childEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("still running after %s", d)
	}
	r := result{stdout: stdout.Bytes(), stderr: stderr.Bytes(), err: err}
	w.outputs = append(w.outputs, output{"attested " + strings.Join(args, " ") + " stdout", r.stdout},
		output{"attested " + strings.Join(args, " ") + " stderr", r.stderr})
	return r
}

func snapshot(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	entries, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return files
	}
	require.NoError(t, err)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		files[e.Name()] = b
	}
	return files
}

// TestAttackBrokerInitOverExisting (findings 13 and 14): with broker.yaml
// gone, the Kubernetes init container's 'test -f broker.yaml || attested
// broker init' replaced master.key, the CA and the admin token. Now init
// refuses and names what it found; serve refuses secrets others can read;
// the CA key was never in the serving directory; the broker serves on.
func TestAttackBrokerInitOverExisting(t *testing.T) {
	w := certifiedWorld(t, worldOptions{noImage: true})
	d := w.brokerDir
	assert.NoFileExists(t, filepath.Join(d, "ca-key.pem"), "the CA key is in the serving data directory")
	assert.FileExists(t, filepath.Join(d+"-ca", "ca-key.pem"))
	w.broker.stop()

	cfg, err := os.ReadFile(filepath.Join(d, "broker.yaml"))
	require.NoError(t, err)
	require.NoError(t, os.Remove(filepath.Join(d, "broker.yaml")))
	before := snapshot(t, d)
	require.Contains(t, before, "master.key")
	require.Contains(t, before, "broker.db")

	// examples/kubernetes/broker.yaml's init container, as shipped.
	initContainer := fmt.Sprintf("test -f %[1]s/broker.yaml || %[2]s broker init --data-dir %[1]s --listen %[3]s",
		d, shared.attested, w.brokerAddr)
	caBefore := snapshot(t, d+"-ca")
	r := w.run(runOpts{}, "init container", "sh", "-c", initContainer)
	require.Error(t, r.err, "init over an existing broker must fail: %s", r.stdout)
	assert.Contains(t, r.msg(), "already holds broker files")
	assert.Contains(t, r.msg(), "broker.db")
	assert.Contains(t, r.msg(), "master.key")
	assert.Equal(t, before, snapshot(t, d), "init changed the data directory")
	assert.Equal(t, caBefore, snapshot(t, d+"-ca"), "init changed the CA directory")

	require.NoError(t, os.WriteFile(filepath.Join(d, "broker.yaml"), cfg, 0o600))
	for _, tc := range []struct {
		path string
		mode os.FileMode
		fix  string
	}{
		{filepath.Join(d, "master.key"), 0o644, "chmod 600"},
		{filepath.Join(d, "admin.token"), 0o644, "chmod 600"},
		{d, 0o755, "chmod 700"},
	} {
		fi, err := os.Stat(tc.path)
		require.NoError(t, err)
		require.NoError(t, os.Chmod(tc.path, tc.mode))
		r := w.runBounded(10*time.Second, "broker", "serve", "--data-dir", d, "--listen", w.brokerAddr)
		require.Error(t, r.err, "serve started with %s mode %o", tc.path, tc.mode)
		assert.Contains(t, r.msg(), "refusing to serve")
		assert.Contains(t, r.msg(), fmt.Sprintf("%q", tc.path))
		assert.Contains(t, r.msg(), tc.fix)
		require.NoError(t, os.Chmod(tc.path, fi.Mode().Perm()))
	}

	// Nothing was lost: the broker serves its keys and nodes as before.
	require.NoError(t, w.serveBroker(w.brokerAddr))
	assert.Contains(t, w.admin("key", "list"), "app")
	assert.Contains(t, w.admin("node", "list"), "node1")
}

// wrapRequest is an exec-mode keywrap request for key name.
func wrapRequest(name string) []byte {
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Appendf(nil, `{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"attested":[%q]},"DecryptConfig":{"Parameters":{}}},"optsdata":%q},"keyunwrapparams":{"dc":null,"annotation":null}}`,
		b64([]byte("key="+name)), b64([]byte(`{"symkey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}`)))
}

// TestBrokerWithoutSigner: a broker initialised before signed wrapping
// keys (no signer, CA key in its data directory) warns at start, pipelines
// refuse its unsigned keys and say what to run, and issue-signer repairs it.
func TestBrokerWithoutSigner(t *testing.T) {
	w := certifiedWorld(t, worldOptions{noImage: true})
	n := w.node1
	d := w.brokerDir
	w.broker.stop()
	require.NoError(t, os.Rename(filepath.Join(d+"-ca", "ca-key.pem"), filepath.Join(d, "ca-key.pem")))
	require.NoError(t, os.Remove(filepath.Join(d, "signer.pem")))
	require.NoError(t, os.Remove(filepath.Join(d, "signer-key.pem")))
	require.NoError(t, w.serveBroker(w.brokerAddr))
	log, err := os.ReadFile(w.broker.log)
	require.NoError(t, err)
	assert.Contains(t, string(log), "no wrapping-key signing certificate")
	assert.Contains(t, string(log), "CA private key is in the serving data directory")

	require.NoError(t, os.RemoveAll(filepath.Join(n.dir, "cache")))
	r := n.keyprovider(wrapRequest("app"), false)
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "unsigned keys are refused")
	assert.Contains(t, r.msg(), "attested broker issue-signer")

	r = w.run(runOpts{}, "issue-signer", shared.attested, "broker", "issue-signer", "--data-dir", d, "--ca-dir", d)
	require.NoError(t, r.err, "%s", r.stderr)
	assert.Contains(t, string(r.stdout), "move the CA private key")
	w.broker.stop()
	require.NoError(t, w.serveBroker(w.brokerAddr))
	r = n.keyprovider(wrapRequest("app"), false)
	require.NoError(t, r.err, "%s", r.stderr)
}

// TestServeWarnsUncertifiedTPMs (finding 4): a broker that admits TPMs
// without EK certificates says so, and why it matters, at every start.
func TestServeWarnsUncertifiedTPMs(t *testing.T) {
	w := certifiedWorld(t, worldOptions{noImage: true})
	w.broker.stop()
	p := filepath.Join(w.brokerDir, "broker.yaml")
	cfg, err := os.ReadFile(p)
	require.NoError(t, err)
	require.Contains(t, string(cfg), "\nrequireEKCertificate: true\n", "broker init requires certified EKs")
	cfg = bytes.Replace(cfg, []byte("\nrequireEKCertificate: true\n"), []byte("\nrequireEKCertificate: false\n"), 1)
	require.NoError(t, os.WriteFile(p, cfg, 0o600))
	require.NoError(t, w.serveBroker(w.brokerAddr))
	log, err := os.ReadFile(w.broker.log)
	require.NoError(t, err)
	assert.Contains(t, string(log), "level=WARN")
	assert.Contains(t, string(log), "requireEKCertificate is false")
	assert.Contains(t, string(log), "software TPM")
}
