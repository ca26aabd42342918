//go:build e2e

package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/attest"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// Hardening finding 3, through the binary: an exec-mode session file holds
// no usable private key. A thief who copies it gets releases from the
// broker (the token is a bearer handle) but opens none of them: not on
// another host's TPM, and not on the node itself once a PCR the session is
// bound to has moved, even before the broker has seen the change.
func TestStolenSessionFileOpensNothing(t *testing.T) {
	w := newWorld(t, worldOptions{})
	n := w.node1
	w.mustPull(n, execMode)
	raw, err := os.ReadFile(filepath.Join(n.runDir, "session.json"))
	require.NoError(t, err)
	var stolen attest.Session
	require.NoError(t, json.Unmarshal(raw, &stolen))

	release := func() *apiv1.UnwrapResponse {
		in := w.inspect(w.image)
		ann, err := base64.StdEncoding.DecodeString(in.Layers[0].Annotations[providerAnnotation])
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r, err := w.brokerClient().Unwrap(ctx, &apiv1.UnwrapRequest{SessionToken: stolen.Token, Annotation: ann})
		require.NoError(t, err, "the broker cannot tell a thief holding the token")
		return r
	}
	open := func(tpmURI string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tpm, err := attest.OpenTPM(ctx, tpmURI)
		require.NoError(t, err)
		defer tpm.Close()
		r := release()
		_, err = stolen.Open(tpm, r.GetKey(), r.GetKeyVersion(), r.GetSealed())
		return err
	}

	require.NoError(t, open(n.tpm.URI()), "on its own node, unchanged, the session opens")
	other := w.newNode("elsewhere")
	err = open(other.tpm.URI())
	require.Error(t, err, "another host's TPM cannot use the session key")
	assert.Contains(t, err.Error(), "not this TPM's")

	n.tpm.ExtendPCR(16, []byte("rootkit loaded after the attestation"))
	err = open(n.tpm.URI())
	assert.ErrorIs(t, err, attest.ErrSessionKeyLocked, "after a PCR moved the node's own TPM refuses it")
}

// Hardening finding 3, through the binary: once the broker verifies a quote
// showing a changed PCR, the node's earlier session releases nothing more,
// and trust status shows the refusal instead of going back to trusted.
func TestChangedPCREndsEarlierSession(t *testing.T) {
	w := newWorld(t, worldOptions{})
	n := w.node1
	w.mustPull(n, execMode)
	old := n.session()
	require.NoError(t, w.replayToken(old.Token), "the session releases while the node is unchanged")

	n.tpm.ExtendPCR(16, []byte("a debugger was attached"))
	msg, _ := w.refusedPull(n, execMode)
	assert.Contains(t, msg, "PCR 16 differs from policy prod")

	err := w.replayToken(old.Token)
	require.Error(t, err, "the session of the old PCR values must not release any more")
	assert.Equal(t, codes.Unauthenticated, status.Code(err), "%v", err)
	assert.Contains(t, w.auditReasons(n.name), "PCRs changed since last attestation; 1 older session(s) ended")
	assert.Regexp(t, `(?m)^node1\s+untrusted`, w.admin("node", "list"))
}

// Hardening finding 8, through the binary: exec mode refuses a run
// directory others can write and an agent socket it does not own, instead
// of following what another local user planted there.
func TestPlantedRunDirAndSocketAreRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("planting files of another user needs root")
	}
	w := newWorld(t, worldOptions{})
	n := w.node1
	ann, err := base64.StdEncoding.DecodeString(w.inspect(w.image).Layers[0].Annotations[providerAnnotation])
	require.NoError(t, err)
	req := unwrapReq(ann)

	// A world-writable run directory with a lock symlink in it.
	open := filepath.Join(n.dir, "open-run")
	require.NoError(t, os.Mkdir(open, 0o700))
	require.NoError(t, os.Chmod(open, 0o777))
	victim := filepath.Join(n.dir, "victim")
	require.NoError(t, os.Symlink(victim, filepath.Join(open, "session.lock")))
	cfg := strings.Replace(readFile(t, n.cfg), "runDir: "+n.runDir, "runDir: "+open, 1)
	r := w.run(runOpts{stdin: req}, "keyprovider with an open run dir", shared.attested, "keyprovider", "--config", writeTemp(t, n.dir, cfg))
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "others can change it")
	_, err = os.Lstat(victim)
	assert.True(t, os.IsNotExist(err), "the planted link was not followed")

	// An agent socket that another user listens on.
	sockDir := filepath.Join(n.dir, "sockdir")
	require.NoError(t, os.Mkdir(sockDir, 0o700))
	sock := filepath.Join(sockDir, "kp.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	defer l.Close()
	require.NoError(t, os.Chown(sock, 65534, 65534))
	cfg = readFile(t, n.cfg) + "agent: unix://" + sock + "\n"
	r = w.run(runOpts{stdin: req}, "keyprovider with a planted agent socket", shared.attested, "keyprovider", "--config", writeTemp(t, n.dir, cfg))
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), "agent socket")
	assert.Contains(t, r.msg(), "not by this user")
}

func readFile(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

func writeTemp(t *testing.T, dir, content string) string {
	f, err := os.CreateTemp(dir, "cfg-*.yaml")
	require.NoError(t, err)
	_, err = f.WriteString(content)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	return f.Name()
}
