package broker_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	nodeattest "github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/eventlogtest"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/ear"
)

// recordAttest keeps the last attestation request, for its nonce and PCRs.
type recordAttest struct {
	apiv1.BrokerClient
	req *apiv1.AttestRequest
}

func (r *recordAttest) Attest(ctx context.Context, in *apiv1.AttestRequest, opts ...grpc.CallOption) (*apiv1.AttestResponse, error) {
	r.req = in
	return r.BrokerClient.Attest(ctx, in, opts...)
}

// attestForEAR attests the node and returns its session and the request
// it sent.
func attestForEAR(t *testing.T, n *node) (*nodeattest.Session, *apiv1.AttestRequest) {
	t.Helper()
	rec := &recordAttest{BrokerClient: n.b.Node}
	tpm := openTPM(t)
	defer tpm.Close()
	s, err := nodeattest.NewSession(context.Background(), rec, tpm, n.state, n.logs)
	require.NoError(t, err)
	return s, rec.req
}

// brokerJWKS fetches the broker's JWK Set the way a relying party does:
// the public JWKS call, over TLS pinned to the broker CA.
func brokerJWKS(t *testing.T, b *brokertest.Broker) *jose.JSONWebKeySet {
	t.Helper()
	r, err := b.Node.JWKS(context.Background(), &apiv1.JWKSRequest{})
	require.NoError(t, err)
	set, err := ear.ParseJWKS([]byte(r.GetJwks()))
	require.NoError(t, err)
	return set
}

// noTagIndex removes the simulator's tag index, which outlives the tests
// that wrote it: these tests assert the vector of a node without one.
func noTagIndex(t *testing.T) {
	t.Helper()
	tpm := openTPM(t)
	defer tpm.Close()
	require.NoError(t, tpm.RemoveTags())
}

// verifiedEAR checks the session's EAR with the broker's JWKS and returns
// its one appraisal and the broker's claims in it.
func verifiedEAR(t *testing.T, b *brokertest.Broker, s *nodeattest.Session) (*ear.Result, ear.Appraisal, *ear.NodeClaims) {
	t.Helper()
	require.NotEmpty(t, s.EAR, "the broker issued no EAR")
	r, err := ear.Verify(s.EAR, brokerJWKS(t, b), time.Now())
	require.NoError(t, err)
	require.Len(t, r.Submods, 1)
	a, ok := r.Submods[ear.SubmodNode]
	require.True(t, ok)
	c, err := a.NodeClaims()
	require.NoError(t, err)
	return r, a, c
}

// A trusted node's EAR verifies with the broker's JWKS and says what the
// broker established: every category a policy checked affirming, the
// identity, the policy that accepted it, the nonce and PCRs of the
// evidence, the session's expiry.
func TestEARForTrustedNode(t *testing.T) {
	noTagIndex(t)
	b := brokertest.Start(t)
	n := goodBoot().apply(t, b)
	strict(t, b)
	tagEU(t, b)
	s, req := attestForEAR(t, n)
	r, a, c := verifiedEAR(t, b, s)

	assert.Equal(t, ear.Profile, r.Profile)
	assert.Equal(t, ear.VerifierID{Developer: "attested", Build: "attested " + broker.Version}, r.VerifierID)
	assert.Equal(t, s.Expires.Unix(), r.Expires, "the EAR holds as long as the session")
	assert.WithinDuration(t, time.Now(), time.Unix(r.IssuedAt, 0), time.Minute)
	require.NotNil(t, r.Status)
	assert.Equal(t, ear.TierAffirming, *r.Status)

	assert.Equal(t, ear.AppraisalProfile, a.Profile)
	assert.Equal(t, ear.TierAffirming, a.Status)
	// The simulator's EK has no certificate: no hardware claim. No tags
	// are TPM-certified: no sourced-data claim.
	assert.Equal(t, ear.TrustVector{InstanceIdentity: 2, Configuration: 2, Executables: 2, FileSystem: 2}, *a.TrustVector)
	assert.Equal(t, []string{"policy://broker-test/prod-eu/1"}, a.PolicyIDs)
	assert.Equal(t, ear.NonceOf(req.GetNonce()), a.Nonce, "eat_nonce is the challenge the quote answered")

	assert.Equal(t, "broker-test", c.Broker)
	assert.Equal(t, "node1", c.Node)
	assert.True(t, strings.HasPrefix(c.EKFingerprint, "SHA256:"))
	assert.Equal(t, map[string]string{"region": "EU"}, c.Tags)
	assert.Empty(t, c.CertifiedTags)
	assert.Equal(t, map[string]ear.PolicyResult{"prod-eu": {ID: "policy://broker-test/prod-eu/1", Revision: 1, Allowed: true}}, c.Policies)

	p, err := a.PlatformClaims()
	require.NoError(t, err)
	require.NotNil(t, p.SecureBoot)
	assert.True(t, *p.SecureBoot)
	require.Len(t, p.PCRs, broker.NumPCRs)
	for _, pcr := range req.GetPcrs() {
		assert.Equal(t, hex.EncodeToString(pcr.GetDigest()), p.PCRs[strconv.Itoa(int(pcr.GetIndex()))])
	}
	assert.Equal(t, 1.0, counter(t, b.Server.Metrics(), "attested_broker_attestation_results_total", "status", "affirming"))
}

// Evidence that fails a policy still opens a session (policies decide at
// release), but its EAR is contraindicated, in the category of the failing
// clause, and names the clause.
func TestEARContraindicatedWhenEvidenceFailsThePolicy(t *testing.T) {
	cases := []struct {
		name   string
		boot   func() boot
		vector ear.TrustVector
		failed []string
	}{
		{"Secure Boot off", func() boot {
			bt := goodBoot()
			bt.firmware = append(eventlogtest.SecureBoot(false, sbCert), bt.firmware[len(eventlogtest.SecureBoot(true, sbCert)):]...)
			return bt
		}, ear.TrustVector{InstanceIdentity: 2, Configuration: 96, Executables: 2, FileSystem: 2}, []string{"secureBoot", "expression"}},
		{"boot application not allowed", func() boot {
			bt := goodBoot()
			bt.firmware = append(bt.firmware, eventlogtest.BootApp(rootkit[:]))
			return bt
		}, ear.TrustVector{InstanceIdentity: 2, Configuration: 2, Executables: 96, FileSystem: 2}, []string{"bootApplications"}},
		{"file not in the IMA allow-list", func() boot {
			bt := goodBoot()
			bt.ima = append(bt.ima, eventlogtest.IMAFile{Path: "/usr/local/bin/miner", Digest: evil[:]})
			return bt
		}, ear.TrustVector{InstanceIdentity: 2, Configuration: 2, Executables: 2, FileSystem: 96}, []string{"ima"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			noTagIndex(t)
			b := brokertest.Start(t)
			n := tc.boot().apply(t, b)
			ann := strict(t, b)
			tagEU(t, b)
			s, _ := attestForEAR(t, n)
			r, a, c := verifiedEAR(t, b, s)
			assert.Equal(t, ear.TierContraindicated, *r.Status)
			assert.Equal(t, ear.TierContraindicated, a.Status)
			assert.Equal(t, tc.vector, *a.TrustVector)
			assert.Equal(t, []string{"policy://broker-test/prod-eu/1"}, a.PolicyIDs)
			assert.False(t, c.Policies["prod-eu"].Allowed)
			assert.Equal(t, tc.failed, c.Policies["prod-eu"].Failed)
			assert.Equal(t, 1.0, counter(t, b.Server.Metrics(), "attested_broker_attestation_results_total", "status", "contraindicated"))
			// The EAR reports; the release decides as before.
			_, err := unwrap(n, s, ann)
			require.Error(t, err)
		})
	}
}

// With several policies, the ones that accept the evidence speak for the
// vector; every policy's verdict is in the broker's claims. A tag that a
// node lacks makes a policy refuse it, not the node untrustworthy.
func TestEARWithSeveralPolicies(t *testing.T) {
	noTagIndex(t)
	b := brokertest.Start(t)
	n := goodBoot().apply(t, b)
	strict(t, b)
	tagEU(t, b)
	ctx := context.Background()
	_, err := b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: us-only\ntags:\n  region: [US]\n"})
	require.NoError(t, err)
	_, err = b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: other-firmware\npcrs:\n  0: [\"" + strings.Repeat("ab", 32) + "\"]\n"})
	require.NoError(t, err)
	s, _ := attestForEAR(t, n)
	r, a, c := verifiedEAR(t, b, s)
	assert.Equal(t, ear.TierAffirming, *r.Status)
	assert.Equal(t, ear.TrustVector{InstanceIdentity: 2, Configuration: 2, Executables: 2, FileSystem: 2}, *a.TrustVector,
		"the accepting policy speaks; other-firmware's PCR 0 does not make the node contraindicated")
	assert.Equal(t, []string{"policy://broker-test/other-firmware/1", "policy://broker-test/prod-eu/1", "policy://broker-test/us-only/1"}, a.PolicyIDs)
	assert.True(t, c.Policies["prod-eu"].Allowed)
	assert.Equal(t, ear.PolicyResult{ID: "policy://broker-test/us-only/1", Revision: 1, Failed: []string{"tag region"}}, c.Policies["us-only"])
	assert.Equal(t, []string{"pcr 0"}, c.Policies["other-firmware"].Failed)

	// When none accepts, all speak: PCR 0 is contraindicated, the tag
	// only in the status.
	_, err = b.Admin.TagNode(ctx, &apiv1.TagNodeRequest{Name: "node1", Set: map[string]string{"region": "APAC"}})
	require.NoError(t, err)
	s, _ = attestForEAR(t, n)
	r, a, _ = verifiedEAR(t, b, s)
	assert.Equal(t, ear.TierContraindicated, *r.Status)
	assert.Equal(t, ear.TrustVector{InstanceIdentity: 2, Configuration: 2, Executables: 96, FileSystem: 2}, *a.TrustVector)
}

// Without any policy nothing appraised the platform: the EAR says so with a
// warning, never affirming.
func TestEARWithoutPolicyIsAWarning(t *testing.T) {
	noTagIndex(t)
	b := brokertest.Start(t)
	n := enroll(t, b, "node1")
	s, _ := attestForEAR(t, n)
	r, a, c := verifiedEAR(t, b, s)
	assert.Equal(t, ear.TierWarning, *r.Status)
	assert.Equal(t, ear.TierWarning, a.Status)
	assert.Equal(t, ear.TrustVector{InstanceIdentity: 2}, *a.TrustVector)
	assert.Nil(t, a.PolicyIDs)
	assert.Empty(t, c.Policies)
}

// TPM-certified tags are sourced data: affirming when the TPM certified
// exactly the broker's tags, and listed; contraindicated when a policy
// relies on certified tags that are not the broker's; a warning when the
// policy that accepts the node does not rely on them.
func TestEARCertifiedTags(t *testing.T) {
	t.Cleanup(func() { noTagIndex(t) })
	b, n, _ := certifiedSetup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	sealed, err := b.Node.NodeTags(context.Background(), &apiv1.NodeTagsRequest{SessionToken: s.Token})
	require.NoError(t, err)
	tpm := openTPM(t)
	tags, err := s.OpenTags(tpm, sealed)
	tpm.Close()
	require.NoError(t, err)
	writeTags(t, tags.GetDigest())
	s, _ = attestForEAR(t, n)
	_, a, c := verifiedEAR(t, b, s)
	assert.Equal(t, ear.TierAffirming, a.Status)
	assert.Equal(t, ear.TrustVector{InstanceIdentity: 2, SourcedData: 2}, *a.TrustVector)
	assert.Equal(t, map[string]string{"region": "EU"}, c.CertifiedTags)

	writeTags(t, []byte(strings.Repeat("x", 32)))
	s, _ = attestForEAR(t, n)
	_, a, c = verifiedEAR(t, b, s)
	assert.Equal(t, ear.TierContraindicated, a.Status)
	assert.Equal(t, ear.TrustVector{InstanceIdentity: 2, SourcedData: 96}, *a.TrustVector)
	assert.Empty(t, c.CertifiedTags)
	assert.Equal(t, []string{"certifiedTags"}, c.Policies["eu-certified"].Failed)

	_, err = b.Admin.ApplyPolicy(context.Background(), &apiv1.ApplyPolicyRequest{Yaml: "name: eu-plain\ntags:\n  region: [EU]\n"})
	require.NoError(t, err)
	s, _ = attestForEAR(t, n)
	r, a, c := verifiedEAR(t, b, s)
	assert.Equal(t, ear.TierWarning, *r.Status, "accepted, but the TPM certifies other tags than the broker's")
	assert.Equal(t, ear.TrustVector{InstanceIdentity: 2, SourcedData: 32}, *a.TrustVector)
	assert.True(t, c.Policies["eu-plain"].Allowed)
}

// A token the broker issued fails verification once altered, and a token
// another broker issued does not verify with this broker's JWKS.
func TestEARTamperedOrFromAnotherBrokerFails(t *testing.T) {
	noTagIndex(t)
	b := brokertest.Start(t)
	n := enroll(t, b, "node1")
	s, _ := attestForEAR(t, n)
	keys := brokerJWKS(t, b)
	_, err := ear.Verify(s.EAR, keys, time.Now())
	require.NoError(t, err)

	parts := strings.Split(s.EAR, ".")
	require.Len(t, parts, 3)
	for i, p := range parts {
		c := []byte(p)
		if c[len(c)/2] == 'A' {
			c[len(c)/2] = 'B'
		} else {
			c[len(c)/2] = 'A'
		}
		forged := append([]string{}, parts...)
		forged[i] = string(c)
		_, err := ear.Verify(strings.Join(forged, "."), keys, time.Now())
		require.Error(t, err, "part %d altered", i)
	}

	// The HTTP form of the JWKS, for relying parties that fetch a jwks_uri,
	// is the same document.
	rec := httptest.NewRecorder()
	b.Server.JWKSHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, broker.JWKSPath, nil))
	require.Equal(t, http.StatusOK, rec.Code)
	assert.Equal(t, "application/jwk-set+json", rec.Header().Get("Content-Type"))
	fromHTTP, err := ear.ParseJWKS(rec.Body.Bytes())
	require.NoError(t, err)
	_, err = ear.Verify(s.EAR, fromHTTP, time.Now())
	require.NoError(t, err)
	rec = httptest.NewRecorder()
	b.Server.JWKSHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, broker.JWKSPath, nil))
	assert.Equal(t, http.StatusMethodNotAllowed, rec.Code)

	other := brokertest.Start(t)
	n2 := enroll(t, other, "node1")
	s2, _ := attestForEAR(t, n2)
	_, err = ear.Verify(s2.EAR, keys, time.Now())
	require.ErrorContains(t, err, "no key")
	_, err = ear.Verify(s2.EAR, brokerJWKS(t, other), time.Now())
	require.NoError(t, err)
}

// init creates the EAR key with the other keys: its own, 0600, and an init
// refuses a directory that holds one. Serve refuses it readable by others.
func TestInitCreatesEARKey(t *testing.T) {
	dir := initBroker(t)
	p := filepath.Join(dir, broker.EARKeyFile)
	fi, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	for _, other := range []string{broker.ServerKeyFile, broker.SignerKeyFile} {
		a, err := os.ReadFile(p)
		require.NoError(t, err)
		o, err := os.ReadFile(filepath.Join(dir, other))
		require.NoError(t, err)
		assert.NotEqual(t, a, o, "the EAR key is a key of its own")
	}

	require.NoError(t, os.Chmod(p, 0o644))
	_, err = broker.Open(dir, slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)), func(c *broker.Config) { c.RequireEKCertificate = false })
	require.ErrorContains(t, err, p)

	fresh := filepath.Join(t.TempDir(), "broker")
	require.NoError(t, os.MkdirAll(fresh, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(fresh, broker.EARKeyFile), []byte("precious"), 0o600))
	_, err = broker.Init(broker.InitOptions{DataDir: fresh})
	require.ErrorContains(t, err, broker.EARKeyFile)
	got, err := os.ReadFile(filepath.Join(fresh, broker.EARKeyFile))
	require.NoError(t, err)
	assert.Equal(t, "precious", string(got))
}

// A broker initialised before EARs serves without them, says so at start,
// publishes an empty JWKS; issue-ear-key gives it a key (once), and after a
// restart its EARs verify with the JWKS.
func TestBrokerWithoutEARKeyAndIssueEARKey(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "data")
	_, err := broker.Init(broker.InitOptions{DataDir: dir, CADir: filepath.Join(root, "ca"), ID: "broker-test", AdmitUncertifiedTPMs: true})
	require.NoError(t, err)
	require.NoError(t, os.Remove(filepath.Join(dir, broker.EARKeyFile)))

	var buf syncBuffer
	b := brokertest.Serve(t, dir, slog.New(slog.NewTextHandler(&buf, nil)))
	assert.Contains(t, buf.String(), "no attestation-result (EAR) signing key")
	assert.Contains(t, buf.String(), "attested broker issue-ear-key")
	n := enroll(t, b, "node1")
	s, _ := attestForEAR(t, n)
	assert.Empty(t, s.EAR, "no key, no EAR; the attestation itself succeeds")
	r, err := b.Node.JWKS(context.Background(), &apiv1.JWKSRequest{})
	require.NoError(t, err)
	assert.JSONEq(t, `{"keys":[]}`, r.GetJwks())
	b.Server.Close()

	kid, err := broker.IssueEARKey(dir)
	require.NoError(t, err)
	fi, err := os.Stat(filepath.Join(dir, broker.EARKeyFile))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	before, err := os.ReadFile(filepath.Join(dir, broker.EARKeyFile))
	require.NoError(t, err)
	_, err = broker.IssueEARKey(dir)
	require.ErrorContains(t, err, "exists")
	after, err := os.ReadFile(filepath.Join(dir, broker.EARKeyFile))
	require.NoError(t, err)
	assert.Equal(t, before, after, "a second issue-ear-key never replaces the key")

	buf.Reset()
	b = brokertest.Serve(t, dir, slog.New(slog.NewTextHandler(&buf, nil)))
	assert.NotContains(t, buf.String(), "no attestation-result (EAR) signing key")
	n.b = b
	s, _ = attestForEAR(t, n)
	keys := brokerJWKS(t, b)
	require.Len(t, keys.Keys, 1)
	assert.Equal(t, kid, keys.Keys[0].KeyID)
	_, err = ear.Verify(s.EAR, keys, time.Now())
	require.NoError(t, err)

	_, err = broker.IssueEARKey(filepath.Join(root, "nothing"))
	require.Error(t, err)
}
