package ear

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

// Algorithm is the only JWS algorithm the broker signs with and Verify
// accepts: ECDSA P-256 with SHA-256. A fixed list is what keeps "none",
// HMAC-with-the-public-key and other algorithm confusions out.
const Algorithm = jose.ES256

// MaxTokenSize bounds what Verify parses.
const MaxTokenSize = 64 << 10

// Leeway tolerates clocks that differ a little between the broker and a
// relying party when checking iat and exp.
const Leeway = time.Minute

// KeyID is a public key's JWK thumbprint (RFC 7638, SHA-256, base64url):
// the "kid" of the broker's EAR signing key.
func KeyID(pub *ecdsa.PublicKey) (string, error) {
	k := jose.JSONWebKey{Key: pub}
	sum, err := k.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", fmt.Errorf("ear: key thumbprint: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(sum), nil
}

// Signer signs EARs with one P-256 key.
type Signer struct {
	kid    string
	pub    *ecdsa.PublicKey
	signer jose.Signer
}

// NewSigner returns a signer for key; its kid is the key's thumbprint.
func NewSigner(key *ecdsa.PrivateKey) (*Signer, error) {
	if key == nil || key.Curve != elliptic.P256() {
		return nil, errors.New("ear: the signing key must be an ECDSA P-256 key (ES256)")
	}
	kid, err := KeyID(&key.PublicKey)
	if err != nil {
		return nil, err
	}
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: Algorithm, Key: jose.JSONWebKey{Key: key, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("ear: %w", err)
	}
	return &Signer{kid: kid, pub: &key.PublicKey, signer: s}, nil
}

// KeyID is the kid of the signer's key.
func (s *Signer) KeyID() string { return s.kid }

// Sign validates r and returns it as a JWT in compact serialisation.
func (s *Signer) Sign(r *Result) (string, error) {
	payload, err := r.Marshal()
	if err != nil {
		return "", err
	}
	jws, err := s.signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("ear: signing: %w", err)
	}
	return jws.CompactSerialize()
}

// JWKS is the JWK Set that verifies the signer's EARs.
func (s *Signer) JWKS() ([]byte, error) { return JWKS(s.pub) }

// JWKS writes a JWK Set of P-256 public keys, each with its thumbprint as
// kid, "use": "sig" and "alg": "ES256".
func JWKS(keys ...*ecdsa.PublicKey) ([]byte, error) {
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{}}
	for _, k := range keys {
		kid, err := KeyID(k)
		if err != nil {
			return nil, err
		}
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k, KeyID: kid, Use: "sig", Algorithm: string(Algorithm)})
	}
	return json.Marshal(set)
}

// ParseJWKS reads a JWK Set, refusing private keys (a JWK Set is
// published: a private part in it means the key has leaked).
func ParseJWKS(data []byte) (*jose.JSONWebKeySet, error) {
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(data, &set); err != nil {
		return nil, fmt.Errorf("ear: not a JWK Set: %w", err)
	}
	for i := range set.Keys {
		if !set.Keys[i].IsPublic() {
			return nil, fmt.Errorf("ear: JWK Set entry %q holds a private key; refusing it (and that key must be replaced)", set.Keys[i].KeyID)
		}
	}
	return &set, nil
}

// Verify checks an EAR: a compact JWS signed with ES256 by a key of keys
// (the one its "kid" names; a token without kid needs a set of one key),
// whose claims-set parses and validates (see Parse), issued no later than
// now and not expired at now (both within Leeway). Anything else is an
// error that says what failed.
func Verify(token string, keys *jose.JSONWebKeySet, now time.Time) (*Result, error) {
	if now.IsZero() {
		return nil, errors.New("ear: verify: no time to check the result's validity against")
	}
	if len(token) > MaxTokenSize {
		return nil, fmt.Errorf("ear: token is %d bytes, more than the %d an attestation result may have", len(token), MaxTokenSize)
	}
	jws, err := jose.ParseSignedCompact(token, []jose.SignatureAlgorithm{Algorithm})
	if err != nil {
		return nil, fmt.Errorf("ear: not a JWS in compact serialisation signed with %s: %w", Algorithm, err)
	}
	if len(jws.Signatures) != 1 {
		return nil, errors.New("ear: the token must carry exactly one signature")
	}
	key, err := selectKey(keys, jws.Signatures[0].Header.KeyID)
	if err != nil {
		return nil, err
	}
	payload, err := jws.Verify(key)
	if err != nil {
		return nil, fmt.Errorf("ear: signature does not verify with key %q of the JWK Set (tampered, or signed by another key)", jws.Signatures[0].Header.KeyID)
	}
	r, err := Parse(payload)
	if err != nil {
		return nil, err
	}
	if iat := time.Unix(r.IssuedAt, 0); iat.After(now.Add(Leeway)) {
		return nil, fmt.Errorf("ear: issued at %s, after now (%s): a clock is wrong", iat.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if r.Expires != 0 {
		if exp := time.Unix(r.Expires, 0); !now.Before(exp.Add(Leeway)) {
			return nil, fmt.Errorf("ear: expired at %s; the node attests again for a new one", exp.UTC().Format(time.RFC3339))
		}
	}
	return r, nil
}

// selectKey finds the P-256 public key for kid.
func selectKey(keys *jose.JSONWebKeySet, kid string) (*ecdsa.PublicKey, error) {
	if keys == nil || len(keys.Keys) == 0 {
		return nil, errors.New("ear: the JWK Set holds no key (a broker without an EAR signing key publishes none)")
	}
	var cands []jose.JSONWebKey
	switch {
	case kid != "":
		cands = keys.Key(kid)
		if len(cands) == 0 {
			return nil, fmt.Errorf("ear: no key %q in the JWK Set (signed by another broker, or by a key since replaced; fetch the JWK Set again)", kid)
		}
	case len(keys.Keys) == 1:
		cands = keys.Keys
	default:
		return nil, errors.New("ear: the token names no key (kid) and the JWK Set holds several")
	}
	if len(cands) > 1 {
		return nil, fmt.Errorf("ear: the JWK Set holds %d keys with kid %q", len(cands), kid)
	}
	k := cands[0]
	pub, ok := k.Key.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("ear: key %q is not an ECDSA P-256 public key", k.KeyID)
	}
	if k.Use != "" && k.Use != "sig" {
		return nil, fmt.Errorf("ear: key %q is for %q, not signatures", k.KeyID, k.Use)
	}
	if k.Algorithm != "" && k.Algorithm != string(Algorithm) {
		return nil, fmt.Errorf("ear: key %q is for %s, not %s", k.KeyID, k.Algorithm, Algorithm)
	}
	return pub, nil
}
