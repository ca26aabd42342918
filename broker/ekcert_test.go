package broker_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
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
	"google.golang.org/grpc"

	nodeattest "github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t *testing.T, name string) testCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return testCA{cert, key}
}

// ekCert issues a certificate for pub shaped like a TPM EK certificate: a
// critical directoryName-only SAN and the TCG EK certificate EKU.
func (ca testCA) ekCert(t *testing.T, pub crypto.PublicKey) []byte {
	san, err := asn1.Marshal([]asn1.RawValue{{Tag: 4, Class: 2, IsCompound: true, Bytes: mustDirName(t)}})
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:           x509.KeyUsageKeyEncipherment,
		UnknownExtKeyUsage: []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}},
		ExtraExtensions:    []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	require.NoError(t, err)
	return der
}

func mustDirName(t *testing.T) []byte {
	name := pkix.Name{ExtraNames: []pkix.AttributeTypeAndValue{{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 1}, Value: "id:53574D00"}}}
	der, err := asn1.Marshal(name.ToRDNSequence())
	require.NoError(t, err)
	return der
}

// withCert presents an EK certificate during enrollment, as a TPM with one
// in NV would.
type withCert struct {
	apiv1.BrokerClient
	cert []byte
}

func (w withCert) EnrollStart(ctx context.Context, in *apiv1.EnrollStartRequest, opts ...grpc.CallOption) (*apiv1.EnrollStartResponse, error) {
	in.EkCertificate = w.cert
	return w.BrokerClient.EnrollStart(ctx, in, opts...)
}

func simEK(t *testing.T) crypto.PublicKey {
	tpm := openTPM(t)
	defer tpm.Close()
	ek, err := tpm.EK()
	require.NoError(t, err)
	return ek
}

func brokerTrusting(t *testing.T, ca testCA) *brokertest.Broker {
	f := filepath.Join(t.TempDir(), "roots.pem")
	require.NoError(t, os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}), 0o600))
	return brokertest.Start(t, func(c *broker.Config) { c.EKRoots = []string{f}; c.RequireEKCertificate = true })
}

func enrollWith(t *testing.T, b *brokertest.Broker, client nodeattest.Enrollment) (*apiv1.Node, error) {
	tok, err := b.Admin.CreateJoinToken(context.Background(), &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	tpm := openTPM(t)
	defer tpm.Close()
	_, n, err := nodeattest.Enroll(context.Background(), client, tpm, nodeattest.EnrollOptions{Name: "node1", JoinToken: tok.GetToken()})
	return n, err
}

func TestEKCertificateChainingToTrustedRootIsAccepted(t *testing.T) {
	manufacturer := newCA(t, "TPM Manufacturer Root")
	b := brokerTrusting(t, manufacturer)
	n, err := enrollWith(t, b, withCert{b.Node, manufacturer.ekCert(t, simEK(t))})
	require.NoError(t, err)
	assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
	evs, err := b.Admin.ListAudit(context.Background(), &apiv1.ListAuditRequest{Kind: "enroll"})
	require.NoError(t, err)
	assert.Contains(t, evs.GetEvents()[len(evs.GetEvents())-1].GetReason(), "EK certificate verified (issuer CN=TPM Manufacturer Root)")
}

func TestEKCertificateFromUntrustedCAIsRefused(t *testing.T) {
	b := brokerTrusting(t, newCA(t, "TPM Manufacturer Root"))
	rogue := newCA(t, "Rogue CA")
	_, err := enrollWith(t, b, withCert{b.Node, rogue.ekCert(t, simEK(t))})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `EK certificate (issuer "CN=Rogue CA") does not chain to a trusted TPM manufacturer root`)
}

func TestEKCertificateForAnotherKeyIsRefused(t *testing.T) {
	manufacturer := newCA(t, "TPM Manufacturer Root")
	b := brokerTrusting(t, manufacturer)
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	_, err = enrollWith(t, b, withCert{b.Node, manufacturer.ekCert(t, other.Public())})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "EK certificate is for another key than the EK presented")
}

func TestMissingEKCertificateRefusedWhenRequired(t *testing.T) {
	b := brokerTrusting(t, newCA(t, "TPM Manufacturer Root"))
	_, err := enrollWith(t, b, b.Node)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "EK certificate required")
}
