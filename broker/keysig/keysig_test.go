package keysig_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/broker/keysig"
)

// testBroker is what broker init wrote: the pinned CA, the signer, and the
// TLS key (which must not be able to sign wrapping keys).
type testBroker struct {
	dir    string
	ca     *x509.CertPool
	signer *keysig.Signer
}

func newTestBroker(t *testing.T, id string) testBroker {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "broker")
	_, err := broker.Init(broker.InitOptions{DataDir: dir, CADir: t.TempDir(), ID: id})
	require.NoError(t, err)
	ca, err := conn.CAPool(filepath.Join(dir, broker.CACertFile))
	require.NoError(t, err)
	s, err := keysig.LoadSigner(filepath.Join(dir, broker.SignerCertFile), filepath.Join(dir, broker.SignerKeyFile))
	require.NoError(t, err)
	return testBroker{dir: dir, ca: ca, signer: s}
}

func key(id string) *apiv1.WrappingKey {
	return &apiv1.WrappingKey{Name: "app", Version: 3, Suite: "MLKEM768X25519-HKDFSHA256-AES256GCM",
		PublicKey: bytes.Repeat([]byte{7}, 1216), BrokerId: id}
}

func TestSignedKeyVerifies(t *testing.T) {
	b := newTestBroker(t, "b1")
	wk := key("b1")
	require.NoError(t, b.signer.Sign(wk))
	require.NoError(t, keysig.Verify(wk, b.ca, time.Now()))
}

// Every signed field is covered: changing any one breaks the signature.
func TestAlteredKeyIsRefused(t *testing.T) {
	b := newTestBroker(t, "b1")
	signed := key("b1")
	require.NoError(t, b.signer.Sign(signed))
	for name, alter := range map[string]func(*apiv1.WrappingKey){
		"public key": func(wk *apiv1.WrappingKey) { wk.PublicKey = bytes.Repeat([]byte{9}, 1216) },
		"name":       func(wk *apiv1.WrappingKey) { wk.Name = "other" },
		"version":    func(wk *apiv1.WrappingKey) { wk.Version = 1 },
		"suite":      func(wk *apiv1.WrappingKey) { wk.Suite = "X25519-HKDFSHA256-AES256GCM" },
		"signature":  func(wk *apiv1.WrappingKey) { wk.Signature[len(wk.Signature)-1] ^= 1 },
	} {
		wk := proto.Clone(signed).(*apiv1.WrappingKey)
		alter(wk)
		err := keysig.Verify(wk, b.ca, time.Now())
		require.Error(t, err, name)
		assert.Contains(t, err.Error(), "does not match", name)
	}
	// The broker id is also the signer's subject.
	wk := proto.Clone(signed).(*apiv1.WrappingKey)
	wk.BrokerId = "b2"
	err := keysig.Verify(wk, b.ca, time.Now())
	require.Error(t, err)
	assert.Contains(t, err.Error(), `names broker "b1", the key claims broker "b2"`)
}

func TestUnsignedKeyIsRefused(t *testing.T) {
	b := newTestBroker(t, "b1")
	err := keysig.Verify(key("b1"), b.ca, time.Now())
	require.ErrorIs(t, err, keysig.ErrUnsigned)
	wk := key("b1")
	require.NoError(t, b.signer.Sign(wk))
	wk.SignerChain = nil
	require.ErrorIs(t, keysig.Verify(wk, b.ca, time.Now()), keysig.ErrUnsigned)
	require.Error(t, keysig.Verify(wk, nil, time.Now()))
}

// A signer from another CA (another broker, or the attacker's own "broker")
// is refused, whatever it signs.
func TestSignerFromAnotherCAIsRefused(t *testing.T) {
	pinned := newTestBroker(t, "b1")
	evil := newTestBroker(t, "b1")
	wk := key("b1")
	require.NoError(t, evil.signer.Sign(wk))
	err := keysig.Verify(wk, pinned.ca, time.Now())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "does not chain to the pinned broker CA")
}

// The TLS server key chains to the pinned CA but is not a signer.
func TestServerCertificateCannotSign(t *testing.T) {
	b := newTestBroker(t, "b1")
	certPEM, err := os.ReadFile(filepath.Join(b.dir, broker.ServerCertFile))
	require.NoError(t, err)
	keyPEM, err := os.ReadFile(filepath.Join(b.dir, broker.ServerKeyFile))
	require.NoError(t, err)
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	k, err := x509.ParseECPrivateKey(kb.Bytes)
	require.NoError(t, err)
	_, err = keysig.NewSigner(k, [][]byte{cb.Bytes})
	require.Error(t, err, "the server certificate must not load as a signer")

	wk := key("b1")
	digest := sha256.Sum256(keysig.Message(wk.BrokerId, wk.Name, wk.Version, wk.Suite, wk.PublicKey))
	wk.Signature, err = ecdsa.SignASN1(rand.Reader, k, digest[:])
	require.NoError(t, err)
	wk.SignerChain = [][]byte{cb.Bytes}
	err = keysig.Verify(wk, b.ca, time.Now())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not a wrapping-key signing certificate")
}

// A CA that limits its usages to others than ours cannot pass the usage on.
func TestCAWithoutTheUsageIsRefused(t *testing.T) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tls only"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "b1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		UnknownExtKeyUsage: []asn1.ObjectIdentifier{keysig.ExtKeyUsage}}, ca, leafKey.Public(), caKey)
	require.NoError(t, err)
	s, err := keysig.NewSigner(leafKey, [][]byte{leafDER})
	require.NoError(t, err)
	wk := key("b1")
	require.NoError(t, s.Sign(wk))
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	err = keysig.Verify(wk, pool, time.Now())
	require.Error(t, err)
	assert.Contains(t, err.Error(), "does not allow wrapping-key signing")
}

func TestExpiredSignerIsRefused(t *testing.T) {
	b := newTestBroker(t, "b1")
	wk := key("b1")
	require.NoError(t, b.signer.Sign(wk))
	err := keysig.Verify(wk, b.ca, b.signer.Certificate().NotAfter.Add(time.Hour))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "expired")
}

func TestOversizedChainIsRefused(t *testing.T) {
	b := newTestBroker(t, "b1")
	wk := key("b1")
	require.NoError(t, b.signer.Sign(wk))
	for range 4 {
		wk.SignerChain = append(wk.SignerChain, wk.SignerChain[0])
	}
	require.ErrorContains(t, keysig.Verify(wk, b.ca, time.Now()), "at most")
}

// Length prefixes keep fields from running into each other.
func TestMessageIsUnambiguous(t *testing.T) {
	m := keysig.Message("ab", "c", 1, "s", []byte("k"))
	for _, other := range [][]byte{
		keysig.Message("a", "bc", 1, "s", []byte("k")),
		keysig.Message("ab", "c", 1, "sk", nil),
		keysig.Message("ab", "c", 256, "s", []byte("k")),
	} {
		assert.NotEqual(t, m, other)
	}
	assert.Equal(t, m, keysig.Message("ab", "c", 1, "s", []byte("k")))
}

// FuzzVerify: signatures and chains come from the wire and from cache
// files; whatever they hold, Verify refuses without panicking.
func FuzzVerify(f *testing.F) {
	dir := f.TempDir()
	_, err := broker.Init(broker.InitOptions{DataDir: filepath.Join(dir, "data"), CADir: filepath.Join(dir, "ca"), ID: "b1"})
	require.NoError(f, err)
	ca, err := conn.CAPool(filepath.Join(dir, "data", broker.CACertFile))
	require.NoError(f, err)
	s, err := keysig.LoadSigner(filepath.Join(dir, "data", broker.SignerCertFile), filepath.Join(dir, "data", broker.SignerKeyFile))
	require.NoError(f, err)
	wk := key("b1")
	require.NoError(f, s.Sign(wk))
	f.Add(wk.Signature, wk.SignerChain[0], []byte("pub"))
	f.Add([]byte{}, []byte{0x30, 0x03, 0x02, 0x01, 0x00}, []byte{})
	f.Fuzz(func(t *testing.T, sig, cert, pub []byte) {
		k := key("b1")
		k.PublicKey, k.Signature, k.SignerChain = pub, sig, [][]byte{cert}
		if keysig.Verify(k, ca, time.Now()) == nil && !bytes.Equal(cert, wk.SignerChain[0]) {
			t.Fatalf("a key verified under a certificate the broker did not issue")
		}
	})
}
