// Package load drives many simulated nodes, each a real enrolled TPM
// (swtpm), against brokers run from the built binary: the load generator
// (cmd/attested-load) and the fault tests (test/e2e) share it. The nodes
// run the product's own node code (attest.Sessions, keyprovider's Handler
// and NodeUnwrapper) in this process, one TPM and one broker connection
// each, as the agent on every node would.
package load

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/broker"
)

// Broker is one 'attested broker serve' process and the files clients
// need to reach it.
type Broker struct {
	Bin     string
	DataDir string
	Addr    string
	// ID is the broker identity annotations carry.
	ID             string
	CAFile         string
	AdminTokenFile string
	// Log receives the broker's output.
	Log string
	// Env is added to the broker's environment.
	Env []string

	cmd  *exec.Cmd
	done chan struct{}
}

var brokerIDRe = regexp.MustCompile(`broker (\S+) initialised`)

// InitBroker runs 'attested broker init' in dir/broker (the CA key goes to
// dir/broker-ca) listening on a free loopback port, trusting ekRoots for EK
// certificates, and merges the YAML documents in settings (top-level keys;
// later documents win) into its broker.yaml. It does not start it.
func InitBroker(bin, dir string, ekRoots []string, settings ...string) (*Broker, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	b := &Broker{Bin: bin, DataDir: filepath.Join(dir, "broker"), Addr: fmt.Sprintf("127.0.0.1:%d", port),
		Log: filepath.Join(dir, "broker.log")}
	args := []string{"broker", "init", "--data-dir", b.DataDir, "--ca-dir", filepath.Join(dir, "broker-ca"), "--listen", b.Addr}
	for _, r := range ekRoots {
		args = append(args, "--ek-roots", r)
	}
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("attested broker init: %v\n%s", err, out)
	}
	m := brokerIDRe.FindSubmatch(out)
	if m == nil {
		return nil, fmt.Errorf("attested broker init printed %q", out)
	}
	b.ID = string(m[1])
	b.CAFile = filepath.Join(b.DataDir, broker.CACertFile)
	b.AdminTokenFile = filepath.Join(b.DataDir, broker.AdminTokenFile)
	if err := MergeYAML(filepath.Join(b.DataDir, broker.ConfigFile), settings...); err != nil {
		return nil, err
	}
	return b, nil
}

// Replica copies the broker's data directory (master key, CA, server
// certificate, broker.yaml and its store setting) into dir/name for another
// replica serving on a free loopback port. Replicas share a store only
// when broker.yaml names a PostgreSQL database.
func (b *Broker) Replica(dir, name string) (*Broker, error) {
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	r := *b
	r.DataDir = filepath.Join(dir, name)
	r.Addr = fmt.Sprintf("127.0.0.1:%d", port)
	r.Log = filepath.Join(dir, name+".log")
	r.cmd, r.done = nil, nil
	r.CAFile = filepath.Join(r.DataDir, broker.CACertFile)
	r.AdminTokenFile = filepath.Join(r.DataDir, broker.AdminTokenFile)
	if err := copyDir(b.DataDir, r.DataDir); err != nil {
		return nil, fmt.Errorf("replica %s: %w", name, err)
	}
	return &r, nil
}

// copyDir copies a directory tree, modes included.
func copyDir(from, to string) error {
	return filepath.WalkDir(from, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(from, p)
		if err != nil {
			return err
		}
		dst := filepath.Join(to, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.Mkdir(dst, fi.Mode().Perm())
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, data, fi.Mode().Perm())
	})
}

// MergeYAML sets the top-level settings of the YAML documents in docs in
// the YAML file path, whatever it already holds: appending would repeat
// keys, which the broker refuses.
func MergeYAML(path string, docs ...string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	cfg := map[string]any{}
	if err := yaml.Unmarshal(data, &cfg); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	for _, doc := range docs {
		dec := yaml.NewDecoder(strings.NewReader(doc))
		for {
			over := map[string]any{}
			if err := dec.Decode(&over); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return fmt.Errorf("broker settings %q: %w", doc, err)
			}
			maps.Copy(cfg, over)
		}
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	return os.WriteFile(path, out, 0o600)
}

// Start runs 'attested broker serve' and waits until it accepts
// connections.
func (b *Broker) Start() error {
	log, err := os.OpenFile(b.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(b.Bin, "broker", "serve", "--data-dir", b.DataDir, "--listen", b.Addr)
	cmd.Env = append(os.Environ(), b.Env...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("attested broker serve: %w", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	b.cmd, b.done = cmd, done
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-done:
			return fmt.Errorf("attested broker serve exited at start (%v):\n%s", cmd.ProcessState, tail(b.Log, 4000))
		default:
		}
		if c, err := net.DialTimeout("tcp", b.Addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			b.Kill()
			return fmt.Errorf("attested broker serve did not listen on %s within 30s:\n%s", b.Addr, tail(b.Log, 4000))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Running reports whether the broker process is up.
func (b *Broker) Running() bool {
	if b.cmd == nil {
		return false
	}
	select {
	case <-b.done:
		return false
	default:
		return true
	}
}

// PID is the broker's process id (0 when it is not running).
func (b *Broker) PID() int {
	if !b.Running() {
		return 0
	}
	return b.cmd.Process.Pid
}

// Stop ends the broker with SIGTERM, then SIGKILL after 10 s.
func (b *Broker) Stop() {
	if !b.Running() {
		return
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(10 * time.Second):
		b.Kill()
	}
}

// Kill ends the broker with SIGKILL: no shutdown code runs, as in a crash
// or an OOM kill.
func (b *Broker) Kill() {
	if b.cmd == nil {
		return
	}
	_ = b.cmd.Process.Kill()
	<-b.done
}

// ExitState describes how the broker process ended ("" while it runs).
func (b *Broker) ExitState() string {
	if b.cmd == nil || b.Running() {
		return ""
	}
	return b.cmd.ProcessState.String()
}

// LoadLimits are broker limits for a load test: the broker's defaults
// bound what one source (an IPv4 address) may do, and every simulated node
// connects from 127.0.0.1, so they are raised to what nodes nodes pulling
// layers layers at once need. A real fleet comes from as many addresses as
// it has nodes and needs none of this.
func LoadLimits(nodes, layers int) broker.Limits {
	d := broker.DefaultLimits()
	conns := max(d.MaxConnections, 2*nodes+64)
	reqs := max(d.MaxRequests, nodes*(layers+1)+64)
	rate := func(r broker.Rate, perNode float64) broker.Rate {
		return broker.Rate{PerSecond: max(r.PerSecond, perNode*float64(nodes)), Burst: max(r.Burst, 2*nodes)}
	}
	return broker.Limits{
		MaxConnections:           conns,
		MaxConnectionsPerSource:  conns,
		MaxRequests:              reqs,
		MaxRequestsPerSource:     reqs,
		MaxRequestBytes:          max(d.MaxRequestBytes, 1<<30),
		MaxRequestBytesPerSource: max(d.MaxRequestBytes, 1<<30),
		Rates: map[string]broker.Rate{
			"public":  rate(d.Rates["public"], 10),
			"enroll":  rate(d.Rates["enroll"], 10),
			"attest":  rate(d.Rates["attest"], 100),
			"unwrap":  rate(d.Rates["unwrap"], 100),
			"connect": rate(d.Rates["connect"], 10),
		},
		MaxSources: d.MaxSources,
	}
}

// LimitsYAML is broker.yaml's "limits" section (and the enrollment cap)
// for l, to pass to InitBroker.
func LimitsYAML(l broker.Limits, enrollments int) (string, error) {
	out, err := yaml.Marshal(map[string]any{"limits": l, "maxEnrollmentsInFlight": max(enrollments, broker.DefaultMaxEnrollmentsInFlight)})
	return string(out), err
}

// LimitsText says in one line what LoadLimits and LimitsYAML set.
func LimitsText(l broker.Limits, enrollments int) string {
	var rates []string
	for _, k := range slices.Sorted(maps.Keys(l.Rates)) {
		rates = append(rates, fmt.Sprintf("%s %s", k, l.Rates[k]))
	}
	return fmt.Sprintf("maxConnections(PerSource) %d, maxRequests(PerSource) %d, maxRequestBytes(PerSource) %s, maxEnrollmentsInFlight %d, rates: %s",
		l.MaxConnectionsPerSource, l.MaxRequestsPerSource, l.MaxRequestBytesPerSource, max(enrollments, broker.DefaultMaxEnrollmentsInFlight), strings.Join(rates, "; "))
}

// FreePort returns a loopback TCP port free at the time of the call.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = append([]byte("...\n"), b[len(b)-n:]...)
	}
	return string(b)
}
