package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	kpconfig "github.com/containers/ocicrypt/config/keyprovider-config"
	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/broker/policy"
)

const examples = "../../examples"

// runConfig parses args with the real command tree and returns the
// resulting configuration.
func runConfig(t *testing.T, args ...string) config {
	t.Helper()
	root, cfg := newRootConfig()
	root.AddCommand(&cobra.Command{Use: "probe", RunE: func(*cobra.Command, []string) error { return nil }})
	root.SetArgs(append([]string{"probe"}, args...))
	require.NoError(t, root.Execute())
	return *cfg
}

func TestExampleNodeConfigsLoadStrictly(t *testing.T) {
	for _, f := range []string{"node.yaml", "pipeline.yaml"} {
		c := runConfig(t, "--config", filepath.Join(examples, f))
		assert.Equal(t, "broker.example.internal:8443", c.Broker, f)
		assert.Equal(t, 30*time.Second, c.Timeout, f)
	}
}

func TestFlagsWinOverConfigFile(t *testing.T) {
	c := runConfig(t, "--config", filepath.Join(examples, "node.yaml"), "--name", "from-flag", "--timeout", "5s")
	assert.Equal(t, "from-flag", c.Name)
	assert.Equal(t, 5*time.Second, c.Timeout)
	assert.Equal(t, "/dev/tpmrm0", c.TPM, "file value kept where no flag was given")
}

func TestUnknownConfigFieldIsAnError(t *testing.T) {
	f := filepath.Join(t.TempDir(), "bad.yaml")
	require.NoError(t, os.WriteFile(f, []byte("brokr: x\n"), 0o600))
	root := newRoot()
	root.SetArgs([]string{"node", "attest", "--config", f})
	root.SetOut(io.Discard)
	err := root.Execute()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "field brokr not found")
}

func TestExamplePoliciesParse(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(examples, "policy-*.yaml"))
	require.NoError(t, err)
	require.Len(t, files, 2)
	for _, f := range files {
		data, err := os.ReadFile(f)
		require.NoError(t, err)
		_, err = policy.Parse(data)
		require.NoError(t, err, f)
	}
}

func TestExampleOcicryptConfigs(t *testing.T) {
	for _, f := range []string{"exec.json", "grpc.json"} {
		data, err := os.ReadFile(filepath.Join(examples, "ocicrypt", f))
		require.NoError(t, err)
		var c kpconfig.OcicryptConfig
		require.NoError(t, json.Unmarshal(data, &c), f)
		attrs, ok := c.KeyProviderConfig["attested"]
		require.True(t, ok, f)
		assert.True(t, attrs.Command != nil || attrs.Grpc != "", f)
		if attrs.Command != nil {
			assert.Equal(t, "keyprovider", attrs.Command.Args[0])
		}
	}
}

func TestExampleKubernetesManifestsParse(t *testing.T) {
	for _, f := range []string{"broker.yaml", "node-daemonset.yaml"} {
		data, err := os.ReadFile(filepath.Join(examples, "kubernetes", f))
		require.NoError(t, err)
		dec := yaml.NewDecoder(bytes.NewReader(data))
		n := 0
		for {
			var doc map[string]any
			err := dec.Decode(&doc)
			if errors.Is(err, io.EOF) {
				break
			}
			require.NoError(t, err, f)
			assert.NotEmpty(t, doc["kind"], f)
			n++
		}
		assert.Positive(t, n, f)
	}
}
