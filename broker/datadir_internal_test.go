package broker

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Finding 13: an init that stops after any file (a crash, a full disk)
// leaves nothing serve accepts, and a second init refuses instead of
// overwriting what the first one wrote.
func TestInterruptedInitLeavesNothingServeAccepts(t *testing.T) {
	t.Cleanup(func() { initHook = nil })
	for step := 1; ; step++ {
		root := t.TempDir()
		o := InitOptions{DataDir: filepath.Join(root, "data"), CADir: filepath.Join(root, "ca")}
		n := 0
		var last string
		initHook = func(path string) error {
			n++
			last = path
			if n == step {
				return errors.New("crash")
			}
			return nil
		}
		_, err := Init(o)
		initHook = nil
		if err == nil {
			require.Greater(t, step, 3, "init wrote too few files")
			return
		}
		if filepath.Base(last) == ConfigFile {
			// The config is the last file: the broker is complete.
			continue
		}
		t.Logf("stopped after %s", last)
		_, err = Open(o.DataDir, slog.New(slog.NewTextHandler(io.Discard, nil)))
		require.Error(t, err, "serve accepted an interrupted init (stopped after %s)", last)
		written, err := os.ReadFile(last)
		require.NoError(t, err)
		_, err = Init(o)
		require.Error(t, err, "a second init after one stopped at %s must refuse", last)
		again, err := os.ReadFile(last)
		require.NoError(t, err)
		assert.Equal(t, written, again, "the second init rewrote %s", last)
	}
}

// A temporary file left by an interrupted init counts as a broker file.
func TestInitRefusesLeftoverTemporaryFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	require.NoError(t, os.MkdirAll(dir, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ".master.key.init-123"), []byte("x"), 0o600))
	_, err := Init(InitOptions{DataDir: dir, CADir: t.TempDir()})
	require.Error(t, err)
	assert.Contains(t, err.Error(), ".master.key.init-123")
}

// createExclusive never replaces a file, even one that appears after the
// check.
func TestCreateExclusiveNeverOverwrites(t *testing.T) {
	p := filepath.Join(t.TempDir(), "master.key")
	require.NoError(t, os.WriteFile(p, []byte("precious"), 0o600))
	err := createExclusive(p, []byte("new"), 0o600)
	require.Error(t, err)
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, "precious", string(b))
	entries, err := os.ReadDir(filepath.Dir(p))
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temporary file is left behind")
}
