package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	kpconfig "github.com/containers/ocicrypt/config/keyprovider-config"
	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"

	"github.com/attested-dev/attested/attest"
	"github.com/attested-dev/attested/broker/policy"
	"github.com/attested-dev/attested/cmd/internal/execmode"
	"github.com/attested-dev/attested/cmd/internal/labelercmd"
	"github.com/attested-dev/attested/cmd/internal/nodeconfig"
)

const examples = "../../examples"

// runConfig parses args with the real command tree and returns the
// resulting configuration.
func runConfig(t *testing.T, args ...string) config {
	t.Helper()
	root, cfg := newRootConfig()
	root.AddCommand(&cobra.Command{Use: "probe", RunE: func(*cobra.Command, []string) error { return nil }})
	root.SetArgs(append([]string{"probe"}, args...))
	require.NoError(t, root.Execute())
	return *cfg
}

func TestExampleNodeConfigsLoadStrictly(t *testing.T) {
	for _, f := range []string{"node.yaml", "pipeline.yaml"} {
		c := runConfig(t, "--config", filepath.Join(examples, f))
		assert.Equal(t, "broker.example.internal:8443", c.Broker, f)
		assert.Equal(t, 30*time.Second, c.Timeout, f)
	}
}

func TestFlagsWinOverConfigFile(t *testing.T) {
	c := runConfig(t, "--config", filepath.Join(examples, "node.yaml"), "--name", "from-flag", "--timeout", "5s")
	assert.Equal(t, "from-flag", c.Name)
	assert.Equal(t, 5*time.Second, c.Timeout)
	assert.Equal(t, "/dev/tpmrm0", c.TPM, "file value kept where no flag was given")
}

func TestUnknownConfigFieldIsAnError(t *testing.T) {
	f := filepath.Join(t.TempDir(), "bad.yaml")
	require.NoError(t, os.WriteFile(f, []byte("brokr: x\n"), 0o600))
	root := newRoot()
	root.SetArgs([]string{"node", "attest", "--config", f})
	root.SetOut(io.Discard)
	err := root.Execute()
	require.Error(t, err)
	assert.Contains(t, err.Error(), `unknown setting "brokr" in `)
	assert.NotContains(t, err.Error(), "main.config", "no Go type names")
}

func TestExamplePoliciesParse(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(examples, "policy-*.yaml"))
	require.NoError(t, err)
	require.Len(t, files, 2)
	for _, f := range files {
		data, err := os.ReadFile(f)
		require.NoError(t, err)
		_, err = policy.Parse(data)
		require.NoError(t, err, f)
	}
}

func TestExampleOcicryptConfigs(t *testing.T) {
	for _, f := range []string{"exec.json", "grpc.json"} {
		data, err := os.ReadFile(filepath.Join(examples, "ocicrypt", f))
		require.NoError(t, err)
		var c kpconfig.OcicryptConfig
		require.NoError(t, json.Unmarshal(data, &c), f)
		attrs, ok := c.KeyProviderConfig["attested"]
		require.True(t, ok, f)
		assert.True(t, attrs.Command != nil || attrs.Grpc != "", f)
		if attrs.Command != nil {
			// Exec mode runs the lighter binary with node.yaml's flags.
			assert.Equal(t, "/usr/local/bin/attested-keyprovider", attrs.Command.Path, f)
			c := nodeconfig.Defaults()
			fs := execmode.Flags(&c)
			require.NoError(t, fs.Parse(attrs.Command.Args), f)
			assert.Empty(t, fs.Args(), f)
			path, err := fs.GetString("config")
			require.NoError(t, err)
			assert.Equal(t, "/etc/attested/node.yaml", path, f)
		}
	}
}

// The deployment examples (examples/systemd, examples/kubernetes) are what
// operators copy: the tests below hold them to the posture they document,
// and to the binary's real flags and paths.

// pendingFlags are flags that other changes of the same hardening issue add
// in parallel; the examples are written for them. They are tolerated only
// while this tree lacks them: delete an entry once its change is merged.
var pendingFlags = map[string][]string{}

// secretFlags would put a secret on a command line, where every local user
// reads it (/proc/PID/cmdline).
var secretFlags = []string{"--join-token", "--admin-token"}

// parseAttested parses one attested command line (without the program
// name) with the real command tree, as the binary would, without running
// it. It returns the command with its flags set.
func parseAttested(t *testing.T, where string, args []string) *cobra.Command {
	t.Helper()
	for _, a := range args {
		for _, f := range secretFlags {
			assert.False(t, a == f || strings.HasPrefix(a, f+"="), "%s: %s puts a secret on the command line; use a file, stdin or the environment", where, f)
		}
	}
	root := newRoot()
	cmd, rest, err := root.Find(args)
	require.NoError(t, err, where)
	require.NotSame(t, root, cmd, "%s: %q names no attested command", where, args)
	if cmd.CommandPath() == "attested labeler" {
		// It runs attested-labeler with its arguments.
		return parseLabeler(t, where, rest)
	}
	require.True(t, cmd.Runnable(), "%s: %q is not a runnable command", where, args)
	rest = dropPendingFlags(t, where, cmd, rest)
	require.NoError(t, cmd.ParseFlags(rest), "%s: %q", where, args)
	if cmd.Args != nil {
		require.NoError(t, cmd.Args(cmd, cmd.Flags().Args()), "%s: %q", where, args)
	}
	return cmd
}

// parseLabeler parses an attested-labeler command line (without the
// program name) with its real flags.
func parseLabeler(t *testing.T, where string, args []string) *cobra.Command {
	t.Helper()
	cmd := labelercmd.New()
	require.NoError(t, cmd.ParseFlags(args), "%s: %q", where, args)
	require.NoError(t, cmd.ValidateRequiredFlags(), "%s: %q", where, args)
	require.NoError(t, cmd.Args(cmd, cmd.Flags().Args()), "%s: %q", where, args)
	return cmd
}

func dropPendingFlags(t *testing.T, where string, cmd *cobra.Command, args []string) []string {
	t.Helper()
	cmd.InheritedFlags() // merges persistent flags into cmd.Flags()
	pending := map[string]bool{}
	for _, name := range pendingFlags[cmd.CommandPath()] {
		if cmd.Flags().Lookup(name) == nil {
			pending[name] = true
		}
	}
	var out []string
	for i := 0; i < len(args); i++ {
		name, _, hasValue := strings.Cut(strings.TrimPrefix(args[i], "--"), "=")
		if strings.HasPrefix(args[i], "--") && pending[name] {
			t.Logf("%s: %s --%s is pending (added by another change of this issue); not checked", where, cmd.CommandPath(), name)
			if !hasValue {
				i++
			}
			continue
		}
		out = append(out, args[i])
	}
	return out
}

// commentCommands returns the attested command lines that a file's comments
// tell the operator to run, written as '$ ... attested ARGS'.
func commentCommands(t *testing.T, path string) [][]string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	var cmds [][]string
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "#") {
			continue
		}
		_, shell, ok := strings.Cut(line, "$ ")
		if !ok {
			continue
		}
		words := strings.Fields(shell)
		for i, w := range words {
			// The program starts the line, or follows '--' (kubectl exec).
			if (i > 0 && words[i-1] != "--") || (w != "attested" && !strings.HasSuffix(w, "/attested")) {
				continue
			}
			var args []string
			for _, a := range words[i+1:] {
				if strings.ContainsAny(a, "<>|;&") {
					break
				}
				args = append(args, a)
			}
			cmds = append(cmds, args)
			break
		}
	}
	return cmds
}

// pinnedImage is a fully qualified image name pinned by digest, with no tag:
// a tag can be moved to other bytes, a digest cannot.
var pinnedImage = regexp.MustCompile(`^(localhost|[a-z0-9-]+(\.[a-z0-9-]+)+)(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+@sha256:[0-9a-f]{64}$`)

func TestPinnedImagePattern(t *testing.T) {
	for _, ok := range []string{
		"registry.example.internal/attested/attested@sha256:" + strings.Repeat("0", 64),
		"ghcr.io/squat/generic-device-plugin@sha256:" + strings.Repeat("ab", 32),
		"localhost:5000/attested@sha256:" + strings.Repeat("1", 64),
	} {
		assert.Regexp(t, pinnedImage, ok)
	}
	for _, bad := range []string{
		"attested:latest",
		"attested",
		"registry.example.internal/attested/attested:v1",
		"registry.example.internal/attested/attested:v1@sha256:" + strings.Repeat("0", 64),
		"squat/generic-device-plugin@sha256:" + strings.Repeat("0", 64),
		"registry.example.internal/attested@sha256:" + strings.Repeat("0", 63),
		"registry.example.internal/attested@sha512:" + strings.Repeat("0", 64),
	} {
		assert.NotRegexp(t, pinnedImage, bad)
	}
}

// Kubernetes.

type kubeObject struct {
	file     string
	doc      *yaml.Node
	Kind     string `yaml:"kind"`
	Metadata struct {
		Name      string            `yaml:"name"`
		Namespace string            `yaml:"namespace"`
		Labels    map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Data map[string]string `yaml:"data"`
	Spec yaml.Node         `yaml:"spec"`
	// RBAC objects and service accounts.
	Rules                        []rbacRule    `yaml:"rules"`
	RoleRef                      rbacRoleRef   `yaml:"roleRef"`
	Subjects                     []rbacSubject `yaml:"subjects"`
	AutomountServiceAccountToken *bool         `yaml:"automountServiceAccountToken"`
}

type rbacRule struct {
	APIGroups       []string `yaml:"apiGroups"`
	Resources       []string `yaml:"resources"`
	ResourceNames   []string `yaml:"resourceNames"`
	NonResourceURLs []string `yaml:"nonResourceURLs"`
	Verbs           []string `yaml:"verbs"`
}

type rbacRoleRef struct {
	Kind string `yaml:"kind"`
	Name string `yaml:"name"`
}

type rbacSubject struct {
	Kind      string `yaml:"kind"`
	Name      string `yaml:"name"`
	Namespace string `yaml:"namespace"`
}

func (o kubeObject) String() string {
	return fmt.Sprintf("%s: %s %s/%s", o.file, o.Kind, o.Metadata.Namespace, o.Metadata.Name)
}

type securityContext struct {
	Privileged               *bool  `yaml:"privileged"`
	AllowPrivilegeEscalation *bool  `yaml:"allowPrivilegeEscalation"`
	ReadOnlyRootFilesystem   *bool  `yaml:"readOnlyRootFilesystem"`
	RunAsNonRoot             *bool  `yaml:"runAsNonRoot"`
	RunAsUser                *int64 `yaml:"runAsUser"`
	FSGroup                  *int64 `yaml:"fsGroup"`
	FSGroupChangePolicy      string `yaml:"fsGroupChangePolicy"`
	Capabilities             struct {
		Add  []string `yaml:"add"`
		Drop []string `yaml:"drop"`
	} `yaml:"capabilities"`
	SeccompProfile struct {
		Type string `yaml:"type"`
	} `yaml:"seccompProfile"`
}

type volumeMount struct {
	Name      string `yaml:"name"`
	MountPath string `yaml:"mountPath"`
	ReadOnly  bool   `yaml:"readOnly"`
}

type container struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Command []string `yaml:"command"`
	Args    []string `yaml:"args"`
	Env     []struct {
		Name      string `yaml:"name"`
		ValueFrom *struct {
			FieldRef *struct {
				FieldPath string `yaml:"fieldPath"`
			} `yaml:"fieldRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	Resources struct {
		Limits map[string]any `yaml:"limits"`
	} `yaml:"resources"`
	SecurityContext securityContext `yaml:"securityContext"`
	VolumeMounts    []volumeMount   `yaml:"volumeMounts"`
}

type configMapRef struct {
	Name string `yaml:"name"`
}

type volume struct {
	Name     string `yaml:"name"`
	HostPath *struct {
		Path string `yaml:"path"`
		Type string `yaml:"type"`
	} `yaml:"hostPath"`
	ConfigMap *configMapRef `yaml:"configMap"`
	Projected *struct {
		Sources []struct {
			ConfigMap *configMapRef `yaml:"configMap"`
		} `yaml:"sources"`
	} `yaml:"projected"`
	Secret *struct {
		SecretName  string `yaml:"secretName"`
		Optional    bool   `yaml:"optional"`
		DefaultMode *int   `yaml:"defaultMode"`
	} `yaml:"secret"`
}

type podSpec struct {
	AutomountServiceAccountToken *bool           `yaml:"automountServiceAccountToken"`
	ServiceAccountName           string          `yaml:"serviceAccountName"`
	HostNetwork                  bool            `yaml:"hostNetwork"`
	HostPID                      bool            `yaml:"hostPID"`
	HostIPC                      bool            `yaml:"hostIPC"`
	SecurityContext              securityContext `yaml:"securityContext"`
	InitContainers               []container     `yaml:"initContainers"`
	Containers                   []container     `yaml:"containers"`
	EphemeralContainers          []container     `yaml:"ephemeralContainers"`
	Volumes                      []volume        `yaml:"volumes"`
}

type podTemplate struct {
	Metadata struct {
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Spec podSpec `yaml:"spec"`
}

// workload is an object that runs pods.
type workload struct {
	kubeObject
	labels map[string]string
	pod    podSpec
	// claims names the StatefulSet's volume claim templates.
	claims []string
}

func (w workload) containers() []container {
	return append(append(append([]container{}, w.pod.InitContainers...), w.pod.Containers...), w.pod.EphemeralContainers...)
}

func (w workload) container(t *testing.T, name string) container {
	t.Helper()
	for _, c := range w.containers() {
		if c.Name == name {
			return c
		}
	}
	require.FailNow(t, "no such container", "%s: container %s", w, name)
	return container{}
}

func (w workload) volume(t *testing.T, name string) volume {
	t.Helper()
	for _, v := range w.pod.Volumes {
		if v.Name == name {
			return v
		}
	}
	for _, c := range w.claims {
		if c == name {
			return volume{Name: name}
		}
	}
	require.FailNow(t, "no such volume", "%s: volume %s", w, name)
	return volume{}
}

// mountOf returns the mount of c that holds path (the deepest one).
func mountOf(c container, path string) (volumeMount, bool) {
	var best volumeMount
	found := false
	for _, m := range c.VolumeMounts {
		if (path == m.MountPath || strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/")) && len(m.MountPath) >= len(best.MountPath) {
			best, found = m, true
		}
	}
	return best, found
}

// Kinds the examples may hold; a new kind must be taught to the tests.
var (
	workloadKinds = map[string]bool{"Deployment": true, "StatefulSet": true, "DaemonSet": true, "ReplicaSet": true, "Job": true, "CronJob": true, "Pod": true}
	otherKinds    = map[string]bool{"Namespace": true, "ConfigMap": true, "Service": true, "NetworkPolicy": true,
		"ServiceAccount": true, "ClusterRole": true, "ClusterRoleBinding": true, "Role": true, "RoleBinding": true,
		"ValidatingAdmissionPolicy": true, "ValidatingAdmissionPolicyBinding": true}
)

func kubeObjects(t *testing.T) []kubeObject {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(examples, "kubernetes", "*.yaml"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	var objs []kubeObject
	for _, f := range files {
		data, err := os.ReadFile(f)
		require.NoError(t, err)
		dec := yaml.NewDecoder(bytes.NewReader(data))
		n := 0
		for {
			doc := &yaml.Node{}
			err := dec.Decode(doc)
			if errors.Is(err, io.EOF) {
				break
			}
			require.NoError(t, err, f)
			var o kubeObject
			require.NoError(t, doc.Decode(&o), f)
			o.file, o.doc = filepath.Base(f), doc
			require.NotEmpty(t, o.Kind, f)
			require.True(t, workloadKinds[o.Kind] || otherKinds[o.Kind], "%s: kind %s is not checked by these tests; teach them", f, o.Kind)
			objs = append(objs, o)
			n++
		}
		assert.Positive(t, n, f)
	}
	return objs
}

func workloads(t *testing.T, objs []kubeObject) []workload {
	t.Helper()
	var ws []workload
	for _, o := range objs {
		if !workloadKinds[o.Kind] {
			continue
		}
		var tmpl podTemplate
		var claims []string
		switch o.Kind {
		case "Pod":
			tmpl.Metadata.Labels = o.Metadata.Labels
			require.NoError(t, o.Spec.Decode(&tmpl.Spec), o.String())
		case "CronJob":
			var s struct {
				JobTemplate struct {
					Spec struct {
						Template podTemplate `yaml:"template"`
					} `yaml:"spec"`
				} `yaml:"jobTemplate"`
			}
			require.NoError(t, o.Spec.Decode(&s), o.String())
			tmpl = s.JobTemplate.Spec.Template
		default:
			var s struct {
				Template             podTemplate `yaml:"template"`
				VolumeClaimTemplates []struct {
					Metadata struct {
						Name string `yaml:"name"`
					} `yaml:"metadata"`
				} `yaml:"volumeClaimTemplates"`
			}
			require.NoError(t, o.Spec.Decode(&s), o.String())
			tmpl = s.Template
			for _, c := range s.VolumeClaimTemplates {
				claims = append(claims, c.Metadata.Name)
			}
		}
		ws = append(ws, workload{kubeObject: o, labels: tmpl.Metadata.Labels, pod: tmpl.Spec, claims: claims})
	}
	return ws
}

func findWorkload(t *testing.T, ws []workload, kind, name string) workload {
	t.Helper()
	for _, w := range ws {
		if w.Kind == kind && w.Metadata.Name == name {
			return w
		}
	}
	require.FailNow(t, "missing workload", "%s %s", kind, name)
	return workload{}
}

func findObject(t *testing.T, objs []kubeObject, kind, namespace, name string) kubeObject {
	t.Helper()
	for _, o := range objs {
		if o.Kind == kind && o.Metadata.Namespace == namespace && o.Metadata.Name == name {
			return o
		}
	}
	require.FailNow(t, "missing object", "%s %s/%s", kind, namespace, name)
	return kubeObject{}
}

// imagesIn finds every image reference in a document, wherever it is.
func imagesIn(n *yaml.Node) []string {
	var out []string
	for i := 0; i < len(n.Content); i++ {
		c := n.Content[i]
		if n.Kind == yaml.MappingNode && i%2 == 0 && c.Value == "image" && i+1 < len(n.Content) {
			out = append(out, n.Content[i+1].Value)
			continue
		}
		out = append(out, imagesIn(c)...)
	}
	return out
}

func TestExampleKubernetesImagesPinnedByDigest(t *testing.T) {
	n := 0
	for _, o := range kubeObjects(t) {
		for _, img := range imagesIn(o.doc) {
			assert.Regexp(t, pinnedImage, img, "%s: image %q must be a fully qualified name pinned by digest (NAME@sha256:...), never a tag", o, img)
			n++
		}
	}
	assert.Positive(t, n)
}

// mayRunAsRoot lists the containers that run as uid 0, always without
// capabilities, and why they must.
var mayRunAsRoot = map[string]string{
	"attested-agent/agent":     "the kernel's event logs in securityfs are readable by root only, and the host's exec-mode keyprovider (root) shares its directories",
	"attested-agent/dirs":      "it makes the agent's (root's) host directories 0700",
	"attested-agent/enroll":    "it writes the agent's (root's) state directory",
	"tpm-device-plugin/plugin": "it registers in the kubelet's root-owned socket directory",
}

// mayCallAPIServer lists the workloads that get a service account token,
// and why; every other pod runs without one.
var mayCallAPIServer = map[string]string{
	"attested-labeler": "it labels Nodes",
}

// labelerRules are all the labeler may do: read nodes and patch their labels.
var labelerRules = []rbacRule{{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch", "patch"}}}

// allowedHostPaths lists, per workload, the host paths it may mount and
// whether they must be read-only. Nothing else of the host is reachable.
var allowedHostPaths = map[string]map[string]bool{
	"attested-agent":    {"/var/lib/attested": false, "/run/attested": false, "/sys/kernel/security": true},
	"tpm-device-plugin": {"/var/lib/kubelet/device-plugins": false, "/dev/tpmrm0": true},
}

func TestExampleKubernetesPodSecurity(t *testing.T) {
	ws := workloads(t, kubeObjects(t))
	require.NotEmpty(t, ws)
	for _, w := range ws {
		p := w.pod
		if _, ok := mayCallAPIServer[w.Metadata.Name]; ok {
			assert.True(t, p.AutomountServiceAccountToken != nil && *p.AutomountServiceAccountToken, "%s: says it needs its token (automountServiceAccountToken: true)", w)
			assert.NotContains(t, []string{"", "default"}, p.ServiceAccountName, "%s: a service account of its own", w)
		} else {
			assert.True(t, p.AutomountServiceAccountToken != nil && !*p.AutomountServiceAccountToken, "%s: automountServiceAccountToken: false (it does not call the API server)", w)
		}
		assert.False(t, p.HostNetwork || p.HostPID || p.HostIPC, "%s: no host network, PID or IPC namespace", w)
		for _, v := range p.Volumes {
			if v.HostPath == nil {
				continue
			}
			readOnly, ok := allowedHostPaths[w.Metadata.Name][v.HostPath.Path]
			if !assert.True(t, ok, "%s: hostPath %s is not one this workload may mount", w, v.HostPath.Path) || !readOnly {
				continue
			}
			for _, c := range w.containers() {
				for _, m := range c.VolumeMounts {
					assert.True(t, m.Name != v.Name || m.ReadOnly, "%s: container %s must mount hostPath %s read-only", w, c.Name, v.HostPath.Path)
				}
			}
		}
		for _, c := range w.containers() {
			where := fmt.Sprintf("%s: container %s", w, c.Name)
			sc := c.SecurityContext
			assert.False(t, sc.Privileged != nil && *sc.Privileged, "%s: must not be privileged", where)
			assert.True(t, sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation, "%s: allowPrivilegeEscalation: false", where)
			assert.True(t, sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem, "%s: readOnlyRootFilesystem: true", where)
			assert.Contains(t, sc.Capabilities.Drop, "ALL", "%s: capabilities: {drop: [ALL]}", where)
			assert.Empty(t, sc.Capabilities.Add, "%s: adds capabilities", where)
			seccomp := sc.SeccompProfile.Type
			if seccomp == "" {
				seccomp = p.SecurityContext.SeccompProfile.Type
			}
			assert.Contains(t, []string{"RuntimeDefault", "Localhost"}, seccomp, "%s: seccompProfile RuntimeDefault (pod or container)", where)
			nonRoot, uid := sc.RunAsNonRoot, sc.RunAsUser
			if nonRoot == nil {
				nonRoot = p.SecurityContext.RunAsNonRoot
			}
			if uid == nil {
				uid = p.SecurityContext.RunAsUser
			}
			if _, ok := mayRunAsRoot[w.Metadata.Name+"/"+c.Name]; ok {
				assert.True(t, uid != nil && *uid == 0 && nonRoot != nil && !*nonRoot, "%s: runs as root by design: say so (runAsUser: 0, runAsNonRoot: false)", where)
				continue
			}
			assert.True(t, nonRoot != nil && *nonRoot, "%s: runAsNonRoot: true", where)
			assert.True(t, uid == nil || *uid != 0, "%s: runAsUser 0", where)
		}
	}
}

// labelerArgs returns the attested-labeler command line a container runs,
// if any.
func labelerArgs(c container) ([]string, bool) {
	cmd := append(append([]string{}, c.Command...), c.Args...)
	if len(cmd) == 0 || !strings.HasSuffix(cmd[0], "/"+labelercmd.Name) {
		return nil, false
	}
	return cmd[1:], true
}

// shellScript returns the script a container runs with /bin/sh -c.
func shellScript(c container) (string, bool) {
	cmd := append(append([]string{}, c.Command...), c.Args...)
	if len(cmd) != 3 || cmd[0] != "/bin/sh" || cmd[1] != "-c" {
		return "", false
	}
	return cmd[2], true
}

// scriptCommands returns the attested command lines in a container's shell
// script, with the script's own variables (NAME="VALUE" lines) and the
// container's environment (as $NAME) put in.
func scriptCommands(t *testing.T, c container) [][]string {
	t.Helper()
	script, ok := shellScript(c)
	if !ok {
		return nil
	}
	vars := map[string]string{}
	for _, e := range c.Env {
		vars[e.Name] = "$" + e.Name
	}
	assign := regexp.MustCompile(`^([A-Za-z_][A-Za-z0-9_]*)="([^"$]*(\$[A-Za-z_][A-Za-z0-9_]*)?[^"$]*)"$`)
	expand := func(s string) string {
		return os.Expand(s, func(name string) string {
			v, ok := vars[name]
			require.True(t, ok, "container %s: script uses $%s, which it does not set", c.Name, name)
			return v
		})
	}
	var cmds [][]string
	for _, line := range strings.Split(script, "\n") {
		line = strings.TrimSpace(line)
		if m := assign.FindStringSubmatch(line); m != nil {
			vars[m[1]] = expand(m[2])
			continue
		}
		words := strings.Fields(strings.TrimPrefix(line, "exec "))
		if len(words) == 0 || (words[0] != "attested" && !strings.HasSuffix(words[0], "/attested")) {
			continue
		}
		var args []string
		for _, w := range words[1:] {
			args = append(args, expand(strings.Trim(w, `"`)))
		}
		cmds = append(cmds, args)
	}
	return cmds
}

// attestedArgs returns the attested command line a container runs, if any.
func attestedArgs(c container) ([]string, bool) {
	cmd := append(append([]string{}, c.Command...), c.Args...)
	if len(cmd) == 0 || (cmd[0] != "attested" && !strings.HasSuffix(cmd[0], "/attested")) {
		return nil, false
	}
	return cmd[1:], true
}

func TestExampleKubernetesCommandsUseRealFlags(t *testing.T) {
	objs := kubeObjects(t)
	n := 0
	for _, w := range workloads(t, objs) {
		for _, c := range w.containers() {
			where := fmt.Sprintf("%s: container %s", w, c.Name)
			if args, ok := attestedArgs(c); ok {
				parseAttested(t, where, args)
				n++
			}
			if args, ok := labelerArgs(c); ok {
				parseLabeler(t, where, args)
				n++
			}
			for _, args := range scriptCommands(t, c) {
				parseAttested(t, where+" (script)", args)
				n++
			}
		}
	}
	assert.GreaterOrEqual(t, n, 4, "the broker, the agent, its enroll step and the labeler run attested")
	for _, f := range []string{"broker.yaml", "node-daemonset.yaml", "labeler.yaml"} {
		path := filepath.Join(examples, "kubernetes", f)
		cmds := commentCommands(t, path)
		assert.NotEmpty(t, cmds, "%s: its instructions name attested commands", f)
		for _, args := range cmds {
			parseAttested(t, f+" (comment)", args)
		}
	}
}

// deviceResources returns the extended resources the generic device plugin
// advertises, by device path.
func deviceResources(t *testing.T, c container) map[string]string {
	t.Helper()
	domain := "squat.ai"
	out := map[string]string{}
	for i := 0; i < len(c.Args); i++ {
		a := c.Args[i]
		if v, ok := strings.CutPrefix(a, "--domain="); ok {
			domain = v
		}
		if a != "--device" || i+1 >= len(c.Args) {
			continue
		}
		var spec struct {
			Name   string `yaml:"name"`
			Groups []struct {
				Paths []struct {
					Path        string `yaml:"path"`
					Permissions string `yaml:"permissions"`
				} `yaml:"paths"`
			} `yaml:"groups"`
		}
		require.NoError(t, yaml.Unmarshal([]byte(c.Args[i+1]), &spec))
		for _, g := range spec.Groups {
			for _, p := range g.Paths {
				assert.Equal(t, "rw", p.Permissions, "device %s: read-write, no mknod", p.Path)
				out[p.Path] = spec.Name
			}
		}
	}
	for path, name := range out {
		out[path] = domain + "/" + name
	}
	return out
}

func TestExampleKubernetesAgent(t *testing.T) {
	objs := kubeObjects(t)
	ws := workloads(t, objs)
	agent := findWorkload(t, ws, "DaemonSet", "attested-agent")
	c := agent.container(t, "agent")
	args, ok := attestedArgs(c)
	require.True(t, ok)
	cmd := parseAttested(t, "agent", args)
	require.Equal(t, "attested agent", cmd.CommandPath())

	// The node configuration the agent reads is the ConfigMap's, loaded as
	// strictly as the binary loads it.
	configPath, _ := cmd.Flags().GetString("config")
	m, ok := mountOf(c, configPath)
	require.True(t, ok, "agent: --config %s is on no volume", configPath)
	v := agent.volume(t, m.Name)
	require.NotNil(t, v.Projected, "agent: %s comes from the ConfigMaps", configPath)
	var sources []string
	for _, s := range v.Projected.Sources {
		if s.ConfigMap != nil {
			sources = append(sources, s.ConfigMap.Name)
		}
	}
	assert.ElementsMatch(t, []string{"attested-node", "attested-broker-ca"}, sources)
	cm := findObject(t, objs, "ConfigMap", agent.Metadata.Namespace, "attested-node")
	f := filepath.Join(t.TempDir(), "node.yaml")
	require.NoError(t, os.WriteFile(f, []byte(cm.Data[filepath.Base(configPath)]), 0o600))
	cfg := runConfig(t, "--config", f)
	brokerCA, ok := mountOf(c, cfg.BrokerCA)
	assert.True(t, ok && brokerCA.Name == m.Name, "agent: brokerCA %s comes from ConfigMap attested-broker-ca", cfg.BrokerCA)

	// State and run directories are the host's, at the same paths, so the
	// container runtime on the host finds the socket that grpc.json names,
	// and exec mode on the host shares the enrollment.
	listen, _ := cmd.Flags().GetString("listen")
	socket := strings.TrimPrefix(listen, "unix://")
	assert.Equal(t, cfg.RunDir, filepath.Dir(socket), "agent: the socket lives in runDir")
	grpcConf, err := os.ReadFile(filepath.Join(examples, "ocicrypt", "grpc.json"))
	require.NoError(t, err)
	var kp kpconfig.OcicryptConfig
	require.NoError(t, json.Unmarshal(grpcConf, &kp))
	assert.Equal(t, listen, kp.KeyProviderConfig["attested"].Grpc, "agent: serves where examples/ocicrypt/grpc.json points the runtime")
	for _, dir := range []string{cfg.StateDir, cfg.RunDir} {
		m, ok := mountOf(c, dir)
		if assert.True(t, ok, "agent: %s is on no volume", dir) {
			v := agent.volume(t, m.Name)
			assert.True(t, v.HostPath != nil && v.HostPath.Path == dir && m.MountPath == dir, "agent: %s must be the host's %s", dir, dir)
		}
	}
	m, ok = mountOf(c, cfg.CacheDir)
	assert.True(t, ok, "agent: cacheDir %s is writable only on a volume (read-only root)", cfg.CacheDir)
	assert.NotEqual(t, m.MountPath, cfg.CacheDir, "agent: an emptyDir's root is 0777; the key cache must be a directory the agent creates 0700")

	// Event logs: the host's securityfs, mounted read-only away from
	// /sys/kernel/security, which the runtime's default AppArmor profile
	// denies to containers.
	for _, log := range []string{cfg.EventLog, cfg.IMALog} {
		require.NotEmpty(t, log)
		assert.False(t, strings.HasPrefix(log, "/sys/kernel/security/"), "agent: %s is denied by the default AppArmor profile", log)
		m, ok := mountOf(c, log)
		if assert.True(t, ok, "agent: %s is on no volume", log) {
			v := agent.volume(t, m.Name)
			assert.True(t, v.HostPath != nil && v.HostPath.Path == "/sys/kernel/security" && m.ReadOnly, "agent: %s must come from the host's securityfs, read-only", log)
		}
	}

	// The TPM comes from the device plugin, never from a hostPath.
	assert.Equal(t, "/dev/tpmrm0", cfg.TPM)
	_, ok = mountOf(c, cfg.TPM)
	assert.False(t, ok, "agent: the TPM must come from the device plugin, not a volume")
	plugin := findWorkload(t, ws, "DaemonSet", "tpm-device-plugin")
	resource, ok := deviceResources(t, plugin.container(t, "plugin"))[cfg.TPM]
	require.True(t, ok, "the device plugin must offer %s", cfg.TPM)
	assert.Contains(t, c.Resources.Limits, resource, "agent: must request %s", resource)

	var env []string
	for _, e := range c.Env {
		env = append(env, e.Name)
	}
	assert.Contains(t, env, "NODE_NAME", "agent: --name $(NODE_NAME) needs it")
}

func TestExampleKubernetesBroker(t *testing.T) {
	objs := kubeObjects(t)
	broker := findWorkload(t, workloads(t, objs), "StatefulSet", "attested-broker")
	c := broker.container(t, "broker")
	args, ok := attestedArgs(c)
	require.True(t, ok)
	cmd := parseAttested(t, "broker", args)
	require.Equal(t, "attested broker serve", cmd.CommandPath())
	dataDir, _ := cmd.Flags().GetString("data-dir")
	m, ok := mountOf(c, dataDir)
	require.True(t, ok, "broker: --data-dir %s is on no volume", dataDir)
	assert.Contains(t, broker.claims, m.Name, "broker: the data lives on the persistent volume")
	// fsGroup gives the volume's root to a group; broker serve refuses a
	// data directory others can read, so the data is one level down and
	// the kubelet must not re-add group permissions to its files.
	assert.NotEqual(t, m.MountPath, dataDir, "broker: the data directory must be below the volume's root")
	if broker.pod.SecurityContext.FSGroup != nil {
		assert.Equal(t, "OnRootMismatch", broker.pod.SecurityContext.FSGroupChangePolicy)
	}
	imp := broker.container(t, "import")
	for _, m := range imp.VolumeMounts {
		if v := broker.volume(t, m.Name); v.Secret != nil {
			assert.True(t, m.ReadOnly && v.Secret.Optional, "broker: the import Secret is read-only and optional (deleted after the import)")
		}
	}
	ns := findObject(t, objs, "Namespace", "", broker.Metadata.Namespace)
	assert.Equal(t, "restricted", ns.Metadata.Labels["pod-security.kubernetes.io/enforce"], "broker: its namespace enforces Pod Security restricted")
}

type netPeer struct {
	NamespaceSelector *struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"namespaceSelector"`
	PodSelector *struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"podSelector"`
	IPBlock *struct {
		CIDR string `yaml:"cidr"`
	} `yaml:"ipBlock"`
}

type netRule struct {
	From  []netPeer `yaml:"from"`
	To    []netPeer `yaml:"to"`
	Ports []struct {
		Protocol string `yaml:"protocol"`
		Port     int    `yaml:"port"`
	} `yaml:"ports"`
}

type netPolicy struct {
	PodSelector struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"podSelector"`
	PolicyTypes []string  `yaml:"policyTypes"`
	Ingress     []netRule `yaml:"ingress"`
	Egress      []netRule `yaml:"egress"`
}

func TestExampleKubernetesNetworkPolicies(t *testing.T) {
	objs := kubeObjects(t)
	policies := map[string][]netPolicy{} // by namespace
	for _, o := range objs {
		if o.Kind != "NetworkPolicy" {
			continue
		}
		var p netPolicy
		require.NoError(t, o.Spec.Decode(&p), o.String())
		policies[o.Metadata.Namespace] = append(policies[o.Metadata.Namespace], p)
	}
	selecting := func(ns string, labels map[string]string) []netPolicy {
		var out []netPolicy
		for _, p := range policies[ns] {
			match := true
			for k, v := range p.PodSelector.MatchLabels {
				match = match && labels[k] == v
			}
			if match {
				out = append(out, p)
			}
		}
		return out
	}
	// Every namespace that runs pods denies all traffic by default.
	for _, w := range workloads(t, objs) {
		deny := false
		for _, p := range policies[w.Metadata.Namespace] {
			deny = deny || (len(p.PodSelector.MatchLabels) == 0 && len(p.Ingress) == 0 && len(p.Egress) == 0 &&
				slices.Contains(p.PolicyTypes, "Ingress") && slices.Contains(p.PolicyTypes, "Egress"))
		}
		assert.True(t, deny, "%s: namespace %s needs a default-deny NetworkPolicy", w, w.Metadata.Namespace)
	}

	ws := workloads(t, objs)
	broker := findWorkload(t, ws, "StatefulSet", "attested-broker")
	agent := findWorkload(t, ws, "DaemonSet", "attested-agent")
	labeler := findWorkload(t, ws, "Deployment", "attested-labeler")
	// isPod: the peer is exactly workload w's pods, seen from namespace ns.
	isPod := func(p netPeer, ns string, w workload) bool {
		if p.IPBlock != nil || p.PodSelector == nil || p.PodSelector.MatchLabels["app"] != w.labels["app"] {
			return false
		}
		if p.NamespaceSelector == nil {
			return ns == w.Metadata.Namespace
		}
		return p.NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] == w.Metadata.Namespace
	}
	// Only the agents and the labeler reach the broker, only on its port;
	// the broker reaches nothing.
	for _, p := range selecting(broker.Metadata.Namespace, broker.labels) {
		for _, r := range p.Ingress {
			for _, peer := range r.From {
				assert.True(t, isPod(peer, broker.Metadata.Namespace, agent) || isPod(peer, broker.Metadata.Namespace, labeler),
					"broker: ingress from something other than the agents and the labeler")
			}
			assert.NotEmpty(t, r.From, "broker: ingress from anywhere")
			for _, port := range r.Ports {
				assert.Equal(t, 8443, port.Port, "broker: ingress beyond its port")
			}
			assert.NotEmpty(t, r.Ports, "broker: ingress on every port")
		}
		assert.Empty(t, p.Egress, "broker: calls out to nothing")
	}
	// The labeler serves nothing and reaches the broker, DNS and, by
	// address, the API server.
	lp := selecting(labeler.Metadata.Namespace, labeler.labels)
	assert.NotEmpty(t, lp)
	for _, p := range lp {
		assert.Empty(t, p.Ingress, "labeler: serves nothing")
		for _, r := range p.Egress {
			require.NotEmpty(t, r.To, "labeler: egress to anywhere")
			require.NotEmpty(t, r.Ports, "labeler: egress on every port")
			var ports []int
			for _, port := range r.Ports {
				ports = append(ports, port.Port)
			}
			for _, peer := range r.To {
				switch {
				case isPod(peer, labeler.Metadata.Namespace, broker):
					assert.Equal(t, []int{8443}, ports, "labeler: the broker's port only")
				case peer.IPBlock != nil:
					assert.Subset(t, []int{443, 6443}, ports, "labeler: by address, the API server's port only")
					assert.NotEqual(t, "0.0.0.0/0", peer.IPBlock.CIDR, "labeler: the API server by address, not everywhere")
				default:
					assert.Subset(t, []int{53}, ports, "labeler: egress beyond the broker, DNS and the API server")
				}
			}
		}
	}
	// The agent serves no network port and reaches only the broker and DNS.
	for _, p := range selecting(agent.Metadata.Namespace, agent.labels) {
		assert.Empty(t, p.Ingress, "agent: serves a unix socket only")
		for _, r := range p.Egress {
			assert.NotEmpty(t, r.To, "agent: egress to anywhere")
			for _, port := range r.Ports {
				assert.Contains(t, []int{8443, 53}, port.Port, "agent: egress beyond the broker and DNS")
			}
			assert.NotEmpty(t, r.Ports, "agent: egress on every port")
		}
	}
}

// systemd.

// unitFile holds a unit's settings: section, key, values in order.
type unitFile struct {
	path     string
	sections map[string]map[string][]string
	comments []string
}

func parseUnit(t *testing.T, path string) unitFile {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	u := unitFile{path: path, sections: map[string]map[string][]string{}}
	section := ""
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "":
		case strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
			u.comments = append(u.comments, line)
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			u.sections[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			require.True(t, ok && section != "", "%s:%d: not KEY=VALUE in a section", path, i+1)
			u.sections[section][k] = append(u.sections[section][k], v)
		}
	}
	return u
}

func (u unitFile) service(key string) []string { return u.sections["Service"][key] }

// one returns the only value of a Service key.
func (u unitFile) one(t *testing.T, key string) string {
	t.Helper()
	v := u.service(key)
	require.Len(t, v, 1, "%s: %s= once", u.path, key)
	return v[0]
}

func (u unitFile) execStart(t *testing.T) *cobra.Command {
	t.Helper()
	words := strings.Fields(u.one(t, "ExecStart"))
	require.NotEmpty(t, words)
	require.Equal(t, "/usr/local/bin/attested", words[0], u.path)
	return parseAttested(t, u.path, words[1:])
}

// unitHardening is the sandbox both units run in; each value is measured
// to work (see the units' comments).
var unitHardening = map[string]string{
	"NoNewPrivileges":         "yes",
	"CapabilityBoundingSet":   "",
	"AmbientCapabilities":     "",
	"ProtectSystem":           "strict",
	"ProtectHome":             "yes",
	"PrivateTmp":              "yes",
	"PrivateDevices":          "yes",
	"DevicePolicy":            "closed",
	"PrivateUsers":            "yes",
	"PrivateIPC":              "yes",
	"PrivateMounts":           "yes",
	"ProtectProc":             "invisible",
	"ProcSubset":              "pid",
	"ProtectHostname":         "yes",
	"ProtectClock":            "yes",
	"ProtectKernelTunables":   "yes",
	"ProtectKernelModules":    "yes",
	"ProtectKernelLogs":       "yes",
	"ProtectControlGroups":    "yes",
	"RestrictNamespaces":      "yes",
	"RestrictRealtime":        "yes",
	"RestrictSUIDSGID":        "yes",
	"LockPersonality":         "yes",
	"MemoryDenyWriteExecute":  "yes",
	"RemoveIPC":               "yes",
	"KeyringMode":             "private",
	"SystemCallArchitectures": "native",
	"SystemCallErrorNumber":   "EPERM",
	"UMask":                   "0077",
}

// securityScore is the unit comment that states the measured exposure.
var securityScore = regexp.MustCompile(`systemd-analyze security --offline=true (\S+) \(systemd (\d+)\): (\d+\.\d) `)

// maxExposure is the bar for systemd-analyze security's exposure level.
const maxExposure = 2.0

func TestExampleSystemdUnitsHardened(t *testing.T) {
	families := map[string]string{
		"attested-broker.service": "AF_INET AF_INET6",
		"attested-agent.service":  "AF_UNIX AF_INET AF_INET6",
	}
	for name, af := range families {
		u := parseUnit(t, filepath.Join(examples, "systemd", name))
		for k, want := range unitHardening {
			assert.Equal(t, []string{want}, u.service(k), "%s: %s=%s", name, k, want)
		}
		assert.Equal(t, []string{"@system-service", "~@privileged @resources"}, u.service("SystemCallFilter"), name)
		assert.Equal(t, []string{af}, u.service("RestrictAddressFamilies"), name)
		assert.Equal(t, []string{"0700"}, u.service("StateDirectoryMode"), name)

		var stated string
		for _, c := range u.comments {
			if m := securityScore.FindStringSubmatch(c); m != nil {
				assert.Equal(t, name, m[1], "%s: the score comment names another unit", name)
				stated = m[3]
				score, err := strconv.ParseFloat(m[3], 64)
				require.NoError(t, err)
				assert.LessOrEqual(t, score, maxExposure, "%s: exposure", name)
				checkMeasuredScore(t, u.path, m[2], m[3])
			}
		}
		assert.NotEmpty(t, stated, "%s: state the systemd-analyze security score in a comment", name)
	}
}

// checkMeasuredScore re-measures the stated score where the same systemd
// version is installed (scores differ between versions).
func checkMeasuredScore(t *testing.T, path, version, stated string) {
	t.Helper()
	bin, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Logf("%s: systemd-analyze not installed; stated score not re-measured", path)
		return
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil || !strings.HasPrefix(string(out), "systemd "+version+" ") {
		t.Logf("%s: score stated for systemd %s; this is %q; not re-measured", path, version, strings.SplitN(string(out), "\n", 2)[0])
		return
	}
	out, err = exec.Command(bin, "security", "--offline=true", "--no-pager", path).CombinedOutput()
	require.NoError(t, err, "%s", out)
	m := regexp.MustCompile(`Overall exposure level for \S+: (\d+\.\d) `).FindSubmatch(out)
	require.NotNil(t, m, "%s", out)
	assert.Equal(t, stated, string(m[1]), "%s: the stated systemd-analyze security score is not what it measures", path)
}

func TestExampleSystemdBrokerUnit(t *testing.T) {
	u := parseUnit(t, filepath.Join(examples, "systemd", "attested-broker.service"))
	cmd := u.execStart(t)
	require.Equal(t, "attested broker serve", cmd.CommandPath())
	dataDir, _ := cmd.Flags().GetString("data-dir")
	assert.Equal(t, "/var/lib/"+u.one(t, "StateDirectory"), dataDir, "the data directory is the unit's StateDirectory")
	user := u.one(t, "User")
	assert.NotContains(t, []string{"", "root", "0"}, user, "the broker runs as its own user")
	// broker init puts the CA private key in DATA-DIR-ca; the broker must
	// not see it.
	assert.Contains(t, strings.Fields(u.one(t, "InaccessiblePaths")), "-"+dataDir+"-ca")
	assert.Equal(t, []string{"yes"}, u.service("PrivateDevices"))
	assert.Empty(t, u.service("DeviceAllow"), "the broker opens no device")
	for _, args := range commentCommands(t, u.path) {
		c := parseAttested(t, u.path+" (comment)", args)
		if c.CommandPath() == "attested broker init" {
			d, _ := c.Flags().GetString("data-dir")
			assert.Equal(t, dataDir, d, "init and serve use one data directory")
		}
	}
}

func TestExampleSystemdAgentUnit(t *testing.T) {
	u := parseUnit(t, filepath.Join(examples, "systemd", "attested-agent.service"))
	cmd := u.execStart(t)
	require.Equal(t, "attested agent", cmd.CommandPath())
	configPath, _ := cmd.Flags().GetString("config")
	assert.Equal(t, defaultConfig, configPath)
	cfg := runConfig(t, "--config", filepath.Join(examples, "node.yaml")) // what /etc/attested/node.yaml holds
	assert.Equal(t, "/var/lib/"+u.one(t, "StateDirectory"), cfg.StateDir)
	assert.Equal(t, "/run/"+u.one(t, "RuntimeDirectory"), cfg.RunDir)
	assert.Equal(t, []string{"0700"}, u.service("RuntimeDirectoryMode"))
	listen, _ := cmd.Flags().GetString("listen")
	assert.Equal(t, cfg.Agent, listen, "the agent serves where node.yaml's exec mode forwards")
	assert.Equal(t, cfg.RunDir, filepath.Dir(strings.TrimPrefix(listen, "unix://")), "the socket lives in the RuntimeDirectory")
	cacheDir, _ := cmd.Flags().GetString("cache-dir")
	assert.Equal(t, "/var/cache/"+u.one(t, "CacheDirectory"), cacheDir)
	// The TPM and no other device.
	assert.Equal(t, []string{cfg.TPM + " rw"}, u.service("DeviceAllow"))
	assert.Equal(t, []string{cfg.TPM}, u.service("BindPaths"))
	for _, args := range commentCommands(t, u.path) {
		parseAttested(t, u.path+" (comment)", args)
	}
	assert.NotEmpty(t, commentCommands(t, u.path), "the unit says how to enroll")
}

// RBAC: the service accounts that may call the API server are bound to
// what they need and nothing else; nothing else is bound.
func TestExampleKubernetesRBAC(t *testing.T) {
	objs := kubeObjects(t)
	roles := map[string]kubeObject{}
	for _, o := range objs {
		if o.Kind == "ClusterRole" || o.Kind == "Role" {
			roles[o.Kind+"/"+o.Metadata.Namespace+"/"+o.Metadata.Name] = o
		}
		if o.Kind == "ServiceAccount" {
			assert.True(t, o.AutomountServiceAccountToken != nil && !*o.AutomountServiceAccountToken,
				"%s: no token by default; the one pod that needs it says so", o)
		}
	}
	accounts := map[string]string{} // namespace/name -> workload
	for _, w := range workloads(t, objs) {
		if _, ok := mayCallAPIServer[w.Metadata.Name]; ok {
			accounts[w.Metadata.Namespace+"/"+w.pod.ServiceAccountName] = w.Metadata.Name
		}
	}
	require.Len(t, accounts, len(mayCallAPIServer))
	bound := map[string]bool{}
	for _, o := range objs {
		if o.Kind != "ClusterRoleBinding" && o.Kind != "RoleBinding" {
			continue
		}
		require.NotEmpty(t, o.Subjects, o.String())
		for _, s := range o.Subjects {
			require.Equal(t, "ServiceAccount", s.Kind, "%s: binds %s %s; only the service accounts of mayCallAPIServer are bound", o, s.Kind, s.Name)
			w, ok := accounts[s.Namespace+"/"+s.Name]
			require.True(t, ok, "%s: binds service account %s/%s of no workload that may call the API server", o, s.Namespace, s.Name)
			bound[w] = true
		}
		ns := ""
		if o.RoleRef.Kind == "Role" {
			ns = o.Metadata.Namespace
		}
		role, ok := roles[o.RoleRef.Kind+"/"+ns+"/"+o.RoleRef.Name]
		require.True(t, ok, "%s: its %s %s is not in the examples (a built-in role grants more than the labeler needs)", o, o.RoleRef.Kind, o.RoleRef.Name)
		assert.Equal(t, labelerRules, role.Rules, "%s: the labeler may get, list, watch and patch nodes, nothing else", role)
	}
	for w := range mayCallAPIServer {
		assert.True(t, bound[w], "%s: gets a token but no role", w)
	}
}

// admissionPolicy is the part of a ValidatingAdmissionPolicy the tests read.
type admissionPolicy struct {
	FailurePolicy    string `yaml:"failurePolicy"`
	MatchConstraints struct {
		ResourceRules []struct {
			APIGroups  []string `yaml:"apiGroups"`
			Operations []string `yaml:"operations"`
			Resources  []string `yaml:"resources"`
		} `yaml:"resourceRules"`
	} `yaml:"matchConstraints"`
	MatchConditions []struct {
		Expression string `yaml:"expression"`
	} `yaml:"matchConditions"`
	Validations []struct {
		Expression string `yaml:"expression"`
	} `yaml:"validations"`
	// Binding.
	PolicyName        string   `yaml:"policyName"`
	ValidationActions []string `yaml:"validationActions"`
}

func TestExampleKubernetesLabeler(t *testing.T) {
	objs := kubeObjects(t)
	ws := workloads(t, objs)
	labeler := findWorkload(t, ws, "Deployment", "attested-labeler")
	var spec struct {
		Replicas *int `yaml:"replicas"`
	}
	require.NoError(t, labeler.Spec.Decode(&spec))
	assert.True(t, spec.Replicas != nil && *spec.Replicas == 1, "labeler: one replica (it has no leader election)")
	c := labeler.container(t, "labeler")
	args, ok := labelerArgs(c)
	require.True(t, ok, "labeler: runs %s", labelercmd.Name)
	cmd := parseLabeler(t, "labeler", args)

	// It reaches the broker through the broker's Service.
	svc := findObject(t, objs, "Service", "attested", "attested-broker")
	broker, _ := cmd.Flags().GetString("broker")
	assert.Equal(t, svc.Metadata.Name+"."+svc.Metadata.Namespace+".svc:8443", broker)
	// The admin credential from a Secret, read-only, for its owner only;
	// the CA from a ConfigMap.
	tokenFile, _ := cmd.Flags().GetString("admin-token-file")
	m, ok := mountOf(c, tokenFile)
	require.True(t, ok, "labeler: --admin-token-file %s is on no volume", tokenFile)
	v := labeler.volume(t, m.Name)
	require.NotNil(t, v.Secret, "labeler: the admin credential comes from a Secret")
	assert.True(t, m.ReadOnly, "labeler: the Secret is mounted read-only")
	assert.True(t, v.Secret.DefaultMode != nil && *v.Secret.DefaultMode == 0o400, "labeler: the admin credential is readable by its owner only")
	ca, _ := cmd.Flags().GetString("broker-ca")
	m, ok = mountOf(c, ca)
	require.True(t, ok, "labeler: --broker-ca %s is on no volume", ca)
	assert.NotNil(t, labeler.volume(t, m.Name).ConfigMap, "labeler: the broker CA comes from a ConfigMap")
	interval, _ := cmd.Flags().GetDuration("interval")
	grace, _ := cmd.Flags().GetDuration("grace")
	assert.GreaterOrEqual(t, grace, 2*interval, "labeler: a grace period of at least two polls, or one lost poll flaps every node")

	// The admission policy reserves attested.dev/ labels to exactly this
	// service account, on nodes and their status, and denies.
	var policy, binding admissionPolicy
	po := findObject(t, objs, "ValidatingAdmissionPolicy", "", "attested-node-labels")
	bo := findObject(t, objs, "ValidatingAdmissionPolicyBinding", "", "attested-node-labels")
	require.NoError(t, po.Spec.Decode(&policy))
	require.NoError(t, bo.Spec.Decode(&binding))
	assert.Equal(t, "Fail", policy.FailurePolicy)
	require.Len(t, policy.MatchConstraints.ResourceRules, 1)
	rule := policy.MatchConstraints.ResourceRules[0]
	assert.Equal(t, []string{""}, rule.APIGroups)
	assert.ElementsMatch(t, []string{"CREATE", "UPDATE"}, rule.Operations)
	assert.ElementsMatch(t, []string{"nodes", "nodes/status"}, rule.Resources)
	require.Len(t, policy.MatchConditions, 1)
	account := "system:serviceaccount:" + labeler.Metadata.Namespace + ":" + labeler.pod.ServiceAccountName
	assert.Equal(t, "request.userInfo.username != '"+account+"'", policy.MatchConditions[0].Expression)
	require.Len(t, policy.Validations, 1)
	assert.Contains(t, policy.Validations[0].Expression, "'attested.dev/'")
	assert.Equal(t, "attested-node-labels", binding.PolicyName)
	assert.Equal(t, []string{"Deny"}, binding.ValidationActions)
}

// The agent's pod enrolls its node once, under spec.nodeName, with the
// node's join token from a Secret that only the enroll step mounts.
func TestExampleKubernetesAgentEnrolls(t *testing.T) {
	objs := kubeObjects(t)
	agent := findWorkload(t, workloads(t, objs), "DaemonSet", "attested-agent")
	enroll := agent.container(t, "enroll")
	var inits []string
	for _, c := range agent.pod.InitContainers {
		inits = append(inits, c.Name)
	}
	assert.Contains(t, inits, "enroll", "enroll runs before the agent starts")
	cmds := scriptCommands(t, enroll)
	require.Len(t, cmds, 1)
	cmd := parseAttested(t, "enroll", cmds[0])
	require.Equal(t, "attested node enroll", cmd.CommandPath())

	// Under the Kubernetes node name.
	name, _ := cmd.Flags().GetString("name")
	assert.Equal(t, "$NODE_NAME", name)
	var nodeName bool
	for _, e := range enroll.Env {
		nodeName = nodeName || (e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName")
	}
	assert.True(t, nodeName, "enroll: NODE_NAME is spec.nodeName, the name the labeler labels")

	// With the agent's configuration; once: not when the node's
	// enrollment is on its disk.
	agentCmd := parseAttested(t, "agent", must(attestedArgs(agent.container(t, "agent"))))
	config, _ := cmd.Flags().GetString("config")
	agentConfig, _ := agentCmd.Flags().GetString("config")
	assert.Equal(t, agentConfig, config)
	cm := findObject(t, objs, "ConfigMap", agent.Metadata.Namespace, "attested-node")
	f := filepath.Join(t.TempDir(), "node.yaml")
	require.NoError(t, os.WriteFile(f, []byte(cm.Data[filepath.Base(config)]), 0o600))
	cfg := runConfig(t, "--config", f)
	script, _ := shellScript(enroll)
	assert.Contains(t, script, "[ -e "+filepath.Join(cfg.StateDir, attest.StateFile)+" ]", "enroll: skips an enrolled node")
	m, ok := mountOf(enroll, cfg.StateDir)
	assert.True(t, ok && !m.ReadOnly && agent.volume(t, m.Name).HostPath != nil, "enroll: writes the host's state directory")

	// The token: a file in an optional Secret (deleted once the nodes are
	// enrolled), read-only, for root only, mounted in this step alone.
	tokenFile, _ := cmd.Flags().GetString("join-token-file")
	require.True(t, strings.HasSuffix(tokenFile, "/$NODE_NAME"), "enroll: the token is the Secret's key named for the node: %s", tokenFile)
	m, ok = mountOf(enroll, tokenFile)
	require.True(t, ok, "enroll: %s is on no volume", tokenFile)
	v := agent.volume(t, m.Name)
	require.NotNil(t, v.Secret, "enroll: the join token comes from a Secret")
	assert.True(t, m.ReadOnly && v.Secret.Optional, "enroll: the Secret is read-only and optional")
	assert.True(t, v.Secret.DefaultMode != nil && *v.Secret.DefaultMode == 0o400, "enroll: the token is readable by its owner only")
	for _, c := range agent.containers() {
		if c.Name == enroll.Name {
			continue
		}
		for _, cm := range c.VolumeMounts {
			assert.NotEqual(t, m.Name, cm.Name, "%s: only the enroll step sees the join tokens", c.Name)
		}
	}
	// The TPM.
	assert.Equal(t, agent.container(t, "agent").Resources.Limits["squat.ai/tpmrm0"], enroll.Resources.Limits["squat.ai/tpmrm0"])
}

func must[T any](v T, ok bool) T {
	if !ok {
		panic("must")
	}
	return v
}
