package broker_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/keysig"
)

func initBroker(t *testing.T) (dataDir string) {
	t.Helper()
	dataDir = filepath.Join(t.TempDir(), "broker")
	_, err := broker.Init(broker.InitOptions{DataDir: dataDir, ID: "b1", Listen: "127.0.0.1:0"})
	require.NoError(t, err)
	return dataDir
}

// Finding 13: with broker.yaml gone but the keys still there, a second
// init replaced master.key, the CA, the server key and the admin token.
func TestInitOverExistingBrokerKeepsEveryFile(t *testing.T) {
	dir := initBroker(t)
	require.NoError(t, os.Remove(filepath.Join(dir, broker.ConfigFile)))
	before := map[string][]byte{}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		before[e.Name()] = b
	}
	require.Contains(t, before, broker.MasterKeyFile)
	_, err = broker.Init(broker.InitOptions{DataDir: dir, ID: "b2"})
	require.Error(t, err, "init over an existing broker must be refused")
	assert.Contains(t, err.Error(), broker.MasterKeyFile)
	for name, want := range before {
		got, err := os.ReadFile(filepath.Join(dir, name))
		require.NoError(t, err)
		assert.True(t, bytes.Equal(want, got), "init rewrote %s", name)
	}
	assert.NoFileExists(t, filepath.Join(dir, broker.ConfigFile))
}

// Finding 13: any one broker file is enough to refuse, the store included.
func TestInitRefusesAnyBrokerFile(t *testing.T) {
	for _, name := range []string{broker.DatabaseFile, broker.MasterKeyFile, broker.AdminTokenFile,
		broker.ServerKeyFile, broker.ServerCertFile, broker.CACertFile, "ca-key.pem"} {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "broker")
			require.NoError(t, os.MkdirAll(dir, 0o700))
			p := filepath.Join(dir, name)
			require.NoError(t, os.WriteFile(p, []byte("precious"), 0o600))
			_, err := broker.Init(broker.InitOptions{DataDir: dir})
			require.Error(t, err)
			assert.Contains(t, err.Error(), name)
			got, err := os.ReadFile(p)
			require.NoError(t, err)
			assert.Equal(t, "precious", string(got))
			assert.NoFileExists(t, filepath.Join(dir, broker.ConfigFile))
		})
	}
}

// Finding 14: serve started with a 0755 data directory and 0644 secrets.
func TestServeRefusesLooseSecrets(t *testing.T) {
	log := slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil))
	cases := []struct {
		name string
		file string // relative to the data directory; "" is the directory
		mode os.FileMode
		fix  string
	}{
		{"data dir 0755", "", 0o755, "chmod 700"},
		{"data dir 0750", "", 0o750, "chmod 700"},
		{"master.key 0644", broker.MasterKeyFile, 0o644, "chmod 600"},
		{"admin.token 0644", broker.AdminTokenFile, 0o644, "chmod 600"},
		{"server-key.pem 0640", broker.ServerKeyFile, 0o640, "chmod 600"},
		{"broker.yaml 0666", broker.ConfigFile, 0o666, "chmod"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := initBroker(t)
			p := filepath.Join(dir, c.file)
			require.NoError(t, os.Chmod(p, c.mode))
			srv, err := broker.Open(dir, log, func(c *broker.Config) { c.RequireEKCertificate = false })
			if err == nil {
				srv.Close()
			}
			require.Error(t, err, "serve accepted %s with mode %o", p, c.mode)
			assert.Contains(t, err.Error(), p)
			assert.Contains(t, err.Error(), c.fix)
		})
	}
	t.Run("not owned by the running user", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to give a file away")
		}
		dir := initBroker(t)
		p := filepath.Join(dir, broker.MasterKeyFile)
		require.NoError(t, os.Chown(p, 4242, 4242))
		srv, err := broker.Open(dir, log, func(c *broker.Config) { c.RequireEKCertificate = false })
		if err == nil {
			srv.Close()
		}
		require.Error(t, err)
		assert.Contains(t, err.Error(), p)
		assert.Contains(t, err.Error(), "uid 4242")
	})
}

// Finding 14: the CA private key sat in the serving directory for good.
func TestCAKeyIsNotInServingDir(t *testing.T) {
	dir := initBroker(t)
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		if e.Name() == broker.CACertFile {
			continue
		}
		for block, rest := pem.Decode(b); block != nil; block, rest = pem.Decode(rest) {
			if block.Type == "EC PRIVATE KEY" {
				k, err := x509.ParseECPrivateKey(block.Bytes)
				require.NoError(t, err)
				ca := caCert(t, dir)
				assert.False(t, k.PublicKey.Equal(ca.PublicKey), "%s holds the CA private key", e.Name())
			}
		}
	}
}

func caCert(t *testing.T, dir string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, broker.CACertFile))
	require.NoError(t, err)
	block, _ := pem.Decode(b)
	require.NotNil(t, block)
	c, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	return c
}

// Finding 14: the CA may vouch only for the broker's own names and usages.
func TestCAIsNameConstrained(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "broker")
	_, err := broker.Init(broker.InitOptions{DataDir: dir, ID: "b1", Listen: "10.1.2.3:8443", SANs: []string{"broker.example.internal"}})
	require.NoError(t, err)
	ca := caCert(t, dir)
	assert.True(t, ca.PermittedDNSDomainsCritical)
	assert.ElementsMatch(t, []string{"localhost", "b1", "broker.example.internal"}, ca.PermittedDNSDomains)
	var ips []string
	for _, n := range ca.PermittedIPRanges {
		ips = append(ips, n.String())
	}
	assert.ElementsMatch(t, []string{"127.0.0.1/32", "::1/128", "10.1.2.3/32"}, ips)
	assert.Equal(t, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, ca.ExtKeyUsage)
	assert.NotEmpty(t, ca.UnknownExtKeyUsage, "the CA names the wrapping-key signing usage")
}

// Finding 4: a new broker admits only TPMs with certified EKs.
func TestInitRequiresCertifiedEKs(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "broker")
	cfg, err := broker.Init(broker.InitOptions{DataDir: dir, ID: "b1"})
	require.NoError(t, err)
	assert.True(t, cfg.RequireEKCertificate)
	loaded, err := broker.LoadConfig(dir)
	require.NoError(t, err)
	assert.True(t, loaded.RequireEKCertificate)
	raw, err := os.ReadFile(filepath.Join(dir, broker.ConfigFile))
	require.NoError(t, err)
	assert.Contains(t, string(raw), "ekRoots")
	// No roots configured yet: serve refuses and says what to do.
	_, err = broker.Open(dir, slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "ekRoots")
	assert.Contains(t, err.Error(), "requireEKCertificate: false")
}

// Finding 4: admitting uncertified TPMs is stated at start.
func TestServeWarnsWhenUncertifiedTPMsAreAdmitted(t *testing.T) {
	dir := initBroker(t)
	var buf bytes.Buffer
	srv, err := broker.Open(dir, slog.New(slog.NewTextHandler(&buf, nil)), func(c *broker.Config) { c.RequireEKCertificate = false })
	require.NoError(t, err)
	srv.Close()
	assert.Contains(t, buf.String(), "level=WARN")
	assert.Contains(t, buf.String(), "requireEKCertificate is false")
	assert.Contains(t, buf.String(), "software TPM")
}

// Finding 14: the CA key goes to its own directory, beside the data
// directory by default; serve runs without it.
func TestCAKeyGoesToItsOwnDirectory(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "attested-broker")
	_, err := broker.Init(broker.InitOptions{DataDir: dir, ID: "b1"})
	require.NoError(t, err)
	caDir := broker.DefaultCADir(dir)
	assert.Equal(t, filepath.Join(root, "attested-broker-ca"), caDir)
	assert.FileExists(t, filepath.Join(caDir, "ca-key.pem"))
	assert.FileExists(t, filepath.Join(caDir, broker.CACertFile))
	assert.NoFileExists(t, filepath.Join(dir, "ca-key.pem"))
	fi, err := os.Stat(caDir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	fi, err = os.Stat(filepath.Join(caDir, "ca-key.pem"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	// The admin takes it offline; the broker serves as before.
	require.NoError(t, os.RemoveAll(caDir))
	srv, err := broker.Open(dir, slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)), func(c *broker.Config) { c.RequireEKCertificate = false })
	require.NoError(t, err)
	srv.Close()
}

func TestCADirMustBeOutsideTheDataDir(t *testing.T) {
	root := t.TempDir()
	for _, ca := range []string{filepath.Join(root, "data"), filepath.Join(root, "data", "ca"), root} {
		_, err := broker.Init(broker.InitOptions{DataDir: filepath.Join(root, "data"), CADir: ca})
		require.Error(t, err, ca)
		assert.Contains(t, err.Error(), "outside the data directory")
	}
	// A CA directory that holds another broker's CA is not overwritten.
	caDir := filepath.Join(root, "ca")
	require.NoError(t, os.MkdirAll(caDir, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(caDir, "ca-key.pem"), []byte("other"), 0o600))
	_, err := broker.Init(broker.InitOptions{DataDir: filepath.Join(root, "data"), CADir: caDir})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "ca-key.pem")
	assert.NoDirExists(t, filepath.Join(root, "data"), "nothing is created when init refuses")
}

// Finding 14: even with the CA key, a certificate for another name, or for
// a usage the broker does not issue, does not verify under the CA.
func TestCAConstraintsAreEnforced(t *testing.T) {
	root := t.TempDir()
	dir, caDir := filepath.Join(root, "data"), filepath.Join(root, "ca")
	_, err := broker.Init(broker.InitOptions{DataDir: dir, CADir: caDir, ID: "b1", Listen: "10.1.2.3:8443", SANs: []string{"broker.example.internal"}})
	require.NoError(t, err)
	ca := caCert(t, dir)
	kb, err := os.ReadFile(filepath.Join(caDir, "ca-key.pem"))
	require.NoError(t, err)
	block, _ := pem.Decode(kb)
	caKey, err := x509.ParseECPrivateKey(block.Bytes)
	require.NoError(t, err)
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	issue := func(dns []string, ips []net.IP, eku x509.ExtKeyUsage) *x509.Certificate {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(9),
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
			DNSNames: dns, IPAddresses: ips, ExtKeyUsage: []x509.ExtKeyUsage{eku}}, ca, k.Public(), caKey)
		require.NoError(t, err)
		c, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		return c
	}
	verify := func(c *x509.Certificate, eku x509.ExtKeyUsage) error {
		_, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{eku}})
		return err
	}
	require.NoError(t, verify(issue([]string{"broker.example.internal"}, []net.IP{net.ParseIP("10.1.2.3")}, x509.ExtKeyUsageServerAuth), x509.ExtKeyUsageServerAuth))
	assert.ErrorContains(t, verify(issue([]string{"bank.example.com"}, nil, x509.ExtKeyUsageServerAuth), x509.ExtKeyUsageServerAuth), "not permitted")
	assert.ErrorContains(t, verify(issue(nil, []net.IP{net.ParseIP("10.9.9.9")}, x509.ExtKeyUsageServerAuth), x509.ExtKeyUsageServerAuth), "not permitted")
	assert.Error(t, verify(issue([]string{"localhost"}, nil, x509.ExtKeyUsageClientAuth), x509.ExtKeyUsageClientAuth))
	assert.Error(t, verify(issue([]string{"localhost"}, nil, x509.ExtKeyUsageCodeSigning), x509.ExtKeyUsageCodeSigning))
}

func TestInitRefusesBadNames(t *testing.T) {
	for _, o := range []broker.InitOptions{
		{ID: "bad id\n"},
		{SANs: []string{"not a name"}},
		{Listen: "0.0.0.0:8443", SANs: []string{"0.0.0.0"}},
	} {
		o.DataDir = filepath.Join(t.TempDir(), "data")
		_, err := broker.Init(o)
		assert.Error(t, err, "%+v", o)
	}
}

// Finding 6, brokers initialised before signed wrapping keys: serve says
// what is missing, their keys go out unsigned (pipelines refuse them), and
// issue-signer repairs the broker with the CA key it kept in its data
// directory.
func TestBrokerWithoutSignerAndIssueSigner(t *testing.T) {
	root := t.TempDir()
	dir, caDir := filepath.Join(root, "data"), filepath.Join(root, "ca")
	_, err := broker.Init(broker.InitOptions{DataDir: dir, CADir: caDir, ID: "b1", AdmitUncertifiedTPMs: true})
	require.NoError(t, err)
	// What an old init left: the CA key inside, no signer.
	require.NoError(t, os.Rename(filepath.Join(caDir, "ca-key.pem"), filepath.Join(dir, "ca-key.pem")))
	require.NoError(t, os.Remove(filepath.Join(dir, broker.SignerCertFile)))
	require.NoError(t, os.Remove(filepath.Join(dir, broker.SignerKeyFile)))

	var buf syncBuffer
	b := brokertest.Serve(t, dir, slog.New(slog.NewTextHandler(&buf, nil)))
	assert.Contains(t, buf.String(), "no wrapping-key signing certificate")
	assert.Contains(t, buf.String(), "attested broker issue-signer")
	assert.Contains(t, buf.String(), "CA private key is in the serving data directory")
	ctx := context.Background()
	_, err = b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: p\npcrs:\n  23: [\"" + strings.Repeat("0", 64) + "\"]\n"})
	require.NoError(t, err)
	_, err = b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "app", Policy: "p"})
	require.NoError(t, err)
	wk, err := b.Node.GetWrappingKey(ctx, &apiv1.GetWrappingKeyRequest{Name: "app"})
	require.NoError(t, err)
	assert.Empty(t, wk.Signature, "a broker without a signer sends keys unsigned")
	assert.ErrorIs(t, keysig.Verify(wk, b.CA, time.Now()), keysig.ErrUnsigned)
	b.Server.Close()

	// A wrong CA key is refused.
	other := filepath.Join(root, "other")
	_, err = broker.Init(broker.InitOptions{DataDir: filepath.Join(root, "otherdata"), CADir: other})
	require.NoError(t, err)
	_, err = broker.IssueSigner(dir, other)
	require.ErrorContains(t, err, "is not the key of the CA")

	cert, err := broker.IssueSigner(dir, dir)
	require.NoError(t, err)
	assert.Equal(t, "b1", cert.Subject.CommonName)
	_, err = broker.IssueSigner(dir, dir)
	require.ErrorContains(t, err, "exists")

	buf.Reset()
	b = brokertest.Serve(t, dir, slog.New(slog.NewTextHandler(&buf, nil)))
	assert.NotContains(t, buf.String(), "no wrapping-key signing certificate")
	assert.NotContains(t, buf.String(), "pipelines will refuse")
	wk, err = b.Node.GetWrappingKey(ctx, &apiv1.GetWrappingKeyRequest{Name: "app"})
	require.NoError(t, err)
	require.NoError(t, keysig.Verify(wk, b.CA, time.Now()))
}

// syncBuffer is a log sink safe for the broker's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (s *syncBuffer) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b.Reset()
}
