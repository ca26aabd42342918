package keyprovider_test

import (
	"context"
	"crypto/sha256"
	"sync/atomic"
	"testing"
	"time"

	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/simtpm"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// A lingering TPM (the agent's) keeps one connection, one loaded session
// key and one policy session across layers; none of that may let the key
// open once a PCR it is bound to has moved, on the reused policy session or
// on a new one.
func TestLingeringTPMStillEnforcesPCRPolicy(t *testing.T) {
	f := newFixture(t, nil)
	var opens atomic.Int32
	f.sessions.TPM = func(ctx context.Context) (*attest.TPM, error) {
		opens.Add(1)
		return attest.OpenTPM(ctx, "simulator")
	}
	f.sessions.Linger = time.Hour
	defer f.sessions.Close()
	ctx := context.Background()
	ann := f.wrap(t, "key=app")
	s, err := f.sessions.Get(ctx)
	require.NoError(t, err)
	release := func() *apiv1.UnwrapResponse {
		r, err := f.b.Node.Unwrap(ctx, &apiv1.UnwrapRequest{SessionToken: s.Token, Annotation: ann})
		require.NoError(t, err)
		return r
	}
	for range 3 {
		r := release()
		got, err := f.sessions.Open(ctx, s, r.GetKey(), r.GetKeyVersion(), r.GetSealed())
		require.NoError(t, err)
		assert.JSONEq(t, optsdata, string(got))
	}
	assert.Equal(t, int32(1), opens.Load(), "attestation and three releases share one TPM connection")

	// PCR 16 is not in the key's broker policy but is in its TPM policy.
	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	sum := sha256.Sum256([]byte("moved after the attestation"))
	require.NoError(t, legacy.PCRExtend(sim, tpmutil.Handle(16), legacy.AlgSHA256, sum[:], ""))
	for i := range 2 { // the kept policy session, then a new one
		r := release()
		_, err = f.sessions.Open(ctx, s, r.GetKey(), r.GetKeyVersion(), r.GetSealed())
		require.ErrorIs(t, err, attest.ErrSessionKeyLocked, "use %d after the PCR moved", i+1)
	}
	// The handler attests again and the new session opens.
	got, err := f.unwrap(t, "null", ann)
	require.NoError(t, err)
	assert.JSONEq(t, optsdata, string(got))
}

// The lingering TPM closes once idle, so another process can have swtpm.
func TestLingeringTPMClosesWhenIdle(t *testing.T) {
	f := newFixture(t, nil)
	var opens atomic.Int32
	f.sessions.TPM = func(ctx context.Context) (*attest.TPM, error) {
		opens.Add(1)
		return attest.OpenTPM(ctx, "simulator")
	}
	f.sessions.Linger = 20 * time.Millisecond
	defer f.sessions.Close()
	ann := f.wrap(t, "key=app")
	_, err := f.unwrap(t, "null", ann)
	require.NoError(t, err)
	first := opens.Load()
	// The simulator's lock is free again only if the TPM was closed.
	require.Eventually(t, func() bool {
		tpm, err := attest.OpenTPM(context.Background(), "simulator")
		if err != nil {
			return false
		}
		tpm.Close()
		return true
	}, 5*time.Second, 10*time.Millisecond)
	_, err = f.unwrap(t, "null", ann)
	require.NoError(t, err)
	assert.Equal(t, first+1, opens.Load(), "a use after the linger opens the TPM again")
}
