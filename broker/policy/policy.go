// Package policy parses attested's declarative YAML policies and evaluates
// them, clause by clause, against the claims the broker established from a
// node's verified evidence.
//
// Nothing is trusted by default: a policy must state at least one
// requirement, and a claim a clause needs but the evidence lacks fails it.
package policy

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/attest/binding"
	"github.com/attested-dev/attested/broker/evidence"
	"github.com/attested-dev/attested/keyprovider/annotation"
)

// MaxSize bounds a policy document.
const MaxSize = 256 << 10

// Policy is a parsed, validated policy.
type Policy struct {
	Name string
	// PCRs maps a PCR index (SHA-256 bank) to its accepted values; several
	// values allow rolling upgrades.
	PCRs map[int][][]byte
	// SecureBoot is "required", "off" or "" (no requirement).
	SecureBoot string
	// BootApps, when set, lists every EFI application digest allowed in
	// PCR 4.
	BootApps [][]byte
	// CmdlineRequire and CmdlineForbid are substrings of the kernel command
	// line.
	CmdlineRequire, CmdlineForbid []string
	// IMA, when set, requires an IMA log whose every measurement outside
	// the excluded prefixes is an allowed digest of its path.
	IMA *IMAPolicy
	// Tags maps a tag to its accepted values.
	Tags map[string][]string
	// CertifiedTags requires the node's TPM to certify (NV_Certify by the
	// AK) the digest of exactly the tags the broker holds for it.
	CertifiedTags bool
	// Expression is an optional CEL expression over the claims.
	Expression *Expression
	// MaxSessionAge bounds how old the appraisal behind a release may be.
	MaxSessionAge time.Duration
}

// IMAPolicy is an IMA allow-list.
type IMAPolicy struct {
	Allow   map[string][][]byte
	Exclude []string
}

// document is the YAML shape; it is decoded strictly.
type document struct {
	Name             string              `yaml:"name"`
	PCRs             map[string][]string `yaml:"pcrs"`
	SecureBoot       string              `yaml:"secureBoot"`
	BootApplications []string            `yaml:"bootApplications"`
	KernelCmdline    *struct {
		Require []string `yaml:"require"`
		Forbid  []string `yaml:"forbid"`
	} `yaml:"kernelCmdline"`
	IMA *struct {
		Allow   map[string][]string `yaml:"allow"`
		Exclude []string            `yaml:"exclude"`
	} `yaml:"ima"`
	Tags          map[string][]string `yaml:"tags"`
	CertifiedTags bool                `yaml:"certifiedTags"`
	Expression    string              `yaml:"expression"`
	MaxSessionAge string              `yaml:"maxSessionAge"`
}

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
	fail := func(field, format string, args ...any) error {
		return fmt.Errorf("policy: line %d: %s", lines[field], fmt.Sprintf(format, args...))
	}
	if !annotation.ValidName(doc.Name) {
		return nil, fail("name", "name %q must be 1-63 letters, digits, '.', '_' or '-'", doc.Name)
	}
	p := &Policy{Name: doc.Name, PCRs: map[int][][]byte{}}
	for key, values := range doc.PCRs {
		idx, err := strconv.Atoi(key)
		if err != nil || idx < 0 || idx > 23 {
			return nil, fail("pcrs."+key, "PCR index %q must be a number from 0 to 23", key)
		}
		if len(values) == 0 {
			return nil, fail("pcrs."+key, "PCR %d lists no accepted values (a PCR that accepts nothing would refuse every node; remove it or add values)", idx)
		}
		for _, v := range values {
			d, err := parseDigest(v)
			if err != nil {
				return nil, fail("pcrs."+key, "PCR %d value %q is not a SHA-256 digest (64 hex digits)", idx, v)
			}
			p.PCRs[idx] = append(p.PCRs[idx], d)
		}
	}
	switch doc.SecureBoot {
	case "", "required", "off":
		p.SecureBoot = doc.SecureBoot
	default:
		return nil, fail("secureBoot", "secureBoot is %q; want required or off", doc.SecureBoot)
	}
	if _, set := lines["bootApplications"]; set && len(doc.BootApplications) == 0 {
		return nil, fail("bootApplications", "bootApplications lists nothing, which would refuse every node; remove it or list digests")
	}
	for _, v := range doc.BootApplications {
		d, err := parseDigest(v)
		if err != nil {
			return nil, fail("bootApplications", "boot application %q is not a SHA-256 digest", v)
		}
		p.BootApps = append(p.BootApps, d)
	}
	if k := doc.KernelCmdline; k != nil {
		if len(k.Require)+len(k.Forbid) == 0 {
			return nil, fail("kernelCmdline", "kernelCmdline needs require or forbid")
		}
		for _, s := range append(slices.Clone(k.Require), k.Forbid...) {
			if strings.TrimSpace(s) == "" {
				return nil, fail("kernelCmdline", "kernelCmdline has an empty entry")
			}
		}
		p.CmdlineRequire, p.CmdlineForbid = k.Require, k.Forbid
	}
	if m := doc.IMA; m != nil {
		if len(m.Allow) == 0 {
			return nil, fail("ima", "ima needs an allow list (path: [sha256 digests])")
		}
		p.IMA = &IMAPolicy{Allow: map[string][][]byte{}, Exclude: m.Exclude}
		for path, ds := range m.Allow {
			if !strings.HasPrefix(path, "/") || len(ds) == 0 {
				return nil, fail("ima", "ima allow entry %q must be an absolute path with at least one digest", path)
			}
			for _, v := range ds {
				d, err := parseDigest(v)
				if err != nil {
					return nil, fail("ima", "ima digest %q for %s is not a SHA-256 digest", v, path)
				}
				p.IMA.Allow[path] = append(p.IMA.Allow[path], d)
			}
		}
		for _, e := range m.Exclude {
			if !strings.HasPrefix(e, "/") {
				return nil, fail("ima", "ima exclude %q must be an absolute path prefix", e)
			}
		}
	}
	if len(doc.Tags) > 0 {
		p.Tags = map[string][]string{}
		for k, vs := range doc.Tags {
			if !annotation.ValidTagName(k) || len(vs) == 0 {
				return nil, fail("tags", "tag %q must be a tag name with at least one accepted value", k)
			}
			p.Tags[k] = vs
		}
	}
	if doc.CertifiedTags && len(p.Tags) == 0 {
		return nil, fail("certifiedTags", "certifiedTags needs tags to certify")
	}
	p.CertifiedTags = doc.CertifiedTags
	if doc.Expression != "" {
		e, err := compileExpression(doc.Expression)
		if err != nil {
			return nil, fail("expression", "expression: %v", err)
		}
		p.Expression = e
	}
	if doc.MaxSessionAge != "" {
		d, err := time.ParseDuration(doc.MaxSessionAge)
		if err != nil || d <= 0 {
			return nil, fail("maxSessionAge", "maxSessionAge %q is not a positive duration such as 5m", doc.MaxSessionAge)
		}
		p.MaxSessionAge = d
	}
	if len(p.PCRs) == 0 && p.SecureBoot == "" && p.BootApps == nil && p.CmdlineRequire == nil &&
		p.CmdlineForbid == nil && p.IMA == nil && p.Tags == nil && p.Expression == nil {
		return nil, fmt.Errorf("policy: %s states no requirement; a policy must require PCR values, Secure Boot, boot applications, a kernel command line, an IMA allow-list, tags or an expression", p.Name)
	}
	return p, nil
}

func parseDigest(v string) ([]byte, error) {
	d, err := hex.DecodeString(strings.TrimPrefix(strings.ToLower(v), "sha256:"))
	if err != nil || len(d) != 32 {
		return nil, errors.New("not a SHA-256 digest")
	}
	return d, nil
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
	PCRs  map[int][]byte
	Facts evidence.Facts
	// Tags are the node's asset tags as the broker holds them.
	Tags map[string]string
	// SessionAge is how long ago the evidence was appraised.
	SessionAge time.Duration
}

// Clause is the outcome of one requirement.
type Clause struct {
	Name   string
	OK     bool
	Detail string
}

// Result is an evaluation outcome: every clause, in a stable order.
type Result struct {
	Allowed bool
	Clauses []Clause
}

// Reasons are the failing clauses' details.
func (r Result) Reasons() []string {
	var out []string
	for _, c := range r.Clauses {
		if !c.OK {
			out = append(out, c.Detail)
		}
	}
	return out
}

// Error joins the failing clauses into one operator-readable sentence.
func (r Result) Error() string { return strings.Join(r.Reasons(), "; ") }

// Evaluate checks the claims against every clause of the policy.
func (p *Policy) Evaluate(c Claims) Result {
	var cs []Clause
	add := func(name string, ok bool, detail string) { cs = append(cs, Clause{Name: name, OK: ok, Detail: detail}) }
	idxs := make([]int, 0, len(p.PCRs))
	for i := range p.PCRs {
		idxs = append(idxs, i)
	}
	sort.Ints(idxs)
	for _, i := range idxs {
		name := fmt.Sprintf("pcr %d", i)
		got, ok := c.PCRs[i]
		switch {
		case !ok:
			add(name, false, fmt.Sprintf("PCR %d is required by policy %s but was not in the quote", i, p.Name))
		case !containsDigest(p.PCRs[i], got):
			add(name, false, fmt.Sprintf("PCR %d differs from policy %s: got %s, want one of %s", i, p.Name, shortHex(got), shortList(p.PCRs[i])))
		default:
			add(name, true, fmt.Sprintf("PCR %d is %s, accepted by policy %s", i, shortHex(got), p.Name))
		}
	}
	p.evalSecureBoot(c, add)
	p.evalBootApps(c, add)
	p.evalCmdline(c, add)
	p.evalIMA(c, add)
	p.evalTags(c, add)
	p.evalCertifiedTags(c, add)
	if p.Expression != nil {
		ok, detail := p.Expression.eval(c)
		if !ok {
			detail = fmt.Sprintf("expression of policy %s: %s", p.Name, detail)
		}
		add("expression", ok, detail)
	}
	if p.MaxSessionAge > 0 {
		ok := c.SessionAge <= p.MaxSessionAge
		add("maxSessionAge", ok, fmt.Sprintf("evidence is %s old; policy %s allows %s", c.SessionAge.Round(time.Second), p.Name, p.MaxSessionAge))
	}
	allowed := true
	for _, cl := range cs {
		allowed = allowed && cl.OK
	}
	return Result{Allowed: allowed, Clauses: cs}
}

type adder func(name string, ok bool, detail string)

func (p *Policy) evalSecureBoot(c Claims, add adder) {
	if p.SecureBoot == "" {
		return
	}
	sb := c.Facts.SecureBoot
	switch {
	case sb == nil:
		add("secureBoot", false, fmt.Sprintf("policy %s requires Secure Boot %s, but the node sent no firmware event log", p.Name, p.SecureBoot))
	case p.SecureBoot == "required" && !*sb:
		add("secureBoot", false, fmt.Sprintf("Secure Boot is disabled; policy %s requires it", p.Name))
	case p.SecureBoot == "off" && *sb:
		add("secureBoot", false, fmt.Sprintf("Secure Boot is enabled; policy %s requires it off", p.Name))
	default:
		add("secureBoot", true, "Secure Boot is "+map[bool]string{true: "enabled", false: "disabled"}[*sb])
	}
}

func (p *Policy) evalBootApps(c Claims, add adder) {
	if p.BootApps == nil {
		return
	}
	if !c.Facts.FirmwareLog {
		add("bootApplications", false, fmt.Sprintf("policy %s lists allowed boot applications, but the node sent no firmware event log", p.Name))
		return
	}
	for _, b := range c.Facts.BootApps {
		if !containsDigest(p.BootApps, b.Digest) {
			add("bootApplications", false, fmt.Sprintf("PCR 4: event %d EV_EFI_BOOT_SERVICES_APPLICATION digest %s is not an allowed boot application of policy %s", b.Event, shortHex(b.Digest), p.Name))
			return
		}
	}
	add("bootApplications", true, fmt.Sprintf("all %d boot applications are allowed", len(c.Facts.BootApps)))
}

func (p *Policy) evalCmdline(c Claims, add adder) {
	if p.CmdlineRequire == nil && p.CmdlineForbid == nil {
		return
	}
	if len(c.Facts.KernelCmdlines) == 0 {
		add("kernelCmdline", false, fmt.Sprintf("policy %s has kernel command line conditions, but no measured kernel command line replayed", p.Name))
		return
	}
	for _, line := range c.Facts.KernelCmdlines {
		for _, r := range p.CmdlineRequire {
			if !strings.Contains(line, r) {
				add("kernelCmdline", false, fmt.Sprintf("kernel command line %q lacks %q required by policy %s", line, r, p.Name))
				return
			}
		}
		for _, f := range p.CmdlineForbid {
			if strings.Contains(line, f) {
				add("kernelCmdline", false, fmt.Sprintf("kernel command line %q contains %q forbidden by policy %s", line, f, p.Name))
				return
			}
		}
	}
	add("kernelCmdline", true, "kernel command line meets the conditions")
}

func (p *Policy) evalIMA(c Claims, add adder) {
	if p.IMA == nil {
		return
	}
	if c.Facts.IMA == nil {
		add("ima", false, fmt.Sprintf("policy %s has an IMA allow-list, but no IMA measurement replayed (no IMA log sent, or PCR 10 never extended)", p.Name))
		return
	}
	checked := 0
entries:
	for _, e := range c.Facts.IMA {
		for _, ex := range p.IMA.Exclude {
			if strings.HasPrefix(e.Path, ex) {
				continue entries
			}
		}
		checked++
		allowed, ok := p.IMA.Allow[e.Path]
		if !ok {
			add("ima", false, fmt.Sprintf("IMA: %s (%s %s) is not in the allow-list of policy %s", e.Path, e.Algorithm, shortHex(e.Digest), p.Name))
			return
		}
		if e.Algorithm != "sha256" || !containsDigest(allowed, e.Digest) {
			add("ima", false, fmt.Sprintf("IMA: %s has digest %s %s, not one policy %s allows", e.Path, e.Algorithm, shortHex(e.Digest), p.Name))
			return
		}
	}
	add("ima", true, fmt.Sprintf("all %d measured files are allowed", checked))
}

func (p *Policy) evalTags(c Claims, add adder) {
	keys := make([]string, 0, len(p.Tags))
	for k := range p.Tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		got, ok := c.Tags[k]
		switch {
		case !ok:
			add("tag "+k, false, fmt.Sprintf("node %s has no tag %s; policy %s wants one of %s", c.Node, k, p.Name, strings.Join(p.Tags[k], ", ")))
		case !slices.Contains(p.Tags[k], got):
			add("tag "+k, false, fmt.Sprintf("tag %s=%s of node %s is not accepted by policy %s (want one of %s)", k, got, c.Node, p.Name, strings.Join(p.Tags[k], ", ")))
		default:
			add("tag "+k, true, fmt.Sprintf("tag %s=%s", k, got))
		}
	}
}

func (p *Policy) evalCertifiedTags(c Claims, add adder) {
	if !p.CertifiedTags {
		return
	}
	want := binding.TagDigest(c.Node, c.Tags)
	switch got := c.Facts.CertifiedTagDigest; {
	case got == nil:
		add("certifiedTags", false, fmt.Sprintf("policy %s requires TPM-certified tags, but node %s certified none (run 'attested node tags sync' on it)", p.Name, c.Node))
	case !bytes.Equal(got, want):
		add("certifiedTags", false, fmt.Sprintf("tags certified by node %s's TPM (digest %s) are not its tags at the broker (digest %s): forged or stale; run 'attested node tags sync' on it", c.Node, shortHex(got), shortHex(want)))
	default:
		add("certifiedTags", true, "the node's TPM certifies its tags")
	}
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
