package policy

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/evidence"
)

// clause finds the named clause of a result.
func clause(t *testing.T, r Result, name string) Clause {
	t.Helper()
	for _, c := range r.Clauses {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no clause %s in %+v", name, r.Clauses)
	return Clause{}
}

func cmdlineClaims(lines ...string) Claims {
	return Claims{Facts: evidence.Facts{FirmwareLog: true, KernelCmdlines: lines}}
}

// TestShippedMeasuredBootPolicyRefusesCmdlineTricks: the shipped example
// policy refuses the command lines a review got through substring matching
// (finding 12), and accepts an honest one.
func TestShippedMeasuredBootPolicyRefusesCmdlineTricks(t *testing.T) {
	doc, err := os.ReadFile("../../examples/policy-measured-boot.yaml")
	require.NoError(t, err)
	p, err := Parse(doc)
	require.NoError(t, err)
	for _, line := range []string{
		"x=ima_appraise=enforce ima_appraise=fix xlockdown=integrity init=/bin//sh",
		"ima_appraise=enforce ima-appraise=off lockdown=integrity lockdown=none init=/bin/bash",
	} {
		c := clause(t, p.Evaluate(cmdlineClaims(line)), "kernelCmdline")
		assert.False(t, c.OK, "%q passed: %s", line, c.Detail)
	}
	const good = "BOOT_IMAGE=/vmlinuz-6.12 root=/dev/sda1 ro ima_appraise=enforce lockdown=integrity quiet"
	ok := clause(t, p.Evaluate(cmdlineClaims(good)), "kernelCmdline")
	assert.True(t, ok.OK, ok.Detail)
	// Its forbid list alone refuses a shell as init, however spelled.
	for _, init := range []string{"init=/bin//sh", `"init=/bin/./sh"`, "init=/bin/bash", "-- single"} {
		c := clause(t, p.Evaluate(cmdlineClaims(good+" "+init)), "kernelCmdline")
		assert.False(t, c.OK, "%q passed", init)
		assert.Contains(t, c.Detail, "forbidden by policy prod-eu-measured")
	}
}

// TestCmdlineParametersNotSubstrings: require and forbid name whole
// parameters, as the kernel parses the line.
func TestCmdlineParametersNotSubstrings(t *testing.T) {
	p, err := Parse([]byte(`name: p
kernelCmdline:
  require: ["ima_appraise=enforce", "lockdown=integrity", "ro"]
  forbid: ["init=/bin/sh", "systemd.debug-shell", "rd.break"]
`))
	require.NoError(t, err)
	const good = "ima_appraise=enforce lockdown=integrity ro"
	for _, tc := range []struct {
		line string
		ok   bool
		why  string
	}{
		{good, true, ""},
		{`BOOT_IMAGE=/vmlinuz "ima_appraise=enforce" lockdown="integrity" ro quiet`, true, ""},
		{"ima-appraise=enforce lockdown=integrity ro", true, ""},
		// Required values: every occurrence, before "--", whole values.
		{"x=ima_appraise=enforce lockdown=integrity ro", false, `lacks "ima_appraise=enforce"`},
		{"ima_appraise=enforce ima_appraise=fix lockdown=integrity ro", false, `sets "ima_appraise=fix"`},
		{"ima_appraise=fix ima_appraise=enforce lockdown=integrity ro", false, `sets "ima_appraise=fix"`},
		{"ima_appraise=enforce ima-appraise=off lockdown=integrity ro", false, `sets "ima-appraise=off"`},
		{"ima_appraise=enforcex lockdown=integrity ro", false, `sets "ima_appraise=enforcex"`},
		{"lockdown=integrity ro -- ima_appraise=enforce", false, `lacks "ima_appraise=enforce"`},
		{"ima_appraise=enforce lockdown=integrity ro=0", false, `sets "ro=0"`},
		{"ima_appraise=enforce xlockdown=integrity ro", false, `lacks "lockdown=integrity"`},
		// Forbidden: any spelling of the parameter, anywhere.
		{good + " init=/bin//sh", false, `contains "init=/bin/sh"`},
		{good + " init=/bin/./sh", false, `contains "init=/bin/sh"`},
		{good + " init=/usr/../bin/sh", false, `contains "init=/bin/sh"`},
		{good + " init=bin/sh", false, `contains "init=/bin/sh"`},
		{good + ` "init=/bin/sh"`, false, `contains "init=/bin/sh"`},
		{good + " systemd.debug_shell", false, `contains "systemd.debug-shell"`},
		{good + " systemd.debug-shell=1", false, `contains "systemd.debug-shell"`},
		{good + " -- rd.break", false, `contains "rd.break"`},
		{good + "\xa0init=/bin/sh", false, `contains "init=/bin/sh"`},
		{good + " init=/bin/shx", true, ""},
		{good + " xinit=/bin/sh", true, ""},
	} {
		c := clause(t, p.Evaluate(cmdlineClaims(tc.line)), "kernelCmdline")
		assert.Equal(t, tc.ok, c.OK, "%q: %s", tc.line, c.Detail)
		if !tc.ok {
			assert.Contains(t, c.Detail, tc.why, tc.line)
		}
	}

	// Several lines: each must pass, and so must the line they make
	// together.
	c := clause(t, p.Evaluate(cmdlineClaims(good, "lockdown=none")), "kernelCmdline")
	assert.False(t, c.OK)
	c = clause(t, p.Evaluate(cmdlineClaims(good+` x="`, good+`" init=/bin/sh`)), "kernelCmdline")
	assert.False(t, c.OK, "joined, the lines set init=/bin/sh: %s", c.Detail)
	// GRUB's loader commands are searched for forbidden parameters.
	cl := cmdlineClaims(good)
	cl.Facts.BootloaderCommands = []string{"linux /vmlinuz " + good + " rd.break"}
	c = clause(t, p.Evaluate(cl), "kernelCmdline")
	assert.False(t, c.OK)
	assert.Contains(t, c.Detail, "GRUB loader command")

	// No established command line refuses, and says why.
	cl = Claims{Facts: evidence.Facts{FirmwareLog: true, KernelCmdlineUnknown: "PCR 12 event 9 is not a command line"}}
	c = clause(t, p.Evaluate(cl), "kernelCmdline")
	assert.False(t, c.OK)
	assert.Contains(t, c.Detail, "PCR 12 event 9 is not a command line")
}

func TestCmdlineEntriesAreOneParameter(t *testing.T) {
	for _, entry := range []string{`a=b "c d"`, "a b", "--", "-- a", `""`, " "} {
		_, err := Parse([]byte("name: p\nkernelCmdline:\n  forbid: ['" + entry + "']\n"))
		assert.ErrorContains(t, err, "is not one kernel parameter", entry)
	}
	p, err := Parse([]byte("name: p\nkernelCmdline:\n  require: ['dyndbg=\"file a.c +p\"']\n"))
	require.NoError(t, err)
	assert.Equal(t, evidence.Param{Name: "dyndbg", Value: "file a.c +p", HasValue: true}, p.CmdlineRequire[0])
}

// TestIMAExcludeAtPathComponents: an excluded directory covers the files
// under it, never a sibling that shares its prefix (finding 12).
func TestIMAExcludeAtPathComponents(t *testing.T) {
	digest := bytes.Repeat([]byte{1}, 32)
	for _, exclude := range []string{"/tmp/", "/tmp"} {
		p, err := Parse([]byte("name: p\nima:\n  allow:\n    /usr/bin/bash: [\"" + strings.Repeat("01", 32) + "\"]\n  exclude: [\"" + exclude + "\"]\n"))
		require.NoError(t, err)
		for path, ok := range map[string]bool{"/tmp/x": true, "/tmp/a/b": true, "/tmpfoo/miner": false, "/tmp": false} {
			c := clause(t, p.Evaluate(Claims{Facts: evidence.Facts{IMA: []evidence.IMAEntry{
				{Path: "/usr/bin/bash", Algorithm: "sha256", Digest: digest},
				{Path: path, Algorithm: "sha256", Digest: digest},
			}}}), "ima")
			assert.Equal(t, ok, c.OK, "exclude %q, file %q: %s", exclude, path, c.Detail)
		}
	}
	for _, bad := range []string{"/", "//", "tmp", "/tmp/../etc", "/tmp//x"} {
		_, err := Parse([]byte("name: p\nima:\n  allow:\n    /a: [\"" + strings.Repeat("01", 32) + "\"]\n  exclude: [\"" + bad + "\"]\n"))
		assert.ErrorContains(t, err, "must be a clean absolute directory", bad)
	}
}

// TestIMAViolationsRefuse: any violation refuses an ima clause unless the
// policy allows them (finding 2).
func TestIMAViolationsRefuse(t *testing.T) {
	allow := "  allow:\n    /usr/bin/bash: [\"" + strings.Repeat("01", 32) + "\"]\n"
	facts := evidence.Facts{IMA: []evidence.IMAEntry{{Path: "/usr/bin/bash", Algorithm: "sha256", Digest: bytes.Repeat([]byte{1}, 32)}}, IMAViolations: 2}
	p, err := Parse([]byte("name: p\nima:\n" + allow))
	require.NoError(t, err)
	c := clause(t, p.Evaluate(Claims{Facts: facts}), "ima")
	assert.False(t, c.OK)
	assert.Contains(t, c.Detail, "IMA recorded 2 measurement violation(s)")
	p, err = Parse([]byte("name: p\nima:\n" + allow + "  allowViolations: true\n"))
	require.NoError(t, err)
	c = clause(t, p.Evaluate(Claims{Facts: facts}), "ima")
	assert.True(t, c.OK, c.Detail)
}

// TestBootApplicationsFailClosed: an application the log re-typed is
// named as such; no measured application at all refuses.
func TestBootApplicationsFailClosed(t *testing.T) {
	p, err := Parse([]byte("name: p\nbootApplications: [\"" + strings.Repeat("01", 32) + "\"]\n"))
	require.NoError(t, err)
	c := clause(t, p.Evaluate(Claims{Facts: evidence.Facts{FirmwareLog: true, BootApps: []evidence.BootApp{
		{Event: 3, Digest: bytes.Repeat([]byte{1}, 32)},
		{Event: 4, Digest: bytes.Repeat([]byte{2}, 32), LoggedType: "EV_EFI_ACTION"},
	}}}), "bootApplications")
	assert.False(t, c.OK)
	assert.Contains(t, c.Detail, "PCR 4: event 4 (logged as EV_EFI_ACTION, which its digest does not prove) digest 0202020202020202.. is not an allowed boot application")
	for _, apps := range [][]evidence.BootApp{nil, {}} {
		c = clause(t, p.Evaluate(Claims{Facts: evidence.Facts{FirmwareLog: true, BootApps: apps}}), "bootApplications")
		assert.False(t, c.OK)
	}
}

// TestExpressionOverAbsentFactsRefuses: a fact the node did not establish
// is absent in the expression, not an empty list or false, so an
// expression over it refuses (finding 9).
func TestExpressionOverAbsentFactsRefuses(t *testing.T) {
	for _, expr := range []string{
		`kernelCmdline.all(l, !l.contains("init=/bin/sh"))`,
		`bootApps.all(a, a == "00")`,
		`!secureBoot`,
		`size(kernelCmdline) == 0 && node != ""`,
	} {
		p, err := Parse([]byte("name: p\nexpression: '" + expr + "'\n"))
		require.NoError(t, err, expr)
		r := p.Evaluate(Claims{Node: "n1", Facts: evidence.Facts{}})
		assert.False(t, r.Allowed, "%s passed for a node that sent no event log", expr)
		assert.Contains(t, r.Error(), "could not be evaluated", expr)
	}
	p, err := Parse([]byte("name: p\nexpression: 'kernelCmdline.all(l, !l.contains(\"init=\")) && !secureBoot && bootApps.size() == 1'\n"))
	require.NoError(t, err)
	sb := false
	r := p.Evaluate(Claims{Facts: evidence.Facts{FirmwareLog: true, SecureBoot: &sb, KernelCmdlines: []string{"ro"},
		BootApps: []evidence.BootApp{{Digest: []byte{1}}}}})
	assert.True(t, r.Allowed, r.Error())
}

// TestExpressionThatRequiresNothingIsRefused: an expression that holds
// whatever the node shows is no requirement (finding 9).
func TestExpressionThatRequiresNothingIsRefused(t *testing.T) {
	for _, expr := range []string{`true`, `true || node == "x"`, `1 == 1`, `!false`, `tags.size() == 7 || true`} {
		_, err := Parse([]byte("name: p\nexpression: '" + expr + "'\n"))
		assert.ErrorContains(t, err, "states no requirement", expr)
	}
	for _, doc := range []string{
		"name: p\nexpression: 'node.startsWith(\"eu-\")'\n",
		"name: p\nexpression: 'true'\ntags:\n  region: [EU]\n",
	} {
		_, err := Parse([]byte(doc))
		assert.NoError(t, err, doc)
	}
}
