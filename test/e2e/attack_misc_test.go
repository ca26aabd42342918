//go:build e2e

package e2e

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest/eventlogtest"
)

// Hardening finding 9, through the binary: a policy that states no
// requirement, an expression that holds whatever the node shows included,
// is refused at apply time.
func TestPolicyStatingNothingIsRefused(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	for _, doc := range []string{
		"name: open\nexpression: \"true\"\n",
		"name: open\nexpression: 'true || node == \"x\"'\n",
	} {
		f := filepath.Join(w.dir, "open.yaml")
		require.NoError(t, os.WriteFile(f, []byte(doc), 0o600))
		r := w.run(runOpts{}, "policy apply", shared.attested, "policy", "apply", "-f", f, "--config", w.node1.cfg)
		require.Error(t, r.err, "%s", doc)
		assert.Contains(t, r.msg(), "states no requirement")
	}
}

// Hardening finding 10, through the binary: an IMA log of thousands of
// entries is replayed, and neither the session nor the node record keeps
// it: the broker's database grows by a few pages, not by the log.
func TestLargeIMALogIsNotKept(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	n := w.node1
	var files []eventlogtest.IMAFile
	for i := range 4000 {
		d := sha256.Sum256([]byte(fmt.Sprint(i)))
		files = append(files, eventlogtest.IMAFile{Path: fmt.Sprintf("/usr/lib/x86_64-linux-gnu/lib-%04d.so.1", i), Digest: d[:]})
	}
	imaLog, events := eventlogtest.IMA(files)
	require.Greater(t, len(imaLog), 400<<10)
	n.measure(events, eventlogtest.Firmware(nil), imaLog)
	db := filepath.Join(w.brokerDir, "broker.db")
	before := fileSize(t, db)
	r := w.attested(n, "node", "attest")
	require.NoError(t, r.err, "%s", r.stderr)
	r = w.attested(n, "node", "attest")
	require.NoError(t, r.err, "%s", r.stderr)
	grown := fileSize(t, db) - before
	t.Logf("IMA log %d KiB; broker.db grew %d KiB over two attestations", len(imaLog)>>10, grown>>10)
	assert.Less(t, grown, int64(len(imaLog)/2), "the broker kept the IMA log")
}

func fileSize(t *testing.T, path string) int64 {
	fi, err := os.Stat(path)
	require.NoError(t, err)
	return fi.Size()
}

// Hardening finding 16, through the binary: lifetimes are bounded whatever
// broker.yaml says.
func TestUnboundedLifetimesAreRefused(t *testing.T) {
	for _, cfg := range []string{"sessionTTL: 48h\n", "nonceTTL: 1h\n"} {
		dir, err := os.MkdirTemp(shared.dir, "w")
		require.NoError(t, err)
		w := &world{t: t, dir: dir, brokerExtra: ekTrust(t, true) + "---\n" + cfg}
		err = w.tryStartBroker()
		require.Error(t, err, cfg)
		assert.Contains(t, err.Error(), "out of range")
	}
}

// Hardening finding 18, through the binary: a name carrying a newline is
// quoted in the refusal, so it cannot forge a line of the admin's output.
func TestAttackerTextCannotForgeOutputLines(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	forged := "ghost\nnode1  trusted"
	r := w.run(runOpts{}, "node remove", shared.attested, "node", "remove", forged, "--config", w.node1.cfg)
	require.Error(t, r.err)
	msg := strings.TrimSpace(r.msg())
	assert.NotContains(t, msg, "\n", "one line of error, the name quoted")
	assert.Contains(t, msg, `"ghost\nnode1  trusted"`)
}
