package broker

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/go-attestation/attest"
)

// EKRoots are the TPM manufacturer CAs the broker trusts for EK
// certificates. Nothing is trusted by default: test CAs such as swtpm's
// local CA must be configured explicitly.
type EKRoots struct {
	roots, intermediates *x509.CertPool
	n                    int
}

// LoadEKRoots reads PEM certificates from files or directories. Self-signed
// certificates become roots; the others intermediates.
func LoadEKRoots(paths []string) (*EKRoots, error) {
	r := &EKRoots{roots: x509.NewCertPool(), intermediates: x509.NewCertPool()}
	for _, p := range paths {
		files := []string{p}
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			files, _ = filepath.Glob(filepath.Join(p, "*.pem"))
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				return nil, fmt.Errorf("broker: EK roots: %w", err)
			}
			found := false
			for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
				if block.Type != "CERTIFICATE" {
					continue
				}
				c, err := x509.ParseCertificate(block.Bytes)
				if err != nil {
					return nil, fmt.Errorf("broker: EK roots: %s: %w", f, err)
				}
				if isSelfSigned(c) {
					r.roots.AddCert(c)
					r.n++
				} else {
					r.intermediates.AddCert(c)
				}
				found = true
			}
			if !found {
				return nil, fmt.Errorf("broker: EK roots: %s holds no PEM certificate", f)
			}
		}
	}
	return r, nil
}

func isSelfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}

// Configured reports whether any root is trusted.
func (r *EKRoots) Configured() bool { return r != nil && r.n > 0 }

// Critical extensions that EK certificates carry and Go's verifier does not
// process: the TPM's SAN is a directoryName only, and subject directory
// attributes name the TPM specification. Their content is not a trust
// decision; the chain is.
var (
	oidSAN                  = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidSubjectDirectoryAttr = asn1.ObjectIdentifier{2, 5, 29, 9}
)

// Verify checks an EK certificate (DER) chains to a configured root.
func (r *EKRoots) Verify(der []byte) (*x509.Certificate, error) {
	cert, err := attest.ParseEKCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("EK certificate does not parse: %v", err)
	}
	if !r.Configured() {
		return nil, errors.New("no EK manufacturer roots are configured (ekRoots in broker.yaml)")
	}
	var unhandled []asn1.ObjectIdentifier
	for _, oid := range cert.UnhandledCriticalExtensions {
		if !oid.Equal(oidSAN) && !oid.Equal(oidSubjectDirectoryAttr) {
			unhandled = append(unhandled, oid)
		}
	}
	cert.UnhandledCriticalExtensions = unhandled
	_, err = cert.Verify(x509.VerifyOptions{
		Roots:         r.roots,
		Intermediates: r.intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, fmt.Errorf("EK certificate (issuer %q) does not chain to a trusted TPM manufacturer root: %v", cert.Issuer.String(), err)
	}
	return cert, nil
}
