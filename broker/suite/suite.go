// Package suite names the HPKE cipher suites attested uses, so a suite can be
// recorded in an annotation or a session and found again by name.
package suite

import (
	"crypto/ecdh"
	"crypto/hpke"
	"fmt"
)

// Suite is an HPKE KEM, KDF and AEAD under one stable name.
type Suite struct {
	Name string
	KEM  hpke.KEM
	KDF  hpke.KDF
	AEAD hpke.AEAD
}

// DefaultName is the default suite: hybrid ML-KEM-768 + X25519, so images in
// public registries stay safe against harvest-now-decrypt-later.
const DefaultName = "MLKEM768X25519-HKDFSHA256-AES256GCM"

// SessionName is the suite of session keys: DHKEM(P-256), because the
// session key lives in the node's TPM (TPMs do P-256 ECDH, not X25519 or
// ML-KEM). Releases sealed to it travel only inside the broker's TLS, whose
// key exchange is hybrid X25519MLKEM768 (enforced on both ends, see
// broker/conn), so a recorded release stays safe against
// harvest-now-decrypt-later without ML-KEM in the seal; ML-KEM stays where
// ciphertext is stored in public, on the layer key.
const SessionName = "DHKEMP256-HKDFSHA256-AES256GCM"

var suites = map[string]Suite{
	SessionName: {Name: SessionName, KEM: hpke.DHKEM(ecdh.P256()), KDF: hpke.HKDFSHA256(), AEAD: hpke.AES256GCM()},
	DefaultName: {Name: DefaultName, KEM: hpke.MLKEM768X25519(), KDF: hpke.HKDFSHA256(), AEAD: hpke.AES256GCM()},
	"X25519-HKDFSHA256-AES256GCM": {
		Name: "X25519-HKDFSHA256-AES256GCM",
		KEM:  hpke.DHKEM(ecdh.X25519()), KDF: hpke.HKDFSHA256(), AEAD: hpke.AES256GCM(),
	},
}

// Lookup returns the named suite.
func Lookup(name string) (Suite, error) {
	s, ok := suites[name]
	if !ok {
		return Suite{}, fmt.Errorf("suite: unknown HPKE suite %q", name)
	}
	return s, nil
}

// Default returns the default suite.
func Default() Suite { return suites[DefaultName] }

// GenerateKey returns a new key pair as serialized private and public keys.
func (s Suite) GenerateKey() (priv, pub []byte, err error) {
	k, err := s.KEM.GenerateKey()
	if err != nil {
		return nil, nil, fmt.Errorf("suite: generate %s key: %w", s.Name, err)
	}
	priv, err = k.Bytes()
	if err != nil {
		return nil, nil, fmt.Errorf("suite: serialize %s key: %w", s.Name, err)
	}
	return priv, k.PublicKey().Bytes(), nil
}

// Seal encrypts plaintext to a serialized public key; info binds context.
func (s Suite) Seal(pub, info, plaintext []byte) ([]byte, error) {
	pk, err := s.KEM.NewPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("suite: %s public key: %w", s.Name, err)
	}
	ct, err := hpke.Seal(pk, s.KDF, s.AEAD, info, plaintext)
	if err != nil {
		return nil, fmt.Errorf("suite: seal: %w", err)
	}
	return ct, nil
}

// Open decrypts a Seal output with a serialized private key.
func (s Suite) Open(priv, info, ciphertext []byte) ([]byte, error) {
	k, err := s.KEM.NewPrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("suite: %s private key: %w", s.Name, err)
	}
	return s.OpenWith(k, info, ciphertext)
}

// OpenWith decrypts with an already parsed private key, which spares the
// ML-KEM key expansion on hot paths.
func (s Suite) OpenWith(k hpke.PrivateKey, info, ciphertext []byte) ([]byte, error) {
	pt, err := hpke.Open(k, s.KDF, s.AEAD, info, ciphertext)
	if err != nil {
		return nil, fmt.Errorf("suite: open: ciphertext does not decrypt under this key and context")
	}
	return pt, nil
}
