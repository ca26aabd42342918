// Package policy parses attested's declarative YAML policies and evaluates
// them against the claims the broker established from a node's evidence.
//
// Nothing is trusted by default: a policy must state at least one
// requirement, and a claim the policy needs but the evidence lacks fails.
package policy

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// MaxSize bounds a policy document.
const MaxSize = 256 << 10

// Policy is a parsed, validated policy.
type Policy struct {
	Name string
	// PCRs maps a PCR index (SHA-256 bank) to its accepted values; several
	// values allow rolling upgrades.
	PCRs map[int][][]byte
}

// document is the YAML shape; it is decoded strictly.
type document struct {
	Name string              `yaml:"name"`
	PCRs map[string][]string `yaml:"pcrs"`
}

var policyName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Parse decodes and validates a policy. Errors name the line and the reason;
// unknown fields are errors, never silently dropped.
func Parse(data []byte) (*Policy, error) {
	if len(data) > MaxSize {
		return nil, fmt.Errorf("policy: document is %d bytes, limit %d", len(data), MaxSize)
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if len(root.Content) == 0 {
		return nil, errors.New("policy: empty document")
	}
	var doc document
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	lines := fieldLines(root.Content[0])
	if !policyName.MatchString(doc.Name) {
		return nil, fmt.Errorf("policy: line %d: name %q must be 1-63 letters, digits, '.', '_' or '-'", lines["name"], doc.Name)
	}
	p := &Policy{Name: doc.Name, PCRs: map[int][][]byte{}}
	for key, values := range doc.PCRs {
		line := lines["pcrs."+key]
		idx, err := strconv.Atoi(key)
		if err != nil || idx < 0 || idx > 23 {
			return nil, fmt.Errorf("policy: line %d: PCR index %q must be a number from 0 to 23", line, key)
		}
		if len(values) == 0 {
			return nil, fmt.Errorf("policy: line %d: PCR %d lists no accepted values (a PCR that accepts nothing would refuse every node; remove it or add values)", line, idx)
		}
		for _, v := range values {
			d, err := hex.DecodeString(strings.TrimPrefix(strings.ToLower(v), "sha256:"))
			if err != nil || len(d) != 32 {
				return nil, fmt.Errorf("policy: line %d: PCR %d value %q is not a SHA-256 digest (64 hex digits)", line, idx, v)
			}
			p.PCRs[idx] = append(p.PCRs[idx], d)
		}
	}
	if len(p.PCRs) == 0 {
		return nil, fmt.Errorf("policy: %s states no requirement; a policy must require at least one PCR value", p.Name)
	}
	return p, nil
}

// fieldLines maps "name", "pcrs", "pcrs.<idx>" to their line numbers.
func fieldLines(n *yaml.Node) map[string]int {
	lines := map[string]int{}
	if n.Kind != yaml.MappingNode {
		return lines
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		lines[k.Value] = k.Line
		if v.Kind == yaml.MappingNode {
			for j := 0; j+1 < len(v.Content); j += 2 {
				lines[k.Value+"."+v.Content[j].Value] = v.Content[j].Line
			}
		}
	}
	return lines
}

// Claims is what the broker established from verified evidence.
type Claims struct {
	Node string
	// PCRs holds SHA-256 bank values that a verified quote covered.
	PCRs map[int][]byte
}

// Result is an evaluation outcome. Reasons name every failing clause.
type Result struct {
	Allowed bool
	Reasons []string
}

// Error joins the reasons into one operator-readable sentence.
func (r Result) Error() string { return strings.Join(r.Reasons, "; ") }

// Evaluate checks the claims against every clause of the policy.
func (p *Policy) Evaluate(c Claims) Result {
	var reasons []string
	idxs := make([]int, 0, len(p.PCRs))
	for i := range p.PCRs {
		idxs = append(idxs, i)
	}
	sort.Ints(idxs)
	for _, i := range idxs {
		got, ok := c.PCRs[i]
		if !ok {
			reasons = append(reasons, fmt.Sprintf("PCR %d is required by policy %s but was not in the quote", i, p.Name))
			continue
		}
		if !containsDigest(p.PCRs[i], got) {
			reasons = append(reasons, fmt.Sprintf("PCR %d differs from policy %s: got %s, want one of %s", i, p.Name, shortHex(got), shortList(p.PCRs[i])))
		}
	}
	return Result{Allowed: len(reasons) == 0, Reasons: reasons}
}

func containsDigest(list [][]byte, d []byte) bool {
	for _, v := range list {
		if bytes.Equal(v, d) {
			return true
		}
	}
	return false
}

func shortHex(b []byte) string {
	h := hex.EncodeToString(b)
	if len(h) > 16 {
		return h[:16] + ".."
	}
	return h
}

func shortList(l [][]byte) string {
	parts := make([]string, len(l))
	for i, v := range l {
		parts[i] = shortHex(v)
	}
	return strings.Join(parts, ", ")
}
