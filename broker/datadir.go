package broker

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/broker/fsperm"
	"github.com/attested-dev/attested/broker/settings"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// Files in a broker data directory. Everything secret is 0600 in a 0700
// directory.
const (
	ConfigFile    = "broker.yaml"
	MasterKeyFile = "master.key"
	CACertFile    = "ca.pem"
	// CAKeyFile is the CA private key. Init writes it, with a copy of
	// ca.pem, to the CA directory, never to the data directory: serve never
	// uses it, and it belongs offline.
	CAKeyFile      = "ca-key.pem"
	ServerCertFile = "server.pem"
	ServerKeyFile  = "server-key.pem"
	// SignerCertFile and SignerKeyFile sign wrapping keys (see keysig).
	SignerCertFile = "signer.pem"
	SignerKeyFile  = "signer-key.pem"
	AdminTokenFile = "admin.token"
	DatabaseFile   = "broker.db"
)

// brokerFiles are the files a broker keeps in its data directory; any one
// of them means a broker, or what is left of one, is there. CAKeyFile is
// listed for brokers initialised before it moved out.
var brokerFiles = []string{ConfigFile, DatabaseFile, MasterKeyFile, AdminTokenFile, CACertFile, CAKeyFile,
	ServerCertFile, ServerKeyFile, SignerCertFile, SignerKeyFile, EARKeyFile}

// secretFiles may be read by the broker's user only; the others must not
// be writable by anyone else.
var secretFiles = map[string]bool{MasterKeyFile: true, AdminTokenFile: true, CAKeyFile: true,
	ServerKeyFile: true, SignerKeyFile: true, DatabaseFile: true, EARKeyFile: true}

// DefaultCADir is where init writes the CA private key when not told:
// beside the data directory, e.g. /var/lib/attested-broker-ca.
func DefaultCADir(dataDir string) string { return filepath.Clean(dataDir) + "-ca" }

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
	// StaleAfter is how long a node may go without sending evidence before
	// its status is stale (default three times the agent's reattest).
	StaleAfter time.Duration `yaml:"staleAfter,omitempty"`
	// MetricsListen is where Prometheus metrics are served over plain HTTP
	// (default DefaultMetricsListen, loopback); "off" serves none.
	MetricsListen string `yaml:"metricsListen,omitempty"`
	// EKRoots lists PEM files or directories of TPM manufacturer CAs that
	// EK certificates must chain to. Empty trusts none.
	EKRoots []string `yaml:"ekRoots,omitempty"`
	// RequireEKCertificate refuses TPMs that present no EK certificate
	// chaining to EKRoots.
	RequireEKCertificate bool `yaml:"requireEKCertificate,omitempty"`
	// Limits bound what callers can make the broker hold (limits.go);
	// unset fields take DefaultLimits.
	Limits Limits `yaml:"limits,omitempty"`
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
	// Webhooks configures webhook delivery (webhook.go).
	Webhooks WebhookConfig `yaml:"webhooks,omitempty"`
	// DisableDashboard stops serving the admin dashboard to browsers on
	// the TLS port (see Frontend); gRPC is served either way.
	DisableDashboard bool `yaml:"disableDashboard,omitempty"`
	// Store is a PostgreSQL URL (postgres://...) shared by broker replicas;
	// empty keeps the embedded store, DatabaseFile (see storeopen.go).
	Store string `yaml:"store,omitempty"`
}

// DefaultMetricsListen serves metrics on loopback only: expose them with
// metricsListen where a Prometheus elsewhere scrapes.
const DefaultMetricsListen = "127.0.0.1:9464"

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
	// CADir receives the CA private key (and a copy of the CA certificate),
	// outside the serving data directory; DefaultCADir(DataDir) if empty.
	CADir  string
	ID     string
	Listen string
	// SANs are extra DNS names or IPs for the server certificate. The CA is
	// constrained to the server certificate's names.
	SANs []string
	// EKRoots are written to broker.yaml (see Config.EKRoots).
	EKRoots []string
	// AdmitUncertifiedTPMs writes requireEKCertificate: false. The default
	// admits only TPMs whose EK certificate chains to EKRoots.
	AdmitUncertifiedTPMs bool
}

// initHook, when set by a test, runs after each file init puts in place;
// an error stops init there, as a crash would.
var initHook func(path string) error

// Init creates a broker: in the data directory the master key, the CA
// certificate, the TLS server certificate and key, the wrapping-key signing
// certificate and key, the attestation-result (EAR) signing key, the admin
// credential and broker.yaml; in the CA directory the CA private key. It
// refuses when either directory holds any broker file, creates every file
// exclusively (a file that appears meanwhile is never overwritten), and
// writes broker.yaml last, so an init that stops half way leaves nothing
// serve accepts and a second init refuses rather than destroying keys.
func Init(o InitOptions) (*Config, error) {
	if o.DataDir == "" {
		return nil, errors.New("broker: init: no data directory given")
	}
	caDir := o.CADir
	if caDir == "" {
		caDir = DefaultCADir(o.DataDir)
	}
	if err := separateDirs(o.DataDir, caDir); err != nil {
		return nil, err
	}
	id := o.ID
	if id == "" {
		id = "broker-" + hex.EncodeToString(randomBytes(6))
	}
	if !annotation.ValidName(id) {
		return nil, fmt.Errorf("broker: init: broker id %q must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit", id)
	}
	listen := o.Listen
	if listen == "" {
		listen = DefaultListen
	}
	names, err := brokerNames(id, listen, o.SANs)
	if err != nil {
		return nil, err
	}
	if len(o.EKRoots) > 0 {
		if _, err := LoadEKRoots(o.EKRoots); err != nil {
			return nil, fmt.Errorf("broker: init: %w", err)
		}
	}
	// Refuse before anything is created.
	if err := refuseExisting(o.DataDir, brokerFiles, "data"); err != nil {
		return nil, err
	}
	if err := refuseExisting(caDir, []string{CAKeyFile, CACertFile}, "CA"); err != nil {
		return nil, err
	}
	for _, d := range []string{o.DataDir, caDir} {
		if err := makePrivateDir(d); err != nil {
			return nil, err
		}
	}

	master := randomBytes(32)
	token := "atk_" + hex.EncodeToString(randomBytes(32))
	caCert, caKey, err := newCA(id, names)
	if err != nil {
		return nil, err
	}
	srvCert, srvKey, err := newServerCert(caCert, caKey, id, names)
	if err != nil {
		return nil, err
	}
	signerCert, signerKey, err := newSignerCert(caCert, caKey, id)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(token))
	cfg := &Config{ID: id, Listen: listen, AdminTokenSHA256: hex.EncodeToString(sum[:]),
		SessionTTL: DefaultSessionTTL, NonceTTL: DefaultNonceTTL,
		EKRoots: o.EKRoots, RequireEKCertificate: !o.AdmitUncertifiedTPMs}
	cfgYAML, err := configYAML(cfg)
	if err != nil {
		return nil, err
	}
	caKeyPEM, err := ecKeyPEM(caKey)
	if err != nil {
		return nil, err
	}
	srvKeyPEM, err := ecKeyPEM(srvKey)
	if err != nil {
		return nil, err
	}
	signerKeyPEM, err := ecKeyPEM(signerKey)
	if err != nil {
		return nil, err
	}
	earKeyPEM, err := newEARKey()
	if err != nil {
		return nil, err
	}
	caPEM := pemBlock("CERTIFICATE", caCert.Raw)
	files := []struct {
		dir, name string
		data      []byte
		mode      os.FileMode
	}{
		{caDir, CAKeyFile, caKeyPEM, 0o600},
		{caDir, CACertFile, caPEM, 0o644},
		{o.DataDir, MasterKeyFile, master, 0o600},
		{o.DataDir, CACertFile, caPEM, 0o644},
		{o.DataDir, ServerKeyFile, srvKeyPEM, 0o600},
		{o.DataDir, ServerCertFile, pemBlock("CERTIFICATE", srvCert), 0o644},
		{o.DataDir, SignerKeyFile, signerKeyPEM, 0o600},
		{o.DataDir, SignerCertFile, pemBlock("CERTIFICATE", signerCert), 0o644},
		{o.DataDir, EARKeyFile, earKeyPEM, 0o600},
		{o.DataDir, AdminTokenFile, []byte(token + "\n"), 0o600},
		// The config goes last: its presence marks a complete init.
		{o.DataDir, ConfigFile, cfgYAML, 0o600},
	}
	for _, f := range files {
		p := filepath.Join(f.dir, f.name)
		if f.name == ConfigFile {
			// Every other file is durable before the one that marks the
			// broker complete.
			if err := syncDir(o.DataDir); err != nil {
				return nil, fmt.Errorf("broker: init: %w", err)
			}
		}
		if err := createExclusive(p, f.data, f.mode); err != nil {
			return nil, fmt.Errorf("broker: init: %w (nothing was overwritten; remove what this init created in %q and %q before trying again)", err, o.DataDir, caDir)
		}
		if f.dir == caDir && f.name == CACertFile {
			if err := syncDir(caDir); err != nil {
				return nil, fmt.Errorf("broker: init: %w", err)
			}
		}
		if initHook != nil {
			if err := initHook(p); err != nil {
				return nil, err
			}
		}
	}
	if err := syncDir(o.DataDir); err != nil {
		return nil, fmt.Errorf("broker: init: %w", err)
	}
	return cfg, nil
}

// separateDirs refuses a CA directory that is, or is inside, the data
// directory (or the other way round): the CA key must be removable without
// touching what serve reads.
func separateDirs(dataDir, caDir string) error {
	d, err := filepath.Abs(dataDir)
	if err != nil {
		return fmt.Errorf("broker: init: %w", err)
	}
	c, err := filepath.Abs(caDir)
	if err != nil {
		return fmt.Errorf("broker: init: %w", err)
	}
	inside := func(parent, child string) bool {
		rel, err := filepath.Rel(parent, child)
		return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator))
	}
	if inside(d, c) || inside(c, d) {
		return fmt.Errorf("broker: init: the CA directory %q must lie outside the data directory %q (and not contain it): serve reads the data directory, and the CA private key belongs offline", caDir, dataDir)
	}
	return nil
}

// refuseExisting fails when dir holds any of names, or the temporary file
// of an init that stopped before putting one in place.
func refuseExisting(dir string, names []string, what string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("broker: init: %w", err)
	}
	var found []string
	for _, e := range entries {
		for _, n := range names {
			if e.Name() == n || strings.HasPrefix(e.Name(), "."+n) {
				found = append(found, e.Name())
				break
			}
		}
	}
	if len(found) == 0 {
		return nil
	}
	if what == "CA" {
		return fmt.Errorf("broker: init: the CA directory %q already holds %s: refusing to overwrite the CA of another broker; choose another --ca-dir, or move that one away if it is truly unused", dir, strings.Join(found, ", "))
	}
	return fmt.Errorf("broker: init: %q already holds broker files (%s): refusing to overwrite them, which would make every sealed key unopenable and every node lose its pinned CA. "+
		"To run that broker: attested broker serve --data-dir %q (if %s is missing, restore it from a backup). "+
		"An init that was interrupted leaves such files without %s; only if nothing ever served from this directory, move it away and run init again",
		dir, strings.Join(found, ", "), dir, ConfigFile, ConfigFile)
}

// makePrivateDir creates dir 0700, or makes an existing one 0700 after
// checking that it belongs to this user.
func makePrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("broker: init: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("broker: init: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("broker: init: %q is not a directory", dir)
	}
	if err := fsperm.Check(dir, fi, 0); err != nil {
		return fmt.Errorf("broker: init: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("broker: init: %w", err)
	}
	return nil
}

// createExclusive writes a file that must not exist yet: the content goes
// to a temporary file that is synced and then hard-linked to its name,
// which fails if the name exists. The file appears complete or not at all.
func createExclusive(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".init-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%q appeared while init ran; it was left as it is", path)
		}
		return fmt.Errorf("put %q in place (init links files into place so that it never overwrites one; the file system must support hard links): %w", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func ecKeyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pemBlock("EC PRIVATE KEY", der), nil
}

const configHeader = `# attested broker configuration, written by 'attested broker init'.
# 'attested broker serve' flags override these settings.
#
# requireEKCertificate: true admits only TPMs whose endorsement key (EK)
# certificate chains to a TPM manufacturer CA listed in ekRoots; serve
# refuses to start until ekRoots names one. false admits TPMs without a
# certificate through a join token or an admin approval: a leaked token or a
# careless approval then admits a software "TPM" that can report any PCR
# values. serve warns of it at every start.
`

const ekRootsHint = `# ekRoots lists PEM files, or directories of them, holding the CA
# certificates of the TPM manufacturers in your fleet (Infineon, Nuvoton,
# STMicroelectronics, Intel, AMD, ... publish them), for example:
# ekRoots:
#   - /etc/attested/ek-roots/
`

// configYAML is broker.yaml for a new broker, with the comments above.
func configYAML(cfg *Config) ([]byte, error) {
	body, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	b.WriteString(configHeader)
	b.Write(body)
	if !cfg.RequireEKCertificate && !bytes.Contains(body, []byte("\nrequireEKCertificate:")) {
		// Written out, so the choice is visible (the field is omitted when false).
		b.WriteString("requireEKCertificate: false\n")
	}
	if len(cfg.EKRoots) == 0 {
		b.WriteString(ekRootsHint)
	}
	return b.Bytes(), nil
}

// CheckDataDir refuses, as ssh does, a data directory that others may
// enter or that another user owns, and broker files others may read
// (secrets) or change (the rest). Every problem is named with its fix.
func CheckDataDir(dir string) error {
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("broker: %q does not exist (run 'attested broker init' first)", dir)
	}
	if err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("broker: %q is not a directory", dir)
	}
	var problems []string
	if err := fsperm.Check(dir, fi, fsperm.Private); err != nil {
		problems = append(problems, err.Error())
	}
	for _, name := range brokerFiles {
		p := filepath.Join(dir, name)
		fi, err := os.Stat(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue // the loaders say what is missing
		}
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		if !fi.Mode().IsRegular() {
			problems = append(problems, fmt.Sprintf("%q is not a regular file", p))
			continue
		}
		mask := fsperm.NotWritable
		if secretFiles[name] {
			mask = fsperm.Private
		}
		if err := fsperm.Check(p, fi, mask); err != nil {
			problems = append(problems, err.Error())
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("broker: refusing to serve from %q, whose keys and settings must be private to the broker's user: %s",
			dir, strings.Join(problems, "; "))
	}
	return nil
}

// IssueSigner gives a broker initialised before signed wrapping keys its
// signing certificate, issued by the CA whose private key is in caDir (such
// a broker keeps it in its data directory). The CA must be the one in the
// data directory's ca.pem, which clients pin.
func IssueSigner(dataDir, caDir string) (*x509.Certificate, error) {
	if err := CheckDataDir(dataDir); err != nil {
		return nil, err
	}
	cfg, err := LoadConfig(dataDir)
	if err != nil {
		return nil, err
	}
	if err := refuseSigner(dataDir); err != nil {
		return nil, err
	}
	caKeyPath := filepath.Join(caDir, CAKeyFile)
	if err := fsperm.Stat(caKeyPath, fsperm.Private); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("broker: issue signer: no CA private key %q (name the directory that holds %s with --ca-dir)", caKeyPath, CAKeyFile)
		}
		return nil, fmt.Errorf("broker: issue signer: %w", err)
	}
	caKey, err := readECKey(caKeyPath)
	if err != nil {
		return nil, fmt.Errorf("broker: issue signer: %w", err)
	}
	caCert, err := readCert(filepath.Join(dataDir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("broker: issue signer: %w", err)
	}
	if !caKey.PublicKey.Equal(caCert.PublicKey) {
		return nil, fmt.Errorf("broker: issue signer: %q is not the key of the CA in %q that clients pin", caKeyPath, filepath.Join(dataDir, CACertFile))
	}
	if time.Now().After(caCert.NotAfter) {
		return nil, fmt.Errorf("broker: issue signer: the broker CA expired on %s", caCert.NotAfter.Format(time.DateOnly))
	}
	der, key, err := newSignerCert(caCert, caKey, cfg.ID)
	if err != nil {
		return nil, err
	}
	keyPEM, err := ecKeyPEM(key)
	if err != nil {
		return nil, err
	}
	// The key first: serve takes a broker without signer.pem for one that
	// has none, whatever else is there.
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{{SignerKeyFile, keyPEM, 0o600}, {SignerCertFile, pemBlock("CERTIFICATE", der), 0o644}} {
		if err := createExclusive(filepath.Join(dataDir, f.name), f.data, f.mode); err != nil {
			return nil, fmt.Errorf("broker: issue signer: %w", err)
		}
	}
	if err := syncDir(dataDir); err != nil {
		return nil, fmt.Errorf("broker: issue signer: %w", err)
	}
	return x509.ParseCertificate(der)
}

func refuseSigner(dataDir string) error {
	for _, n := range []string{SignerCertFile, SignerKeyFile} {
		p := filepath.Join(dataDir, n)
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("broker: issue signer: %q exists; this broker has a signing certificate (remove both %s and %s to issue a new one)", p, SignerCertFile, SignerKeyFile)
		}
	}
	return nil
}

func readECKey(path string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "EC PRIVATE KEY" {
		return nil, fmt.Errorf("%q holds no PEM EC private key", path)
	}
	return x509.ParseECPrivateKey(block.Bytes)
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%q holds no PEM certificate", path)
	}
	return x509.ParseCertificate(block.Bytes)
}

// LoadConfig reads broker.yaml from a data directory.
func LoadConfig(dataDir string) (*Config, error) {
	data, err := os.ReadFile(filepath.Join(dataDir, ConfigFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("broker: %q is not a broker data directory (run 'attested broker init' first)", dataDir)
		}
		return nil, fmt.Errorf("broker: %w", err)
	}
	var cfg Config
	if err := settings.Decode(filepath.Join(dataDir, ConfigFile), data, &cfg); err != nil {
		return nil, fmt.Errorf("broker: %w", err)
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
	if cfg.Limits, err = cfg.Limits.resolved(); err != nil {
		return nil, fmt.Errorf("broker: %s: %w", ConfigFile, err)
	}
	if cfg.MetricsListen == "" {
		cfg.MetricsListen = DefaultMetricsListen
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

// Seal and open key material under the master key (AES-256-GCM). The AAD
// names the key and version, so sealed blobs cannot be swapped in the store.
type masterKey struct {
	aead cipher.AEAD
	// nonceKey authenticates challenges (see nonce.go).
	nonceKey []byte
}

func loadMasterKey(path string) (*masterKey, error) {
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("broker: master key: %w", err)
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("broker: master key %q: want 32 bytes, have %d", path, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	nonceKey, err := hkdf.Key(sha256.New, key, nil, "attested/v1/nonce-mac", 32)
	if err != nil {
		return nil, err
	}
	return &masterKey{aead: aead, nonceKey: nonceKey}, nil
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
