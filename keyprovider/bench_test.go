package keyprovider_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"testing"

	"github.com/containers/ocicrypt/config"
	"github.com/containers/ocicrypt/keywrap/jwe"
	"github.com/stretchr/testify/require"
)

// The per-layer cost of a warm unwrap through attested (session reuse, the
// local PCR/counter check, the broker call over TLS, the release seal and
// its audit record) next to ocicrypt's own local JWE private key unwrap:
// make bench prints both, so the ratio comes from one run.

func BenchmarkUnwrapWarm(b *testing.B) {
	f := newFixture(&testing.T{}, nil)
	ann := f.wrap(&testing.T{}, "key=app")
	req := []byte(unwrapReq("null", ann))
	ctx := context.Background()
	_, err := f.h.Handle(ctx, req) // attest once: the session is warm below
	require.NoError(b, err)
	b.ResetTimer()
	for b.Loop() {
		if _, err := f.h.Handle(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkUnwrapLocalJWE(b *testing.B) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(b, err)
	pubDER, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	require.NoError(b, err)
	privPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(priv)})
	kw := jwe.NewKeyWrapper()
	wrapped, err := kw.WrapKeys(&config.EncryptConfig{Parameters: map[string][][]byte{
		"pubkeys": {pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})}}}, []byte(optsdata))
	require.NoError(b, err)
	dc := &config.DecryptConfig{Parameters: map[string][][]byte{"privkeys": {privPEM}, "privkeys-passwords": {nil}}}
	b.ResetTimer()
	for b.Loop() {
		if _, err := kw.UnwrapKey(dc, wrapped); err != nil {
			b.Fatal(err)
		}
	}
}
