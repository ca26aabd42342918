package broker

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/attested-dev/attested/attest/binding"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/ear"
	"github.com/attested-dev/attested/broker/fsperm"
	"github.com/attested-dev/attested/broker/policy"
	"github.com/attested-dev/attested/broker/store"
)

// EARKeyFile is the private key that signs attestation results (EAR): an
// ECDSA P-256 key of its own, not the TLS or wrapping-key signer key, so a
// relying party that trusts EARs trusts nothing else of the broker's.
const EARKeyFile = "ear-key.pem"

// earIssuer signs the broker's attestation results.
type earIssuer struct {
	signer *ear.Signer
	jwks   string
	issued *prometheus.CounterVec
}

// newEARKey is the EAR signing key of a new broker, PEM-encoded.
func newEARKey() ([]byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return ecKeyPEM(k)
}

// loadEAR loads the EAR signing key at start. A broker initialised before
// EARs has none: it issues no EAR and says so once, here.
func (s *Server) loadEAR(dataDir string) error {
	path := filepath.Join(dataDir, EARKeyFile)
	if !exists(path) {
		s.log.Warn("this broker has no attestation-result (EAR) signing key ("+EARKeyFile+"; it was initialised before EARs): attestations succeed but return no EAR, and the JWKS is empty. "+
			"Create the key with 'attested broker issue-ear-key --data-dir DATA-DIR' (copy it to every replica of this broker) and restart serve.", "dataDir", dataDir)
		return nil
	}
	key, err := readECKey(path)
	if err != nil {
		return fmt.Errorf("broker: EAR signing key: %w", err)
	}
	signer, err := ear.NewSigner(key)
	if err != nil {
		return fmt.Errorf("broker: EAR signing key %q: %w", path, err)
	}
	jwks, err := signer.JWKS()
	if err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	issued := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "attested_broker_attestation_results_total",
		Help: "Attestation results (EAR) issued, by their ear_status.",
	}, []string{"status"})
	for _, t := range []ear.Tier{ear.TierAffirming, ear.TierWarning, ear.TierContraindicated, ear.TierNone} {
		issued.WithLabelValues(t.String())
	}
	if err := s.Metrics().Register(issued); err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	s.ear = &earIssuer{signer: signer, jwks: string(jwks), issued: issued}
	s.log.Info("attestation results (EAR) are signed", "kid", signer.KeyID(), "alg", ear.Algorithm)
	return nil
}

// IssueEARKey gives a broker initialised before attestation results its
// EAR signing key: created exclusively, 0600, never over an existing one.
// Serve reads it at start. Replicas of one broker need the same key (copy
// the file): a relying party verifies any replica's EAR with the JWKS it
// fetched from any of them.
func IssueEARKey(dataDir string) (kid string, err error) {
	if err := CheckDataDir(dataDir); err != nil {
		return "", err
	}
	if _, err := LoadConfig(dataDir); err != nil {
		return "", err
	}
	path := filepath.Join(dataDir, EARKeyFile)
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("broker: issue EAR key: %q exists; this broker has its key (remove it first to replace it: relying parties must then fetch the JWKS again)", path)
	}
	pemKey, err := newEARKey()
	if err != nil {
		return "", fmt.Errorf("broker: issue EAR key: %w", err)
	}
	if err := createExclusive(path, pemKey, 0o600); err != nil {
		return "", fmt.Errorf("broker: issue EAR key: %w", err)
	}
	if err := syncDir(dataDir); err != nil {
		return "", fmt.Errorf("broker: issue EAR key: %w", err)
	}
	if err := fsperm.Stat(path, fsperm.Private); err != nil {
		return "", fmt.Errorf("broker: issue EAR key: %w", err)
	}
	k, err := readECKey(path)
	if err != nil {
		return "", err
	}
	return ear.KeyID(&k.PublicKey)
}

// JWKS implements apiv1.BrokerServer: the public keys that verify this
// broker's attestation results, as a JWK Set. It is public, like the
// wrapping keys; relying parties fetch it over the TLS channel pinned to
// the broker CA, which is what makes these keys the broker's.
func (s *Server) JWKS(context.Context, *apiv1.JWKSRequest) (*apiv1.JWKSResponse, error) {
	if s.ear == nil {
		return &apiv1.JWKSResponse{Jwks: `{"keys":[]}`}, nil
	}
	return &apiv1.JWKSResponse{Jwks: s.ear.jwks}, nil
}

// JWKSPath is where an HTTPS listener of the broker (the dashboard's)
// publishes the JWK Set, for relying parties that fetch a jwks_uri.
const JWKSPath = "/.well-known/jwks.json"

// JWKSHandler serves the JWK Set over HTTP (mount it at JWKSPath on a TLS
// listener whose certificate chains to the broker CA): the same document
// as the JWKS call, public, cacheable for a few minutes.
func (s *Server) JWKSHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "the JWK Set is read with GET", http.StatusMethodNotAllowed)
			return
		}
		resp, _ := s.JWKS(r.Context(), nil)
		w.Header().Set("Content-Type", "application/jwk-set+json")
		w.Header().Set("Cache-Control", "public, max-age=300")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		io.WriteString(w, resp.GetJwks())
	})
}

// earInput is what an accepted attestation established.
type earInput struct {
	node     store.Node
	rec      claimsRecord // facts (with the IMA list) and IMA verdicts
	pcrs     map[int][]byte
	nonce    []byte
	issued   time.Time
	expires  time.Time // the session's expiry: the EAR holds no longer
	evaluate []policyVerdict
}

// policyVerdict is one stored policy evaluated against the evidence.
type policyVerdict struct {
	name     string
	revision uint32
	res      policy.Result
	err      error
}

// attestationResult signs the EAR of an accepted attestation, or returns
// "" when the broker has no EAR key or the EAR could not be made: the
// attestation stands either way (the EAR reports it; it decides nothing).
func (s *Server) attestationResult(in earInput) string {
	if s.ear == nil {
		return ""
	}
	r := s.earClaims(in)
	tok, err := s.ear.signer.Sign(r)
	if err != nil {
		s.log.Error("attestation result not issued", "node", in.node.Name, "err", err)
		return ""
	}
	s.ear.issued.WithLabelValues(r.Status.String()).Inc()
	return tok
}

// evaluatePolicies evaluates every stored policy against the evidence, as
// a release would, for the node's status and its EAR: nothing is released
// or recorded. The IMA clauses use the verdicts already taken
// (imaVerdicts), not the list.
func (s *Server) evaluatePolicies(ctx context.Context, node store.Node, pcrs map[int][]byte, rec claimsRecord) ([]policyVerdict, error) {
	recs, err := s.store.ListPolicies(ctx)
	if err != nil {
		return nil, err
	}
	facts := rec.Facts
	facts.IMA = nil
	claims := policy.Claims{Node: node.Name, PCRs: pcrs, Facts: facts, Tags: node.Tags, IMAVerdicts: rec.IMAVerdicts}
	out := make([]policyVerdict, 0, len(recs))
	for _, rec := range recs {
		v := policyVerdict{name: rec.Name, revision: rec.Revision}
		p, err := s.policyAt(rec)
		if err != nil {
			v.err = err
		} else {
			v.res = p.Evaluate(claims)
		}
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b policyVerdict) int { return strings.Compare(a.name, b.name) })
	return out, nil
}

// policyAt parses a stored policy revision, through the cache that
// releases use.
func (s *Server) policyAt(rec store.Policy) (*policy.Policy, error) {
	s.mu.Lock()
	c, ok := s.policies[rec.Name]
	s.mu.Unlock()
	if ok && c.revision == rec.Revision {
		return c.p, nil
	}
	p, err := policy.Parse([]byte(rec.YAML))
	if err != nil {
		return nil, fmt.Errorf("stored policy %s no longer parses: %v", rec.Name, err)
	}
	s.mu.Lock()
	if cur, ok := s.policies[rec.Name]; !ok || cur.revision < rec.Revision {
		s.policies[rec.Name] = cachedPolicy{revision: rec.Revision, p: p}
	}
	s.mu.Unlock()
	return p, nil
}

// policyID names a policy revision in ear_appraisal_policy_ids.
func (s *Server) policyID(name string, revision uint32) string {
	return fmt.Sprintf("policy://%s/%s/%d", s.cfg.ID, name, revision)
}

// Which AR4SI category a policy clause speaks for. Tags are where a node
// may run, not how trustworthy it is: they count for a policy's verdict
// and ear_status, not for the vector; so do the expression (whose subject
// is anything) and maxSessionAge (an EAR is fresh when issued).
type category int

const (
	catNone category = iota
	catConfiguration
	catExecutables
	catFileSystem
	catSourcedData
)

// executablePCRs hold code measurements (TCG PC Client: 0 firmware, 2
// option ROM and UEFI driver code, 4 boot manager and applications; Linux:
// 9 kernel and initrd as GRUB loads them, 11 the unified kernel image, 13
// system extensions). PCR 10 is IMA's; the others configuration.
var executablePCRs = map[int]bool{0: true, 2: true, 4: true, 9: true, 11: true, 13: true}

func clauseCategory(name string) category {
	switch name {
	case "secureBoot", "kernelCmdline":
		return catConfiguration
	case "bootApplications":
		return catExecutables
	case "ima":
		return catFileSystem
	case "certifiedTags":
		return catSourcedData
	}
	if i, err := strconv.Atoi(strings.TrimPrefix(name, "pcr ")); err == nil && strings.HasPrefix(name, "pcr ") {
		switch {
		case i == 10:
			return catFileSystem
		case executablePCRs[i]:
			return catExecutables
		}
		return catConfiguration
	}
	return catNone
}

// earClaims maps what the broker established onto the EAR claims:
//
//   - instance-identity affirming: the quote verified with the enrolled,
//     credential-activated AK of an approved node (there is no EAR
//     otherwise);
//   - hardware genuine when the node's EK certificate chained to a
//     configured TPM manufacturer CA at enrollment; no claim otherwise (a
//     TPM admitted by join token or approval may be software);
//   - configuration, executables, file-system and sourced-data from the
//     policy clauses on them (PCRs, Secure Boot, kernel command line, boot
//     applications, IMA allow-list, TPM-certified tags): affirming when they
//     pass, contraindicated when one fails. When a policy accepts the
//     evidence, the accepting policies speak; when none does, all do;
//   - sourced-data also from the evidence: affirming when the TPM certified
//     exactly the broker's tags, a warning when it certified others (stale
//     or forged) and no policy relied on them;
//   - runtime-opaque and storage-opaque: no claim (a measured host does
//     not hide its workloads from its own OS).
//
// ear_status is affirming when a policy accepts the evidence (and the
// vector allows it), contraindicated when policies exist and none accepts,
// a warning when there is no policy: nothing appraised the platform.
func (s *Server) earClaims(in earInput) *ear.Result {
	n := in.node
	vec := ear.TrustVector{InstanceIdentity: ear.InstanceRecognized}
	if n.EKIssuer != "" {
		vec.Hardware = ear.HardwareGenuine
	}
	wantTags := binding.TagDigest(n.Name, n.Tags)
	certified := in.rec.Facts.CertifiedTagDigest
	switch {
	case certified == nil:
	case bytes.Equal(certified, wantTags):
		vec.SourcedData = ear.SourcesTrusted
	default:
		vec.SourcedData = ear.SourcesUntrusted
	}

	claims := ear.NodeClaims{Broker: s.cfg.ID, Node: n.Name, EKFingerprint: "SHA256:" + n.EKFingerprint, EKIssuer: n.EKIssuer,
		Tags: n.Tags, Policies: map[string]ear.PolicyResult{}}
	if vec.SourcedData == ear.SourcesTrusted && len(n.Tags) > 0 {
		claims.CertifiedTags = n.Tags
	}
	var ids []string
	accepting := 0
	for _, v := range in.evaluate {
		pr := ear.PolicyResult{ID: s.policyID(v.name, v.revision), Revision: v.revision, Allowed: v.err == nil && v.res.Allowed}
		if v.err != nil {
			pr.Error = v.err.Error()
		}
		for _, c := range v.res.Clauses {
			if !c.OK {
				pr.Failed = append(pr.Failed, c.Name)
			}
		}
		if pr.Allowed {
			accepting++
		}
		claims.Policies[v.name] = pr
		ids = append(ids, pr.ID)
	}
	for _, v := range in.evaluate {
		if v.err != nil || (accepting > 0 && !v.res.Allowed) {
			continue
		}
		for _, c := range v.res.Clauses {
			if c.Name == "ima" && v.res.Stale {
				continue // undecided: the policy changed meanwhile
			}
			var slot *ear.Claim
			affirm, contra := ear.ConfigApproved, ear.ConfigUnsupportable
			switch clauseCategory(c.Name) {
			case catConfiguration:
				slot = &vec.Configuration
			case catExecutables:
				slot, affirm, contra = &vec.Executables, ear.ExecutablesOK, ear.ExecutablesContra
			case catFileSystem:
				slot, affirm, contra = &vec.FileSystem, ear.FilesApproved, ear.FilesContraindicated
			case catSourcedData:
				slot, affirm, contra = &vec.SourcedData, ear.SourcesTrusted, ear.SourcesContraindicated
			default:
				continue
			}
			switch {
			case !c.OK:
				*slot = contra
			case slot.Tier() == ear.TierNone:
				*slot = affirm
			}
		}
	}

	st := vec.Worst()
	switch {
	case len(in.evaluate) == 0:
		st = max(st, ear.TierWarning)
	case accepting == 0:
		st = ear.TierContraindicated
	default:
		st = max(st, ear.TierAffirming)
	}
	platform := ear.PlatformClaims{PCRs: map[string]string{}, SecureBoot: in.rec.Facts.SecureBoot}
	for _, i := range slices.Sorted(maps.Keys(in.pcrs)) {
		platform.PCRs[strconv.Itoa(i)] = hex.EncodeToString(in.pcrs[i])
	}
	verifierClaims, _ := json.Marshal(claims)   // plain maps and strings: cannot fail
	attesterClaims, _ := json.Marshal(platform) // likewise
	return &ear.Result{
		Profile:    ear.Profile,
		IssuedAt:   in.issued.Unix(),
		Expires:    in.expires.Unix(),
		VerifierID: ear.VerifierID{Developer: ear.Developer, Build: ear.Developer + " " + Version},
		Status:     &st,
		Submods: map[string]ear.Appraisal{ear.SubmodNode: {
			Profile:        ear.AppraisalProfile,
			Status:         st,
			TrustVector:    &vec,
			PolicyIDs:      ids,
			Nonce:          ear.NonceOf(in.nonce),
			AttesterClaims: attesterClaims,
			VerifierClaims: verifierClaims,
		}},
	}
}
