package attest

import (
	"context"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A TPM that never answers must fail the call within its deadline: ocicrypt
// never cancels a provider, so a hung TPM would hang the pull.

// stuckDevice returns a character device that takes commands and never
// answers: the slave side of a pseudo-terminal nobody drives.
func stuckDevice(t *testing.T) string {
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	require.NoError(t, err)
	t.Cleanup(func() { master.Close() })
	var unlock int32
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, master.Fd(), syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock)))
	require.Zero(t, errno)
	var n uint32
	_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, master.Fd(), syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n)))
	require.Zero(t, errno)
	return fmt.Sprintf("/dev/pts/%d", n)
}

func TestStuckDeviceFailsWithinDeadline(t *testing.T) {
	err := readPlatformWithin(t, stuckDevice(t))
	assert.Contains(t, err.Error(), "did not answer")
}

// readPlatformWithin reads the platform from a TPM that never answers,
// with a 300 ms deadline, and checks it fails well before 2 s.
func readPlatformWithin(t *testing.T, spec string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	// Opening an swtpm already asks it something (what an earlier user
	// left loaded); either step may be the one that fails.
	tpm, err := OpenTPM(ctx, spec)
	if err == nil {
		defer tpm.Close()
		_, err = tpm.ReadPlatform()
	}
	require.Error(t, err)
	assert.Less(t, time.Since(start), 2*time.Second)
	return err
}

func TestSilentSwtpmFailsWithinDeadline(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accept, never answer
		}
	}()
	readPlatformWithin(t, "swtpm://"+lis.Addr().String())
}

func TestSessionsWaitIsBoundedByContext(t *testing.T) {
	m := &Sessions{}
	require.NoError(t, m.acquire(context.Background()))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := m.acquire(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "waiting for this node's attestation in progress")
	m.release()
	require.NoError(t, m.acquire(context.Background()))
}

func TestUnknownTPMSpecIsExplained(t *testing.T) {
	_, err := OpenTPM(context.Background(), "tpm0")
	assert.ErrorContains(t, err, "want a device path, swtpm://HOST:PORT or simulator")
	_, err = OpenTPM(context.Background(), "simulator")
	assert.ErrorContains(t, err, "this build has no TPM simulator")
}
