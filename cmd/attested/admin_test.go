package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/brokertest"
)

const zeroPCR = "0000000000000000000000000000000000000000000000000000000000000000"

func writePolicy(t *testing.T, dir, file, name, extra string) string {
	t.Helper()
	p := filepath.Join(dir, file)
	require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o700))
	require.NoError(t, os.WriteFile(p, []byte("name: "+name+"\npcrs:\n  16: [\""+zeroPCR+"\"]\n"+extra), 0o600))
	return p
}

// TestPolicyApplyFilesAndDirectories: several -f, a directory's *.yaml and
// *.yml files in name order, a report per file, "unchanged" for a file the
// same as its policy's current revision, and a failed file reported and
// counted while the others are applied.
func TestPolicyApplyFilesAndDirectories(t *testing.T) {
	b := brokertest.Start(t)
	dir := t.TempDir()
	pdir := filepath.Join(dir, "policies")
	a := writePolicy(t, pdir, "a.yaml", "alpha", "")
	bb := writePolicy(t, pdir, "b.yml", "beta", "")
	writePolicy(t, pdir, "notes.txt", "ignored", "")
	writePolicy(t, pdir, "sub/c.yaml", "ignored", "")
	g := writePolicy(t, dir, "gamma.yaml", "gamma", "")

	out, err := cli(t, b, "policy", "apply", "-f", pdir, "-f", g)
	require.NoError(t, err, out)
	assert.Equal(t, a+": policy alpha applied (revision 1)\n"+bb+": policy beta applied (revision 1)\n"+g+": policy gamma applied (revision 1)\n", out)

	writePolicy(t, pdir, "b.yml", "beta", "maxSessionAge: 1h\n")
	out, err = cli(t, b, "policy", "apply", "-f", pdir)
	require.NoError(t, err, out)
	assert.Equal(t, a+": policy alpha unchanged (revision 1)\n"+bb+": policy beta applied (revision 2)\n", out)

	out, err = cli(t, b, "policy", "apply", "-f", g)
	require.NoError(t, err, out)
	assert.Equal(t, "policy gamma unchanged (revision 1)\n", out, "one file: no file name")

	bad := filepath.Join(dir, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte("name: broken\npcrs: nope\n"), 0o600))
	out, err = cli(t, b, "policy", "apply", "-f", bad, "-f", g)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "1 of 2 policy files failed")
	assert.Contains(t, out, bad+": FAILED: ")
	assert.NotContains(t, out, "rpc error")
	assert.Contains(t, out, g+": policy gamma unchanged (revision 1)")

	empty := filepath.Join(dir, "empty")
	require.NoError(t, os.Mkdir(empty, 0o700))
	_, err = cli(t, b, "policy", "apply", "-f", empty)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "holds no *.yaml or *.yml file")
	_, err = cli(t, b, "policy", "apply", "-f", filepath.Join(dir, "missing.yaml"))
	require.Error(t, err)

	out, err = cli(t, b, "policy", "history", "beta")
	require.NoError(t, err, out)
	assert.Regexp(t, `(?m)^1\s+\S+\s+sha256:[0-9a-f]{12}\n2\s+\S+\s+sha256:[0-9a-f]{12}\n$`, strings.SplitN(out, "\n", 2)[1])
	out, err = cli(t, b, "policy", "history", "beta", "--revision", "2")
	require.NoError(t, err, out)
	assert.Contains(t, out, "maxSessionAge: 1h")
	_, err = cli(t, b, "policy", "history", "beta", "--revision", "9")
	assert.ErrorContains(t, err, "policy beta has no revision 9")
}

func TestKeyCommands(t *testing.T) {
	b := brokertest.Start(t)
	out, err := cli(t, b, "policy", "apply", "-f", writePolicy(t, t.TempDir(), "p.yaml", "prod", ""))
	require.NoError(t, err, out)
	out, err = cli(t, b, "key", "create", "app", "--policy", "prod")
	require.NoError(t, err, out)
	out, err = cli(t, b, "key", "rotate", "app")
	require.NoError(t, err, out)
	assert.Regexp(t, `key app rotated: version 2 \(\S+\) wraps new layers`, out)

	out, err = cli(t, b, "key", "show", "app")
	require.NoError(t, err, out)
	assert.Regexp(t, `key app: policy prod \(revision 1, applied \S+\)`, out)
	assert.Regexp(t, `(?m)^1\s+\S+\s+\S+\s+unwraps\s+0\s+0$`, out)
	assert.Regexp(t, `(?m)^2\s+\S+\s+\S+\s+wraps and unwraps\s+0\s+0$`, out)

	out, err = cli(t, b, "key", "disable", "app@1")
	require.NoError(t, err, out)
	assert.Regexp(t, `key app version 1 disabled since \S+Z: nothing wrapped under it is released`, out)
	out, err = cli(t, b, "key", "show", "app")
	require.NoError(t, err, out)
	assert.Regexp(t, `(?m)^1\s+\S+\s+\S+\s+disabled \S+Z\s+0\s+0$`, out)
	out, err = cli(t, b, "key", "list")
	require.NoError(t, err, out)
	assert.Contains(t, out, "DISABLED")

	for _, bad := range []string{"app@x", "app@0", "app@-1"} {
		_, err = cli(t, b, "key", "disable", bad)
		assert.ErrorContains(t, err, "must be a number from 1", bad)
	}
	_, err = cli(t, b, "key", "disable", "app@9")
	assert.ErrorContains(t, err, `key "app" has no version 9`)

	out, err = cli(t, b, "key", "disable", "app")
	require.NoError(t, err, out)
	assert.Contains(t, out, "every version of key app is disabled")
	out, err = cli(t, b, "key", "show", "app")
	require.NoError(t, err, out)
	assert.Contains(t, out, "every version is disabled")
}

var anchorRe = regexp.MustCompile(`(?m)^anchor: (\d+:[0-9a-f]{64}) `)

func TestAuditCommands(t *testing.T) {
	b := brokertest.Start(t)
	out, err := cli(t, b, "policy", "apply", "-f", writePolicy(t, t.TempDir(), "p.yaml", "prod", ""))
	require.NoError(t, err, out)
	out, err = cli(t, b, "key", "create", "app", "--policy", "prod")
	require.NoError(t, err, out)

	_, err = cli(t, b, "audit", "list", "--kind", "nosuch")
	require.Error(t, err)
	assert.Contains(t, plainError(err), `unknown audit kind "nosuch"; the kinds are enroll, approve, revoke, remove, attest, release, refuse, key, policy, token, tag, webhook, login`)

	out, err = cli(t, b, "audit", "list", "--json", "--since", "1h", "--key", "app")
	require.NoError(t, err, out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 1, out)
	var rec map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[0]), &rec))
	assert.Equal(t, "key", rec["kind"])
	assert.Equal(t, "app", rec["key"])
	assert.EqualValues(t, 1, rec["key_version"])
	assert.Equal(t, "prod", rec["policy"])
	assert.Equal(t, true, rec["allowed"])
	assert.Regexp(t, `^[0-9a-f]{64}$`, rec["hash"])
	_, err = time.Parse(time.RFC3339Nano, rec["time"].(string))
	assert.NoError(t, err)

	out, err = cli(t, b, "audit", "list", "--until", "2000-01-01")
	require.NoError(t, err, out)
	assert.Equal(t, 1, strings.Count(out, "\n"), "only the header: %s", out)
	_, err = cli(t, b, "audit", "list", "--since", "yesterday")
	assert.ErrorContains(t, err, `--since: "yesterday" is not a time`)

	out, err = cli(t, b, "audit", "verify")
	require.NoError(t, err, out)
	assert.Regexp(t, `^ok: 2 records; 2 chained records verify`, out)
	m := anchorRe.FindStringSubmatch(out)
	require.NotNil(t, m, out)
	out, err = cli(t, b, "key", "rotate", "app")
	require.NoError(t, err, out)
	out, err = cli(t, b, "audit", "verify", "--anchor", m[1])
	require.NoError(t, err, out)
	assert.Contains(t, out, "anchor 2 matches")

	_, err = cli(t, b, "audit", "verify", "--anchor", "2:"+strings.Repeat("ab", 32))
	assert.ErrorContains(t, err, "anchor does NOT match: record 2 has hash")
	_, err = cli(t, b, "audit", "verify", "--anchor", "99:"+strings.Repeat("ab", 32))
	assert.ErrorContains(t, err, "anchor NOT found: the trail ends before seq 99")
	_, err = cli(t, b, "audit", "verify", "--anchor", "2")
	assert.ErrorContains(t, err, "want SEQ:HASH")
}

// TestAdminCommandsHaveExamples: every key, policy and audit command shows
// an example in its help.
func TestAdminCommandsHaveExamples(t *testing.T) {
	root := newRoot()
	n := 0
	for _, name := range []string{"key", "policy", "audit"} {
		cmd, _, err := root.Find([]string{name})
		require.NoError(t, err)
		for _, c := range append(cmd.Commands(), cmd) {
			if c.Hidden || c.Name() == "help" {
				continue
			}
			n++
			assert.NotEmpty(t, c.Example, "%s has no example", c.CommandPath())
		}
	}
	assert.GreaterOrEqual(t, n, 13)
}

func TestZeroPCRs(t *testing.T) {
	assert.Equal(t, "0, 7", zeroPCRs("name: x\npcrs:\n  7: [\""+zeroPCR+"\"]\n  0: [\""+zeroPCR+"\"]\n"))
	assert.Empty(t, zeroPCRs("name: x\npcrs:\n  0: [\""+zeroPCR+"\"]\n  7: [\"ab"+zeroPCR[2:]+"\"]\n"), "one measured PCR")
	assert.Empty(t, zeroPCRs("name: x\n"), "no PCRs drafted")
}

func TestParseWhen(t *testing.T) {
	now := time.Date(2025, 6, 2, 12, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Time{
		"2025-06-01T10:00:00Z": time.Date(2025, 6, 1, 10, 0, 0, 0, time.UTC),
		"2025-06-01":           time.Date(2025, 6, 1, 0, 0, 0, 0, time.UTC),
		"24h":                  now.Add(-24 * time.Hour),
	} {
		got, err := parseWhen(in, now)
		require.NoError(t, err, in)
		assert.True(t, want.Equal(got), "%s: %s", in, got)
	}
	for _, bad := range []string{"", "-1h", "0s", "June"} {
		_, err := parseWhen(bad, now)
		assert.Error(t, err, bad)
	}
}
