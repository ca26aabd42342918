package ear_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/ear"
)

// The test vectors in testdata are the draft's and Veraison's own; see
// testdata/PROVENANCE.md for the commit each one comes from.

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	require.NoError(t, err)
	return b
}

// The JSON claims-sets of draft-ietf-rats-ear (Figures 3 and 4, the TEEP
// and Veraison extension examples) and Veraison's draft-04 example parse,
// with the values the draft describes.
func TestDraftClaimsSetsParse(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "draft", "*.json"))
	require.NoError(t, err)
	require.Len(t, files, 7)
	for _, f := range files {
		if strings.HasSuffix(f, "appendix-b-opa-input.json") {
			continue // a JWT, see TestDraftJWTExampleVerifies
		}
		raw, err := os.ReadFile(f)
		require.NoError(t, err)
		r, err := ear.Parse(raw)
		require.NoError(t, err, f)
		require.NotEmpty(t, r.Submods, f)
		// Everything Parse read, extensions included, comes out of the
		// encoder as it came in.
		again, err := r.Marshal()
		require.NoError(t, err, f)
		require.JSONEq(t, string(raw), string(again), f)
	}

	// Figure 3: a contraindicated appraisal of one attester, "PSA".
	r, err := ear.Parse(readTestdata(t, "draft/ear-json-1.json"))
	require.NoError(t, err)
	require.Equal(t, ear.ProfileDraft03, r.Profile)
	require.EqualValues(t, 1666529184, r.IssuedAt)
	require.Equal(t, ear.VerifierID{Developer: "https://veraison-project.org", Build: "vts 0.0.1"}, r.VerifierID)
	psa := r.Submods["PSA"]
	require.Equal(t, ear.TierContraindicated, psa.Status)
	require.Equal(t, ear.TrustVector{InstanceIdentity: 2, Executables: 96, Hardware: 2}, *psa.TrustVector)
	require.Equal(t, ear.TierContraindicated, psa.TrustVector.Worst())
	require.Equal(t, []string{"https://veraison.example/policy/1/60a0068d"}, psa.PolicyIDs)
	require.JSONEq(t, `"NzQ3MjY5NzM2NTYzNzQK"`, string(r.RawEvidence))

	// Figure 4: a composite attester with two affirming appraisals.
	r, err = ear.Parse(readTestdata(t, "draft/ear-json-2.json"))
	require.NoError(t, err)
	require.ElementsMatch(t, []string{"CCA Platform", "CCA Realm"}, slices.Collect(func(yield func(string) bool) {
		for k := range r.Submods {
			yield(k)
		}
	}))
	require.Equal(t, ear.TrustVector{InstanceIdentity: 2}, *r.Submods["CCA Realm"].TrustVector)

	// Extensions are kept as they came.
	r, err = ear.Parse(readTestdata(t, "draft/ext-teep-json-1.json"))
	require.NoError(t, err)
	require.Contains(t, string(r.Submods["PSA"].Extensions["ear_teep_claims"]), "80FH7byS7VjfARIq0_KLqu6B9j-F79QtV6p")

	// draft-04: attester and verifier claims are objects of the appraisal.
	r, err = ear.Parse(readTestdata(t, "draft/veraison-draft04-extensions.json"))
	require.NoError(t, err)
	require.Equal(t, ear.Profile, r.Profile)
	require.JSONEq(t, `{"bar":"baz","foo":"bar"}`, string(r.Submods["test"].VerifierClaims))
	require.JSONEq(t, `{"k1":"v1","k2":"v2"}`, string(r.Submods["test"].AttesterClaims))
	require.Contains(t, r.Submods["test"].Extensions, "ear_veraison_key_attestation")
}

type opaInput struct {
	Token   string          `json:"ear_token"`
	Trusted json.RawMessage `json:"trusted_verifiers"`
}

// The draft's one signed example (Appendix B) verifies with the JWK Set the
// draft gives, and its legacy claim names read as the current ones.
func TestDraftJWTExampleVerifies(t *testing.T) {
	var in opaInput
	require.NoError(t, json.Unmarshal(readTestdata(t, "draft/appendix-b-opa-input.json"), &in))
	keys, err := ear.ParseJWKS(in.Trusted)
	require.NoError(t, err)
	r, err := ear.Verify(in.Token, keys, time.Now())
	require.NoError(t, err)
	require.Equal(t, ear.ProfileVeraison, r.Profile)
	require.EqualValues(t, 1666529184, r.IssuedAt, "the floating-point iat of a legacy token reads as an integer")
	tpm := r.Submods["PARSEC_TPM"]
	require.Equal(t, ear.TierAffirming, tpm.Status)
	require.Equal(t, ear.TrustVector{Executables: 2, Hardware: 2, InstanceIdentity: 2}, *tpm.TrustVector)
	require.Equal(t, []string{"https://veraison.example/policy/1/60a0068d"}, tpm.PolicyIDs)
	require.Contains(t, tpm.Extensions, "ear.veraison.key-attestation")
	require.Contains(t, r.Extensions, "jti")
	require.Contains(t, r.Extensions, "nbf")

	// One byte of the payload changed: the signature no longer verifies.
	parts := strings.Split(in.Token, ".")
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	require.NoError(t, err)
	forged := strings.Replace(string(payload), `"affirming"`, `"affirminG"`, 1)
	require.NotEqual(t, string(payload), forged)
	_, err = ear.Verify(parts[0]+"."+base64.RawURLEncoding.EncodeToString([]byte(forged))+"."+parts[2], keys, time.Now())
	require.ErrorContains(t, err, "signature does not verify")
}

type veraisonVectors struct {
	Key  json.RawMessage `json:"key"`
	Pass []string        `json:"verify_pass"`
	Fail []struct {
		What  string `json:"what"`
		Token string `json:"token"`
	} `json:"verify_fail"`
}

// Veraison's own test tokens: the one its tests verify verifies here, and
// every one its tests refuse (HS256, alg none, bad formatting, an empty
// claims-set, trailing rubbish) is refused here.
func TestVeraisonTokens(t *testing.T) {
	var v veraisonVectors
	require.NoError(t, json.Unmarshal(readTestdata(t, "veraison-ear-tokens.json"), &v))
	keys, err := ear.ParseJWKS([]byte(`{"keys":[` + string(v.Key) + `]}`))
	require.NoError(t, err)
	require.Len(t, v.Pass, 1)
	r, err := ear.Verify(v.Pass[0], keys, time.Now())
	require.NoError(t, err)
	test := r.Submods["test"]
	require.Equal(t, ear.TierAffirming, test.Status)
	require.Equal(t, []string{"policy://test/01234"}, test.PolicyIDs)
	require.Equal(t, ear.VerifierID{Developer: "Acme Inc.", Build: "rrtrap-v1.0.0"}, r.VerifierID)
	require.Len(t, v.Fail, 5)
	for _, f := range v.Fail {
		_, err := ear.Verify(f.Token, keys, time.Now())
		require.Error(t, err, f.What)
	}
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return k
}

func jwks(t *testing.T, keys ...*ecdsa.PublicKey) *jose.JSONWebKeySet {
	t.Helper()
	b, err := ear.JWKS(keys...)
	require.NoError(t, err)
	set, err := ear.ParseJWKS(b)
	require.NoError(t, err)
	return set
}

// brokerLike is an EAR shaped as the broker issues them.
func brokerLike(now time.Time) *ear.Result {
	st := ear.TierAffirming
	return &ear.Result{
		Profile: ear.Profile, IssuedAt: now.Unix(), Expires: now.Add(5 * time.Minute).Unix(),
		VerifierID: ear.VerifierID{Developer: ear.Developer, Build: "attested 0.1.0"},
		Status:     &st,
		Submods: map[string]ear.Appraisal{ear.SubmodNode: {
			Profile: ear.AppraisalProfile, Status: ear.TierAffirming,
			TrustVector:    &ear.TrustVector{InstanceIdentity: 2, Executables: 2, Configuration: 2},
			PolicyIDs:      []string{"policy://broker-test/measured-boot/1"},
			Nonce:          ear.NonceOf([]byte("0123456789abcdef0123")),
			AttesterClaims: json.RawMessage(`{"pcrs_sha256":{"0":"00"}}`),
			VerifierClaims: json.RawMessage(`{"broker":"broker-test","node":"node-1","ek_fingerprint":"SHA256:00","policies":{}}`),
		}},
	}
}

// Tokens signed by the signer verify with its JWK Set and nothing else: a
// tampered token, a token signed by another key (even one claiming the
// right kid), an expired one and one from the future are refused.
func TestSignVerifyAndAttacks(t *testing.T) {
	now := time.Now()
	key := newKey(t)
	s, err := ear.NewSigner(key)
	require.NoError(t, err)
	set := jwks(t, &key.PublicKey)
	tok, err := s.Sign(brokerLike(now))
	require.NoError(t, err)
	r, err := ear.Verify(tok, set, now)
	require.NoError(t, err)
	c, err := r.Submods[ear.SubmodNode].NodeClaims()
	require.NoError(t, err)
	require.Equal(t, "node-1", c.Node)

	// The kid is the RFC 7638 thumbprint (computed here from the RFC's
	// recipe: SHA-256 of the required members in lexicographic order, no
	// whitespace), and the JWK Set names it.
	kid, err := ear.KeyID(&key.PublicKey)
	require.NoError(t, err)
	coord := func(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
	raw, err := key.PublicKey.Bytes() // 0x04 || X || Y
	require.NoError(t, err)
	canonical := `{"crv":"P-256","kty":"EC","x":"` + coord(raw[1:33]) + `","y":"` + coord(raw[33:]) + `"}`
	sum := sha256.Sum256([]byte(canonical))
	require.Equal(t, coord(sum[:]), kid)
	require.Equal(t, kid, s.KeyID())
	require.Equal(t, kid, set.Keys[0].KeyID)
	require.Equal(t, "sig", set.Keys[0].Use)
	require.Equal(t, "ES256", set.Keys[0].Algorithm)

	parts := strings.Split(tok, ".")
	t.Run("tampered payload", func(t *testing.T) {
		payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
		forged := strings.Replace(string(payload), `"node-1"`, `"node-2"`, 1)
		_, err := ear.Verify(parts[0]+"."+base64.RawURLEncoding.EncodeToString([]byte(forged))+"."+parts[2], set, now)
		require.ErrorContains(t, err, "signature does not verify")
	})
	t.Run("tampered signature", func(t *testing.T) {
		sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
		sig[10] ^= 1
		_, err := ear.Verify(parts[0]+"."+parts[1]+"."+base64.RawURLEncoding.EncodeToString(sig), set, now)
		require.ErrorContains(t, err, "signature does not verify")
	})
	t.Run("another key", func(t *testing.T) {
		other, err := ear.NewSigner(newKey(t))
		require.NoError(t, err)
		tok, err := other.Sign(brokerLike(now))
		require.NoError(t, err)
		_, err = ear.Verify(tok, set, now)
		require.ErrorContains(t, err, "no key")
	})
	t.Run("another key claiming our kid", func(t *testing.T) {
		forger := newKey(t)
		js, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: forger, KeyID: kid}}, nil)
		require.NoError(t, err)
		payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
		obj, err := js.Sign(payload)
		require.NoError(t, err)
		tok, err := obj.CompactSerialize()
		require.NoError(t, err)
		_, err = ear.Verify(tok, set, now)
		require.ErrorContains(t, err, "signature does not verify")
	})
	t.Run("alg none", func(t *testing.T) {
		hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","kid":"` + kid + `"}`))
		_, err := ear.Verify(hdr+"."+parts[1]+".", set, now)
		require.Error(t, err)
	})
	t.Run("HS256 keyed with the public key", func(t *testing.T) {
		pubJSON, _ := json.Marshal(set.Keys[0])
		js, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: pubJSON}, nil)
		require.NoError(t, err)
		payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
		obj, err := js.Sign(payload)
		require.NoError(t, err)
		tok, err := obj.CompactSerialize()
		require.NoError(t, err)
		_, err = ear.Verify(tok, set, now)
		require.ErrorContains(t, err, "ES256")
	})
	t.Run("expired", func(t *testing.T) {
		_, err := ear.Verify(tok, set, now.Add(5*time.Minute+ear.Leeway+time.Second))
		require.ErrorContains(t, err, "expired")
	})
	t.Run("issued in the future", func(t *testing.T) {
		_, err := ear.Verify(tok, set, now.Add(-ear.Leeway-time.Minute))
		require.ErrorContains(t, err, "after now")
	})
	t.Run("no time", func(t *testing.T) {
		_, err := ear.Verify(tok, set, time.Time{})
		require.Error(t, err)
	})
	t.Run("empty JWK Set", func(t *testing.T) {
		_, err := ear.Verify(tok, jwks(t), now)
		require.ErrorContains(t, err, "no key")
	})
}

// A JWK Set that carries a private key is refused: publishing one means
// the key leaked.
func TestJWKSWithPrivateKeyRefused(t *testing.T) {
	key := newKey(t)
	b, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key, KeyID: "k"}}})
	require.NoError(t, err)
	_, err = ear.ParseJWKS(b)
	require.ErrorContains(t, err, "private key")
}

// shape describes a JSON value by its types only.
func shape(v any) any {
	switch x := v.(type) {
	case map[string]any:
		m := map[string]any{}
		for k, e := range x {
			m[k] = shape(e)
		}
		return m
	case []any:
		if len(x) == 0 {
			return []any{}
		}
		return []any{shape(x[0])}
	case json.Number:
		if _, err := x.Int64(); err == nil {
			return "integer"
		}
		return "number"
	case string:
		return "string"
	case bool:
		return "bool"
	}
	return "null"
}

func decodeShape(t *testing.T, b []byte) map[string]any {
	t.Helper()
	d := json.NewDecoder(strings.NewReader(string(b)))
	d.UseNumber()
	var v map[string]any
	require.NoError(t, d.Decode(&v))
	return shape(v).(map[string]any)
}

// requireSameTypes checks that every claim the two shapes share has the
// same type, recursively.
func requireSameTypes(t *testing.T, ours, theirs map[string]any, path string) {
	t.Helper()
	for k, tv := range theirs {
		ov, ok := ours[k]
		if !ok {
			continue
		}
		om, oIsMap := ov.(map[string]any)
		tm, tIsMap := tv.(map[string]any)
		switch {
		case oIsMap && tIsMap:
			requireSameTypes(t, om, tm, path+"."+k)
		default:
			require.Equal(t, tv, ov, "claim %s%s", path, k)
		}
	}
}

// The broker's EARs have the structure of the draft's examples: the same
// claim names with the same JSON types (integer iat, verifier id object,
// appraisals with a status string, a vector of integers, a list of policy
// ids), and beyond them only the draft-04 claims (exp, ear_status, eat_nonce,
// ear_attester_claims, ear_verifier_claims), each a map where the draft
// wants one.
func TestEncoderMatchesDraftStructure(t *testing.T) {
	now := time.Now()
	s, err := ear.NewSigner(newKey(t))
	require.NoError(t, err)
	tok, err := s.Sign(brokerLike(now))
	require.NoError(t, err)
	payload, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[1])
	require.NoError(t, err)
	ours := decodeShape(t, payload)

	fig3 := decodeShape(t, readTestdata(t, "draft/ear-json-1.json"))
	v04 := decodeShape(t, readTestdata(t, "draft/veraison-draft04-extensions.json"))
	// The examples label their one appraisal "PSA" and "test"; compare it
	// with ours.
	for _, ex := range []struct {
		m     map[string]any
		label string
	}{{fig3, "PSA"}, {v04, "test"}} {
		sub := ex.m["submods"].(map[string]any)
		sub[ear.SubmodNode] = sub[ex.label]
		delete(sub, ex.label)
		requireSameTypes(t, ours, ex.m, "")
	}

	allowedTop := []string{"eat_profile", "iat", "exp", "ear_verifier_id", "ear_status", "submods", "eat_nonce"}
	for k := range ours {
		require.Contains(t, allowedTop, k)
	}
	for _, k := range []string{"eat_profile", "iat", "ear_verifier_id", "submods"} {
		require.Contains(t, ours, k, "mandatory claim")
	}
	app := ours["submods"].(map[string]any)[ear.SubmodNode].(map[string]any)
	for k := range app {
		require.Contains(t, []string{"eat_profile", "ear_status", "ear_trustworthiness_vector", "ear_appraisal_policy_ids",
			"eat_nonce", "ear_attester_claims", "ear_verifier_claims"}, k)
	}
	for k, v := range app["ear_trustworthiness_vector"].(map[string]any) {
		require.Contains(t, []string{"instance-identity", "configuration", "executables", "file-system", "hardware",
			"runtime-opaque", "storage-opaque", "sourced-data"}, k)
		require.Equal(t, "integer", v)
	}
	require.Equal(t, "string", app["eat_nonce"])
	require.IsType(t, map[string]any{}, app["ear_attester_claims"])
	require.IsType(t, map[string]any{}, app["ear_verifier_claims"])
	require.Equal(t, "string", ours["ear_status"])
	require.Equal(t, "integer", ours["exp"])
}

// What the draft forbids does not get signed or accepted.
func TestValidateRefuses(t *testing.T) {
	now := time.Now()
	s, err := ear.NewSigner(newKey(t))
	require.NoError(t, err)
	for name, mutate := range map[string]func(r *ear.Result){
		"status more trusting than the vector": func(r *ear.Result) {
			a := r.Submods[ear.SubmodNode]
			a.TrustVector.Executables = ear.ExecutablesContra
			r.Submods[ear.SubmodNode] = a
		},
		"overall status more trusting than an appraisal": func(r *ear.Result) {
			a := r.Submods[ear.SubmodNode]
			a.Status = ear.TierWarning
			r.Submods[ear.SubmodNode] = a
		},
		"no appraisal":    func(r *ear.Result) { r.Submods = nil },
		"unknown profile": func(r *ear.Result) { r.Profile = "tag:example.com,2026:other" },
		"no verifier id":  func(r *ear.Result) { r.VerifierID = ear.VerifierID{} },
		"empty policy id list": func(r *ear.Result) {
			a := r.Submods[ear.SubmodNode]
			a.PolicyIDs = []string{}
			r.Submods[ear.SubmodNode] = a
		},
		"extension over claim": func(r *ear.Result) { r.Extensions = map[string]json.RawMessage{"iat": json.RawMessage(`1`)} },
		"legacy name extension": func(r *ear.Result) {
			r.Extensions = map[string]json.RawMessage{"ear.status": json.RawMessage(`"affirming"`)}
		},
	} {
		r := brokerLike(now)
		mutate(r)
		_, err := s.Sign(r)
		require.Error(t, err, name)
	}

	for name, doc := range map[string]string{
		"float iat in a current profile": `{"eat_profile":"` + ear.Profile + `","iat":1.666529184e+09,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{"ear_status":"affirming"}}}`,
		"float exp":                      `{"eat_profile":"` + ear.Profile + `","iat":1666529184,"exp":1666529200.5,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{"ear_status":"affirming"}}}`,
		"unknown vector category":        `{"eat_profile":"` + ear.Profile + `","iat":1666529184,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{"ear_status":"affirming","ear_trustworthiness_vector":{"executable":2}}}}`,
		"claim out of range":             `{"eat_profile":"` + ear.Profile + `","iat":1666529184,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{"ear_status":"contraindicated","ear_trustworthiness_vector":{"executables":300}}}}`,
		"unknown tier":                   `{"eat_profile":"` + ear.Profile + `","iat":1666529184,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{"ear_status":"fine"}}}`,
		"no status":                      `{"eat_profile":"` + ear.Profile + `","iat":1666529184,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{}}}`,
		"no profile":                     `{"iat":1666529184,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{"ear_status":"affirming"}}}`,
		"verifier claims not an object":  `{"eat_profile":"` + ear.Profile + `","iat":1666529184,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{"ear_status":"affirming","ear_verifier_claims":[1]}}}`,
	} {
		_, err := ear.Parse([]byte(doc))
		require.Error(t, err, name)
	}
}

func TestClaimTiers(t *testing.T) {
	for v, want := range map[ear.Claim]ear.Tier{0: ear.TierNone, 1: ear.TierNone, -1: ear.TierNone, 2: ear.TierAffirming, 31: ear.TierAffirming,
		-2: ear.TierAffirming, 32: ear.TierWarning, 95: ear.TierWarning, -33: ear.TierWarning, 96: ear.TierContraindicated, 127: ear.TierContraindicated, -128: ear.TierContraindicated} {
		require.Equal(t, want, v.Tier(), "claim %d", v)
	}
}
