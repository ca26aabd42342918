package store

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A second broker on the same data directory is told the store is in use,
// not "timeout".
func TestSecondOpenSaysInUse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "broker.db")
	s, err := OpenBolt(path)
	require.NoError(t, err)
	defer s.Close()
	defer func(d time.Duration) { openLockTimeout = d }(openLockTimeout)
	openLockTimeout = 100 * time.Millisecond
	_, err = OpenBolt(path)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "is in use: another broker serves this data directory")
}
