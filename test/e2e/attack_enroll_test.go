//go:build e2e

package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Enrollment attacks from the review (issue 6, findings 4, 5 and 11),
// replayed against the built binary, swtpm and 'attested broker serve'.

var ekLine = regexp.MustCompile(`(?m)^  EK: +(SHA256:[0-9a-f]{64})$`)

// enrolledEK is the EK fingerprint 'node enroll' printed.
func enrolledEK(t *testing.T, r result) string {
	t.Helper()
	m := ekLine.FindSubmatch(r.stdout)
	require.NotNil(t, m, "node enroll printed no full EK fingerprint:\n%s", r.stdout)
	return string(m[1])
}

// nodeAs is a node with its own TPM whose configuration claims name.
func (w *world) nodeAs(dir, name string) *node {
	n := w.newNode(dir)
	n.name = name
	n.cfg = n.writeConfig("node-"+name+".yaml", 20*time.Second)
	return n
}

// watchArgv runs cmd to completion while reading its /proc/PID/cmdline as
// fast as it can, as any local user could, and returns everything it saw.
func watchArgv(t *testing.T, cmd *exec.Cmd) (seen [][]byte, samples int, err error) {
	t.Helper()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	proc := filepath.Join("/proc", strconv.Itoa(cmd.Process.Pid), "cmdline")
	for {
		select {
		case err := <-done:
			return seen, samples, err
		default:
		}
		if b, err := os.ReadFile(proc); err == nil && len(b) > 0 {
			samples++
			if len(seen) == 0 || !bytes.Equal(seen[len(seen)-1], b) {
				seen = append(seen, b)
			}
		}
		time.Sleep(500 * time.Microsecond)
	}
}

// TestJoinTokenNeverInArgv (finding 5): '--join-token TOKEN' let every
// local user read the token from /proc/PID/cmdline while enrollment ran,
// and enroll a TPM-less identity with it. The flag is refused, naming its
// replacements; the token from a file, stdin or the environment never
// appears in the process's command line while it enrolls.
func TestJoinTokenNeverInArgv(t *testing.T) {
	// The watcher sees what is on a command line: a control.
	seen, _, err := watchArgv(t, exec.Command("sh", "-c", "sleep 0.3", "ajt_control"))
	require.NoError(t, err)
	require.Contains(t, string(bytes.Join(seen, nil)), "ajt_control")

	w := newWorld(t, worldOptions{noImage: true})

	tokFile := w.tokenFile()
	raw, err := os.ReadFile(tokFile)
	require.NoError(t, err)
	tok := strings.TrimSpace(string(raw))

	old := w.newNode("old-flag")
	r := w.attested(old, "node", "enroll", "--join-token", tok)
	require.Error(t, r.err, "the old flag must be refused")
	assert.Contains(t, r.msg(), "--join-token-file")
	assert.Contains(t, r.msg(), "ATTESTED_JOIN_TOKEN")
	assert.NotContains(t, r.msg(), tok, "the refusal does not echo the token")
	assert.NotContains(t, w.admin("node", "list"), "old-flag")

	ways := []struct {
		name  string
		args  []string
		stdin string
		env   []string
	}{
		{"file", []string{"--join-token-file", tokFile}, "", nil},
		{"stdin", []string{"--join-token-file", "-"}, "", nil},
		{"env", nil, "", nil},
	}
	for i, way := range ways {
		t.Run(way.name, func(t *testing.T) {
			var tok string
			if i == 0 {
				tok = strings.TrimSpace(string(raw)) // the token the refused command carried: still unspent
			} else {
				b, err := os.ReadFile(w.tokenFile())
				require.NoError(t, err)
				tok = strings.TrimSpace(string(b))
			}
			n := w.newNode("via-" + way.name)
			cmd := exec.Command(shared.attested, append([]string{"--config", n.cfg, "node", "enroll"}, way.args...)...)
			cmd.Env = childEnv()
			switch way.name {
			case "stdin":
				cmd.Stdin = strings.NewReader(tok + "\n")
			case "env":
				cmd.Env = childEnv("ATTESTED_JOIN_TOKEN=" + tok)
			}
			var out, errOut bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errOut
			seen, samples, err := watchArgv(t, cmd)
			require.NoError(t, err, "enroll via %s: %s", way.name, errOut.String())
			assert.Contains(t, out.String(), "node via-"+way.name+" enrolled with broker "+w.brokerID+": active")
			assert.NotContains(t, out.String()+errOut.String(), tok)
			require.Greater(t, samples, 10, "the command line was sampled while enrollment ran")
			for _, argv := range seen {
				assert.NotContains(t, string(argv), tok, "the join token is in the command line")
			}
			t.Logf("%s: %d samples of /proc/PID/cmdline, none with the token", way.name, samples)
		})
	}
	assert.Contains(t, w.admin("node", "list"), "via-file")
}

// TestPendingSquatBlocksNothing (finding 4): a machine with a genuine TPM
// (here another swtpm with a certificate from the trusted CA) enrolls
// without a token under the victim's name. It only waits, showing its EK;
// the victim enrolls with a join token anyway, which drops the squat; and
// an approval must name the EK the node printed.
func TestPendingSquatBlocksNothing(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	assert.Contains(t, w.admin("node", "list"), "verified (issuer CN=swtpm-localca)", "the suite's nodes enroll with verified EK certificates")

	squat := w.nodeAs("squatter", "victim")
	r := w.attested(squat, "node", "enroll")
	require.NoError(t, r.err, "%s", r.stderr)
	out := string(r.stdout)
	assert.Contains(t, out, "node victim enrolled with broker "+w.brokerID+": waiting for approval until ")
	assert.Contains(t, out, "EK certificate: verified (issuer CN=swtpm-localca)")
	squatEK := enrolledEK(t, r)
	assert.Contains(t, out, "attested node approve victim --ek "+squatEK)

	pending := w.admin("node", "list", "--pending")
	assert.Regexp(t, `victim +`+squatEK+` +verified \(issuer CN=swtpm-localca\) +\S+ +\d{4}-\d\d-\d\dT`, pending)
	assert.NotContains(t, pending, "node1", "--pending lists only pending enrollments")

	_, err := os.Stat(filepath.Join(squat.stateDir, "node.json"))
	require.NoError(t, err)
	r = w.attested(squat, "node", "attest")
	require.Error(t, r.err, "a pending enrollment does not attest")

	victim := w.newNode("victim")
	r = victim.enrollWithToken(w.tokenFile())
	require.NoError(t, r.err, "a pending squat must not block a join-token enrollment: %s", r.stderr)
	victimEK := enrolledEK(t, r)
	assert.NotEqual(t, squatEK, victimEK)
	assert.Contains(t, w.admin("node", "list", "--pending"), "no enrollment is waiting for approval", "the squat is superseded")

	r = w.attested(w.node1, "node", "approve", "victim", "--ek", squatEK)
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "no enrollment of node \"victim\" with EK "+squatEK+" is waiting for approval")
	r = w.attested(victim, "node", "attest")
	require.NoError(t, r.err, "%s", r.stderr)
}

// TestApprovalNamesTheEK (finding 4): 'node approve NAME' approved
// whatever waited under NAME. It now needs --ek, matching exactly, and the
// refusal shows what waits.
func TestApprovalNamesTheEK(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	n := w.newNode("worker-2")
	r := w.attested(n, "node", "enroll")
	require.NoError(t, r.err, "%s", r.stderr)
	ek := enrolledEK(t, r)

	r = w.attested(w.node1, "node", "approve", "worker-2")
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "--ek SHA256:")
	assert.Contains(t, r.msg(), ek, "the refusal shows what is pending")

	other := "SHA256:" + strings.Repeat("ab", 32)
	r = w.attested(w.node1, "node", "approve", "worker-2", "--ek", other)
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), ek)

	out := w.admin("node", "approve", "worker-2", "--ek", ek)
	assert.Contains(t, out, "node worker-2 is now active (EK "+ek+", EK certificate verified (issuer CN=swtpm-localca))")
	r = w.attested(n, "node", "attest")
	require.NoError(t, r.err, "the approved node attests: %s", r.stderr)
	var reasons []string
	for _, e := range w.audit("--kind", "approve") {
		reasons = append(reasons, e.Reason)
	}
	assert.Contains(t, strings.Join(reasons, "\n"), "approved EK "+ek)
}

// TestUncertifiedEnrollment: a broker that admits TPMs without a trusted EK
// certificate (requireEKCertificate: false, no ekRoots) still enrolls by
// join token and by approval, and says the EK is unverified.
func TestUncertifiedEnrollment(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true, uncertified: true, brokerConfig: "ekRoots: []\n"})
	assert.Regexp(t, `node1 +stale .* unverified`, w.admin("node", "list"), "enrolled, no evidence yet")
	n := w.newNode("worker-3")
	r := w.attested(n, "node", "enroll")
	require.NoError(t, r.err, "%s", r.stderr)
	assert.Contains(t, string(r.stdout), "EK certificate: unverified")
	ek := enrolledEK(t, r)
	assert.Regexp(t, `worker-3 +`+ek+` +unverified`, w.admin("node", "list", "--pending"))
	assert.Contains(t, w.admin("node", "approve", "worker-3", "--ek", ek), "node worker-3 is now active")
	r = w.attested(n, "node", "attest")
	require.NoError(t, r.err, "%s", r.stderr)
}
