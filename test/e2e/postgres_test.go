//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/attest"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/broker/store/pgstore"
	"github.com/attested-dev/attested/broker/store/pgstore/pgtest"
)

// replica is one 'attested broker serve' of a replicated broker.
type replica struct {
	name, dir, addr string
	env             []string
	proc            *proc
}

// TestPostgresReplicas runs two broker replicas, each from its own copy of
// one data directory (one master key, one CA), on one PostgreSQL database
// (Debian's server, as an unprivileged throwaway cluster), reached over TCP
// with a password from a passfile.
func TestPostgresReplicas(t *testing.T) {
	pg := pgtest.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	db, err := pg.CreateDatabase(ctx)
	require.NoError(t, err)

	dir, err := os.MkdirTemp(shared.dir, "w")
	require.NoError(t, err)
	w := &world{t: t, dir: dir, brokerExtra: ekTrust(t, true)}
	t.Cleanup(func() {
		if t.Failed() {
			w.dumpLogs()
		}
	})
	w.startRegistry()

	passfile, err := pg.Passfile(w.dir)
	require.NoError(t, err)
	storeURL := pg.TCPURL(db)
	a, b := w.initReplicas(storeURL, []string{"PGPASSFILE=" + passfile})

	t.Run("migration runs once when replicas start together", func(t *testing.T) {
		var started sync.WaitGroup
		errs := make([]error, 2)
		for i, r := range []*replica{a, b} {
			started.Go(func() { errs[i] = w.tryServeReplica(r) })
		}
		started.Wait()
		require.NoError(t, errors.Join(errs...))
		migrated := 0
		for _, r := range []*replica{a, b} {
			log, err := os.ReadFile(r.proc.log)
			require.NoError(t, err)
			if strings.Contains(string(log), "applied schema migrations") {
				migrated++
			} else {
				assert.Contains(t, string(log), "schema is current", r.name)
			}
			assert.Contains(t, string(log), storeURL, "the store is named in the log (it carries no password)")
		}
		assert.Equal(t, 1, migrated, "one replica applies the migrations, the other finds them applied")
		c, err := pgx.Connect(ctx, pg.URL(db))
		require.NoError(t, err)
		defer c.Close(ctx)
		var n int
		require.NoError(t, c.QueryRow(ctx, "SELECT count(*) FROM attested_schema").Scan(&n))
		assert.Equal(t, pgstore.SchemaVersion(), n)
	})
	require.False(t, t.Failed())

	// Node, policy and key through replica a; the node's second
	// configuration reaches replica b.
	w.brokerDir, w.brokerAddr, w.broker = a.dir, a.addr, a.proc
	w.brokerID = brokerIDOf(t, a.dir)
	n := w.newNode("node1")
	w.node1 = n
	n.enroll()
	w.applyPolicy("prod", map[int][]byte{0: n.tpm.ReadPCR(0), 16: n.tpm.ReadPCR(16)})
	cfgA := n.cfg
	w.brokerAddr = b.addr
	cfgB := n.writeConfig("node-b.yaml", 20*time.Second)
	w.brokerAddr = a.addr
	n.cfg = cfgB
	require.Contains(t, w.admin("key", "create", "app", "--policy", "prod"), "key app version 1 created", "a key created at replica b")
	n.cfg = cfgA
	w.image = "docker://" + w.registry + "/app:1"
	r := w.imgcopy(n, execMode, "copy", "--quiet", "--encryption-key", "provider:attested:key=app",
		"--dest-tls-verify=false", "oci:"+shared.srcImage+":latest", w.image)
	require.NoError(t, r.err, "encrypt at replica a with the key replica b created: %s", r.stderr)

	t.Run("nonce is single-use across replicas", func(t *testing.T) {
		ca := filepath.Join(a.dir, "ca.pem")
		clients := map[string]apiv1.BrokerClient{}
		for _, rep := range []*replica{a, b} {
			cc, err := conn.Dial(conn.Options{Addr: rep.addr, CAFile: ca, Timeout: 20 * time.Second})
			require.NoError(t, err)
			t.Cleanup(func() { cc.Close() })
			clients[rep.name] = apiv1.NewBrokerClient(cc)
		}
		ch, err := clients[a.name].Challenge(ctx, &apiv1.ChallengeRequest{Node: n.name})
		require.NoError(t, err)
		var ev *attest.Evidence
		n.withTPM(ctx, func(tpm *attest.TPM, st *attest.State) {
			ev, err = attest.Collect(tpm, st, ch.GetNonce(), attest.Logs{})
		})
		require.NoError(t, err)
		const tries = 12
		var mu sync.Mutex
		var ok int
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range tries {
			c := clients[a.name]
			if i%2 == 1 {
				c = clients[b.name]
			}
			wg.Go(func() {
				<-start
				_, err := c.Attest(ctx, ev.Request)
				mu.Lock()
				defer mu.Unlock()
				if err == nil {
					ok++
					return
				}
				assert.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
			})
		}
		close(start)
		wg.Wait()
		assert.Equal(t, 1, ok, "one of %d presentations of one piece of evidence, at two replicas, is accepted", tries)
		assert.Contains(t, w.auditReasons(n.name), "nonce already used (replayed evidence?)")
	})

	t.Run("attested at one replica, unwrapped at the other", func(t *testing.T) {
		before, _ := w.quotes(n)
		w.mustPull(n, execMode)
		attested, _ := w.quotes(n)
		require.Equal(t, before+1, attested, "the pull attested once, at replica a")
		// Replica a goes away: the session it opened serves at b.
		a.proc.stop()
		n.cfg = cfgB
		w.mustPull(n, execMode)
		after, _ := w.quotes(n)
		assert.Equal(t, attested, after, "replica b released every layer on replica a's session, without a new quote")
		w.serveReplica(a)
	})

	t.Run("revocation at one replica binds the other at once", func(t *testing.T) {
		n.cfg = cfgA
		assert.Contains(t, w.admin("node", "revoke", n.name), "node node1 is now revoked")
		n.cfg = cfgB
		msg, _ := w.refusedPull(n, execMode)
		assert.Contains(t, msg, `node "node1" is revoked`)
	})

	t.Run("no password on the command line", func(t *testing.T) {
		bad := strings.Replace(storeURL, pgtest.Superuser+"@", pgtest.Superuser+":"+pg.Password+"@", 1)
		r := w.run(runOpts{}, "broker serve --store with a password", shared.attested, "broker", "serve", "--data-dir", b.dir,
			"--listen", fmt.Sprintf("127.0.0.1:%d", freePort(t)), "--store", bad)
		require.Error(t, r.err)
		assert.Contains(t, r.msg(), "no place for secrets")
		assert.Contains(t, r.msg(), "PGPASSFILE")
	})

	w.assertNoSecrets([]secret{{what: "the PostgreSQL password", raw: []byte(pg.Password)}})
}

// initReplicas initialises one broker and copies its data directory for a
// second replica; both use storeURL, with env added to their environment.
func (w *world) initReplicas(storeURL string, env []string) (*replica, *replica) {
	t := w.t
	a := &replica{name: "broker", dir: filepath.Join(w.dir, "broker"), addr: fmt.Sprintf("127.0.0.1:%d", freePort(t)), env: env}
	b := &replica{name: "broker-b", dir: filepath.Join(w.dir, "broker-b"), addr: fmt.Sprintf("127.0.0.1:%d", freePort(t)), env: env}
	r := w.run(runOpts{}, "broker init", shared.attested, "broker", "init", "--data-dir", a.dir, "--listen", a.addr)
	require.NoError(t, r.err, "broker init: %s", r.stderr)
	require.NoError(t, overrideYAML(filepath.Join(a.dir, "broker.yaml"), w.brokerExtra+"---\nstore: "+storeURL+"\n"))
	require.NoError(t, copyDir(a.dir, b.dir))
	for _, rep := range []*replica{a, b} {
		metrics := fmt.Sprintf("metricsListen: 127.0.0.1:%d\n", freePort(t))
		require.NoError(t, overrideYAML(filepath.Join(rep.dir, "broker.yaml"), metrics))
	}
	return a, b
}

// serveReplica starts (or restarts) a replica and waits until it accepts
// connections.
func (w *world) serveReplica(r *replica) {
	require.NoError(w.t, w.tryServeReplica(r))
	if w.brokerAddr == r.addr {
		w.broker = r.proc
	}
}

// tryServeReplica is serveReplica saying why the replica did not start;
// it is safe to call from several goroutines.
func (w *world) tryServeReplica(r *replica) error {
	p := w.startEnv(r.name, r.env, shared.attested, "broker", "serve", "--data-dir", r.dir, "--listen", r.addr)
	r.proc = p
	return w.waitReady(p, r.name, func() error {
		c, err := net.DialTimeout("tcp", r.addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
}

// copyDir copies a broker data directory, modes included.
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

// brokerIDOf reads the broker's identity from its broker.yaml.
func brokerIDOf(t *testing.T, dir string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "broker.yaml"))
	require.NoError(t, err)
	for _, line := range strings.Split(string(data), "\n") {
		if id, ok := strings.CutPrefix(line, "id: "); ok {
			return strings.TrimSpace(id)
		}
	}
	t.Fatalf("no id in %s", dir)
	return ""
}
