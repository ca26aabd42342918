//go:build e2e

package e2e

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/test/swtpm"
)

// providerAnnotation is the layer annotation ocicrypt stores for the
// provider named "attested".
const providerAnnotation = "org.opencontainers.image.enc.keys.provider.attested"

// mode is how ocicrypt reaches attested.
type mode string

const (
	execMode mode = "exec" // ocicrypt runs 'attested keyprovider' per layer
	grpcMode mode = "grpc" // ocicrypt calls the agent's unix socket
)

// eachMode runs f as a subtest per mode; each subtest builds its own world.
func eachMode(t *testing.T, f func(t *testing.T, m mode)) {
	for _, m := range []mode{execMode, grpcMode} {
		t.Run(string(m), func(t *testing.T) { f(t, m) })
	}
}

// world is one broker with its data, one registry, and the nodes of a test.
type world struct {
	t          testing.TB
	dir        string
	registry   string // host:port
	brokerDir  string
	brokerAddr string
	brokerID   string
	// metricsAddr is where the broker serves Prometheus metrics.
	metricsAddr string
	broker      *proc
	node1       *node
	// image is the encrypted image in the registry.
	image       string
	brokerExtra string
	// outputs is everything the tests saw on stdout and stderr that must
	// never hold a secret; log files are read from dir at check time.
	outputs []output
}

type output struct {
	what string
	data []byte
}

type worldOptions struct {
	// encryptMode is the mode the image is encrypted in (exec by default).
	encryptMode mode
	// noImage skips encrypting the image.
	noImage bool
	// brokerConfig is YAML whose settings override broker.yaml's before
	// the broker starts.
	brokerConfig string
	// uncertified admits TPMs without EK certificates (join token or
	// approval only). By default the broker trusts the suite's swtpm EK CA
	// and requires certificates, as 'broker init' sets up a broker.
	uncertified bool
}

// newWorld starts a registry and a broker, enrolls node1 on its own swtpm,
// applies policy "prod" (PCRs 0 and 16 at their current values), creates
// key "app" under it and pushes an image encrypted for it.
func newWorld(t testing.TB, o worldOptions) *world {
	t.Helper()
	dir, err := os.MkdirTemp(shared.dir, "w")
	require.NoError(t, err)
	w := &world{t: t, dir: dir, brokerExtra: ekTrust(t, !o.uncertified)}
	if o.brokerConfig != "" {
		w.brokerExtra += "---\n" + o.brokerConfig
	}
	t.Cleanup(func() {
		if t.Failed() {
			w.dumpLogs()
		}
	})
	w.startRegistry()
	w.startBroker()
	w.node1 = w.newNode("node1")
	w.node1.enroll()
	w.applyPolicy("prod", map[int][]byte{0: w.node1.tpm.ReadPCR(0), 16: w.node1.tpm.ReadPCR(16)})
	out := w.admin("key", "create", "app", "--policy", "prod")
	require.Contains(t, out, "key app version 1 created")
	if !o.noImage {
		m := o.encryptMode
		if m == "" {
			m = execMode
		}
		w.image = "docker://" + w.registry + "/app:1"
		r := w.imgcopy(w.node1, m, "copy", "--quiet", "--encryption-key", "provider:attested:key=app",
			"--dest-tls-verify=false", "oci:"+shared.srcImage+":latest", w.image)
		require.NoError(t, r.err, "encrypt: %s", r.stderr)
	}
	return w
}

// --- processes -------------------------------------------------------------

// proc is a long-running child whose output goes to a log file.
type proc struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
}

func (w *world) start(name string, bin string, args ...string) *proc {
	w.t.Helper()
	return w.startEnv(name, nil, bin, args...)
}

// startEnv is start with variables added to the child's environment.
func (w *world) startEnv(name string, env []string, bin string, args ...string) *proc {
	w.t.Helper()
	logPath := filepath.Join(w.dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(w.t, err)
	defer f.Close()
	cmd := exec.Command(bin, args...)
	cmd.Dir = w.dir
	cmd.Env = childEnv(env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(w.t, cmd.Start(), "start %s", name)
	p := &proc{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	w.t.Cleanup(p.stop)
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the process with SIGTERM, then SIGKILL after 5 s.
func (p *proc) stop() {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// waitReady polls ready until it succeeds, failing if p exits first.
func (w *world) waitReady(p *proc, what string, ready func() error) error {
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if p.exited() {
			b, _ := os.ReadFile(p.log)
			return fmt.Errorf("%s exited before it was ready (%v):\n%s", p.name, p.cmd.ProcessState, b)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after 15s: %v", what, err)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// childEnv is the environment without configuration the tests set per
// command.
func childEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "ATTESTED_") || strings.HasPrefix(kv, "OCICRYPT_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (w *world) dumpLogs() {
	logs, _ := filepath.Glob(filepath.Join(w.dir, "*.log"))
	logs2, _ := filepath.Glob(filepath.Join(w.dir, "*", "*.log"))
	for _, l := range append(logs, logs2...) {
		b, _ := os.ReadFile(l)
		if len(b) > 6000 {
			b = append([]byte("...\n"), b[len(b)-6000:]...)
		}
		w.t.Logf("--- %s\n%s", l, b)
	}
}

// --- commands --------------------------------------------------------------

// result is one finished command.
type result struct {
	stdout, stderr []byte
	err            error
	code           int
	dur            time.Duration
}

// msg is the command's stderr, for assertions on what a user reads.
func (r result) msg() string { return string(r.stderr) }

type runOpts struct {
	stdin []byte
	env   []string
	// secretStdout keeps stdout out of the leak corpus: it is a protocol
	// reply that carries optsdata by design.
	secretStdout bool
}

// run runs a command to completion and records its output for leak checks.
func (w *world) run(o runOpts, label, bin string, args ...string) result {
	cmd := exec.Command(bin, args...)
	cmd.Dir = w.dir
	cmd.Env = childEnv(o.env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if o.stdin != nil {
		cmd.Stdin = bytes.NewReader(o.stdin)
	}
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: stdout.Bytes(), stderr: stderr.Bytes(), err: err, dur: time.Since(start)}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		r.code = -1
	}
	if !o.secretStdout {
		w.outputs = append(w.outputs, output{label + " stdout", r.stdout})
	}
	w.outputs = append(w.outputs, output{label + " stderr", r.stderr})
	return r
}

// attested runs the binary with node n's configuration.
func (w *world) attested(n *node, args ...string) result {
	return w.run(runOpts{}, "attested "+strings.Join(args, " "), shared.attested, append([]string{"--config", n.cfg}, args...)...)
}

// admin runs an admin command, which must succeed, and returns its stdout.
func (w *world) admin(args ...string) string {
	w.t.Helper()
	r := w.attested(w.node1, args...)
	require.NoError(w.t, r.err, "attested %v: %s", args, r.stderr)
	return string(r.stdout)
}

// imgcopy runs the copy engine with ocicrypt pointed at node n in mode m.
func (w *world) imgcopy(n *node, m mode, args ...string) result {
	w.t.Helper()
	env := []string{"OCICRYPT_KEYPROVIDER_CONFIG=" + n.ocicryptConfig(m)}
	return w.run(runOpts{env: env}, fmt.Sprintf("imgcopy(%s,%s) %s", n.name, m, args[0]), shared.imgcopy, args...)
}

// pull decrypts the world's image on node n into a fresh OCI layout.
func (w *world) pull(n *node, m mode) (result, string) {
	w.t.Helper()
	out, err := os.MkdirTemp(w.dir, "pull")
	require.NoError(w.t, err)
	r := w.imgcopy(n, m, "copy", "--quiet", "--decryption-key", "provider:attested", "--src-tls-verify=false", w.image, "oci:"+out+":latest")
	return r, out
}

// mustPull pulls and checks the decrypted layers are the original ones.
func (w *world) mustPull(n *node, m mode) result {
	w.t.Helper()
	r, out := w.pull(n, m)
	require.NoError(w.t, r.err, "pull on %s (%s): %s", n.name, m, r.stderr)
	w.verifyDecrypted(out)
	return r
}

// refusedPull pulls, expects a failure, and returns the error text the
// client printed.
func (w *world) refusedPull(n *node, m mode) (string, result) {
	w.t.Helper()
	r, out := w.pull(n, m)
	require.Error(w.t, r.err, "pull on %s (%s) should have been refused; stdout: %s", n.name, m, r.stdout)
	w.t.Logf("refused after %s; the client printed:\n%s", r.dur.Round(time.Millisecond), r.stderr)
	entries, _ := os.ReadDir(filepath.Join(out, "blobs", "sha256"))
	for _, e := range entries {
		// Whatever the engine left behind, no layer may be plaintext.
		b, err := os.ReadFile(filepath.Join(out, "blobs", "sha256", e.Name()))
		require.NoError(w.t, err)
		if d := diffID(b); d != "" {
			require.NotContains(w.t, shared.srcDiffIDs, d, "a refused pull wrote a decrypted layer")
		}
	}
	return r.msg(), r
}

// --- registry and broker ---------------------------------------------------

func (w *world) startRegistry() {
	t := w.t
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		cfg := filepath.Join(w.dir, "registry.yml")
		require.NoError(t, os.WriteFile(cfg, fmt.Appendf(nil, `version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  redirect:
    disable: true
http:
  addr: %s
`, filepath.Join(w.dir, "registry"), addr), 0o600))
		p := w.start("registry", "docker-registry", "serve", cfg)
		err = w.waitReady(p, "registry", func() error {
			resp, err := http.Get("http://" + addr + "/v2/")
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("GET /v2/: %s", resp.Status)
			}
			return nil
		})
		if err == nil {
			w.registry = addr
			return
		}
		p.stop()
	}
	require.NoError(t, err)
}

var brokerIDRe = regexp.MustCompile(`broker (\S+) initialised`)

func (w *world) startBroker() {
	require.NoError(w.t, w.tryStartBroker())
}

// tryStartBroker initialises and starts the world's broker, saying why it
// did not start.
func (w *world) tryStartBroker() error {
	t := w.t
	w.brokerDir = filepath.Join(w.dir, "broker")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	r := w.run(runOpts{}, "broker init", shared.attested, "broker", "init", "--data-dir", w.brokerDir, "--listen", addr)
	require.NoError(t, r.err, "broker init: %s", r.stderr)
	m := brokerIDRe.FindSubmatch(r.stdout)
	require.NotNil(t, m, "broker init printed %q", r.stdout)
	w.brokerID = string(m[1])
	for _, f := range []string{"ca.pem", "admin.token"} {
		require.FileExists(t, filepath.Join(w.brokerDir, f))
	}
	// Each world's broker serves its metrics on a port of its own.
	w.metricsAddr = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	extra := "metricsListen: " + w.metricsAddr + "\n---\n" + w.brokerExtra
	require.NoError(t, overrideYAML(filepath.Join(w.brokerDir, "broker.yaml"), extra))
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if attempt > 0 {
			addr = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		}
		if err = w.serveBroker(addr); err == nil {
			return nil
		}
	}
	return err
}

// ekTrust is broker configuration trusting the suite's swtpm EK CA, with
// EK certificates required or not.
func ekTrust(t testing.TB, required bool) string {
	roots, err := shared.ca.Roots()
	if err != nil {
		t.Fatalf("swtpm CA: %v", err)
	}
	return fmt.Sprintf("ekRoots:\n  - %s\n  - %s\nrequireEKCertificate: %v\n", roots[0], roots[1], required)
}

// overrideYAML sets the top-level settings of the YAML documents in extra
// (separated by "---"; later ones win) in the YAML file path, whatever it already holds:
// appending would repeat keys, which the broker refuses.
func overrideYAML(path, extra string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	cfg := map[string]any{}
	if err := yaml.Unmarshal(data, &cfg); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	dec := yaml.NewDecoder(strings.NewReader(extra))
	for {
		over := map[string]any{}
		if err := dec.Decode(&over); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return fmt.Errorf("broker settings %q: %w", extra, err)
		}
		maps.Copy(cfg, over)
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	return os.WriteFile(path, out, 0o600)
}

// serveBroker starts 'attested broker serve' on addr (the broker's data
// stays in brokerDir, so this also restarts a stopped broker).
func (w *world) serveBroker(addr string) error {
	p := w.start("broker", shared.attested, "broker", "serve", "--data-dir", w.brokerDir, "--listen", addr)
	err := w.waitReady(p, "broker", func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err != nil {
		p.stop()
		return err
	}
	w.broker, w.brokerAddr = p, addr
	return nil
}

func (w *world) applyPolicy(name string, pcrs map[int][]byte) {
	var b strings.Builder
	fmt.Fprintf(&b, "name: %s\npcrs:\n", name)
	for i, v := range pcrs {
		fmt.Fprintf(&b, "  %d: [\"%s\"]\n", i, hex.EncodeToString(v))
	}
	f := filepath.Join(w.dir, "policy-"+name+".yaml")
	require.NoError(w.t, os.WriteFile(f, []byte(b.String()), 0o600))
	out := w.admin("policy", "apply", "-f", f)
	require.Contains(w.t, out, "policy "+name+" applied")
}

// --- audit -----------------------------------------------------------------

type auditEvent struct {
	Seq     uint64 `json:"seq"`
	Kind    string `json:"kind"`
	Node    string `json:"node"`
	Key     string `json:"key"`
	Allowed bool   `json:"allowed"`
	Reason  string `json:"reason"`
}

func (w *world) audit(args ...string) []auditEvent {
	w.t.Helper()
	out := w.admin(append([]string{"audit", "list", "--json"}, args...)...)
	var evs []auditEvent
	dec := json.NewDecoder(strings.NewReader(out))
	for {
		var e auditEvent
		if err := dec.Decode(&e); err == io.EOF {
			return evs
		} else {
			require.NoError(w.t, err, "audit list --json: %s", out)
		}
		evs = append(evs, e)
	}
}

// quotes counts the node's attestations the broker has seen: every TPM
// quote the node sends is appraised once and audited as kind "attest".
func (w *world) quotes(n *node) (total, allowed int) {
	for _, e := range w.audit("--node", n.name, "--kind", "attest") {
		total++
		if e.Allowed {
			allowed++
		}
	}
	return total, allowed
}

// --- nodes -----------------------------------------------------------------

type node struct {
	w        *world
	name     string
	dir      string
	cfg      string
	stateDir string
	runDir   string
	tpm      *swtpm.TPM
	agent    *proc
	sock     string
}

// newNode gives a node its own swtpm, state and configuration (not enrolled).
func (w *world) newNode(name string) *node { return w.newNodeWithCA(name, shared.ca) }

// newNodeWithCA is newNode with a TPM whose EK certificate ca issued.
func (w *world) newNodeWithCA(name string, ca *swtpm.CA) *node {
	n := &node{w: w, name: name, dir: filepath.Join(w.dir, name)}
	n.stateDir = filepath.Join(n.dir, "state")
	n.runDir = filepath.Join(n.dir, "run")
	n.sock = filepath.Join(n.runDir, "kp.sock")
	n.tpm = swtpm.Start(w.t, ca, filepath.Join(n.dir, "tpm"))
	n.cfg = n.writeConfig("node.yaml", 20*time.Second)
	return n
}

// writeConfig writes a node configuration with the given request timeout
// and returns its path.
func (n *node) writeConfig(file string, timeout time.Duration) string {
	w := n.w
	p := filepath.Join(n.dir, file)
	cfg := fmt.Sprintf(`broker: %s
brokerCA: %s
adminTokenFile: %s
name: %s
tpm: %s
stateDir: %s
runDir: %s
cacheDir: %s
timeout: %s
reattest: 1h
`, w.brokerAddr, filepath.Join(w.brokerDir, "ca.pem"), filepath.Join(w.brokerDir, "admin.token"),
		n.name, n.tpm.URI(), n.stateDir, n.runDir, filepath.Join(n.dir, "cache"), timeout)
	require.NoError(w.t, os.MkdirAll(n.dir, 0o700))
	require.NoError(w.t, os.WriteFile(p, []byte(cfg), 0o600))
	return p
}

// enroll enrolls the node with a single-use join token.
func (n *node) enroll() {
	w := n.w
	r := n.enrollWithToken(w.tokenFile())
	require.NoError(w.t, r.err, "enroll %s: %s", n.name, r.stderr)
	require.Contains(w.t, string(r.stdout), "node "+n.name+" enrolled")
	require.NotContains(w.t, string(r.stdout), "waiting for approval")
}

// tokenFile has the admin create a join token into a new private file and
// returns its path.
func (w *world) tokenFile() string {
	w.t.Helper()
	f, err := os.CreateTemp(w.dir, "join-*.token")
	require.NoError(w.t, err)
	require.NoError(w.t, f.Close())
	require.NoError(w.t, os.Remove(f.Name()))
	out := w.admin("node", "token", "create", "--output", f.Name())
	require.Contains(w.t, out, "join token written to")
	return f.Name()
}

// enrollWithToken runs 'attested node enroll --join-token-file file'.
func (n *node) enrollWithToken(file string) result {
	return n.w.attested(n, "node", "enroll", "--join-token-file", file)
}

// ocicryptConfig writes the ocicrypt keyprovider configuration for mode m
// (starting the agent for gRPC) and returns its path.
func (n *node) ocicryptConfig(m mode) string {
	var cfg any
	switch m {
	case execMode:
		cfg = map[string]any{"key-providers": map[string]any{"attested": map[string]any{
			"cmd": map[string]any{"path": shared.keyprovider, "args": []string{"--config", n.cfg}}}}}
	case grpcMode:
		if n.agent == nil || n.agent.exited() {
			n.startAgent(n.enrolled())
		}
		cfg = map[string]any{"key-providers": map[string]any{"attested": map[string]any{"grpc": "unix://" + n.sock}}}
	}
	b, err := json.Marshal(cfg)
	require.NoError(n.w.t, err)
	p := filepath.Join(n.dir, "ocicrypt-"+string(m)+".json")
	require.NoError(n.w.t, os.WriteFile(p, b, 0o600))
	return p
}

func (n *node) enrolled() bool {
	_, err := os.Stat(filepath.Join(n.stateDir, "node.json"))
	return err == nil
}

// startAgent runs 'attested agent' for the node; with waitAttest it returns
// only once the agent's start-up attestation reached the broker, so the
// agent is warm.
func (n *node) startAgent(waitAttest bool) {
	w := n.w
	w.t.Helper()
	before := 0
	if waitAttest {
		before, _ = w.quotes(n)
	}
	n.agent = w.start("agent-"+n.name, shared.attested, "agent", "--config", n.cfg, "--listen", "unix://"+n.sock)
	require.NoError(w.t, w.waitReady(n.agent, "agent socket", func() error {
		c, err := net.Dial("unix", n.sock)
		if err == nil {
			c.Close()
		}
		return err
	}))
	if !waitAttest {
		return
	}
	require.NoError(w.t, w.waitReady(n.agent, "agent start-up attestation", func() error {
		if total, _ := w.quotes(n); total <= before {
			return errors.New("no attestation yet")
		}
		return nil
	}))
	_, allowed := w.quotes(n)
	require.Greater(w.t, allowed, 0, "the agent's start-up attestation was refused")
}

// keyprovider sends one exec-mode request to 'attested keyprovider'.
func (n *node) keyprovider(req []byte, secretReply bool) result {
	return n.w.run(runOpts{stdin: req, secretStdout: secretReply}, "attested keyprovider ("+n.name+")",
		shared.attested, "keyprovider", "--config", n.cfg)
}

// --- images ----------------------------------------------------------------

type inspected struct {
	ManifestMediaType string `json:"manifestMediaType"`
	Layers            []struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Size        int64             `json:"size"`
		Annotations map[string]string `json:"annotations"`
	} `json:"layers"`
	DiffIDs []string `json:"diffIDs"`
}

func (w *world) inspect(ref string) inspected {
	w.t.Helper()
	r := w.run(runOpts{}, "imgcopy inspect", shared.imgcopy, "inspect", "--tls-verify=false", ref)
	require.NoError(w.t, r.err, "inspect %s: %s", ref, r.stderr)
	var in inspected
	require.NoError(w.t, json.Unmarshal(r.stdout, &in))
	return in
}

// verifyDecrypted checks the OCI layout at dir holds the original image:
// plaintext layers whose uncompressed digests are the source's diff IDs.
func (w *world) verifyDecrypted(dir string) {
	t := w.t
	t.Helper()
	in := w.inspect("oci:" + dir + ":latest")
	require.Len(t, in.Layers, srcLayers)
	require.Equal(t, shared.srcDiffIDs, in.DiffIDs)
	for i, l := range in.Layers {
		require.NotContains(t, l.MediaType, "encrypted", "layer %d", i)
		require.NotContains(t, l.Annotations, providerAnnotation, "layer %d", i)
		hexd, ok := strings.CutPrefix(l.Digest, "sha256:")
		require.True(t, ok, l.Digest)
		blob, err := os.ReadFile(filepath.Join(dir, "blobs", "sha256", hexd))
		require.NoError(t, err)
		require.Equal(t, shared.srcDiffIDs[i], diffID(blob), "layer %d content differs from the original", i)
	}
}

// diffID is the sha256 of the gunzipped blob, or "" if it is not gzip.
func diffID(blob []byte) string {
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		return ""
	}
	h := sha256.New()
	if _, err := io.Copy(h, zr); err != nil {
		return ""
	}
	return fmt.Sprintf("sha256:%x", h.Sum(nil))
}

// --- secrets ---------------------------------------------------------------

// secret is a value that must not appear in any output.
type secret struct {
	what string
	raw  []byte
}

// forms are the encodings a secret could leak in.
func (s secret) forms() map[string][]byte {
	return map[string][]byte{
		"raw":           s.raw,
		"base64":        []byte(base64.StdEncoding.EncodeToString(s.raw)),
		"base64 (raw)":  []byte(base64.RawStdEncoding.EncodeToString(s.raw)),
		"base64url":     []byte(base64.RawURLEncoding.EncodeToString(s.raw)),
		"hex":           []byte(hex.EncodeToString(s.raw)),
		"go %q / %v":    []byte(fmt.Sprintf("%q", s.raw)),
		"go byte slice": []byte(strings.Trim(fmt.Sprint(s.raw), "[]")),
	}
}

// assertNoSecrets checks every recorded output and every log file of the
// world for every form of every secret.
func (w *world) assertNoSecrets(secrets []secret) int {
	t := w.t
	t.Helper()
	corpus := append([]output(nil), w.outputs...)
	var logs []string
	err := filepath.WalkDir(w.dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".log") {
			logs = append(logs, p)
		}
		return err
	})
	require.NoError(t, err)
	for _, l := range logs {
		b, err := os.ReadFile(l)
		require.NoError(t, err)
		corpus = append(corpus, output{"log " + strings.TrimPrefix(l, w.dir+"/"), b})
	}
	checked := 0
	for _, s := range secrets {
		require.GreaterOrEqual(t, len(s.raw), 16, "secret %s is too short to search for", s.what)
		for form, needle := range s.forms() {
			for _, o := range corpus {
				checked++
				if i := bytes.Index(o.data, needle); i >= 0 {
					t.Errorf("%s (%s form) appears in %s: ...%s...", s.what, form, o.what, excerpt(o.data, i, len(needle)))
				}
			}
		}
	}
	return checked
}

func excerpt(b []byte, i, n int) string {
	lo, hi := max(0, i-60), min(len(b), i+n+60)
	return string(b[lo:hi])
}

// appendLine appends one line to a configuration file.
func appendLine(path, line string) error {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintln(f, line)
	return err
}
