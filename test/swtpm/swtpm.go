// Package swtpm runs swtpm (the Debian package) as a test TPM 2.0 over TCP,
// with its own certificate authority, and gives tests the few TPM commands
// they need from outside the product: reading and extending PCRs.
//
// swtpm's TCP data channel carries raw TPM 2.0 commands and responses and
// serves one connection at a time, so a test must only talk to it while the
// code under test is not connected (attested opens it per operation).
package swtpm

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"

	"github.com/attested-dev/attested/attest"
)

// CA is a per-test swtpm certificate authority: swtpm_setup signs the EK
// and platform certificates with it instead of the global
// /var/lib/swtpm-localca.
type CA struct {
	// SetupConfig is the swtpm_setup --config file that points at this CA.
	SetupConfig string
	Dir         string

	mu sync.Mutex
}

// Tools are the programs this package runs.
var Tools = []string{"swtpm", "swtpm_setup", "swtpm_localca"}

// CheckTools returns an error naming every missing program.
func CheckTools() error {
	var missing []string
	for _, p := range Tools {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%v not found in PATH", missing)
	}
	return nil
}

// NewCA writes swtpm_setup and swtpm_localca configuration for a CA in dir.
// The CA's keys are created by swtpm_localca on first use.
func NewCA(dir string) (*CA, error) {
	localca, err := exec.LookPath("swtpm_localca")
	if err != nil {
		return nil, err
	}
	caDir := filepath.Join(dir, "ca")
	if err := os.MkdirAll(caDir, 0o700); err != nil {
		return nil, err
	}
	files := map[string]string{
		"swtpm-localca.conf":    fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", caDir),
		"swtpm-localca.options": "--platform-manufacturer attested-e2e\n--platform-version 2.1\n--platform-model swtpm\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			return nil, err
		}
	}
	setup := filepath.Join(dir, "swtpm_setup.conf")
	content := fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n",
		localca, filepath.Join(dir, "swtpm-localca.conf"), filepath.Join(dir, "swtpm-localca.options"))
	if err := os.WriteFile(setup, []byte(content), 0o600); err != nil {
		return nil, err
	}
	return &CA{SetupConfig: setup, Dir: caDir}, nil
}

// Roots returns the CA's certificates (its root and the issuer that signs
// EK certificates), PEM files a broker trusts as ekRoots. swtpm_localca
// creates them when it first signs; if nothing was signed yet, Roots
// manufactures a throwaway TPM so that it does.
func (ca *CA) Roots() ([]string, error) {
	ca.mu.Lock()
	defer ca.mu.Unlock()
	roots := []string{filepath.Join(ca.Dir, "swtpm-localca-rootca-cert.pem"), filepath.Join(ca.Dir, "issuercert.pem")}
	missing := func() bool {
		for _, r := range roots {
			if _, err := os.Stat(r); err != nil {
				return true
			}
		}
		return false
	}
	if missing() {
		state, err := os.MkdirTemp(filepath.Dir(ca.Dir), "first-tpm")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(state)
		out, err := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", state, "--create-ek-cert", "--overwrite", "--config", ca.SetupConfig).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("swtpm_setup (to create the CA): %v\n%s", err, out)
		}
		if missing() {
			return nil, fmt.Errorf("swtpm_localca did not create %v", roots)
		}
	}
	return roots, nil
}

// TPM is a running swtpm.
type TPM struct {
	t        testing.TB
	StateDir string
	LogFile  string
	Port     int
	CtrlPort int

	cmd  *exec.Cmd
	done chan struct{}
}

// Start manufactures a TPM in stateDir (EK and platform certificates signed
// by ca) and runs swtpm on two free loopback ports. It is stopped when the
// test ends.
func Start(t testing.TB, ca *CA, stateDir string) *TPM {
	t.Helper()
	s, err := Launch(ca, stateDir)
	if err != nil {
		t.Fatalf("swtpm: %v", err)
	}
	s.t = t
	t.Cleanup(s.Stop)
	return s
}

// Launch is Start for programs that are not tests (the load generator):
// errors are returned, and the caller stops the TPM.
func Launch(ca *CA, stateDir string) (*TPM, error) {
	if err := Manufacture(ca, stateDir); err != nil {
		return nil, err
	}
	return Run(stateDir)
}

// Manufacture creates a TPM's state in stateDir: its EK and platform
// certificates signed by ca.
func Manufacture(ca *CA, stateDir string) error {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return err
	}
	out, err := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", stateDir,
		"--create-ek-cert", "--create-platform-cert", "--overwrite", "--config", ca.SetupConfig).CombinedOutput()
	if err != nil {
		return fmt.Errorf("swtpm_setup: %v\n%s", err, out)
	}
	return nil
}

// Run runs swtpm on the TPM manufactured in stateDir, on two free loopback
// ports.
func Run(stateDir string) (*TPM, error) {
	s := &TPM{StateDir: stateDir, LogFile: filepath.Join(filepath.Dir(stateDir), filepath.Base(stateDir)+".swtpm.log")}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		if s.Port, lastErr = freePort(); lastErr != nil {
			continue
		}
		if s.CtrlPort, lastErr = freePort(); lastErr != nil {
			continue
		}
		if lastErr = s.start(); lastErr == nil {
			return s, nil
		}
	}
	return nil, lastErr
}

// Addr is the data channel address, host:port.
func (s *TPM) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port)) }

// URI is the value of attested's --tpm for this TPM.
func (s *TPM) URI() string { return "swtpm://" + s.Addr() }

func (s *TPM) start() error {
	log, err := os.OpenFile(s.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command("swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+s.StateDir,
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.Port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.CtrlPort),
		"--flags", "not-need-init,startup-clear")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	// Probe the control port: the data port serves one client at a time
	// and belongs to the code under test.
	ctrl := net.JoinHostPort("127.0.0.1", strconv.Itoa(s.CtrlPort))
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-done:
			b, _ := os.ReadFile(s.LogFile)
			return fmt.Errorf("swtpm exited at start (%v):\n%s", cmd.ProcessState, b)
		default:
		}
		if c, err := net.DialTimeout("tcp", ctrl, time.Second); err == nil {
			c.Close()
			// Another process may have taken one of the ports between
			// freePort and swtpm's bind (hundreds of TPMs start at once
			// in a load test): the probe then reached it, not this swtpm.
			if listensOn(cmd.Process.Pid, s.Port, s.CtrlPort) {
				return nil
			}
			s.Stop()
			return fmt.Errorf("swtpm did not get ports %d and %d (another process took one)", s.Port, s.CtrlPort)
		}
		if time.Now().After(deadline) {
			s.Stop()
			return errors.New("swtpm did not open its control port within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// listensOn reports whether process pid holds listening TCP sockets on
// every one of ports (from /proc). A process that has exited holds none:
// one that bound its control port and then failed on its data port (taken
// by another swtpm) may still answer the probe as it dies.
func listensOn(pid int, ports ...int) bool {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return false
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil {
			if ino, ok := strings.CutPrefix(l, "socket:["); ok {
				inodes[strings.TrimSuffix(ino, "]")] = true
			}
		}
	}
	var found []int
	for _, table := range []string{"tcp", "tcp6"} {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			// sl local_address rem_address st ... inode
			f := strings.Fields(line)
			if len(f) < 10 || f[3] != "0A" || !inodes[f[9]] {
				continue
			}
			if i := strings.LastIndexByte(f[1], ':'); i >= 0 {
				if port, err := strconv.ParseUint(f[1][i+1:], 16, 16); err == nil {
					found = append(found, int(port))
				}
			}
		}
	}
	for _, p := range ports {
		if !slices.Contains(found, p) {
			return false
		}
	}
	return true
}

// Stop ends swtpm (its state stays in StateDir).
func (s *TPM) Stop() {
	if s.cmd == nil {
		return
	}
	select {
	case <-s.done:
	default:
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(5 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.done
		}
	}
	s.cmd = nil
}

// PID is swtpm's process id (0 when it is not running).
func (s *TPM) PID() int {
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Kill ends swtpm with SIGKILL, as a TPM that vanishes would: nothing of
// its volatile state is saved.
func (s *TPM) Kill() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

// Reboot stops swtpm and starts it again on the same state and ports: PCRs
// return to their reset values and the TPM's reset counter grows.
func (s *TPM) Reboot() {
	s.t.Helper()
	s.Stop()
	if err := s.Restart(); err != nil {
		s.t.Fatalf("swtpm reboot: %v", err)
	}
}

// Restart starts a stopped or killed swtpm again on its state and ports.
func (s *TPM) Restart() error {
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		if err = s.start(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

// ExtendPCR extends the SHA-256 bank of PCR pcr with SHA-256(data), as a
// boot component's measurement would.
func (s *TPM) ExtendPCR(pcr int, data []byte) {
	s.t.Helper()
	if err := s.Extend(pcr, data); err != nil {
		s.t.Fatalf("%v", err)
	}
}

// Extend is ExtendPCR returning its error.
func (s *TPM) Extend(pcr int, data []byte) error {
	digest := sha256Sum(data)
	if err := s.with(func(rw io.ReadWriter) error {
		return tpm2.PCRExtend(rw, tpmutil.Handle(pcr), tpm2.AlgSHA256, digest, "")
	}); err != nil {
		return fmt.Errorf("swtpm: extend PCR %d: %w", pcr, err)
	}
	return nil
}

// ReadPCR returns the SHA-256 bank value of PCR pcr.
func (s *TPM) ReadPCR(pcr int) []byte {
	s.t.Helper()
	v, err := s.PCR(pcr)
	if err != nil {
		s.t.Fatalf("%v", err)
	}
	return v
}

// PCR is ReadPCR returning its error.
func (s *TPM) PCR(pcr int) ([]byte, error) {
	var v []byte
	if err := s.with(func(rw io.ReadWriter) error {
		var err error
		v, err = tpm2.ReadPCR(rw, pcr, tpm2.AlgSHA256)
		return err
	}); err != nil {
		return nil, fmt.Errorf("swtpm: read PCR %d: %w", pcr, err)
	}
	return v, nil
}

// with runs fn over a fresh data-channel connection. If attested holds the
// connection, swtpm accepts this one when it lets go.
func (s *TPM) with(fn func(io.ReadWriter) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := attest.DialSwtpm(ctx, s.Addr())
	if err != nil {
		return err
	}
	defer c.Close()
	return fn(c)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func sha256Sum(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:]
}
