// Package ear builds, signs, parses and verifies EAT Attestation Results
// (EAR, draft-ietf-rats-ear): the JWT an attestation verifier signs to say
// what it concluded about an attester, with the AR4SI trustworthiness
// vector (draft-ietf-rats-ar4si) and the verifier's own claims.
//
// The broker issues EARs in the claim names and profile of
// draft-ietf-rats-ear-04 ("ear_status", "ear_trustworthiness_vector",
// eat_profile "tag:ietf.org,2026:rats/ear#04"). Parse also reads the
// earlier spellings that Veraison and CoCo Trustee deployments still emit
// ("ear.status", "ear.trustworthiness-vector", eat_profile
// "tag:github.com,2023:veraison/ear"), and the draft's own examples,
// normalised to the current names, so one consumer reads both.
//
// This package holds no broker state: relying parties, tests and the CLI
// use it to verify an EAR against the broker's JWK Set.
package ear

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
)

// Profile is the eat_profile of the EARs this package issues:
// draft-ietf-rats-ear-04, section 3.
const Profile = "tag:ietf.org,2026:rats/ear#04"

// Profiles that Parse accepts besides Profile. The -03 profile has the
// current claim names; the legacy ones spell them with '.' and '-'
// ("ear.status") and carry one policy id as a string.
const (
	ProfileDraft03   = "tag:ietf.org,2026:rats/ear#03"
	ProfileDraft2507 = "tag:ietf.org,2025-07:ear"
	// ProfileVeraison is what github.com/veraison/ear (up to its
	// draft-04 support) and the draft's JWT example use.
	ProfileVeraison = "tag:github.com,2023:veraison/ear"
	// ProfileTrustee is CoCo Trustee's alias of ProfileVeraison.
	ProfileTrustee = "tag:github.com,2024:confidential-containers/Trustee"
)

// legacy reports whether a profile uses the pre-03 claim spellings.
func legacy(profile string) bool {
	switch profile {
	case ProfileDraft2507, ProfileVeraison, ProfileTrustee:
		return true
	}
	return false
}

func knownProfile(profile string) bool {
	return profile == Profile || profile == ProfileDraft03 || legacy(profile)
}

// Claim names of draft-ietf-rats-ear-04 (JSON serialisation).
const (
	ClaimProfile        = "eat_profile"
	ClaimIssuedAt       = "iat"
	ClaimExpires        = "exp"
	ClaimStatus         = "ear_status"
	ClaimVerifierID     = "ear_verifier_id"
	ClaimRawEvidence    = "ear_raw_evidence"
	ClaimSubmods        = "submods"
	ClaimNonce          = "eat_nonce"
	ClaimTrustVector    = "ear_trustworthiness_vector"
	ClaimPolicyIDs      = "ear_appraisal_policy_ids"
	ClaimAttesterClaims = "ear_attester_claims"
	ClaimVerifierClaims = "ear_verifier_claims"
)

// legacyNames maps the pre-03 spellings to the current ones.
var legacyNames = map[string]string{
	"ear.status":                 ClaimStatus,
	"ear.verifier-id":            ClaimVerifierID,
	"ear.raw-evidence":           ClaimRawEvidence,
	"ear.trustworthiness-vector": ClaimTrustVector,
	"ear.appraisal-policy-id":    ClaimPolicyIDs,
}

// Tier is an AR4SI trustworthiness tier (draft-ietf-rats-ar4si section
// 3.2). Its value is the CBOR encoding; JSON carries the name.
type Tier int8

// The four tiers.
const (
	TierNone            Tier = 0
	TierAffirming       Tier = 2
	TierWarning         Tier = 32
	TierContraindicated Tier = 96
)

var tierNames = map[Tier]string{TierNone: "none", TierAffirming: "affirming", TierWarning: "warning", TierContraindicated: "contraindicated"}

func (t Tier) String() string {
	if n, ok := tierNames[t]; ok {
		return n
	}
	return fmt.Sprintf("tier(%d)", int8(t))
}

// MarshalJSON writes the tier's name, as the JSON serialisation requires.
func (t Tier) MarshalJSON() ([]byte, error) {
	n, ok := tierNames[t]
	if !ok {
		return nil, fmt.Errorf("ear: %d is not a trustworthiness tier", int8(t))
	}
	return json.Marshal(n)
}

// UnmarshalJSON reads a tier's name.
func (t *Tier) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("a trustworthiness tier is one of none, affirming, warning, contraindicated: %w", err)
	}
	for v, n := range tierNames {
		if n == s {
			*t = v
			return nil
		}
	}
	return fmt.Errorf("%q is not a trustworthiness tier (none, affirming, warning, contraindicated)", s)
}

// Claim is one AR4SI trustworthiness claim value (-128..127).
type Claim int8

// AR4SI claim values the broker uses (draft-ietf-rats-ar4si section 2.3).
const (
	NoClaim Claim = 0
	// Affirming values, one meaning per category.
	InstanceRecognized Claim = 2  // instance-identity: recognized and not compromised
	ConfigApproved     Claim = 2  // configuration: a known and approved config
	ExecutablesOK      Claim = 2  // executables: only approved executables loaded, at and after boot
	FilesApproved      Claim = 2  // file-system: only a recognized set of approved files
	HardwareGenuine    Claim = 2  // hardware: genuine
	SourcesTrusted     Claim = 2  // sourced-data: from attested, affirming sources
	SourcesUntrusted   Claim = 32 // sourced-data: from unattested sources or sources with warnings
	// Contraindicated values.
	ConfigUnsupportable     Claim = 96 // configuration: unacceptable
	ExecutablesContra       Claim = 96 // executables: contraindicated run-time
	FilesContraindicated    Claim = 96 // file-system: contraindicated items found
	SourcesContraindicated  Claim = 96 // sourced-data: from contraindicated sources
	InstanceUntrustworthy   Claim = 96 // instance-identity: recognized but not trustworthy
	HardwareContraindicated Claim = 96 // hardware: recognized, trustworthiness contraindicated
)

// Tier is the tier a claim value falls in: none [-1,1], affirming
// [-32,-2] and [2,31], warning [-96,-33] and [32,95], contraindicated the
// rest.
func (c Claim) Tier() Tier {
	v := int(c)
	if v < 0 {
		v = -v
	}
	switch {
	case v <= 1:
		return TierNone
	case v <= 31:
		return TierAffirming
	case v <= 95:
		return TierWarning
	}
	return TierContraindicated
}

// TrustVector is the AR4SI trustworthiness vector. A zero claim (no claim
// made) is left out of the JSON, as in the draft's examples.
type TrustVector struct {
	InstanceIdentity Claim `json:"instance-identity,omitempty"`
	Configuration    Claim `json:"configuration,omitempty"`
	Executables      Claim `json:"executables,omitempty"`
	FileSystem       Claim `json:"file-system,omitempty"`
	Hardware         Claim `json:"hardware,omitempty"`
	RuntimeOpaque    Claim `json:"runtime-opaque,omitempty"`
	StorageOpaque    Claim `json:"storage-opaque,omitempty"`
	SourcedData      Claim `json:"sourced-data,omitempty"`
}

// Claims lists the vector's claims by their JSON names.
func (v TrustVector) Claims() map[string]Claim {
	return map[string]Claim{
		"instance-identity": v.InstanceIdentity, "configuration": v.Configuration, "executables": v.Executables,
		"file-system": v.FileSystem, "hardware": v.Hardware, "runtime-opaque": v.RuntimeOpaque,
		"storage-opaque": v.StorageOpaque, "sourced-data": v.SourcedData,
	}
}

// Worst is the least trustworthy tier among the claims made (TierNone when
// none is made). Tiers order as their values: none, affirming, warning,
// contraindicated.
func (v TrustVector) Worst() Tier {
	w := TierNone
	for _, c := range v.Claims() {
		w = max(w, c.Tier())
	}
	return w
}

// UnmarshalJSON refuses category names AR4SI does not define and values
// outside -128..127 (json refuses those for an int8), so a typo cannot
// pass for "no claim".
func (v *TrustVector) UnmarshalJSON(b []byte) error {
	type plain TrustVector
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p plain
	if err := dec.Decode(&p); err != nil {
		return fmt.Errorf("trustworthiness vector: %w", err)
	}
	*v = TrustVector(p)
	return nil
}

// VerifierID identifies the verifier software (AR4SI section 3.3).
type VerifierID struct {
	Developer string `json:"developer"`
	Build     string `json:"build"`
}

// Nonce is an eat_nonce: one or more base64url strings (RFC 9711 section
// 4.1; the EAR draft asks JWT serialisations for base64). It is compared
// as text.
type Nonce []string

// NonceOf encodes nonce bytes as an eat_nonce.
func NonceOf(b []byte) Nonce { return Nonce{base64.RawURLEncoding.EncodeToString(b)} }

// MarshalJSON writes one nonce as a string, several as an array.
func (n Nonce) MarshalJSON() ([]byte, error) {
	if len(n) == 1 {
		return json.Marshal(n[0])
	}
	return json.Marshal([]string(n))
}

// UnmarshalJSON reads a string or an array of at least two strings.
func (n *Nonce) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		if one == "" {
			return errors.New("eat_nonce is empty")
		}
		*n = Nonce{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil || len(many) < 2 || slices.Contains(many, "") {
		return errors.New("eat_nonce must be a string or an array of at least two non-empty strings")
	}
	*n = many
	return nil
}

// Appraisal is one EAR-appraisal: what the verifier concluded about one
// attester (a "submods" entry).
type Appraisal struct {
	// Profile names the schema of the appraisal's extensions and of its
	// verifier claims (the draft asks for it when an appraisal carries
	// them).
	Profile     string       `json:"eat_profile,omitempty"`
	Status      Tier         `json:"ear_status"`
	TrustVector *TrustVector `json:"ear_trustworthiness_vector,omitempty"`
	// PolicyIDs are the appraisal policies applied, in order; never empty
	// when present.
	PolicyIDs []string `json:"ear_appraisal_policy_ids,omitempty"`
	// Nonce is the nonce of the evidence this appraisal is about.
	Nonce Nonce `json:"eat_nonce,omitempty"`
	// AttesterClaims are claims with the attester's authority (taken from
	// its evidence), VerifierClaims claims with the verifier's (added by
	// the appraisal): draft-04.
	AttesterClaims json.RawMessage `json:"ear_attester_claims,omitempty"`
	VerifierClaims json.RawMessage `json:"ear_verifier_claims,omitempty"`
	// Extensions are the other claims ($$ear-appraisal-extension), kept
	// as they came.
	Extensions map[string]json.RawMessage `json:"-"`
}

// Result is an EAR claims-set.
type Result struct {
	Profile    string     `json:"eat_profile"`
	IssuedAt   int64      `json:"iat"`
	Expires    int64      `json:"exp,omitempty"`
	VerifierID VerifierID `json:"ear_verifier_id"`
	// Status is the overall tier of a composite attester (optional).
	Status  *Tier                `json:"ear_status,omitempty"`
	Submods map[string]Appraisal `json:"submods"`
	Nonce   Nonce                `json:"eat_nonce,omitempty"`
	// RawEvidence is kept as it came: a base64url string up to -03, a CMW
	// record in -04. The broker never sends it (it can be megabytes, and
	// it is the node's to disclose).
	RawEvidence json.RawMessage `json:"ear_raw_evidence,omitempty"`
	// Extensions are the other claims ($$ear-extension), kept as they
	// came (jti, nbf, ear_veraison_*, ...). The draft wants an extension
	// to be a map: the broker adds none at the top level, and says who
	// issued the EAR about which node in its appraisal's verifier claims.
	Extensions map[string]json.RawMessage `json:"-"`
}

// Validate checks what the draft requires of an EAR: the mandatory claims,
// at least one appraisal, policy id lists that are not empty, and no
// status more trusting than the worst claim under it.
func (r *Result) Validate() error {
	var problems []string
	if !knownProfile(r.Profile) {
		problems = append(problems, fmt.Sprintf("eat_profile %q is not an EAR profile this verifier reads (%s)", r.Profile, Profile))
	}
	if r.IssuedAt <= 0 {
		problems = append(problems, "iat is missing")
	}
	if r.Expires != 0 && r.Expires < r.IssuedAt {
		problems = append(problems, "exp is before iat")
	}
	if r.VerifierID.Developer == "" || r.VerifierID.Build == "" {
		problems = append(problems, "ear_verifier_id needs developer and build")
	}
	if len(r.Submods) == 0 {
		problems = append(problems, "submods holds no appraisal")
	}
	worst := TierNone
	for _, label := range slices.Sorted(maps.Keys(r.Submods)) {
		a := r.Submods[label]
		if _, ok := tierNames[a.Status]; !ok {
			problems = append(problems, fmt.Sprintf("submods[%q]: ear_status is not a tier", label))
		}
		if a.TrustVector != nil && a.Status < a.TrustVector.Worst() {
			problems = append(problems, fmt.Sprintf("submods[%q]: ear_status %s trusts more than its vector's worst claim (%s)", label, a.Status, a.TrustVector.Worst()))
		}
		if a.PolicyIDs != nil && len(a.PolicyIDs) == 0 {
			problems = append(problems, fmt.Sprintf("submods[%q]: ear_appraisal_policy_ids is empty", label))
		}
		worst = max(worst, a.Status)
	}
	if r.Status != nil && *r.Status < worst {
		problems = append(problems, fmt.Sprintf("ear_status %s trusts more than its worst appraisal (%s)", *r.Status, worst))
	}
	if len(problems) > 0 {
		return fmt.Errorf("ear: not a valid attestation result: %s", strings.Join(problems, "; "))
	}
	return nil
}

// Marshal validates the result and writes its JSON claims-set.
func (r *Result) Marshal() ([]byte, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return json.Marshal(r)
}

// MarshalJSON writes the claims and the extensions in one object; an
// extension cannot replace a claim this package defines.
func (r Result) MarshalJSON() ([]byte, error) {
	type plain Result
	return withExtensions(plain(r), r.Extensions)
}

// MarshalJSON writes the appraisal's claims and extensions in one object.
func (a Appraisal) MarshalJSON() ([]byte, error) {
	type plain Appraisal
	return withExtensions(plain(a), a.Extensions)
}

func withExtensions(v any, ext map[string]json.RawMessage) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil || len(ext) == 0 {
		return b, err
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	for k, x := range ext {
		if _, taken := m[k]; taken || legacyNames[k] != "" {
			return nil, fmt.Errorf("ear: extension %q collides with a claim of the draft", k)
		}
		m[k] = x
	}
	return json.Marshal(m)
}

// Parse reads an EAR claims-set (the JWT payload), normalises the legacy
// claim names of older profiles, and validates it. Claims it does not know
// are kept as extensions. It does not check a signature or the time: see
// Verify.
func Parse(payload []byte) (*Result, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(payload, &top); err != nil {
		return nil, fmt.Errorf("ear: claims-set is not a JSON object: %w", err)
	}
	var r Result
	if err := str(top, ClaimProfile, &r.Profile); err != nil {
		return nil, err
	}
	if r.Profile == "" {
		return nil, errors.New("ear: no eat_profile: not an attestation result")
	}
	if !knownProfile(r.Profile) {
		return nil, fmt.Errorf("ear: eat_profile %q is not an EAR profile this verifier reads (%s, or %s and the older %s, %s, %s)",
			r.Profile, Profile, ProfileDraft03, ProfileDraft2507, ProfileVeraison, ProfileTrustee)
	}
	old := legacy(r.Profile)
	if old {
		rename(top)
	}
	var err error
	if r.IssuedAt, err = numericDate(top, ClaimIssuedAt, old); err != nil {
		return nil, err
	}
	if r.Expires, err = numericDate(top, ClaimExpires, old); err != nil {
		return nil, err
	}
	if err := field(top, ClaimVerifierID, &r.VerifierID); err != nil {
		return nil, err
	}
	if raw, ok := top[ClaimStatus]; ok {
		var t Tier
		if err := json.Unmarshal(raw, &t); err != nil {
			return nil, fmt.Errorf("ear: ear_status: %w", err)
		}
		r.Status = &t
	}
	if err := field(top, ClaimNonce, &r.Nonce); err != nil {
		return nil, err
	}
	if raw, ok := top[ClaimRawEvidence]; ok {
		r.RawEvidence = raw
	}
	var subs map[string]json.RawMessage
	if err := field(top, ClaimSubmods, &subs); err != nil {
		return nil, err
	}
	r.Submods = make(map[string]Appraisal, len(subs))
	for label, raw := range subs {
		a, err := parseAppraisal(raw, old)
		if err != nil {
			return nil, fmt.Errorf("ear: submods[%q]: %w", label, err)
		}
		r.Submods[label] = a
	}
	for _, k := range []string{ClaimProfile, ClaimIssuedAt, ClaimExpires, ClaimVerifierID, ClaimStatus, ClaimNonce,
		ClaimRawEvidence, ClaimSubmods} {
		delete(top, k)
	}
	if len(top) > 0 {
		r.Extensions = top
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return &r, nil
}

func parseAppraisal(raw json.RawMessage, old bool) (Appraisal, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return Appraisal{}, errors.New("an appraisal must be a JSON object")
	}
	if old {
		if id, ok := m["ear.appraisal-policy-id"]; ok {
			// One id as a string before -03; a list since.
			var s string
			if err := json.Unmarshal(id, &s); err != nil {
				return Appraisal{}, errors.New("ear.appraisal-policy-id must be a string")
			}
			m["ear.appraisal-policy-id"], _ = json.Marshal([]string{s})
		}
		rename(m)
	}
	var a Appraisal
	if _, ok := m[ClaimStatus]; !ok {
		return a, errors.New("ear_status is missing")
	}
	if err := field(m, ClaimStatus, &a.Status); err != nil {
		return a, err
	}
	if err := str(m, ClaimProfile, &a.Profile); err != nil {
		return a, err
	}
	if raw, ok := m[ClaimTrustVector]; ok {
		a.TrustVector = new(TrustVector)
		if err := json.Unmarshal(raw, a.TrustVector); err != nil {
			return a, err
		}
	}
	if raw, ok := m[ClaimPolicyIDs]; ok {
		if err := json.Unmarshal(raw, &a.PolicyIDs); err != nil || a.PolicyIDs == nil {
			return a, errors.New("ear_appraisal_policy_ids must be a list of strings")
		}
	}
	if err := field(m, ClaimNonce, &a.Nonce); err != nil {
		return a, err
	}
	for name, dst := range map[string]*json.RawMessage{ClaimAttesterClaims: &a.AttesterClaims, ClaimVerifierClaims: &a.VerifierClaims} {
		if raw, ok := m[name]; ok {
			if !isObject(raw) {
				return a, fmt.Errorf("%s must be a JSON object", name)
			}
			*dst = raw
		}
	}
	for _, k := range []string{ClaimStatus, ClaimProfile, ClaimTrustVector, ClaimPolicyIDs, ClaimNonce, ClaimAttesterClaims, ClaimVerifierClaims} {
		delete(m, k)
	}
	if len(m) > 0 {
		a.Extensions = m
	}
	return a, nil
}

// rename moves legacy claim names to the current ones.
func rename(m map[string]json.RawMessage) {
	for old, cur := range legacyNames {
		if v, ok := m[old]; ok {
			if _, both := m[cur]; !both {
				m[cur] = v
			}
			delete(m, old)
		}
	}
}

func isObject(raw json.RawMessage) bool {
	var m map[string]json.RawMessage
	return json.Unmarshal(raw, &m) == nil && m != nil
}

// field decodes an optional claim into dst.
func field(m map[string]json.RawMessage, name string, dst any) error {
	raw, ok := m[name]
	if !ok {
		return nil
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return fmt.Errorf("ear: claim %s: %w", name, err)
	}
	return nil
}

func str(m map[string]json.RawMessage, name string, dst *string) error {
	if err := field(m, name, dst); err != nil {
		return fmt.Errorf("ear: claim %s must be a string", name)
	}
	return nil
}

// numericDate reads iat or exp: an integer (the EAR draft forbids floating
// point). Legacy producers (JWT libraries writing 1.666529184e+09, as in
// the draft's own JWT example) get an integral float accepted.
func numericDate(m map[string]json.RawMessage, name string, lenient bool) (int64, error) {
	raw, ok := m[name]
	if !ok {
		return 0, nil
	}
	var v int64
	if err := json.Unmarshal(raw, &v); err == nil {
		return v, nil
	}
	var f float64
	if lenient && json.Unmarshal(raw, &f) == nil && f == math.Trunc(f) && f > 0 && f < 1<<53 {
		return int64(f), nil
	}
	return 0, fmt.Errorf("ear: claim %s must be an integer number of seconds (not %s)", name, raw)
}
