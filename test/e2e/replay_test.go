//go:build e2e

package e2e

import (
	"context"
	"encoding/base64"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/attested-dev/attested/attest"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/conn"
	"github.com/attested-dev/attested/broker/suite"
)

// TestReplayedEvidenceRefused plays an attacker against the running broker:
// it captures node1's real evidence (a quote from its swtpm) and presents
// it again, under a fresh nonce, and with its own session key.
func TestReplayedEvidenceRefused(t *testing.T) {
	// Refusals of unverified evidence are sampled into the audit; an
	// interval of 1ns keeps each one, so that they can be counted below.
	w := newWorld(t, worldOptions{noImage: true, brokerConfig: "limits:\n  auditSampleInterval: 1ns\n"})
	n := w.node1
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b := w.brokerClient()

	// Honest evidence, recorded on its way to the broker.
	rec := &recordingBroker{BrokerClient: b}
	n.withTPM(ctx, func(tpm *attest.TPM, st *attest.State) {
		_, err := attest.NewSession(ctx, rec, tpm, st, attest.Logs{})
		require.NoError(t, err)
	})
	require.NotNil(t, rec.last)

	t.Run("same evidence again", func(t *testing.T) {
		_, err := b.Attest(ctx, rec.last)
		require.Error(t, err)
		assert.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
		assert.Contains(t, status.Convert(err).Message(), "nonce already used (replayed evidence?)")
	})
	t.Run("old quote under a fresh nonce", func(t *testing.T) {
		ch, err := b.Challenge(ctx, &apiv1.ChallengeRequest{Node: n.name})
		require.NoError(t, err)
		req := proto.Clone(rec.last).(*apiv1.AttestRequest)
		req.Nonce = ch.GetNonce()
		_, err = b.Attest(ctx, req)
		require.Error(t, err)
		assert.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
		assert.Contains(t, status.Convert(err).Message(), "its quote is not signed by its enrolled attestation key over this challenge")
		assert.Contains(t, w.auditReasons(n.name), "quote refused: not signed by this node's enrolled AK over this nonce, session key and PCR values: its qualifying data is for another nonce")
	})
	t.Run("fresh evidence with an attacker's session key", func(t *testing.T) {
		st, err := suite.Lookup(suite.SessionName)
		require.NoError(t, err)
		_, pub, err := st.GenerateKey()
		require.NoError(t, err)
		hijack := &recordingBroker{BrokerClient: b, rewrite: func(r *apiv1.AttestRequest) { r.SessionPublicKey = pub }}
		n.withTPM(ctx, func(tpm *attest.TPM, st *attest.State) {
			_, err = attest.NewSession(ctx, hijack, tpm, st, attest.Logs{})
		})
		require.Error(t, err)
		assert.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
		assert.Contains(t, err.Error(), "its quote is not signed by its enrolled attestation key over this challenge")
	})

	total, allowed := w.quotes(n)
	assert.Equal(t, 4, total, "one honest and three refused appraisals")
	assert.Equal(t, 1, allowed)
}

// auditReasons joins the reasons of the node's audit records: where the
// broker keeps what it does not tell unauthenticated callers.
func (w *world) auditReasons(node string) string {
	var out []string
	for _, e := range w.audit("--node", node) {
		out = append(out, e.Reason)
	}
	return strings.Join(out, "\n")
}

// recordingBroker passes attestation calls through, keeping (and
// optionally rewriting) the last AttestRequest.
type recordingBroker struct {
	apiv1.BrokerClient
	rewrite func(*apiv1.AttestRequest)
	last    *apiv1.AttestRequest
}

func (r *recordingBroker) Attest(ctx context.Context, in *apiv1.AttestRequest, opts ...grpc.CallOption) (*apiv1.AttestResponse, error) {
	in = proto.Clone(in).(*apiv1.AttestRequest)
	if r.rewrite != nil {
		r.rewrite(in)
	}
	r.last = in
	return r.BrokerClient.Attest(ctx, in, opts...)
}

// withTPM opens the node's swtpm and enrollment state in this process.
func (n *node) withTPM(ctx context.Context, fn func(*attest.TPM, *attest.State)) {
	st, err := attest.LoadState(n.stateDir)
	require.NoError(n.w.t, err)
	tpm, err := attest.OpenTPM(ctx, n.tpm.URI())
	require.NoError(n.w.t, err)
	defer tpm.Close()
	fn(tpm, st)
}

// brokerClient dials the broker the way a node does: TLS pinned to its CA.
func (w *world) brokerClient() apiv1.BrokerClient {
	cc, err := conn.Dial(conn.Options{Addr: w.brokerAddr, CAFile: filepath.Join(w.brokerDir, "ca.pem"), Timeout: 10 * time.Second})
	require.NoError(w.t, err)
	w.t.Cleanup(func() { cc.Close() })
	return apiv1.NewBrokerClient(cc)
}

// replayToken presents a session token to the broker's release API with a
// real layer annotation of the world's image.
func (w *world) replayToken(token []byte) error {
	in := w.inspect(w.image)
	ann, err := base64.StdEncoding.DecodeString(in.Layers[0].Annotations[providerAnnotation])
	require.NoError(w.t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = w.brokerClient().Unwrap(ctx, &apiv1.UnwrapRequest{SessionToken: token, Annotation: ann})
	return err
}
