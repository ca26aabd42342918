package broker

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/keysig"
	"github.com/attested-dev/attested/broker/suite"
)

// checkEKPolicy refuses a broker that requires certified EKs but trusts no
// manufacturer: no TPM could enroll.
func checkEKPolicy(cfg *Config) error {
	if !cfg.RequireEKCertificate || len(cfg.EKRoots) > 0 {
		return nil
	}
	return fmt.Errorf("broker: requireEKCertificate is true but ekRoots names no TPM manufacturer CA, so no TPM could enroll: " +
		"put your TPM manufacturers' CA certificates (PEM) in a directory and list it under ekRoots in " + ConfigFile + " (or --ek-roots); " +
		"to admit TPMs without an EK certificate through join tokens and approvals instead, set requireEKCertificate: false (serve then warns of the risk at every start)")
}

// startup loads the wrapping-key signer and states at start what weakens
// the broker, so an operator reads it in the log rather than in a review.
func (s *Server) startup(dataDir string) error {
	if err := s.loadEAR(dataDir); err != nil {
		return err
	}
	if !s.cfg.RequireEKCertificate {
		s.log.Warn("SECURITY: requireEKCertificate is false: TPMs without a manufacturer-certified EK are admitted through a join token or an admin approval. " +
			"A leaked join token or a careless approval admits a software TPM, which can report any PCR values and receive every key its tags allow. " +
			"Set requireEKCertificate: true with ekRoots naming your TPM manufacturers' CAs unless this is a lab.")
	}
	if caKey := filepath.Join(dataDir, CAKeyFile); exists(caKey) {
		s.log.Warn("SECURITY: the broker CA private key is in the serving data directory, where serve never uses it; whoever reads it can impersonate this broker to every node and pipeline. "+
			"Move it offline (it is needed only by 'attested broker issue-signer').", "file", caKey)
	}
	signer, err := loadSigner(dataDir)
	if err != nil {
		return err
	}
	if signer == nil {
		s.log.Warn("SECURITY: this broker has no wrapping-key signing certificate ("+SignerCertFile+"; it was initialised before wrapping keys were signed). "+
			"Pipelines refuse its unsigned wrapping keys, so no image can be encrypted for it until an admin runs "+
			"'attested broker issue-signer --data-dir DATA-DIR --ca-dir DIR', DIR holding "+CAKeyFile+" (such a broker keeps it in DATA-DIR).",
			"dataDir", dataDir)
		return nil
	}
	// Check the signer as a pipeline will: a mismatch here means every
	// wrap would fail.
	ca, err := readCert(filepath.Join(dataDir, CACertFile))
	if err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	probe := &apiv1.WrappingKey{Name: "startup-probe", Version: 1, Suite: suite.DefaultName, PublicKey: []byte("probe"), BrokerId: s.cfg.ID}
	if err := signer.Sign(probe); err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if err := keysig.Verify(probe, pool, s.now()); err != nil {
		s.log.Warn("SECURITY: pipelines will refuse this broker's wrapping keys: "+err.Error(), "certificate", filepath.Join(dataDir, SignerCertFile))
	}
	s.signer = signer
	return nil
}

// loadSigner returns the signing key, or nil when the broker has none.
func loadSigner(dataDir string) (*keysig.Signer, error) {
	cert, key := filepath.Join(dataDir, SignerCertFile), filepath.Join(dataDir, SignerKeyFile)
	if !exists(cert) {
		return nil, nil
	}
	if !exists(key) {
		return nil, fmt.Errorf("broker: %q exists without its key %q", cert, key)
	}
	signer, err := keysig.LoadSigner(cert, key)
	if err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	return signer, nil
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return !errors.Is(err, fs.ErrNotExist)
}
