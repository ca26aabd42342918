// Package keysig signs the broker's wrapping keys and verifies them on the
// build side. The broker signs each public key it hands out (broker id, key
// name, version, suite, public key) with a key whose certificate chains to
// the broker CA; a pipeline checks that signature against the CA it pins for
// TLS every time it seals a layer key, whether the key came from the wire or
// from its cache. A planted cache entry or a key from anywhere but the
// broker is refused.
package keysig

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// ExtKeyUsage marks the certificate of the wrapping-key signing key; the
// broker CA issues it to that key only, so the TLS server key cannot sign
// wrapping keys and the signing key cannot serve TLS. No arc can be taken
// without registration but 2.25 (ITU-T X.667, a UUID as one integer), and
// Go's x509 parses arcs of at most 31 bits, so the OID is four random
// 31-bit arcs under 2.25: as unlikely to collide as a UUID.
var ExtKeyUsage = asn1.ObjectIdentifier{2, 25, 938242729, 338669916, 2135502952, 94885131}

// domain separates this signature from anything else a key could sign.
const domain = "attested/v1/wrapping-key\x00"

// Limits on what a client parses from the wire or a cache file.
const (
	maxChain     = 4
	maxCertBytes = 16 << 10
)

// Message is the canonical encoding that is signed: a domain tag, then each
// field length-prefixed (uint32, big endian) in a fixed order, the version
// as a fixed uint32. No field can run into the next.
func Message(brokerID, name string, version uint32, suite string, publicKey []byte) []byte {
	b := make([]byte, 0, len(domain)+4*5+len(brokerID)+len(name)+len(suite)+len(publicKey))
	b = append(b, domain...)
	field := func(v []byte) {
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		b = append(b, v...)
	}
	field([]byte(brokerID))
	field([]byte(name))
	b = binary.BigEndian.AppendUint32(b, version)
	field([]byte(suite))
	field(publicKey)
	return b
}

func messageOf(wk *apiv1.WrappingKey) []byte {
	return Message(wk.GetBrokerId(), wk.GetName(), wk.GetVersion(), wk.GetSuite(), wk.GetPublicKey())
}

// Signer is the broker's wrapping-key signing key and its certificate chain
// (leaf first, DER).
type Signer struct {
	key   *ecdsa.PrivateKey
	chain [][]byte
	cert  *x509.Certificate
}

// NewSigner pairs a signing key with its certificate chain (leaf first).
func NewSigner(key *ecdsa.PrivateKey, chain [][]byte) (*Signer, error) {
	if len(chain) == 0 {
		return nil, errors.New("keysig: no signing certificate")
	}
	cert, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("keysig: signing certificate: %w", err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("keysig: the signing key does not match its certificate")
	}
	if !slices.ContainsFunc(cert.UnknownExtKeyUsage, ExtKeyUsage.Equal) {
		return nil, errors.New("keysig: the signing certificate lacks the wrapping-key signing usage")
	}
	return &Signer{key: key, chain: chain, cert: cert}, nil
}

// LoadSigner reads the signing certificate (PEM, leaf first, intermediates
// after it) and its EC private key (PEM).
func LoadSigner(certFile, keyFile string) (*Signer, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("keysig: %w", err)
	}
	var chain [][]byte
	for block, rest := pem.Decode(certPEM); block != nil; block, rest = pem.Decode(rest) {
		if block.Type == "CERTIFICATE" {
			chain = append(chain, block.Bytes)
		}
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("keysig: %q holds no PEM certificate", certFile)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("keysig: %w", err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil || block.Type != "EC PRIVATE KEY" {
		return nil, fmt.Errorf("keysig: %q holds no PEM EC private key", keyFile)
	}
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("keysig: %q: %w", keyFile, err)
	}
	s, err := NewSigner(key, chain)
	if err != nil {
		return nil, fmt.Errorf("%w (%q, %q)", err, certFile, keyFile)
	}
	return s, nil
}

// Certificate is the signing certificate.
func (s *Signer) Certificate() *x509.Certificate { return s.cert }

// Sign sets wk's signature and signer chain over its current fields.
func (s *Signer) Sign(wk *apiv1.WrappingKey) error {
	digest := sha256.Sum256(messageOf(wk))
	sig, err := ecdsa.SignASN1(rand.Reader, s.key, digest[:])
	if err != nil {
		return fmt.Errorf("keysig: sign: %w", err)
	}
	wk.Signature = sig
	wk.SignerChain = s.chain
	return nil
}

// ErrUnsigned is returned for a key that carries no signature.
var ErrUnsigned = errors.New("carries no broker signature")

// Verify checks that wk was signed by a key whose certificate chains to
// roots (the broker CA the client pins), holds the wrapping-key signing
// usage, every CA above it allows that usage, and names wk's broker.
func Verify(wk *apiv1.WrappingKey, roots *x509.CertPool, now time.Time) error {
	if roots == nil {
		return errors.New("no broker CA to check the signature against")
	}
	if len(wk.GetSignature()) == 0 || len(wk.GetSignerChain()) == 0 {
		return ErrUnsigned
	}
	if len(wk.GetSignerChain()) > maxChain {
		return fmt.Errorf("signer chain has %d certificates, at most %d are accepted", len(wk.GetSignerChain()), maxChain)
	}
	var certs []*x509.Certificate
	for i, der := range wk.GetSignerChain() {
		if len(der) > maxCertBytes {
			return fmt.Errorf("signer certificate %d is %d bytes, at most %d are accepted", i, len(der), maxCertBytes)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("signer certificate %d does not parse: %v", i, err)
		}
		certs = append(certs, c)
	}
	leaf := certs[0]
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	// Go's verifier checks named usages only; ours is checked below.
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return fmt.Errorf("signer certificate %q does not chain to the pinned broker CA: %v", leaf.Subject.String(), err)
	}
	if !slices.ContainsFunc(leaf.UnknownExtKeyUsage, ExtKeyUsage.Equal) {
		return fmt.Errorf("signer certificate %q is not a wrapping-key signing certificate (extended key usage %s missing)", leaf.Subject.String(), ExtKeyUsage)
	}
	if !slices.ContainsFunc(chains, allowsUsage) {
		return fmt.Errorf("a CA above signer certificate %q does not allow wrapping-key signing", leaf.Subject.String())
	}
	if leaf.Subject.CommonName != wk.GetBrokerId() {
		return fmt.Errorf("signer certificate names broker %q, the key claims broker %q", leaf.Subject.CommonName, wk.GetBrokerId())
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return fmt.Errorf("signer certificate %q holds no ECDSA P-256 key", leaf.Subject.String())
	}
	digest := sha256.Sum256(messageOf(wk))
	if !ecdsa.VerifyASN1(pub, digest[:], wk.GetSignature()) {
		return errors.New("the broker signature does not match the key (altered or forged)")
	}
	return nil
}

// allowsUsage reports whether every CA in a verified chain leaves the
// wrapping-key signing usage open: no extended key usage at all, "any", or
// ours.
func allowsUsage(chain []*x509.Certificate) bool {
	for _, c := range chain[1:] {
		if len(c.ExtKeyUsage) == 0 && len(c.UnknownExtKeyUsage) == 0 {
			continue
		}
		if slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageAny) || slices.ContainsFunc(c.UnknownExtKeyUsage, ExtKeyUsage.Equal) {
			continue
		}
		return false
	}
	return true
}
