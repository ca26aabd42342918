// Package policy parses attested's declarative YAML policies and evaluates
// them, clause by clause, against the claims the broker established from a
// node's verified evidence.
//
// Nothing is trusted by default: a policy must state at least one
// requirement, and a claim a clause needs but the evidence lacks fails it.
package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/attest/binding"
	"github.com/attested-dev/attested/broker/evidence"
	"github.com/attested-dev/attested/broker/settings"
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
	// CmdlineRequire and CmdlineForbid are kernel parameters, matched
	// against the measured command lines as the kernel parses them (see
	// evalCmdline), never as substrings.
	CmdlineRequire, CmdlineForbid []evidence.Param
	// IMA, when set, requires an IMA log whose every measurement outside
	// the excluded directories is an allowed digest of its path.
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
	Allow map[string][][]byte
	// Exclude lists directories (clean absolute paths, no trailing '/')
	// whose files are not checked; "/tmp" excludes "/tmp/x", never
	// "/tmpfoo".
	Exclude []string
	// AllowViolations accepts a log with measurement violations (files IMA
	// could not measure); by default any violation refuses.
	AllowViolations bool
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
		Allow           map[string][]string `yaml:"allow"`
		Exclude         []string            `yaml:"exclude"`
		AllowViolations bool                `yaml:"allowViolations"`
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
		return nil, fmt.Errorf("policy: %w", settings.Explain("the policy", err))
	}
	if len(root.Content) == 0 {
		return nil, errors.New("policy: empty document")
	}
	var doc document
	if err := settings.Decode("the policy", data, &doc); err != nil {
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
		var err error
		if p.CmdlineRequire, err = cmdlineParams(k.Require); err != nil {
			return nil, fail("kernelCmdline", "kernelCmdline require: %v", err)
		}
		if p.CmdlineForbid, err = cmdlineParams(k.Forbid); err != nil {
			return nil, fail("kernelCmdline", "kernelCmdline forbid: %v", err)
		}
	}
	if m := doc.IMA; m != nil {
		if len(m.Allow) == 0 {
			return nil, fail("ima", "ima needs an allow list (path: [sha256 digests])")
		}
		p.IMA = &IMAPolicy{Allow: map[string][][]byte{}, AllowViolations: m.AllowViolations}
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
			dir := strings.TrimSuffix(e, "/")
			if !strings.HasPrefix(dir, "/") || dir == "/" || path.Clean(dir) != dir {
				return nil, fail("ima", "ima exclude %q must be a clean absolute directory other than /, such as /tmp or /tmp/", e)
			}
			p.IMA.Exclude = append(p.IMA.Exclude, dir)
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
	// An expression that holds whatever the claims (true, true || ...)
	// requires nothing.
	expressionRequires := p.Expression != nil && !p.Expression.holdsWithoutClaims
	if p.Expression != nil && !expressionRequires && len(p.PCRs) == 0 && p.SecureBoot == "" && p.BootApps == nil &&
		p.CmdlineRequire == nil && p.CmdlineForbid == nil && p.IMA == nil && p.Tags == nil {
		return nil, fail("expression", "policy %s states no requirement: its expression %q holds whatever the node shows; require PCR values, Secure Boot, boot applications, a kernel command line, an IMA allow-list, tags or an expression over the claims", p.Name, doc.Expression)
	}
	if doc.MaxSessionAge != "" {
		d, err := time.ParseDuration(doc.MaxSessionAge)
		if err != nil || d <= 0 {
			return nil, fail("maxSessionAge", "maxSessionAge %q is not a positive duration such as 5m", doc.MaxSessionAge)
		}
		p.MaxSessionAge = d
	}
	if len(p.PCRs) == 0 && p.SecureBoot == "" && p.BootApps == nil && p.CmdlineRequire == nil &&
		p.CmdlineForbid == nil && p.IMA == nil && p.Tags == nil && !expressionRequires {
		return nil, fmt.Errorf("policy: %s states no requirement; a policy must require PCR values, Secure Boot, boot applications, a kernel command line, an IMA allow-list, tags or an expression", p.Name)
	}
	return p, nil
}

// cmdlineParams parses policy entries, each one kernel parameter as it
// would be written on a command line ("ima_appraise=enforce", "quiet",
// "dyndbg=\"file x.c +p\"").
func cmdlineParams(entries []string) ([]evidence.Param, error) {
	var out []evidence.Param
	for _, s := range entries {
		c := evidence.ParseCmdline(s)
		if len(c.Params) != 1 || len(c.InitArgs) != 0 || c.Params[0].Name == "" || strings.ContainsRune(s, 0) {
			return nil, fmt.Errorf("entry %q is not one kernel parameter (name or name=value; quote a value with spaces)", s)
		}
		out = append(out, c.Params[0])
	}
	return out, nil
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
	// IMAVerdicts are IMA clauses evaluated when the evidence was
	// appraised (by IMAKey), for when Facts no longer holds the
	// measurement list: sessions keep verdicts, not megabytes of entries.
	IMAVerdicts map[string]Clause
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
	// Stale is set when a clause could not be decided from the claims
	// kept since the appraisal (the policy changed after it): fresh
	// evidence decides.
	Stale bool
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
	stale := p.evalIMA(c, add)
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
		switch age := c.SessionAge; {
		case age < 0:
			// Evidence from the future: a clock went back; its age is unknown.
			add("maxSessionAge", false, fmt.Sprintf("evidence is dated %s in the future (a clock stepped back); policy %s allows %s", (-age).Round(time.Second), p.Name, p.MaxSessionAge))
		default:
			add("maxSessionAge", age <= p.MaxSessionAge, fmt.Sprintf("evidence is %s old; policy %s allows %s", age.Round(time.Second), p.Name, p.MaxSessionAge))
		}
	}
	allowed := true
	for _, cl := range cs {
		allowed = allowed && cl.OK
	}
	return Result{Allowed: allowed, Clauses: cs, Stale: stale}
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
	switch {
	case !c.Facts.FirmwareLog:
		add("bootApplications", false, fmt.Sprintf("policy %s lists allowed boot applications, but the node sent no firmware event log", p.Name))
		return
	case len(c.Facts.BootApps) == 0:
		add("bootApplications", false, fmt.Sprintf("policy %s lists allowed boot applications, but no boot application was measured into PCR 4", p.Name))
		return
	}
	for _, b := range c.Facts.BootApps {
		if !containsDigest(p.BootApps, b.Digest) {
			add("bootApplications", false, fmt.Sprintf("PCR 4: %s digest %s is not an allowed boot application of policy %s", b.Describe(), shortHex(b.Digest), p.Name))
			return
		}
	}
	add("bootApplications", true, fmt.Sprintf("all %d boot applications are allowed", len(c.Facts.BootApps)))
}

// evalCmdline matches whole kernel parameters, as the kernel parses the
// line (evidence.ParseCmdline), never substrings:
//   - A required "name=value" must appear before "--", and every
//     occurrence of name must have that value (the kernel lets the last one
//     win, other readers of /proc/cmdline may take the first). A required
//     bare "name" must appear, and always without a value.
//   - A forbidden "name" refuses name with any value or none, anywhere on
//     the line, including the words after "--" that init receives; a
//     forbidden "name=value" refuses any occurrence with that value. A
//     forbidden value that is an absolute path also matches the same path
//     written otherwise ("/bin//sh", "/bin/./sh", "bin/sh"), compared after
//     lexical cleaning (symbolic links are not resolved).
//   - Names compare with '-' and '_' as one character.
//
// Every measured command line must pass, and so must their concatenation
// (systemd-stub hands the kernel its lines joined). Forbidden parameters
// are also looked for in GRUB's loader commands, whose kind the digest does
// not prove.
func (p *Policy) evalCmdline(c Claims, add adder) {
	if p.CmdlineRequire == nil && p.CmdlineForbid == nil {
		return
	}
	lines := c.Facts.KernelCmdlines
	if lines == nil {
		why := "the node sent no firmware event log"
		if c.Facts.FirmwareLog {
			why = c.Facts.KernelCmdlineUnknown
		}
		add("kernelCmdline", false, fmt.Sprintf("policy %s has kernel command line conditions, but no measured kernel command line was established: %s", p.Name, why))
		return
	}
	if len(lines) > 1 {
		lines = append(slices.Clone(lines), strings.Join(lines, " "))
	}
	for _, line := range lines {
		if reason := p.cmdlineRefusal(line, true); reason != "" {
			add("kernelCmdline", false, reason)
			return
		}
	}
	for _, cmd := range c.Facts.BootloaderCommands {
		if reason := p.cmdlineRefusal(cmd, false); reason != "" {
			add("kernelCmdline", false, "GRUB loader command: "+reason)
			return
		}
	}
	add("kernelCmdline", true, "kernel command line meets the conditions")
}

// cmdlineRefusal says why line fails the policy's kernelCmdline clause, or
// "" when it passes; requirements are checked only when require is set.
func (p *Policy) cmdlineRefusal(line string, require bool) string {
	cl := evidence.ParseCmdline(line)
	if require {
		for _, r := range p.CmdlineRequire {
			var seen bool
			for _, got := range cl.Params {
				if got.Key() != r.Key() {
					continue
				}
				seen = true
				if got.HasValue != r.HasValue || got.Value != r.Value {
					return fmt.Sprintf("kernel command line %q sets %q, but policy %s requires %q", line, got.String(), p.Name, r.String())
				}
			}
			if !seen {
				return fmt.Sprintf("kernel command line %q lacks %q required by policy %s", line, r.String(), p.Name)
			}
		}
	}
	for _, f := range p.CmdlineForbid {
		for _, got := range append(slices.Clone(cl.Params), cl.InitArgs...) {
			if got.Key() == f.Key() && (!f.HasValue || (got.HasValue && sameForbiddenValue(got.Value, f.Value))) {
				return fmt.Sprintf("kernel command line %q contains %q forbidden by policy %s (as %q)", line, f.String(), p.Name, got.String())
			}
		}
	}
	return ""
}

// sameForbiddenValue compares a command line value with a forbidden one.
// An absolute path is compared cleaned: the kernel resolves "/bin//sh" and
// "/bin/./sh" to /bin/sh, and a relative init= from the root directory.
// Cleaning ".." lexically can only make more values match, which is the
// safe direction for a forbidden value.
func sameForbiddenValue(got, forbidden string) bool {
	if got == forbidden {
		return true
	}
	if !strings.HasPrefix(forbidden, "/") || got == "" {
		return false
	}
	return path.Clean("/"+got) == path.Clean(forbidden)
}

// evalIMA reports stale when the clause cannot be decided from the kept
// claims.
func (p *Policy) evalIMA(c Claims, add adder) (stale bool) {
	if p.IMA == nil {
		return false
	}
	if c.Facts.IMA == nil && c.Facts.IMASummary != nil {
		// The list was appraised and dropped; its verdict was kept.
		v, ok := c.IMAVerdicts[p.IMAKey()]
		if !ok {
			add("ima", false, fmt.Sprintf("the IMA clause of policy %s changed after this node's evidence was appraised; its next attestation decides", p.Name))
			return true
		}
		add("ima", v.OK, v.Detail)
		return false
	}
	cl := p.evalIMAEntries(c)
	add(cl.Name, cl.OK, cl.Detail)
	return false
}

// IMAKey names this policy's IMA clause, content included: a verdict kept
// under it holds for exactly this clause.
func (p *Policy) IMAKey() string {
	if p.IMA == nil {
		return ""
	}
	paths := make([]string, 0, len(p.IMA.Allow))
	for path := range p.IMA.Allow {
		paths = append(paths, path)
	}
	sort.Strings(paths)
	h := sha256.New()
	for _, path := range paths {
		fmt.Fprintf(h, "allow %q", path)
		for _, d := range p.IMA.Allow[path] {
			fmt.Fprintf(h, " %x", d)
		}
		h.Write([]byte{'\n'})
	}
	for _, e := range p.IMA.Exclude {
		fmt.Fprintf(h, "exclude %q\n", e)
	}
	fmt.Fprintf(h, "allowViolations %t\n", p.IMA.AllowViolations)
	return p.Name + "@" + hex.EncodeToString(h.Sum(nil))
}

// IMAVerdict evaluates the IMA clause against claims that still hold the
// measurement list; ok is false when the policy has no IMA clause.
func (p *Policy) IMAVerdict(c Claims) (key string, v Clause, ok bool) {
	if p.IMA == nil {
		return "", Clause{}, false
	}
	return p.IMAKey(), p.evalIMAEntries(c), true
}

func (p *Policy) evalIMAEntries(c Claims) Clause {
	fail := func(format string, args ...any) Clause {
		return Clause{Name: "ima", Detail: fmt.Sprintf(format, args...)}
	}
	if c.Facts.IMA == nil {
		return fail("policy %s has an IMA allow-list, but no IMA measurement replayed (no IMA log sent, or PCR 10 never extended)", p.Name)
	}
	if v := c.Facts.IMAViolations; v > 0 && !p.IMA.AllowViolations {
		return fail("IMA recorded %d measurement violation(s) (a file written while measured or in use), which prove nothing about that content; policy %s does not set ima.allowViolations", v, p.Name)
	}
	checked := 0
entries:
	for _, e := range c.Facts.IMA {
		for _, dir := range p.IMA.Exclude {
			if strings.HasPrefix(e.Path, dir+"/") {
				continue entries
			}
		}
		checked++
		allowed, ok := p.IMA.Allow[e.Path]
		if !ok {
			return fail("IMA: %q (%q) is not in the allow-list of policy %s", e.Path, e.Algorithm+":"+shortHex(e.Digest), p.Name)
		}
		if e.Algorithm != "sha256" || !containsDigest(allowed, e.Digest) {
			return fail("IMA: %q has digest %q, not one policy %s allows", e.Path, e.Algorithm+":"+shortHex(e.Digest), p.Name)
		}
	}
	return Clause{Name: "ima", OK: true, Detail: fmt.Sprintf("all %d measured files are allowed", checked)}
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
