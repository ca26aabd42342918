package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestJoinTokenNeverOnTheCommandLine: '--join-token TOKEN' put the secret
// in /proc/PID/cmdline for every local user to read; it is refused, naming
// what replaces it, before anything else runs.
func TestJoinTokenNeverOnTheCommandLine(t *testing.T) {
	for _, args := range [][]string{
		{"node", "enroll", "--join-token", "ajt_secret"},
		{"node", "enroll", "--join-token=ajt_secret"},
	} {
		root, _ := newRootConfig()
		root.SetArgs(append(args, "--config", writeNodeConfig(t)))
		err := root.Execute()
		require.Error(t, err, "%v", args)
		assert.Contains(t, err.Error(), "--join-token-file")
		assert.Contains(t, err.Error(), joinTokenEnv)
	}
	for _, f := range []string{"join-token", "admin-token"} {
		root, _ := newRootConfig()
		enroll, _, err := root.Find([]string{"node", "enroll"})
		require.NoError(t, err)
		if fl := enroll.Flags().Lookup(f); fl != nil {
			assert.True(t, fl.Hidden, "--%s must not be offered", f)
		}
	}
}

// TestNoSecretFlags: no flag of any command takes a secret's value;
// secrets come from files (flags named *-file), stdin or the environment.
func TestNoSecretFlags(t *testing.T) {
	root, _ := newRootConfig()
	var all []*cobra.Command
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		all = append(all, c)
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	checked := 0
	for _, c := range all {
		for _, fs := range []*pflag.FlagSet{c.Flags(), c.PersistentFlags()} {
			fs.VisitAll(func(f *pflag.Flag) {
				checked++
				secretish := false
				for _, w := range []string{"token", "secret", "password", "passphrase", "credential"} {
					secretish = secretish || strings.Contains(f.Name, w)
				}
				if secretish && !f.Hidden && !strings.HasSuffix(f.Name, "-file") {
					t.Errorf("%s --%s may take a secret on the command line", c.CommandPath(), f.Name)
				}
			})
		}
	}
	assert.Greater(t, checked, 20)
}

func TestJoinTokenSources(t *testing.T) {
	dir := t.TempDir()
	private := filepath.Join(dir, "tok")
	require.NoError(t, os.WriteFile(private, []byte("ajt_file\n"), 0o600))
	tok, err := joinToken(private, nil)
	require.NoError(t, err)
	assert.Equal(t, "ajt_file", tok)

	tok, err = joinToken("-", strings.NewReader("ajt_stdin\n"))
	require.NoError(t, err)
	assert.Equal(t, "ajt_stdin", tok)

	t.Setenv(joinTokenEnv, "ajt_env")
	tok, err = joinToken("", nil)
	require.NoError(t, err)
	assert.Equal(t, "ajt_env", tok)
	_, err = joinToken(private, nil)
	require.Error(t, err, "two sources are ambiguous")
	os.Unsetenv(joinTokenEnv)

	tok, err = joinToken("", nil)
	require.NoError(t, err)
	assert.Empty(t, tok, "no token: enrollment waits for approval")

	shared := filepath.Join(dir, "shared")
	require.NoError(t, os.WriteFile(shared, []byte("ajt_shared\n"), 0o644))
	_, err = joinToken(shared, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "chmod 600")

	for _, bad := range []string{"", "\n", "two words", strings.Repeat("a", maxJoinToken+1)} {
		_, err := joinToken("-", strings.NewReader(bad))
		assert.Error(t, err, "%q", bad)
	}
}

func TestTokenOutputFileIsPrivateAndNew(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tok")
	require.NoError(t, writeSecretFile(p, "ajt_x\n"))
	fi, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	assert.Error(t, writeSecretFile(p, "ajt_y\n"), "an existing file is not overwritten")
}

func writeNodeConfig(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "node.yaml")
	require.NoError(t, os.WriteFile(p, []byte("broker: 127.0.0.1:1\ntpm: simulator\n"), 0o600))
	return p
}
