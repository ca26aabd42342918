package broker_test

import (
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	nodeattest "github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/attest/binding"
	"github.com/attested-dev/attested/attest/eventlogtest"
	"github.com/attested-dev/attested/attest/simtpm"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/enrolltest"
	"github.com/attested-dev/attested/broker/suite"
)

// bootNode reboots the simulator (PCRs clear), measures the firmware
// events and IMA files into it as firmware and kernel would, writes the
// logs, and enrolls a node that sends them.
type boot struct {
	firmware []eventlogtest.Event
	ima      []eventlogtest.IMAFile
	// logOnly are events written to the log but never extended (a lying
	// log); extendOnly are extended but left out of the log.
	logOnly, extendOnly []eventlogtest.Event
}

var (
	sbCert  = eventlogtest.Cert("Test Secure Boot CA")
	shim    = sha256.Sum256([]byte("shimx64.efi"))
	grub    = sha256.Sum256([]byte("grubx64.efi"))
	rootkit = sha256.Sum256([]byte("bootkit.efi"))
	bash    = sha256.Sum256([]byte("/usr/bin/bash v5.2"))
	evil    = sha256.Sum256([]byte("/usr/local/bin/miner"))
)

func goodBoot() boot {
	fw := append(eventlogtest.SecureBoot(true, sbCert),
		eventlogtest.BootApp(shim[:]), eventlogtest.BootApp(grub[:]),
		eventlogtest.KernelCmdline("root=/dev/sda1 ro ima_appraise=enforce"))
	return boot{firmware: fw, ima: []eventlogtest.IMAFile{{Path: "/usr/bin/bash", Digest: bash[:]}, {Path: "/tmp/x", Digest: evil[:]}}}
}

func (bt boot) apply(t *testing.T, b *brokertest.Broker) *node {
	t.Helper()
	logs := bt.measure(t)
	n := enroll(t, b, "node1")
	n.logs = logs
	return n
}

// measure reboots the simulator, extends the boot's events into it and
// writes its logs.
func (bt boot) measure(t *testing.T) nodeattest.Logs {
	t.Helper()
	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	require.NoError(t, sim.Reset())
	imaLog, imaEvents := eventlogtest.IMA(bt.ima)
	require.NoError(t, eventlogtest.Extend(sim, append(append(slicesClone(bt.firmware), bt.extendOnly...), imaEvents...)))
	dir := t.TempDir()
	fw := filepath.Join(dir, "binary_bios_measurements")
	require.NoError(t, os.WriteFile(fw, eventlogtest.Firmware(append(slicesClone(bt.firmware), bt.logOnly...)), 0o600))
	ima := filepath.Join(dir, "binary_runtime_measurements")
	require.NoError(t, os.WriteFile(ima, imaLog, 0o600))
	return nodeattest.Logs{Firmware: fw, IMA: ima}
}

func slicesClone(e []eventlogtest.Event) []eventlogtest.Event {
	return append([]eventlogtest.Event{}, e...)
}

const strictPolicy = `name: prod-eu
secureBoot: required
bootApplications: ["%s", "%s"]
kernelCmdline:
  require: ["ima_appraise=enforce"]
  forbid: ["init=/bin/sh"]
ima:
  allow:
    /usr/bin/bash: ["%s"]
  exclude: ["/tmp/"]
tags:
  region: [EU]
expression: 'secureBoot && "region" in tags'
maxSessionAge: 10m
`

func strict(t *testing.T, b *brokertest.Broker) []byte {
	t.Helper()
	ctx := context.Background()
	_, err := b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: fmt.Sprintf(strictPolicy,
		hex.EncodeToString(shim[:]), hex.EncodeToString(grub[:]), hex.EncodeToString(bash[:]))})
	require.NoError(t, err)
	_, err = b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "app", Policy: "prod-eu"})
	require.NoError(t, err)
	return wrap(t, b, "app", []byte("layer key"))
}

func tagEU(t *testing.T, b *brokertest.Broker) {
	_, err := b.Admin.TagNode(context.Background(), &apiv1.TagNodeRequest{Name: "node1", Set: map[string]string{"region": "EU"}})
	require.NoError(t, err)
}

// releaseOrRefusal attests with the node's logs and asks for the key.
func releaseOrRefusal(t *testing.T, n *node, ann []byte) error {
	t.Helper()
	s, err := n.session(t)
	if err != nil {
		return err
	}
	_, err = unwrap(n, s, ann)
	return err
}

func TestMeasuredBootPolicyReleases(t *testing.T) {
	b := brokertest.Start(t)
	n := goodBoot().apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	require.NoError(t, releaseOrRefusal(t, n, ann))

	s, err := n.session(t)
	require.NoError(t, err)
	ex := explain(t, b, s)
	facts := strings.Join(ex.GetFacts(), "\n")
	assert.Contains(t, facts, "Secure Boot: enabled")
	assert.Contains(t, facts, `Secure Boot authority: "CN=Test Secure Boot CA"`)
	assert.Contains(t, facts, `kernel command line: "root=/dev/sda1 ro ima_appraise=enforce"`)
	assert.Contains(t, facts, "IMA log: 2 measurements replay to PCR 10")
	require.Len(t, ex.GetKeys(), 1)
	assert.True(t, ex.GetKeys()[0].GetAllowed())
	var names []string
	for _, c := range ex.GetKeys()[0].GetClauses() {
		assert.True(t, c.GetOk(), c.GetDetail())
		names = append(names, c.GetName())
	}
	assert.Equal(t, []string{"secureBoot", "bootApplications", "kernelCmdline", "ima", "tag region", "expression", "maxSessionAge"}, names)
}

func TestSecureBootOffIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	bt.firmware = append(eventlogtest.SecureBoot(false, sbCert), bt.firmware[len(eventlogtest.SecureBoot(true, sbCert)):]...)
	n := bt.apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "Secure Boot is disabled; policy prod-eu requires it")
}

func TestFirmwareLogThatDoesNotReplayIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	// The log hides the bootkit the firmware really measured.
	bt.extendOnly = []eventlogtest.Event{eventlogtest.BootApp(rootkit[:])}
	n := bt.apply(t, b)
	strict(t, b)
	_, err := n.session(t)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "firmware event log does not replay to the quoted value of PCR 4")
}

func TestBootApplicationNotAllowedIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	bt.firmware = append(bt.firmware, eventlogtest.BootApp(rootkit[:]))
	n := bt.apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err)
	assert.Regexp(t, `PCR 4: event \d+ EV_EFI_BOOT_SERVICES_APPLICATION digest [0-9a-f]{16}\.\. is not an allowed boot application of policy prod-eu`, err.Error())
}

func TestForbiddenKernelCmdlineIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	bt.firmware[len(bt.firmware)-1] = eventlogtest.KernelCmdline("root=/dev/sda1 ima_appraise=enforce init=/bin/sh")
	n := bt.apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `contains "init=/bin/sh" forbidden by policy prod-eu`)
}

func TestIMAFileNotInAllowListIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	bt.ima = append(bt.ima, eventlogtest.IMAFile{Path: "/usr/local/bin/miner", Digest: evil[:]})
	n := bt.apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `IMA: "/usr/local/bin/miner" ("sha256:`+hex.EncodeToString(evil[:])[:16]+`..") is not in the allow-list of policy prod-eu`)
}

func TestIMALogThatDoesNotReplayIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	n := bt.apply(t, b)
	strict(t, b)
	// Rewrite the IMA log so it hides a measurement that was extended.
	log, _ := eventlogtest.IMA(bt.ima[:1])
	require.NoError(t, os.WriteFile(n.logs.IMA, log, 0o600))
	_, err := n.session(t)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "IMA log does not replay to the quoted value of PCR 10")
}

func TestTagMismatchIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	n := goodBoot().apply(t, b)
	ann := strict(t, b)
	_, err := b.Admin.TagNode(context.Background(), &apiv1.TagNodeRequest{Name: "node1", Set: map[string]string{"region": "US"}})
	require.NoError(t, err)
	err = releaseOrRefusal(t, n, ann)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "tag region=US of node node1 is not accepted by policy prod-eu (want one of EU)")
	evs, err := b.Admin.ListAudit(context.Background(), &apiv1.ListAuditRequest{Kind: "tag"})
	require.NoError(t, err)
	assert.Contains(t, evs.GetEvents()[0].GetReason(), "tags version 1: (none) -> region=US")
}

// TestNonRestrictedKeyCannotBecomeAK: a non-restricted signing key can sign
// any digest with TPM2_Sign, so it could forge a quote. Enrollment must
// refuse it as an AK.
func TestNonRestrictedKeyCannotBecomeAK(t *testing.T) {
	b := brokertest.Start(t)
	k := nonRestrictedKey(t)
	pub, cdata, att, sig := k.public, k.createData, k.createAttestation, k.createSignature
	tpm := openTPM(t)
	ek, err := tpm.EK()
	tpm.Close()
	require.NoError(t, err)
	ekDER, err := x509.MarshalPKIXPublicKey(ek)
	require.NoError(t, err)
	tok, err := b.Admin.CreateJoinToken(context.Background(), &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	area, err := enrolltest.RSAPublicArea(ek.(*rsa.PublicKey))
	require.NoError(t, err)
	_, err = b.Node.EnrollStart(context.Background(), &apiv1.EnrollStartRequest{Name: "forger", EkPublic: ekDER, EkPublicArea: area, JoinToken: tok.GetToken(),
		Ak: &apiv1.AKParameters{Public: pub, CreateData: cdata, CreateAttestation: att, CreateSignature: sig}})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "attestation key refused: provided key is not limited to attestation")
}

type failActivation struct{ apiv1.BrokerClient }

func (f failActivation) EnrollFinish(ctx context.Context, in *apiv1.EnrollFinishRequest, opts ...grpc.CallOption) (*apiv1.EnrollFinishResponse, error) {
	in.ActivatedSecret = make([]byte, len(in.ActivatedSecret)) // not what the TPM decrypted
	return f.BrokerClient.EnrollFinish(ctx, in, opts...)
}

func TestAKWithoutCredentialActivationIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	_, err := enrollWith(t, b, failActivation{b.Node})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "credential activation failed: the attestation key is not in the same TPM as the EK")
	nodes, err := b.Admin.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
	require.NoError(t, err)
	assert.Empty(t, nodes.GetNodes(), "nothing enrolled")
}

// TestReenrollingANameWithAnotherEKIsRefused: a name belongs to one TPM;
// another TPM (here one in software) is refused once credential activation
// proved it holds its EK, and its join token is not spent.
func TestReenrollingANameWithAnotherEKIsRefused(t *testing.T) {
	b := brokertest.Start(t, func(c *broker.Config) { c.RequireEKCertificate = false })
	enroll(t, b, "node1")
	other, err := enrolltest.NewRSA(2048)
	require.NoError(t, err)
	tok, err := b.Admin.CreateJoinToken(context.Background(), &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	_, err = other.Enroll(context.Background(), b.Node, "node1", tok.GetToken())
	require.Error(t, err)
	assert.Equal(t, codes.AlreadyExists, status.Code(err))
	assert.Contains(t, err.Error(), `node name "node1" is enrolled with another TPM`)
	n, err := other.Enroll(context.Background(), b.Node, "node2", tok.GetToken())
	require.NoError(t, err, "the refused enrollment did not spend the token")
	assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
}

func TestLearnPolicyDraftsFromEvidence(t *testing.T) {
	b := brokertest.Start(t)
	n := goodBoot().apply(t, b)
	tagEU(t, b)
	_, err := n.session(t)
	require.NoError(t, err)
	r, err := b.Admin.LearnPolicy(context.Background(), &apiv1.LearnPolicyRequest{Node: "node1", Name: "learned"})
	require.NoError(t, err)
	y := r.GetYaml()
	assert.Contains(t, y, "secureBoot: required")
	assert.Contains(t, y, hex.EncodeToString(shim[:]))
	assert.Contains(t, y, "region:")
	_, err = b.Admin.ApplyPolicy(context.Background(), &apiv1.ApplyPolicyRequest{Yaml: y})
	require.NoError(t, err, "a drafted policy applies as is")
	_, err = b.Admin.CreateKey(context.Background(), &apiv1.CreateKeyRequest{Name: "k", Policy: "learned"})
	require.NoError(t, err)
	require.NoError(t, releaseOrRefusal(t, n, wrap(t, b, "k", []byte("x"))), "the node it was learned from passes it")
}

const certifiedPolicy = `name: eu-certified
tags:
  region: [EU]
certifiedTags: true
`

func certifiedSetup(t *testing.T) (*brokertest.Broker, *node, []byte) {
	b := brokertest.Start(t)
	n := enroll(t, b, "node1")
	tagEU(t, b)
	_, err := b.Admin.ApplyPolicy(context.Background(), &apiv1.ApplyPolicyRequest{Yaml: certifiedPolicy})
	require.NoError(t, err)
	_, err = b.Admin.CreateKey(context.Background(), &apiv1.CreateKeyRequest{Name: "eu", Policy: "eu-certified"})
	require.NoError(t, err)
	return b, n, wrap(t, b, "eu", []byte("k"))
}

// explain asks the broker to explain a session and opens its sealed answer.
func explain(t *testing.T, b *brokertest.Broker, s *nodeattest.Session) *apiv1.Explanation {
	t.Helper()
	r, err := b.Node.Explain(context.Background(), &apiv1.ExplainRequest{SessionToken: s.Token})
	require.NoError(t, err)
	tpm := openTPM(t)
	defer tpm.Close()
	ex, err := s.OpenExplanation(tpm, r)
	require.NoError(t, err)
	return ex
}

func writeTags(t *testing.T, digest []byte) {
	tpm := openTPM(t)
	defer tpm.Close()
	require.NoError(t, tpm.WriteTags(digest))
}

func TestTPMCertifiedTagsRelease(t *testing.T) {
	b, n, ann := certifiedSetup(t)
	s, err := n.session(t)
	require.NoError(t, err)
	sealed, err := b.Node.NodeTags(context.Background(), &apiv1.NodeTagsRequest{SessionToken: s.Token})
	require.NoError(t, err)
	tpm := openTPM(t)
	r, err := s.OpenTags(tpm, sealed)
	tpm.Close()
	require.NoError(t, err)
	writeTags(t, r.GetDigest())
	require.NoError(t, releaseOrRefusal(t, n, ann))
}

func TestForgedNVTagIsRefused(t *testing.T) {
	_, n, ann := certifiedSetup(t)
	// The TPM holds the digest of other tags than the broker's (a node
	// claiming EU while provisioned as US, or a stale provisioning).
	writeTags(t, binding.TagDigest("node1", map[string]string{"region": "US"}))
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "tags certified by node node1's TPM")
	assert.Contains(t, err.Error(), "are not its tags at the broker")
}

func TestTagsWithoutCertificationAreRefusedWhenRequired(t *testing.T) {
	_, n, ann := certifiedSetup(t)
	tpm := openTPM(t)
	require.NoError(t, tpm.RemoveTags())
	tpm.Close()
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "requires TPM-certified tags, but node node1 certified none")
}

// forgeTagSignature flips a bit of the tag certification's signature, as
// a node that forged the certification with another key would present.
type forgeTagSignature struct{ apiv1.BrokerClient }

func (f forgeTagSignature) Attest(ctx context.Context, in *apiv1.AttestRequest, opts ...grpc.CallOption) (*apiv1.AttestResponse, error) {
	sig := append([]byte{}, in.TagCertifySignature...)
	sig[len(sig)-1] ^= 1
	in.TagCertifySignature = sig
	return f.BrokerClient.Attest(ctx, in, opts...)
}

func TestTagCertificationNotByTheAKIsRefused(t *testing.T) {
	b, n, _ := certifiedSetup(t)
	writeTags(t, binding.TagDigest("node1", map[string]string{"region": "EU"}))
	tpm := openTPM(t)
	defer tpm.Close()
	_, err := nodeattest.NewSession(context.Background(), forgeTagSignature{b.Node}, tpm, n.state, n.logs)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "tag certification is not signed by this node's enrolled AK")
}

// TestLogLeavingOutAPCRIsRefused: a log with no PCR 4 events would replay
// (go-attestation skips PCRs without events) and hide the boot
// applications the firmware measured.
func TestLogLeavingOutAPCRIsRefused(t *testing.T) {
	b := brokertest.Start(t)
	bt := boot{firmware: eventlogtest.SecureBoot(true, sbCert), extendOnly: []eventlogtest.Event{eventlogtest.BootApp(rootkit[:])}}
	n := bt.apply(t, b)
	_, err := n.session(t)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "firmware event log has no events for PCR 4, but the TPM measured into it")
}

// TestIMALogWithoutMeasurementsIsNoIMA: an IMA log while PCR 10 was never
// extended (IMA not running) yields no IMA facts, so an allow-list fails.
func TestIMALogWithoutMeasurementsIsNoIMA(t *testing.T) {
	b := brokertest.Start(t)
	bt := goodBoot()
	bt.ima = nil
	n := bt.apply(t, b)
	ann := strict(t, b)
	tagEU(t, b)
	forged, _ := eventlogtest.IMA([]eventlogtest.IMAFile{{Path: "/usr/bin/bash", Digest: bash[:]}})
	require.NoError(t, os.WriteFile(n.logs.IMA, forged, 0o600))
	err := releaseOrRefusal(t, n, ann)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "policy prod-eu has an IMA allow-list, but no IMA measurement replayed")
}

// TestUnauthenticatedRefusalsDoNotTouchTheNode: evidence that does not
// verify says nothing about the node it names.
func TestUnauthenticatedRefusalsDoNotTouchTheNode(t *testing.T) {
	b, n, _, _ := setup(t)
	_, err := n.session(t)
	require.NoError(t, err)
	_, err = b.Node.Attest(context.Background(), &apiv1.AttestRequest{Node: "node1", Nonce: []byte("made up")})
	require.Error(t, err)
	nodes, err := b.Admin.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
	require.NoError(t, err)
	assert.Equal(t, "trusted", nodes.GetNodes()[0].GetTrust())
	_, err = b.Node.Attest(context.Background(), &apiv1.AttestRequest{Node: strings.Repeat("x", 1<<10)})
	assert.ErrorContains(t, err, "must be 1-63 letters")
}

// signingKey is a non-restricted signing key of the node's own TPM: it can
// sign any digest with TPM2_Sign, which is exactly what an AK must not do.
type signingKey struct {
	handle                                                 tpmutil.Handle
	public, createData, createAttestation, createSignature []byte
}

func nonRestrictedKey(t *testing.T) signingKey {
	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	tmpl := legacy.Public{
		Type: legacy.AlgECC, NameAlg: legacy.AlgSHA256,
		Attributes:    legacy.FlagSign | legacy.FlagFixedTPM | legacy.FlagFixedParent | legacy.FlagSensitiveDataOrigin | legacy.FlagUserWithAuth,
		ECCParameters: &legacy.ECCParams{Sign: &legacy.SigScheme{Alg: legacy.AlgECDSA, Hash: legacy.AlgSHA256}, CurveID: legacy.CurveNISTP256},
	}
	srkTmpl := legacy.Public{
		Type: legacy.AlgECC, NameAlg: legacy.AlgSHA256,
		Attributes:    legacy.FlagFixedTPM | legacy.FlagFixedParent | legacy.FlagSensitiveDataOrigin | legacy.FlagUserWithAuth | legacy.FlagRestricted | legacy.FlagDecrypt | legacy.FlagNoDA,
		ECCParameters: &legacy.ECCParams{Symmetric: &legacy.SymScheme{Alg: legacy.AlgAES, KeyBits: 128, Mode: legacy.AlgCFB}, CurveID: legacy.CurveNISTP256},
	}
	srk, _, err := legacy.CreatePrimary(sim, legacy.HandleOwner, legacy.PCRSelection{}, "", "", srkTmpl)
	require.NoError(t, err)
	t.Cleanup(func() { legacy.FlushContext(sim, srk) })
	priv, pub, cdata, chash, ticket, err := legacy.CreateKey(sim, srk, legacy.PCRSelection{}, "", "", tmpl)
	require.NoError(t, err)
	h, _, err := legacy.Load(sim, srk, "", pub, priv)
	require.NoError(t, err)
	t.Cleanup(func() { legacy.FlushContext(sim, h) })
	att, sig, err := legacy.CertifyCreation(sim, "", h, h, nil, chash, legacy.SigScheme{Alg: legacy.AlgECDSA, Hash: legacy.AlgSHA256}, ticket)
	require.NoError(t, err)
	return signingKey{handle: h, public: pub, createData: cdata, createAttestation: att, createSignature: sig}
}

// TestQuoteForgedWithTPM2SignIsRefused: the TPM2_Sign forgery. A key of
// the same TPM that is not restricted signs a TPMS_ATTEST the attacker
// wrote, claiming the PCR values the policy wants; it is not the enrolled
// AK, so the quote is refused.
func TestQuoteForgedWithTPM2SignIsRefused(t *testing.T) {
	b, n, _, _ := setup(t)
	k := nonRestrictedKey(t)
	sim, err := simtpm.Simulator()
	require.NoError(t, err)
	ctx := context.Background()
	ch, err := b.Node.Challenge(ctx, &apiv1.ChallengeRequest{Node: "node1"})
	require.NoError(t, err)
	st, err := suite.Lookup(suite.SessionName)
	require.NoError(t, err)
	_, sessPub, err := st.GenerateKey()
	require.NoError(t, err)
	pcrs := make([][]byte, 24)
	digest := sha256.New()
	for i := range pcrs {
		pcrs[i] = make([]byte, 32) // what a "clean" boot would show
		digest.Write(pcrs[i])
	}
	sel := legacy.PCRSelection{Hash: legacy.AlgSHA256}
	for i := 0; i < 24; i++ {
		sel.PCRs = append(sel.PCRs, i)
	}
	signer := tpmutil.Handle(k.handle)
	forged, err := legacy.AttestationData{
		Magic: 0xff544347, Type: legacy.TagAttestQuote, QualifiedSigner: legacy.Name{Handle: &signer},
		ExtraData:         binding.QualifyingData(ch.GetNonce(), sessPub, n.state.Name),
		AttestedQuoteInfo: &legacy.QuoteInfo{PCRSelection: sel, PCRDigest: digest.Sum(nil)},
	}.Encode()
	require.NoError(t, err)
	h := sha256.Sum256(forged)
	sig, err := legacy.Sign(sim, k.handle, "", h[:], nil, &legacy.SigScheme{Alg: legacy.AlgECDSA, Hash: legacy.AlgSHA256})
	require.NoError(t, err)
	sigBytes, err := sig.Encode()
	require.NoError(t, err)
	req := &apiv1.AttestRequest{Node: "node1", Nonce: ch.GetNonce(), SessionPublicKey: sessPub, SessionSuite: suite.SessionName, Quote: forged, Signature: sigBytes}
	for i, p := range pcrs {
		req.Pcrs = append(req.Pcrs, &apiv1.PCR{Index: uint32(i), Digest: p})
	}
	_, err = b.Node.Attest(ctx, req)
	assertUnverified(t, b, err, "node1", "quote refused: not signed by this node's enrolled AK over this nonce, session key and PCR values: the signature does not verify with the enrolled AK")
}

func TestFailedActivationDoesNotSpendTheJoinToken(t *testing.T) {
	b := brokertest.Start(t)
	tok, err := b.Admin.CreateJoinToken(context.Background(), &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	tpm := openTPM(t)
	defer tpm.Close()
	_, _, err = nodeattest.Enroll(context.Background(), failActivation{b.Node}, tpm, nodeattest.EnrollOptions{Name: "node1", JoinToken: tok.GetToken()})
	require.Error(t, err)
	_, n, err := nodeattest.Enroll(context.Background(), b.Node, tpm, nodeattest.EnrollOptions{Name: "node1", JoinToken: tok.GetToken()})
	require.NoError(t, err, "the token survives a failed activation")
	assert.Equal(t, apiv1.NodeState_NODE_STATE_ACTIVE, n.GetState())
	_, _, err = nodeattest.Enroll(context.Background(), b.Node, tpm, nodeattest.EnrollOptions{Name: "node2", JoinToken: tok.GetToken()})
	require.Error(t, err)
}
