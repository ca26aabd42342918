package policy

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/evidence"
)

var (
	zero = strings.Repeat("0", 64)
	ones = strings.Repeat("1", 64)
)

func TestParseAndEvaluate(t *testing.T) {
	p, err := Parse([]byte("name: prod-eu\npcrs:\n  7: [\"" + zero + "\", \"sha256:" + ones + "\"]\n  0: [\"" + zero + "\"]\n"))
	require.NoError(t, err)
	ok := p.Evaluate(Claims{PCRs: map[int][]byte{0: make([]byte, 32), 7: bytes.Repeat([]byte{0x11}, 32)}})
	assert.True(t, ok.Allowed, ok.Error())

	bad := p.Evaluate(Claims{PCRs: map[int][]byte{0: make([]byte, 32), 7: bytes.Repeat([]byte{0xab}, 32)}})
	assert.False(t, bad.Allowed)
	assert.Equal(t, "PCR 7 differs from policy prod-eu: got abababababababab.., want one of 0000000000000000.., 1111111111111111..", bad.Error())

	missing := p.Evaluate(Claims{PCRs: map[int][]byte{7: make([]byte, 32)}})
	assert.False(t, missing.Allowed)
	assert.Contains(t, missing.Error(), "PCR 0 is required by policy prod-eu but was not in the quote")
}

func TestParseRefusesWithLineAndReason(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{"", "empty document"},
		{"name: p\n", "states no requirement"},
		{"name: p\npcrs:\n  7: []\n", "line 3: PCR 7 lists no accepted values"},
		{"name: p\npcrs:\n  24: [\"" + zero + "\"]\n", "line 3: PCR index \"24\""},
		{"name: p\npcrs:\n  x: [\"" + zero + "\"]\n", "line 3: PCR index \"x\""},
		{"name: p\npcrs:\n  7: [\"abcd\"]\n", "line 3: PCR 7 value \"abcd\" is not a SHA-256 digest"},
		{"name: p\npcrs:\n  7: [\"" + zero + "\"]\nsecureboot: true\n", `unknown setting "secureboot" in the policy line 4`},
		{"name: 'bad name'\npcrs:\n  7: [\"" + zero + "\"]\n", "line 1: name \"bad name\""},
		{"name: [\n", "line 1: not valid YAML"},
	} {
		_, err := Parse([]byte(tc.doc))
		require.Error(t, err, tc.doc)
		assert.Contains(t, err.Error(), tc.want, tc.doc)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("name: prod\npcrs:\n  7: [\"" + zero + "\"]\n"))
	f.Add([]byte("name: p\npcrs:\n  0: [\"sha256:" + ones + "\", \"" + zero + "\"]\n  23: [\"" + zero + "\"]\n"))
	f.Add([]byte("name: &a p\npcrs: *a\n"))
	f.Add([]byte("{name: x, pcrs: {1: [a]}}"))
	f.Add([]byte("name: p\nkernelCmdline:\n  require: [\"ima_appraise=enforce\"]\n  forbid: ['init=\"/bin/sh\"', rd.break]\n"))
	f.Add([]byte("name: p\nima:\n  allow:\n    /a: [\"" + ones + "\"]\n  exclude: [/tmp/]\n  allowViolations: true\n"))
	f.Add([]byte("name: p\nexpression: 'true || kernelCmdline.size() == 0'\n"))
	f.Add([]byte("name: p\nexpression: 'bootApps.all(a, a != \"\")'\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data)
		if err != nil {
			return
		}
		// A policy that parses states a requirement, and unless its own
		// expression over the claims says otherwise refuses a node that
		// shows nothing.
		if p.Expression == nil || p.Expression.holdsWithoutClaims {
			require.False(t, p.Evaluate(Claims{}).Allowed)
		}
		// Parsed kernel parameters are single words of the command line.
		for _, r := range append(append([]evidence.Param{}, p.CmdlineRequire...), p.CmdlineForbid...) {
			require.NotEmpty(t, r.Name)
			require.NotEqual(t, "--", r.String())
		}
	})
}

// Hardening finding 16: evidence dated in the future (a clock stepped back)
// has no known age, and no maxSessionAge accepts it.
func TestNegativeSessionAgeIsRefused(t *testing.T) {
	p, err := Parse([]byte("name: p\nsecureBoot: off\nmaxSessionAge: 5m\n"))
	require.NoError(t, err)
	off := false
	res := p.Evaluate(Claims{Node: "n", Facts: evidence.Facts{FirmwareLog: true, SecureBoot: &off}, SessionAge: -time.Hour})
	assert.False(t, res.Allowed)
	assert.Contains(t, res.Error(), "in the future")
	res = p.Evaluate(Claims{Node: "n", Facts: evidence.Facts{FirmwareLog: true, SecureBoot: &off}, SessionAge: time.Minute})
	assert.True(t, res.Allowed, res.Error())
}
