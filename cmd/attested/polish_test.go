package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

// Operator polish: the version is one command or flag away.
func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"version"}, {"--version"}} {
		out, err := runCLI(t, args...)
		require.NoError(t, err)
		assert.True(t, strings.HasPrefix(out, "attested "), out)
	}
}

// Operator polish: a join token must live; --ttl 0 is refused like any bad
// lifetime, before anything is asked of the broker.
func TestTokenTTLZeroIsRefused(t *testing.T) {
	for _, ttl := range []string{"0", "0s", "-1h", "500ms"} {
		_, err := runCLI(t, "node", "token", "create", "--ttl", ttl, "--broker", "127.0.0.1:1", "--broker-ca", "/nonexistent", "--admin-token-file", "/nonexistent")
		require.Error(t, err, ttl)
		assert.Contains(t, err.Error(), "a join token lives at least 1s", ttl)
	}
}

// Operator polish: a node enrolled under one name cannot attest under
// another by mistake.
func TestAttestUnderAnotherNameIsRefused(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "node.json"), []byte(`{"name":"worker-1","broker":"b","akBlob":"eA=="}`), 0o600))
	_, err := runCLI(t, "node", "attest", "--state-dir", dir, "--name", "worker-2")
	require.Error(t, err)
	assert.Contains(t, err.Error(), `this node is enrolled as "worker-1"`)
	assert.Contains(t, err.Error(), `not "worker-2"`)
}

// Operator polish: gRPC's status framing never reaches the operator.
func TestPlainErrorDropsRPCFraming(t *testing.T) {
	assert.Equal(t, "attest: node \"x\" is revoked",
		plainError(errors.New(`attest: rpc error: code = PermissionDenied desc = node "x" is revoked`)))
}

// Operator polish: examples/node.yaml shows every setting (set, or
// commented out with its meaning).
func TestExampleNodeConfigShowsEverySetting(t *testing.T) {
	data, err := os.ReadFile("../../examples/node.yaml")
	require.NoError(t, err)
	typ := reflect.TypeOf(config{})
	for i := range typ.NumField() {
		tag := strings.Split(typ.Field(i).Tag.Get("yaml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		assert.Regexp(t, `(?m)^(# )?`+tag+`: `, string(data), "examples/node.yaml does not show %q", tag)
	}
}
