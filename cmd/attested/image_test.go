package main

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The container image (Dockerfile) cannot be built here (no container
// engine): these tests hold it to what can be checked without building.

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, COPY, ...
	args string
	// comment holds the comment lines just before it.
	comment string
}

func parseDockerfile(t *testing.T, path string) []instruction {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	var out []instruction
	var comment []string
	lines := strings.Split(string(data), "\n")
	for i := 0; i < len(lines); i++ {
		line := strings.TrimSpace(lines[i])
		switch {
		case line == "":
			comment = nil
			continue
		case strings.HasPrefix(line, "#"):
			comment = append(comment, strings.TrimSpace(strings.TrimPrefix(line, "#")))
			continue
		}
		for strings.HasSuffix(line, "\\") && i+1 < len(lines) {
			i++
			line = strings.TrimSuffix(line, "\\") + " " + strings.TrimSpace(lines[i])
		}
		cmd, args, _ := strings.Cut(line, " ")
		out = append(out, instruction{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args), comment: strings.Join(comment, "\n")})
		comment = nil
	}
	return out
}

// makeBuilds returns the go build command lines of the Makefile's build
// target, with $(GO) as go and the output (-o) left out, by package.
func makeBuilds(t *testing.T) map[string][]string {
	t.Helper()
	data, err := os.ReadFile("../../Makefile")
	require.NoError(t, err)
	out := map[string][]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.HasPrefix(line, "\t$(GO) build ") || !strings.Contains(line, "-o $@") {
			continue
		}
		words := goBuild(strings.Fields("go " + strings.TrimPrefix(line, "\t$(GO) ")))
		out[words[len(words)-1]] = words
	}
	return out
}

// goBuild drops -o and its value from a go build command line.
func goBuild(words []string) []string {
	var out []string
	for i := 0; i < len(words); i++ {
		if words[i] == "-o" {
			i++
			continue
		}
		out = append(out, words[i])
	}
	return out
}

func TestDockerfileBuildsAsTheMakefile(t *testing.T) {
	ins := parseDockerfile(t, "../../Dockerfile")
	want := makeBuilds(t)
	require.Contains(t, want, "./cmd/attested")
	require.Contains(t, want, "./cmd/attested-labeler")
	got := map[string][]string{}
	for _, in := range ins {
		if in.cmd != "RUN" || !strings.Contains(in.args, "go build") {
			continue
		}
		words := strings.Fields(in.args)
		// Static: the final image has no C library.
		require.Equal(t, "CGO_ENABLED=0", words[0], "Dockerfile: %s", in.args)
		words = goBuild(words[1:])
		got[words[len(words)-1]] = words
	}
	assert.Equal(t, want, got, "the Dockerfile builds what the Makefile builds, with the same flags")

	// The build stage's Go is the go.mod's.
	data, err := os.ReadFile("../../go.mod")
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(data)
	require.NotNil(t, m, "go.mod: no go line")
	require.Equal(t, "FROM", ins[0].cmd)
	assert.Contains(t, ins[0].comment, "golang:"+string(m[1])+" ", "the build stage's tag comment names the go.mod's Go")
}

func TestDockerfileBasesPinnedByDigest(t *testing.T) {
	ins := parseDockerfile(t, "../../Dockerfile")
	stages := map[string]bool{}
	n := 0
	for _, in := range ins {
		if in.cmd != "FROM" {
			continue
		}
		words := strings.Fields(in.args)
		require.NotEmpty(t, words)
		img := words[len(words)-1]
		if len(words) >= 3 && strings.EqualFold(words[len(words)-2], "AS") {
			img = words[len(words)-3]
			stages[words[len(words)-1]] = true
		}
		if stages[img] && !strings.Contains(img, "@") {
			continue
		}
		assert.Regexp(t, pinnedImage, img, "Dockerfile: base %q must be a fully qualified name pinned by digest (NAME@sha256:...)", img)
		assert.Regexp(t, regexp.MustCompile(`[a-z0-9./-]+:[a-z0-9.-]+`), in.comment, "Dockerfile: say which tag %s was published under", img)
		n++
	}
	assert.Equal(t, 3, n, "build, tools and the distroless base")
}

// finalStage returns the instructions of the image's last stage.
func finalStage(ins []instruction) []instruction {
	last := 0
	for i, in := range ins {
		if in.cmd == "FROM" {
			last = i
		}
	}
	return ins[last:]
}

// The image holds what the Kubernetes examples run, and runs as the
// non-root user they expect.
func TestDockerfileServesTheExamples(t *testing.T) {
	ins := parseDockerfile(t, "../../Dockerfile")
	final := finalStage(ins)
	files := map[string]bool{}
	tools := map[string]bool{}
	var user string
	for _, in := range final {
		switch in.cmd {
		case "COPY":
			words := strings.Fields(in.args)
			dst := words[len(words)-1]
			for _, src := range words[:len(words)-1] {
				if strings.HasPrefix(src, "--") {
					continue
				}
				if strings.HasSuffix(dst, "/") && !strings.HasSuffix(src, "/") {
					files[dst+filepath.Base(src)] = true
				}
			}
		case "USER":
			user = in.args
		}
	}
	// The tools stage: the links it makes to busybox.
	for _, in := range ins {
		if m := regexp.MustCompile(`for tool in ([a-z ]+); do ln -s busybox "/out/bin/\$tool"`).FindStringSubmatch(in.args); m != nil {
			for _, tool := range strings.Fields(m[1]) {
				tools[tool] = true
				files["/bin/"+tool] = true
			}
		}
	}
	assert.Equal(t, "65532:65532", user, "the image runs as distroless's nonroot unless a pod says otherwise")
	require.True(t, tools["sh"], "the examples' init steps run /bin/sh")

	used := map[string]bool{}
	for _, w := range workloads(t, kubeObjects(t)) {
		for _, c := range w.containers() {
			if !strings.HasPrefix(c.Image, "registry.example.internal/attested/attested@") {
				continue
			}
			require.NotEmpty(t, c.Command, "%s: container %s names its command (the image's entrypoint is attested)", w, c.Name)
			assert.True(t, files[c.Command[0]], "%s: container %s runs %s, which the image does not hold", w, c.Name, c.Command[0])
			script, ok := shellScript(c)
			if !ok {
				continue
			}
			for _, cmd := range scriptTools(script) {
				if strings.HasPrefix(cmd, "/") {
					assert.True(t, files[cmd], "%s: container %s runs %s, which the image does not hold", w, c.Name, cmd)
					continue
				}
				assert.True(t, tools[cmd], "%s: container %s runs %s, which the image does not hold (Dockerfile, tools stage)", w, c.Name, cmd)
				used[cmd] = true
			}
		}
	}
	for tool := range tools {
		assert.True(t, used[tool] || tool == "sh", "the image holds %s, which no example runs: drop it", tool)
	}
}

// shellBuiltins are the shell's own words and builtins, which need no tool.
var shellBuiltins = []string{"if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "case", "esac",
	"!", "exec", "set", "umask", "exit", "echo", "[", "test", "true", "false", ":", "return", "cd"}

// scriptTools returns the programs a shell script runs: the first word of
// each simple command that is not a builtin or an assignment.
func scriptTools(script string) []string {
	var out []string
	for _, line := range strings.Split(script, "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "#") {
			continue
		}
		// Quoted words are arguments, whatever they hold.
		line = regexp.MustCompile(`"[^"]*"|'[^']*'`).ReplaceAllString(line, "Q")
		for _, part := range regexp.MustCompile(`;|&&|\|\||\|`).Split(line, -1) {
			words := strings.Fields(part)
			for len(words) > 0 && slices.Contains([]string{"if", "then", "else", "elif", "do", "!", "exec", "while"}, words[0]) {
				words = words[1:]
			}
			if len(words) == 0 || slices.Contains(shellBuiltins, words[0]) || regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`).MatchString(words[0]) {
				continue
			}
			out = append(out, words[0])
		}
	}
	return out
}

func TestScriptTools(t *testing.T) {
	got := scriptTools("set -eu\nif [ -e x ]; then\n  echo \"a; b && c\" >&2; exit 0\nfi\ntok=\"a b\"\nfor f in a b; do\n  cp x y && chmod 0700 y\ndone\nexec /usr/local/bin/attested node\nmv a b | rm -rf c")
	assert.Equal(t, []string{"cp", "chmod", "/usr/local/bin/attested", "mv", "rm"}, got)
}
