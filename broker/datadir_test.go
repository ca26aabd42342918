package broker_test

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker"
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
