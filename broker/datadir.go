package broker

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/google/renameio/v2"
	"gopkg.in/yaml.v3"
)

// Files in a broker data directory. Everything secret is 0600 in a 0700
// directory.
const (
	ConfigFile     = "broker.yaml"
	MasterKeyFile  = "master.key"
	CACertFile     = "ca.pem"
	CAKeyFile      = "ca-key.pem"
	ServerCertFile = "server.pem"
	ServerKeyFile  = "server-key.pem"
	AdminTokenFile = "admin.token"
	DatabaseFile   = "broker.db"
)

// Config is the broker's configuration (broker.yaml).
type Config struct {
	// ID names this broker in annotations; images sealed by another broker
	// are refused early.
	ID string `yaml:"id"`
	// Listen is the TLS gRPC address.
	Listen string `yaml:"listen"`
	// AdminTokenSHA256 is the hex SHA-256 of the admin credential.
	AdminTokenSHA256 string `yaml:"adminTokenSHA256"`
	// SessionTTL bounds how long one appraisal serves unwraps.
	SessionTTL time.Duration `yaml:"sessionTTL"`
	// NonceTTL bounds how long a node has to answer a challenge.
	NonceTTL time.Duration `yaml:"nonceTTL"`
	// EKRoots lists PEM files or directories of TPM manufacturer CAs that
	// EK certificates must chain to. Empty trusts none.
	EKRoots []string `yaml:"ekRoots,omitempty"`
	// RequireEKCertificate refuses TPMs that present no EK certificate
	// chaining to EKRoots.
	RequireEKCertificate bool `yaml:"requireEKCertificate,omitempty"`
	// ApproveCertifiedEKs admits a TPM whose EK certificate chains to
	// EKRoots without a join token or an approval. Set it only when
	// EKRoots names a CA that certifies your own machines alone (your
	// provisioning CA): a TPM manufacturer's CA certifies every TPM it
	// made, including those of strangers.
	ApproveCertifiedEKs bool `yaml:"approveCertifiedEKs,omitempty"`
	// PendingTTL is how long an enrollment without a join token waits for
	// admin approval before it is dropped.
	PendingTTL time.Duration `yaml:"pendingTTL,omitempty"`
	// MaxPending caps the enrollments waiting for approval; beyond it,
	// enrollment needs a join token.
	MaxPending int `yaml:"maxPending,omitempty"`
	// MaxPendingPerName caps the enrollments waiting for approval under
	// one node name.
	MaxPendingPerName int `yaml:"maxPendingPerName,omitempty"`
	// MaxEnrollmentsInFlight caps the credential activation challenges
	// issued and not yet answered (each lives EnrollmentTTL).
	MaxEnrollmentsInFlight int `yaml:"maxEnrollmentsInFlight,omitempty"`
}

// Defaults for a new broker.
const (
	DefaultListen     = "127.0.0.1:8443"
	DefaultSessionTTL = 5 * time.Minute
	DefaultNonceTTL   = 30 * time.Second
)

// Defaults bounding what enrollment without credentials can create.
//
// An approval is an admin checking, while someone waits, that a fingerprint
// a node printed is the one listed: four hours covers that and a hand-over,
// and bounds how long a squatter's entry clutters the list (it never blocks
// anything). One hundred pending enrollments is far more than admins
// approve by hand at once; fleets enroll with join tokens, which no cap
// touches. A legitimate name has one pending enrollment (a TPM's newer one
// replaces its older); five leaves room for retries from re-imaged
// machines. A challenge is answered within seconds; 256 unanswered ones at
// a time is more than any bring-up needs and bounds the store.
const (
	DefaultPendingTTL             = 4 * time.Hour
	DefaultMaxPending             = 100
	DefaultMaxPendingPerName      = 5
	DefaultMaxEnrollmentsInFlight = 256
)

// InitOptions configures Init.
type InitOptions struct {
	DataDir string
	ID      string
	Listen  string
	// SANs are extra DNS names or IPs for the server certificate.
	SANs []string
}

// Init creates a broker data directory: master key, TLS CA and server
// certificate, admin credential and configuration. It refuses to touch an
// existing broker so that a second init cannot destroy keys.
func Init(o InitOptions) (*Config, error) {
	if o.DataDir == "" {
		return nil, errors.New("broker: init: no data directory given")
	}
	if _, err := os.Stat(filepath.Join(o.DataDir, ConfigFile)); err == nil {
		return nil, fmt.Errorf("broker: init: %s already holds a broker (remove it first to start over)", o.DataDir)
	}
	if err := os.MkdirAll(o.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("broker: init: %w", err)
	}
	if err := os.Chmod(o.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("broker: init: %w", err)
	}
	id := o.ID
	if id == "" {
		id = "broker-" + hex.EncodeToString(randomBytes(6))
	}
	listen := o.Listen
	if listen == "" {
		listen = DefaultListen
	}
	master := randomBytes(32)
	token := "atk_" + hex.EncodeToString(randomBytes(32))
	caCert, caKey, err := newCA(id)
	if err != nil {
		return nil, err
	}
	srvCert, srvKey, err := newServerCert(caCert, caKey, id, listen, o.SANs)
	if err != nil {
		return nil, err
	}
	caKeyDER, err := x509.MarshalECPrivateKey(caKey)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(token))
	cfg := &Config{ID: id, Listen: listen, AdminTokenSHA256: hex.EncodeToString(sum[:]),
		SessionTTL: DefaultSessionTTL, NonceTTL: DefaultNonceTTL}
	cfgYAML, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{MasterKeyFile, master, 0o600},
		{CACertFile, pemBlock("CERTIFICATE", caCert.Raw), 0o644},
		{CAKeyFile, pemBlock("EC PRIVATE KEY", caKeyDER), 0o600},
		{ServerCertFile, pemBlock("CERTIFICATE", srvCert), 0o644},
		{ServerKeyFile, srvKey, 0o600},
		{AdminTokenFile, []byte(token + "\n"), 0o600},
		// The config goes last: its presence marks a complete init.
		{ConfigFile, cfgYAML, 0o600},
	}
	for _, f := range files {
		if err := renameio.WriteFile(filepath.Join(o.DataDir, f.name), f.data, f.mode); err != nil {
			return nil, fmt.Errorf("broker: init: write %s: %w", f.name, err)
		}
	}
	return cfg, nil
}

// LoadConfig reads broker.yaml from a data directory.
func LoadConfig(dataDir string) (*Config, error) {
	data, err := os.ReadFile(filepath.Join(dataDir, ConfigFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("broker: %s is not a broker data directory (run 'attested broker init' first)", dataDir)
		}
		return nil, fmt.Errorf("broker: %w", err)
	}
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return nil, fmt.Errorf("broker: %s: %w", ConfigFile, err)
	}
	if cfg.ID == "" || cfg.AdminTokenSHA256 == "" {
		return nil, fmt.Errorf("broker: %s: id and adminTokenSHA256 are required", ConfigFile)
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = DefaultSessionTTL
	}
	if cfg.NonceTTL <= 0 {
		cfg.NonceTTL = DefaultNonceTTL
	}
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.PendingTTL <= 0 {
		cfg.PendingTTL = DefaultPendingTTL
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = DefaultMaxPending
	}
	if cfg.MaxPendingPerName <= 0 {
		cfg.MaxPendingPerName = DefaultMaxPendingPerName
	}
	if cfg.MaxEnrollmentsInFlight <= 0 {
		cfg.MaxEnrollmentsInFlight = DefaultMaxEnrollmentsInFlight
	}
	return &cfg, nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	// crypto/rand.Read never returns an error on supported platforms.
	rand.Read(b)
	return b
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func newCA(id string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          new(big.Int).SetBytes(randomBytes(16)),
		Subject:               pkix.Name{CommonName: "attested broker CA " + id},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

func newServerCert(ca *x509.Certificate, caKey *ecdsa.PrivateKey, id, listen string, sans []string) (certDER, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: server key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: new(big.Int).SetBytes(randomBytes(16)),
		Subject:      pkix.Name{CommonName: id},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(2, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost", id},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	if host, _, err := net.SplitHostPort(listen); err == nil {
		sans = append(sans, host)
	}
	for _, s := range sans {
		if s == "" {
			continue
		}
		if ip := net.ParseIP(s); ip != nil {
			if !ip.IsUnspecified() {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	certDER, err = x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("broker: server certificate: %w", err)
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return certDER, pemBlock("EC PRIVATE KEY", der), nil
}

// Seal and open key material under the master key (AES-256-GCM). The AAD
// names the key and version, so sealed blobs cannot be swapped in the store.
type masterKey struct{ aead cipher.AEAD }

func loadMasterKey(path string) (*masterKey, error) {
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("broker: master key: %w", err)
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("broker: master key %s: want 32 bytes, have %d", path, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &masterKey{aead: aead}, nil
}

func (m *masterKey) seal(plaintext, aad []byte) []byte {
	nonce := randomBytes(m.aead.NonceSize())
	return m.aead.Seal(nonce, nonce, plaintext, aad)
}

func (m *masterKey) open(sealed, aad []byte) ([]byte, error) {
	n := m.aead.NonceSize()
	if len(sealed) < n {
		return nil, errors.New("broker: sealed key is truncated")
	}
	pt, err := m.aead.Open(nil, sealed[:n], sealed[n:], aad)
	if err != nil {
		return nil, errors.New("broker: sealed key does not open under the master key (wrong master key or tampered store)")
	}
	return pt, nil
}
