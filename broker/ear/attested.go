package ear

import (
	"encoding/json"
	"fmt"
)

// What the broker puts in its EARs, beyond the draft's claims. It is
// documented here, permanently, as the draft asks of a verifier's submodule
// labels and extensions.
const (
	// Developer and the build prefix of the broker's ear_verifier_id.
	Developer = "attested"
	// SubmodNode labels the one appraisal of an attested node: the
	// platform its TPM measured. The node's name is its "node" verifier
	// claim.
	SubmodNode = "attested-node"
	// AppraisalProfile is the eat_profile of that appraisal: it names the
	// schema of its ear_verifier_claims (NodeClaims) and
	// ear_attester_claims (PlatformClaims). A tag URI (RFC 4151), as
	// Veraison's own profile is.
	AppraisalProfile = "tag:github.com,2026:attested-dev/attested/ear#1"
)

// NodeClaims are the broker's own claims about a node (the appraisal's
// ear_verifier_claims, "claims with verifier authority"): who the node is
// to the broker and what each of the broker's policies concluded.
type NodeClaims struct {
	// Broker is the id of the broker that appraised the evidence (its
	// annotations' broker id).
	Broker string `json:"broker"`
	Node   string `json:"node"`
	// EKFingerprint is the SHA-256 of the node's endorsement key (its
	// identity at the broker), "SHA256:" and hex.
	EKFingerprint string `json:"ek_fingerprint"`
	// EKIssuer names the TPM manufacturer CA that issued the node's EK
	// certificate, when one was verified at enrollment.
	EKIssuer string `json:"ek_issuer,omitempty"`
	// Tags are the node's asset tags at the broker.
	Tags map[string]string `json:"tags,omitempty"`
	// CertifiedTags are the tags the node's TPM certified with its AK in
	// this evidence; present only when they are exactly Tags.
	CertifiedTags map[string]string `json:"certified_tags,omitempty"`
	// Policies holds every policy's verdict on this evidence, by name.
	Policies map[string]PolicyResult `json:"policies,omitempty"`
}

// PolicyResult is one policy's verdict on the evidence.
type PolicyResult struct {
	// ID is the policy's entry in ear_appraisal_policy_ids.
	ID       string `json:"id"`
	Revision uint32 `json:"revision"`
	Allowed  bool   `json:"allowed"`
	// Failed names the clauses that failed ("pcr 4", "secureBoot", "tag
	// region", ...); 'attested node attest --explain' on the node says
	// why.
	Failed []string `json:"failed,omitempty"`
	// Error says why the policy could not be evaluated.
	Error string `json:"error,omitempty"`
}

// PlatformClaims are what the node's verified evidence showed (the
// appraisal's ear_attester_claims, "claims with attester authority").
type PlatformClaims struct {
	// PCRs are the SHA-256 bank values the TPM quoted, by index, in hex.
	PCRs map[string]string `json:"pcrs_sha256"`
	// SecureBoot is absent when the firmware event log did not establish
	// it.
	SecureBoot *bool `json:"secure_boot,omitempty"`
}

// NodeClaims decodes the broker's claims from an appraisal it issued.
func (a Appraisal) NodeClaims() (*NodeClaims, error) {
	if a.Profile != AppraisalProfile {
		return nil, fmt.Errorf("ear: appraisal has eat_profile %q, not %s: not issued by an attested broker", a.Profile, AppraisalProfile)
	}
	var c NodeClaims
	if err := json.Unmarshal(a.VerifierClaims, &c); err != nil {
		return nil, fmt.Errorf("ear: %s: %w", ClaimVerifierClaims, err)
	}
	return &c, nil
}

// PlatformClaims decodes the evidence claims from an appraisal the broker
// issued.
func (a Appraisal) PlatformClaims() (*PlatformClaims, error) {
	if a.Profile != AppraisalProfile {
		return nil, fmt.Errorf("ear: appraisal has eat_profile %q, not %s: not issued by an attested broker", a.Profile, AppraisalProfile)
	}
	var c PlatformClaims
	if err := json.Unmarshal(a.AttesterClaims, &c); err != nil {
		return nil, fmt.Errorf("ear: %s: %w", ClaimAttesterClaims, err)
	}
	return &c, nil
}
