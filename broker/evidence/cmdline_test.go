package evidence_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/evidence"
)

// words renders parsed words for comparison.
func words(ps []evidence.Param) []string {
	out := []string{}
	for _, p := range ps {
		out = append(out, p.String())
	}
	return out
}

// TestParseCmdlineAsTheKernel: cases worked through the kernel's next_arg
// and parse_args (lib/cmdline.c, kernel/params.c).
func TestParseCmdlineAsTheKernel(t *testing.T) {
	for _, tc := range []struct {
		line         string
		params, init []string
	}{
		{"", []string{}, []string{}},
		{"  ro   quiet\t", []string{"ro", "quiet"}, []string{}},
		{"x=ima_appraise=enforce ima_appraise=fix", []string{"x=ima_appraise=enforce", "ima_appraise=fix"}, []string{}},
		// Quotes group spaces and are dropped around a value or a word.
		{`dyndbg="file a.c +p" ro`, []string{"dyndbg=file a.c +p", "ro"}, []string{}},
		{`"init=/bin/sh"`, []string{"init=/bin/sh"}, []string{}},
		{`init="/bin/sh"`, []string{"init=/bin/sh"}, []string{}},
		// A quote inside a word toggles grouping but stays in the word.
		{`a=b"c d"e f`, []string{`a=b"c d"e`, "f"}, []string{}},
		// An unterminated quote runs to the end of the line.
		{`a="b c`, []string{"a=b c"}, []string{}},
		{`"`, []string{""}, []string{}},
		// '=' first in a word does not start a value; the next one does.
		{"=a=b", []string{"=a=b"}, []string{}},
		{"a=", []string{"a="}, []string{}},
		// Everything after "--" is init's, up to a second "--".
		{"ro -- init=/bin/sh single -- x", []string{"ro"}, []string{"init=/bin/sh", "single"}},
		{`ro "--" single`, []string{"ro"}, []string{"single"}},
		{"ro --=x", []string{"ro", "--=x"}, []string{}},
		// The kernel's white space includes \v, \f, \r and 0xA0.
		{"a\vb\fc\rd\xa0init=/bin/sh", []string{"a", "b", "c", "d", "init=/bin/sh"}, []string{}},
		// The line ends at a NUL.
		{"ro\x00init=/bin/sh", []string{"ro"}, []string{}},
	} {
		c := evidence.ParseCmdline(tc.line)
		assert.Equal(t, tc.params, words(c.Params), "%q", tc.line)
		assert.Equal(t, tc.init, words(c.InitArgs), "%q", tc.line)
	}
	assert.Equal(t, "ima_appraise", evidence.Param{Name: "ima-appraise"}.Key())
	assert.Equal(t, "systemd.debug_shell", evidence.Param{Name: "systemd.debug-shell"}.Key())
}

func FuzzParseCmdline(f *testing.F) {
	f.Add("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet")
	f.Add(`x=ima_appraise=enforce ima_appraise=fix xlockdown=integrity init=/bin//sh`)
	f.Add(`ima_appraise=enforce ima-appraise=off lockdown=integrity lockdown=none init=/bin/bash`)
	f.Add(`dyndbg="file a.c +p" "init=/bin/sh" -- single "--" x`)
	f.Add("a\xa0b\"c\x00d=")
	f.Fuzz(func(t *testing.T, line string) {
		c := evidence.ParseCmdline(line)
		all := append(append([]evidence.Param{}, c.Params...), c.InitArgs...)
		for _, p := range all {
			require.NotContains(t, p.Name+p.Value, "\x00")
		}
		// Without quotes, the kernel's split is a plain split on its white
		// space, each word cut at its first '=' (after the first byte).
		if strings.ContainsAny(line, "\"\x00") {
			return
		}
		want := []string{}
		for _, w := range splitKernelSpace(line) {
			if w == "--" {
				break
			}
			want = append(want, w)
		}
		require.Equal(t, want, words(c.Params), "%q", line)
	})
}

// splitKernelSpace splits on the kernel's white space, byte by byte.
func splitKernelSpace(s string) []string {
	var out []string
	start := -1
	for i := 0; i <= len(s); i++ {
		sp := i == len(s) || s[i] == ' ' || (s[i] >= '\t' && s[i] <= '\r') || s[i] == 0xa0
		switch {
		case sp && start >= 0:
			out = append(out, s[start:i])
			start = -1
		case !sp && start < 0:
			start = i
		}
	}
	return out
}
