// Package pgtest runs a throwaway PostgreSQL cluster for tests, from the
// server binaries of Debian's postgresql package (scripts/deps.sh installs
// it): initdb into a temporary directory, then postgres on loopback and a
// unix socket. PostgreSQL refuses to run as root, so when the tests run as
// root the cluster runs as the unprivileged user "postgres" (which the
// package creates) or else "nobody".
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Superuser is the cluster's superuser.
const Superuser = "attested"

// ErrNoBinaries means the PostgreSQL server binaries are not installed.
var ErrNoBinaries = errors.New("PostgreSQL server binaries (initdb, postgres) not found in PG_BINDIR, /usr/lib/postgresql/*/bin or PATH: " +
	"run scripts/deps.sh (installs Debian's postgresql)")

// BinDir finds the directory holding initdb and postgres: $PG_BINDIR, else
// the newest /usr/lib/postgresql/*/bin (Debian keeps them off PATH), else
// PATH.
func BinDir() (string, error) {
	has := func(dir string) bool {
		for _, b := range []string{"initdb", "postgres"} {
			if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.IsDir() {
				return false
			}
		}
		return true
	}
	if d := os.Getenv("PG_BINDIR"); d != "" {
		if has(d) {
			return d, nil
		}
		return "", fmt.Errorf("PG_BINDIR=%q holds no initdb and postgres", d)
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, d := range dirs {
		if has(d) {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		if d := filepath.Dir(p); has(d) {
			return d, nil
		}
	}
	return "", ErrNoBinaries
}

func version(dir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir)))
	return v
}

// Cluster is a running PostgreSQL cluster.
type Cluster struct {
	// Dir holds the data directory, the socket and the log.
	Dir string
	// Port is the TCP port on 127.0.0.1 (and the socket's number).
	Port int
	// Password is the superuser's password, asked for on TCP connections;
	// socket connections are trusted.
	Password string
	// Log is the server's log file.
	Log string

	bin  string
	cred *syscall.Credential
	cmd  *exec.Cmd
	done chan struct{}
}

// Start initialises a cluster in a new temporary directory and starts it.
func Start() (*Cluster, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "attested-pg-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir, bin: bin, Log: filepath.Join(dir, "postgres.log"), Password: randomHex(16)}
	if err := c.init(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		err = c.start()
		if err == nil {
			return c, nil
		}
		if attempt == 2 {
			os.RemoveAll(dir)
			return nil, err
		}
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Need starts a cluster for the test, stopped when it ends; the test is
// skipped, saying why, when the server binaries are missing.
func Need(t testing.TB) *Cluster {
	t.Helper()
	c, err := Start()
	if errors.Is(err, ErrNoBinaries) {
		t.Skip(err.Error())
	}
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			if b, err := os.ReadFile(c.Log); err == nil {
				if len(b) > 4000 {
					b = b[len(b)-4000:]
				}
				t.Logf("--- PostgreSQL log (tail)\n%s", b)
			}
		}
		c.Stop()
	})
	return c
}

// unprivileged returns the credential to run the server with when this
// process is root.
func unprivileged() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err1 == nil && err2 == nil {
			return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}, nil
		}
	}
	return nil, errors.New("running as root, and neither user postgres nor nobody exists to run PostgreSQL as")
}

func (c *Cluster) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(c.bin, name), args...)
	cmd.Dir = c.Dir
	cmd.Env = append(os.Environ(), "LC_ALL=C", "TZ=UTC")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred, Pdeathsig: syscall.SIGKILL}
	return cmd
}

func (c *Cluster) init() error {
	var err error
	if c.cred, err = unprivileged(); err != nil {
		return err
	}
	pwfile := filepath.Join(c.Dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(c.Password+"\n"), 0o600); err != nil {
		return err
	}
	if c.cred != nil {
		for _, p := range []string{c.Dir, pwfile} {
			if err := os.Chown(p, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
				return err
			}
		}
	}
	out, err := c.command("initdb", "-D", filepath.Join(c.Dir, "data"), "-U", Superuser, "--pwfile", pwfile,
		"--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync").CombinedOutput()
	os.Remove(pwfile)
	if err != nil {
		return fmt.Errorf("initdb: %v\n%s", err, out)
	}
	return nil
}

func (c *Cluster) start() error {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	c.Port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	return c.run()
}

// run starts the server on c.Port and waits until it accepts connections.
func (c *Cluster) run() error {
	logf, err := os.OpenFile(c.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := c.command("postgres", "-D", filepath.Join(c.Dir, "data"), "-p", strconv.Itoa(c.Port),
		"-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="+c.Dir,
		"-c", "max_connections=200", "-c", "log_min_messages=warning")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	c.cmd, c.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(c.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := pgx.Connect(ctx, c.URL("postgres"))
		cancel()
		if err == nil {
			conn.Close(context.Background())
			return nil
		}
		select {
		case <-c.done:
			b, _ := os.ReadFile(c.Log)
			return fmt.Errorf("postgres exited (%v):\n%s", cmd.ProcessState, b)
		default:
		}
		if time.Now().After(deadline) {
			c.Stop()
			return fmt.Errorf("postgres not accepting connections after 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Kill ends the server at once (SIGKILL), as a crash would.
func (c *Cluster) Kill() {
	if c.cmd == nil {
		return
	}
	c.cmd.Process.Kill()
	<-c.done
}

// Restart starts the server again on the same port after Kill or Halt.
func (c *Cluster) Restart() error { return c.run() }

// Halt stops the server with a fast shutdown, keeping its data.
func (c *Cluster) Halt() {
	if c.cmd == nil {
		return
	}
	c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		<-c.done
	}
}

// Stop stops the server and removes the cluster.
func (c *Cluster) Stop() {
	c.Halt()
	os.RemoveAll(c.Dir)
}

// URL is a URL of database db over the unix socket, as the superuser,
// without a password.
func (c *Cluster) URL(db string) string {
	return fmt.Sprintf("postgres:///%s?host=%s&port=%d&user=%s&sslmode=disable", url.PathEscape(db), url.QueryEscape(c.Dir), c.Port, Superuser)
}

// TCPURL is a URL of database db on 127.0.0.1, as the superuser, whose
// password the client must find elsewhere (PGPASSWORD, a passfile).
func (c *Cluster) TCPURL(db string) string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable", Superuser, c.Port, url.PathEscape(db))
}

// Passfile writes a libpq password file for TCP connections to the cluster
// into dir and returns its path.
func (c *Cluster) Passfile(dir string) (string, error) {
	p := filepath.Join(dir, "pgpass")
	return p, os.WriteFile(p, fmt.Appendf(nil, "127.0.0.1:%d:*:%s:%s\n", c.Port, Superuser, c.Password), 0o600)
}

// Exec runs SQL as the superuser in database db.
func (c *Cluster) Exec(ctx context.Context, db, sql string, args ...any) error {
	conn, err := pgx.Connect(ctx, c.URL(db))
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql, args...)
	return err
}

// CreateDatabase creates an empty database and returns its name.
func (c *Cluster) CreateDatabase(ctx context.Context) (string, error) {
	name := "t_" + randomHex(6)
	return name, c.Exec(ctx, "postgres", "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
}

// NewDatabase creates an empty database for the test and returns its URL
// over the unix socket.
func (c *Cluster) NewDatabase(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	name, err := c.CreateDatabase(ctx)
	if err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	return c.URL(name)
}

// NewSchema creates an empty schema in database postgres (much faster than
// a database) and returns a URL whose search_path is it.
func (c *Cluster) NewSchema(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	name := "s_" + randomHex(6)
	if err := c.Exec(ctx, "postgres", "CREATE SCHEMA "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("pgtest: create schema: %v", err)
	}
	return c.URL("postgres") + "&search_path=" + name
}

// String names the cluster for logs.
func (c *Cluster) String() string {
	return strings.Join([]string{"PostgreSQL", c.bin, c.Dir}, " ")
}
