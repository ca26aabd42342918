//go:build e2e

package e2e

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
)

// releaseRecord is a release as 'audit list --json' writes it.
type releaseRecord struct {
	Seq            uint64 `json:"seq"`
	Time           string `json:"time"`
	Node           string `json:"node"`
	Key            string `json:"key"`
	KeyVersion     uint32 `json:"key_version"`
	LayerDigest    string `json:"layer_digest"`
	Policy         string `json:"policy"`
	PolicyRevision uint32 `json:"policy_revision"`
	Hash           string `json:"hash"`
}

func (w *world) releaseRecords(args ...string) []releaseRecord {
	w.t.Helper()
	out := w.admin(append([]string{"audit", "list", "--json", "--kind", "release"}, args...)...)
	var recs []releaseRecord
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var r releaseRecord
		require.NoError(w.t, json.Unmarshal([]byte(line), &r), line)
		recs = append(recs, r)
	}
	return recs
}

// keyVersions is the key version of each layer of ref.
func (w *world) keyVersions(ref string) []uint32 {
	var out []uint32
	for _, a := range w.layerAnnotations(ref) {
		require.Len(w.t, a.Recipients, 1)
		out = append(out, a.Recipients[0].KeyVersion)
	}
	return out
}

var anchorLineRe = regexp.MustCompile(`(?m)^anchor: (\d+:[0-9a-f]{64}) `)

// TestKeyRotationAndProvableAudit, through the binary: an image wrapped
// before 'key rotate' still pulls while a new one is wrapped under the
// new version; 'key show' counts the releases of each; each release
// record names the layer, key version and policy revision; 'key disable
// app@1' refuses the old image at once and not the new one; an unknown
// audit kind is an error naming the kinds; and a release record edited in
// broker.db while the broker is stopped is reported by 'audit verify'
// after it starts again.
func TestKeyRotationAndProvableAudit(t *testing.T) {
	w := newWorld(t, worldOptions{})
	n := w.node1
	oldImage := w.image
	require.Equal(t, slices.Repeat([]uint32{1}, srcLayers), w.keyVersions(oldImage))
	w.mustPull(n, execMode)

	out := w.admin("key", "rotate", "app")
	assert.Contains(t, out, "key app rotated: version 2")
	// The pipeline's cached copy of version 1 would be used until it
	// expires (10 minutes); a pipeline that starts afresh asks the broker.
	require.NoError(t, os.Remove(n.keyCacheEntry("app")))
	newImage := "docker://" + w.registry + "/app:2"
	r := w.imgcopy(n, execMode, "copy", "--quiet", "--encryption-key", "provider:attested:key=app",
		"--dest-tls-verify=false", "oci:"+shared.srcImage+":latest", newImage)
	require.NoError(t, r.err, "encrypt after rotation: %s", r.stderr)
	require.Equal(t, slices.Repeat([]uint32{2}, srcLayers), w.keyVersions(newImage), "new wraps use version 2")

	w.mustPull(n, execMode) // the old image, wrapped under version 1
	w.image = newImage
	w.mustPull(n, execMode)

	show := w.admin("key", "show", "app")
	assert.Regexp(t, fmt.Sprintf(`(?m)^1\s+\S+\s+\S+\s+unwraps\s+%d\s+0$`, 2*srcLayers), show)
	assert.Regexp(t, fmt.Sprintf(`(?m)^2\s+\S+\s+\S+\s+wraps and unwraps\s+%d\s+0$`, srcLayers), show)

	// Which node got which layer, when, under which policy revision.
	var srcDigests []string
	for _, l := range w.inspect("oci:" + shared.srcImage + ":latest").Layers {
		srcDigests = append(srcDigests, l.Digest)
	}
	rels := w.releaseRecords("--node", "node1", "--key", "app")
	require.Len(t, rels, 3*srcLayers)
	for _, rec := range rels {
		assert.Contains(t, srcDigests, rec.LayerDigest, "release %d names a layer of the image", rec.Seq)
		assert.Equal(t, "prod", rec.Policy)
		assert.EqualValues(t, 1, rec.PolicyRevision)
		assert.NotEmpty(t, rec.Time)
		assert.Regexp(t, `^[0-9a-f]{64}$`, rec.Hash)
	}
	assert.EqualValues(t, 1, rels[0].KeyVersion)
	assert.EqualValues(t, 2, rels[len(rels)-1].KeyVersion)

	// Disabling version 1 refuses the old image at once; the new one pulls.
	out = w.admin("key", "disable", "app@1")
	assert.Contains(t, out, "key app version 1 disabled since")
	w.image = oldImage
	msg, _ := w.refusedPull(n, execMode)
	assert.Contains(t, msg, "key app version 1 is disabled (since ")
	w.image = newImage
	w.mustPull(n, execMode)

	r = w.attested(n, "audit", "list", "--kind", "nosuch")
	require.Error(t, r.err)
	assert.Contains(t, r.msg(), `unknown audit kind "nosuch"; the kinds are enroll, approve, revoke, remove, attest, release, refuse, key, policy, token, tag, webhook, login`)
	assert.NotContains(t, r.msg(), "rpc error")

	// A node without measured boot (swtpm: PCRs 0-7 all zero) drafts a
	// policy that pins nothing about what booted: the draft says so.
	r = w.attested(n, "policy", "learn", "--from-node", "node1")
	require.NoError(t, r.err, "%s", r.stderr)
	assert.Contains(t, string(r.stdout), "pcrs:")
	assert.Contains(t, r.msg(), "warning: every PCR value drafted (PCRs 0, 1, 2, 3, 4, 5, 6, 7")
	assert.Contains(t, r.msg(), "no measured boot")

	verified := w.admin("audit", "verify")
	assert.Contains(t, verified, "ok: ")
	anchor := anchorLineRe.FindStringSubmatch(verified)
	require.NotNil(t, anchor, verified)
	w.mustPull(n, execMode)
	assert.Contains(t, w.admin("audit", "verify", "--anchor", anchor[1]), "matches: nothing up to it was changed or removed")

	// An attacker with the file, the broker stopped, makes one release
	// look like another node's.
	victim := rels[1].Seq
	w.broker.stop()
	db, err := bolt.Open(filepath.Join(w.brokerDir, "broker.db"), 0o600, nil)
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("audit"))
		k := binary.BigEndian.AppendUint64(nil, victim)
		var rec map[string]any
		if err := json.Unmarshal(b.Get(k), &rec); err != nil {
			return err
		}
		require.Equal(t, "node1", rec["node"])
		rec["node"] = "node7"
		data, err := json.Marshal(rec)
		if err != nil {
			return err
		}
		return b.Put(k, data)
	}))
	require.NoError(t, db.Close())
	require.NoError(t, w.serveBroker(w.brokerAddr))

	r = w.attested(n, "audit", "verify")
	require.Error(t, r.err, "the edit went unnoticed: %s", r.stdout)
	assert.Contains(t, r.msg(), fmt.Sprintf("the audit trail does NOT verify: record seq %d: its content does not match its hash: the record was edited", victim))
	assert.Contains(t, r.msg(), fmt.Sprintf("(first bad record: seq %d)", victim))
	assert.NotContains(t, r.msg(), "rpc error")
}
