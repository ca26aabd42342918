package broker_test

import (
	"context"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	nodeattest "github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
)

func certifiedBroker(t *testing.T, ca testCA, configure func(*broker.Config)) *brokertest.Broker {
	f := filepath.Join(t.TempDir(), "roots.pem")
	require.NoError(t, os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw}), 0o600))
	return brokertest.Start(t, func(c *broker.Config) {
		c.EKRoots = []string{f}
		c.RequireEKCertificate = true
		if configure != nil {
			configure(c)
		}
	})
}

// TestCertifiedEKWithoutTokenWaitsForApproval: a manufacturer's
// certificate proves the EK is in a genuine TPM, not that the machine is
// ours (any rented VM or laptop with a TPM from that maker has one), so
// without a join token it waits for approval, and the list shows it was
// verified.
func TestCertifiedEKWithoutTokenWaitsForApproval(t *testing.T) {
	ctx := context.Background()
	ca := newCA(t, "TPM Manufacturer Root")
	b := certifiedBroker(t, ca, nil)
	cert := ca.ekCert(t, simEK(t))
	tpm := openTPM(t)
	_, n, err := nodeattest.Enroll(ctx, withCert{b.Node, cert}, tpm, nodeattest.EnrollOptions{Name: "worker"})
	tpm.Close()
	require.NoError(t, err)
	assert.Equal(t, apiv1.NodeState_NODE_STATE_PENDING, n.GetState())
	assert.Equal(t, "CN=TPM Manufacturer Root", n.GetEkIssuer())
	assert.InDelta(t, time.Now().Add(broker.DefaultPendingTTL).Unix(), n.GetPendingExpiresUnix(), 60)

	l := listNodes(t, b)
	require.Len(t, l.GetPending(), 1)
	p := l.GetPending()[0]
	assert.Equal(t, "CN=TPM Manufacturer Root", p.GetEkIssuer())
	assert.Equal(t, simFingerprint(t), broker.DisplayFingerprint(p.GetEkFingerprint()))
	assert.Equal(t, n.GetPendingExpiresUnix(), p.GetPendingExpiresUnix())

	_, err = b.Admin.ApproveNode(ctx, &apiv1.NodeRequest{Name: "worker", EkFingerprint: simFingerprint(t)})
	require.NoError(t, err)
	evs, err := b.Admin.ListAudit(ctx, &apiv1.ListAuditRequest{Kind: "approve"})
	require.NoError(t, err)
	require.Len(t, evs.GetEvents(), 1)
	assert.Contains(t, evs.GetEvents()[0].GetReason(), simFingerprint(t))
	assert.Contains(t, evs.GetEvents()[0].GetReason(), "verified (issuer CN=TPM Manufacturer Root)")
}

// TestApproveCertifiedEKsAdmitsOnCertificate: where the EK roots are the
// fleet's own provisioning CA, approveCertifiedEKs admits a certified TPM
// without a token, superseding what was pending under its name.
func TestApproveCertifiedEKsAdmitsOnCertificate(t *testing.T) {
	ctx := context.Background()
	ca := newCA(t, "Our Provisioning CA")
	b := certifiedBroker(t, ca, func(c *broker.Config) { c.ApproveCertifiedEKs = true })
	cert := ca.ekCert(t, simEK(t))
	tpm := openTPM(t)
	_, n, err := nodeattest.Enroll(ctx, withCert{b.Node, cert}, tpm, nodeattest.EnrollOptions{Name: "worker"})
	tpm.Close()
	require.NoError(t, err)
	assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
	evs, err := b.Admin.ListAudit(ctx, &apiv1.ListAuditRequest{Kind: "enroll"})
	require.NoError(t, err)
	assert.Contains(t, evs.GetEvents()[len(evs.GetEvents())-1].GetReason(), "trusted EK certificate")
}

// TestPendingEnrollmentExpires: pendingTTL bounds the wait; an expired
// enrollment is neither listed nor approvable.
func TestPendingEnrollmentExpires(t *testing.T) {
	ctx := context.Background()
	b := uncertifiedBroker(t, func(c *broker.Config) { c.PendingTTL = time.Second })
	_, err := enrollSim(t, b, "slow", "")
	require.NoError(t, err)
	require.Len(t, listNodes(t, b).GetPending(), 1)
	time.Sleep(1200 * time.Millisecond)
	assert.Empty(t, listNodes(t, b).GetPending())
	_, err = b.Admin.ApproveNode(ctx, &apiv1.NodeRequest{Name: "slow", EkFingerprint: simFingerprint(t)})
	require.Error(t, err)
	assert.Equal(t, codes.FailedPrecondition, status.Code(err))
	assert.Contains(t, err.Error(), "expired")
}

// TestRejectPendingEnrollment: 'node remove NAME --ek' drops a pending
// enrollment (a squat an admin recognised) without touching others.
func TestRejectPendingEnrollment(t *testing.T) {
	ctx := context.Background()
	b := uncertifiedBroker(t)
	squat := impostor(t)
	_, err := squat.Enroll(ctx, b.Node, "victim", "")
	require.NoError(t, err)
	_, err = enrollSim(t, b, "victim", "")
	require.NoError(t, err)
	_, err = b.Admin.RemoveNode(ctx, &apiv1.NodeRequest{Name: "other", EkFingerprint: squat.Fingerprint()})
	assert.Equal(t, codes.NotFound, status.Code(err), "name and EK must match")
	_, err = b.Admin.RemoveNode(ctx, &apiv1.NodeRequest{Name: "victim", EkFingerprint: squat.Fingerprint()})
	require.NoError(t, err)
	l := listNodes(t, b)
	require.Len(t, l.GetPending(), 1)
	assert.Equal(t, simFingerprint(t), broker.DisplayFingerprint(l.GetPending()[0].GetEkFingerprint()))
}

func TestParseFingerprint(t *testing.T) {
	hex := "3f28287ea2f13f77111faf973da52986c82766eb8d9187de54b67c57115f4c9b"
	for _, in := range []string{"SHA256:" + hex, hex, "sha256:" + hex, " SHA256:3F28287EA2F13F77111FAF973DA52986C82766EB8D9187DE54B67C57115F4C9B "} {
		got, err := broker.ParseFingerprint(in)
		require.NoError(t, err, in)
		assert.Equal(t, hex, got)
	}
	for _, in := range []string{"", "SHA256:", "SHA256:" + hex[:16], "MD5:" + hex, "SHA256:" + hex + "00"} {
		_, err := broker.ParseFingerprint(in)
		assert.Error(t, err, in)
	}
}
