package broker

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/legacy/tpm2"
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

// The TCG EK Credential Profile's EK authPolicy values: PolicyA for the
// low-range templates (PolicySecret(TPM_RH_ENDORSEMENT)), PolicyB for the
// high-range ones (PolicyA OR PolicyC), per name algorithm.
var (
	ekPolicyA       = mustHex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
	ekPolicyBSHA256 = mustHex("ca3d0a99a2b93906f7a3342414efcfb3a385d44cd1fd459089d19b5071c0b7a0")
	ekPolicyBSHA384 = mustHex("b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419cacb47ba09699646150f9fc000f3f80e12")
	ekPolicyBSHA512 = mustHex("b8221ca69e8550a4914de3faa6a18c072cc01208073a928d5d66d59ef79e49a429c41a6b269571d57edb25fbdb1838425608b413cd616a5f6db5b6071af99bea")
)

// Object attributes of the TCG EK templates: a restricted decryption key
// that never leaves the TPM, authorized by policy; the high range also
// allows user authorization (its PolicyB needs it).
const (
	ekLowAttributes = tpm2.FlagFixedTPM | tpm2.FlagFixedParent | tpm2.FlagSensitiveDataOrigin |
		tpm2.FlagAdminWithPolicy | tpm2.FlagRestricted | tpm2.FlagDecrypt
	ekHighAttributes = ekLowAttributes | tpm2.FlagUserWithAuth
)

// checkEKKey refuses EKs weaker than RSA-2048 or NIST P-256.
func checkEKKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits < 2048 {
			return fmt.Errorf("EK refused: it is RSA-%d; an EK must be at least RSA-2048 or ECC NIST P-256", bits)
		}
		if k.E != 65537 {
			return fmt.Errorf("EK refused: RSA exponent %d; the TCG EK templates use 65537", k.E)
		}
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
		default:
			return fmt.Errorf("EK refused: curve %s; an EK must be at least RSA-2048 or ECC NIST P-256", k.Curve.Params().Name)
		}
	default:
		return fmt.Errorf("EK refused: %T keys are not TPM EKs; an EK must be at least RSA-2048 or ECC NIST P-256", pub)
	}
	return nil
}

// checkEKPublicArea checks that area, the EK's TPMT_PUBLIC, is one of the
// TCG EK Credential Profile templates that credential activation here
// serves (L-1 RSA 2048 and L-2 NIST P-256 of the low range, H-1 and H-2 of
// the high range: SHA-256 names, AES-128-CFB), and that it holds pub. It
// returns the template's name.
//
// An area is only what the caller claims: it proves nothing about where the
// key lives (an EK certificate does). It keeps out keys no TPM
// manufacturer would make an EK, and which the broker should not encrypt
// credentials to.
func checkEKPublicArea(area []byte, pub crypto.PublicKey) (string, error) {
	if len(area) == 0 {
		return "", errors.New("EK public area missing: the node sent only the EK's key; upgrade attested on the node (it sends the TPMT_PUBLIC read from the TPM)")
	}
	p, err := tpm2.DecodePublic(area)
	if err != nil {
		return "", fmt.Errorf("EK public area does not parse: %v", err)
	}
	if enc, err := p.Encode(); err != nil || !bytes.Equal(enc, area) {
		return "", errors.New("EK public area refused: trailing or non-canonical bytes")
	}
	refuse := func(format string, args ...any) (string, error) {
		return "", fmt.Errorf("EK public area is not a standard TCG EK template: "+format, args...)
	}
	var high bool
	switch {
	case bytes.Equal(p.AuthPolicy, ekPolicyA):
	case bytes.Equal(p.AuthPolicy, ekPolicyBSHA256):
		high = true
	case bytes.Equal(p.AuthPolicy, ekPolicyBSHA384), bytes.Equal(p.AuthPolicy, ekPolicyBSHA512):
		return "", errors.New("EK refused: a high-range EK template with SHA-384/SHA-512 (H-3 to H-7), which credential activation here does not support; enroll with the TPM's RSA-2048 or NIST P-256 EK")
	default:
		return refuse("authPolicy %x is neither PolicyA (low range) nor PolicyB (high range)", p.AuthPolicy)
	}
	if p.NameAlg != tpm2.AlgSHA256 {
		return refuse("name algorithm %v; the templates L-1, L-2, H-1 and H-2 use SHA-256", p.NameAlg)
	}
	want := tpm2.KeyProp(ekLowAttributes)
	if high {
		want = ekHighAttributes
	}
	if p.Attributes != want {
		return refuse("attributes %#x, want %#x (%s)", uint32(p.Attributes), uint32(want), attributeDiff(p.Attributes, want))
	}
	sym, scheme := (*tpm2.SymScheme)(nil), (*tpm2.SigScheme)(nil)
	var name string
	switch p.Type {
	case tpm2.AlgRSA:
		rp := p.RSAParameters
		sym, scheme = rp.Symmetric, rp.Sign
		if rp.KeyBits != 2048 {
			return refuse("RSA-%d; the RSA templates (L-1, H-1) are RSA-2048", rp.KeyBits)
		}
		if rp.ExponentRaw != 0 {
			return refuse("RSA exponent %d; the templates use the default exponent (0, meaning 65537)", rp.ExponentRaw)
		}
		name = "L-1 (RSA 2048)"
		if high {
			name = "H-1 (RSA 2048)"
		}
	case tpm2.AlgECC:
		ep := p.ECCParameters
		sym, scheme = ep.Symmetric, ep.Sign
		if ep.CurveID != tpm2.CurveNISTP256 {
			return refuse("ECC curve %#x; the ECC templates (L-2, H-2) use NIST P-256", uint16(ep.CurveID))
		}
		if ep.KDF != nil {
			return refuse("ECC KDF scheme set; the templates have none")
		}
		name = "L-2 (ECC NIST P-256)"
		if high {
			name = "H-2 (ECC NIST P-256)"
		}
	default:
		return refuse("key type %v is neither RSA nor ECC", p.Type)
	}
	if sym == nil || sym.Alg != tpm2.AlgAES || sym.KeyBits != 128 || sym.Mode != tpm2.AlgCFB {
		return refuse("symmetric algorithm must be AES-128-CFB (a storage key's)")
	}
	if scheme != nil {
		return refuse("a restricted decryption EK has no signing scheme (scheme %v set)", scheme.Alg)
	}
	key, err := p.Key()
	if err != nil {
		return "", fmt.Errorf("EK public area key: %v", err)
	}
	if k, ok := key.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
		return "", errors.New("EK public area holds another key than the EK presented")
	}
	return name, nil
}

// attributeDiff names the attributes that differ from want.
func attributeDiff(got, want tpm2.KeyProp) string {
	names := []struct {
		f    tpm2.KeyProp
		name string
	}{
		{tpm2.FlagFixedTPM, "fixedTPM"}, {tpm2.FlagStClear, "stClear"}, {tpm2.FlagFixedParent, "fixedParent"},
		{tpm2.FlagSensitiveDataOrigin, "sensitiveDataOrigin"}, {tpm2.FlagUserWithAuth, "userWithAuth"},
		{tpm2.FlagAdminWithPolicy, "adminWithPolicy"}, {tpm2.FlagNoDA, "noDA"},
		{tpm2.FlagRestricted, "restricted"},
		{tpm2.FlagDecrypt, "decrypt"}, {tpm2.FlagSign, "sign"},
	}
	var missing, extra []string
	known := tpm2.KeyProp(0)
	for _, n := range names {
		known |= n.f
		switch {
		case want&n.f != 0 && got&n.f == 0:
			missing = append(missing, n.name)
		case want&n.f == 0 && got&n.f != 0:
			extra = append(extra, n.name)
		}
	}
	if got&^known != 0 {
		extra = append(extra, fmt.Sprintf("%#x", uint32(got&^known)))
	}
	var parts []string
	if len(missing) > 0 {
		parts = append(parts, "missing "+strings.Join(missing, ", "))
	}
	if len(extra) > 0 {
		parts = append(parts, "unexpected "+strings.Join(extra, ", "))
	}
	return strings.Join(parts, "; ")
}

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}
