//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	keyproviderpb "github.com/containers/ocicrypt/utils/keyprovider"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// TestRoundTrip: an image encrypted for key "app" is pushed with encrypted
// layers carrying our annotation, and decrypts on the enrolled node with
// matching PCRs to the original layers, at one TPM quote when cold and
// none when warm.
func TestRoundTrip(t *testing.T) {
	eachMode(t, func(t *testing.T, m mode) {
		w := newWorld(t, worldOptions{encryptMode: m})
		n := w.node1

		enc := w.inspect(w.image)
		require.Len(t, enc.Layers, srcLayers)
		for i, l := range enc.Layers {
			assert.True(t, strings.HasSuffix(l.MediaType, "+encrypted"), "layer %d media type %s", i, l.MediaType)
			assert.Contains(t, l.Annotations, "org.opencontainers.image.enc.pubopts", "layer %d", i)
			require.Contains(t, l.Annotations, providerAnnotation, "layer %d", i)
			raw, err := base64.StdEncoding.DecodeString(l.Annotations[providerAnnotation])
			require.NoError(t, err, "layer %d: one base64 annotation item", i)
			var a struct {
				Format     string `json:"attested"`
				Version    int    `json:"v"`
				Broker     string `json:"broker"`
				Recipients []struct {
					Key        string `json:"key"`
					KeyVersion uint32 `json:"kv"`
					Suite      string `json:"suite"`
				} `json:"recipients"`
			}
			require.NoError(t, json.Unmarshal(raw, &a), "layer %d annotation", i)
			assert.Equal(t, "layer-key", a.Format)
			assert.Equal(t, 1, a.Version)
			assert.Equal(t, w.brokerID, a.Broker)
			require.Len(t, a.Recipients, 1)
			assert.Equal(t, "app", a.Recipients[0].Key)
			assert.Equal(t, uint32(1), a.Recipients[0].KeyVersion)
		}

		switch m {
		case execMode:
			// Nothing attested yet: enrollment and encryption quote nothing.
			total, _ := w.quotes(n)
			require.Zero(t, total, "quotes before the first pull")
			r := w.mustPull(n, m)
			total, allowed := w.quotes(n)
			assert.Equal(t, 1, total, "a cold %d-layer pull costs exactly one quote", srcLayers)
			assert.Equal(t, 1, allowed)
			t.Logf("exec cold pull of %d layers: %s", srcLayers, r.dur)
			r = w.mustPull(n, m)
			total, _ = w.quotes(n)
			assert.Equal(t, 1, total, "a warm pull costs no quote")
			t.Logf("exec warm pull of %d layers: %s", srcLayers, r.dur)
		case grpcMode:
			// The agent (started to encrypt) attested once at start-up.
			total, allowed := w.quotes(n)
			require.Equal(t, 1, total, "the agent attests once at start-up")
			require.Equal(t, 1, allowed)
			for i := 0; i < 2; i++ {
				r := w.mustPull(n, m)
				total, _ = w.quotes(n)
				assert.Equal(t, 1, total, "a pull through the warm agent costs no quote (pull %d)", i+1)
				t.Logf("gRPC warm pull %d of %d layers: %s", i+1, srcLayers, r.dur)
			}
		}
		releases := 0
		for _, e := range w.audit("--node", n.name, "--kind", "release") {
			assert.True(t, e.Allowed)
			assert.Equal(t, "app", e.Key)
			releases++
		}
		assert.Equal(t, 2*srcLayers, releases, "one release per layer per pull")
	})
}

// TestChangedPCRRefused: once a PCR the policy pins changes, the node's
// session ends and the next pull is refused with the PCR and policy named.
func TestChangedPCRRefused(t *testing.T) {
	eachMode(t, func(t *testing.T, m mode) {
		w := newWorld(t, worldOptions{})
		n := w.node1
		w.mustPull(n, m) // warm session
		n.tpm.ExtendPCR(16, []byte("a debugger was attached"))
		msg, _ := w.refusedPull(n, m)
		assert.Contains(t, msg, "PCR 16")
		assert.Contains(t, msg, "policy prod")
		assert.Regexp(t, `broker \S+ refused node node1`, msg)
		if m == grpcMode {
			assert.Contains(t, msg, "code = PermissionDenied")
		}
		refusals := w.audit("--node", n.name, "--kind", "refuse")
		require.NotEmpty(t, refusals)
		for _, e := range refusals {
			assert.False(t, e.Allowed)
			assert.Contains(t, e.Reason, "PCR 16")
		}
	})
}

// TestUnenrolledNodeRefused: a node that never enrolled (its own swtpm and
// state) cannot unwrap, and is told why.
func TestUnenrolledNodeRefused(t *testing.T) {
	eachMode(t, func(t *testing.T, m mode) {
		w := newWorld(t, worldOptions{})
		n2 := w.newNode("node2")
		msg, _ := w.refusedPull(n2, m)
		assert.Contains(t, msg, "not enrolled")
		assert.Contains(t, msg, "attested node enroll")

		// A node whose local state was copied from another node: its TPM
		// does not hold that AK, so it fails before any quote.
		n3 := w.newNode("node3")
		state, err := os.ReadFile(filepath.Join(w.node1.stateDir, "node.json"))
		require.NoError(t, err)
		var st map[string]any
		require.NoError(t, json.Unmarshal(state, &st))
		st["name"] = "node3"
		state, err = json.Marshal(st)
		require.NoError(t, err)
		require.NoError(t, os.MkdirAll(n3.stateDir, 0o700))
		require.NoError(t, os.WriteFile(filepath.Join(n3.stateDir, "node.json"), state, 0o600))
		if m == grpcMode {
			// The agent cannot warm up; start it without waiting for that.
			n3.startAgent(false)
		}
		msg, _ = w.refusedPull(n3, m)
		assert.Contains(t, msg, "load attestation key (was the TPM cleared? enroll again)")
		total, _ := w.quotes(n3)
		assert.Zero(t, total)

		// A node the broker removed: its TPM quotes, and the broker gives
		// the answer it gives anyone whose evidence does not authenticate,
		// keeping the reason for the admin.
		n4 := w.newNode("node4")
		n4.enroll()
		w.admin("node", "remove", "node4")
		if m == grpcMode {
			n4.startAgent(false)
		}
		msg, _ = w.refusedPull(n4, m)
		assert.Contains(t, msg, `broker `+w.brokerID+` refused the evidence of node "node4": the node is not enrolled, not approved or revoked`)
		assert.Contains(t, w.auditReasons("node4"), "node is not enrolled")
	})
}

// TestRevokedNodeRefused: revoking a node ends its session at once.
func TestRevokedNodeRefused(t *testing.T) {
	eachMode(t, func(t *testing.T, m mode) {
		w := newWorld(t, worldOptions{})
		n := w.node1
		w.mustPull(n, m) // warm session
		assert.Contains(t, w.admin("node", "revoke", "node1"), "node node1 is now revoked")
		msg, _ := w.refusedPull(n, m)
		assert.Contains(t, msg, `node "node1" is revoked`)
		assert.Regexp(t, `(?m)^node1\s+revoked`, w.admin("node", "list"))
	})
}

// TestBrokerDown: with the broker stopped, a pull fails at once saying the
// broker is unreachable; with a broker that accepts connections but never
// answers, the node's configured timeout bounds the pull.
func TestBrokerDown(t *testing.T) {
	const timeout = 4 * time.Second
	eachMode(t, func(t *testing.T, m mode) {
		t.Run("stopped", func(t *testing.T) {
			w := newWorld(t, worldOptions{})
			n := w.node1
			n.ocicryptConfig(m) // in gRPC mode: the agent is up and warm
			w.broker.stop()
			msg, r := w.refusedPull(n, m)
			assert.Less(t, r.dur, 30*time.Second)
			assert.Contains(t, msg, "broker "+w.brokerAddr+" is unreachable")
			t.Logf("failed after %s", r.dur)
		})
		t.Run("hung", func(t *testing.T) {
			w := newWorld(t, worldOptions{})
			n := w.node1
			n.cfg = n.writeConfig("node-short-timeout.yaml", timeout)
			n.ocicryptConfig(m)
			w.broker.stop()
			blackHole(t, w.brokerAddr)
			msg, r := w.refusedPull(n, m)
			assert.Regexp(t, `broker `+regexp.QuoteMeta(w.brokerAddr)+` (did not answer in time|is unreachable)`, msg)
			assert.Less(t, r.dur, 30*time.Second)
			// The configured timeout, not something else, ends the wait.
			assert.GreaterOrEqual(t, r.dur, timeout-500*time.Millisecond)
			assert.Less(t, r.dur, timeout+10*time.Second)
			t.Logf("timeout %s: failed after %s", timeout, r.dur)
		})
	})
}

// blackHole accepts TCP connections on addr and never answers.
func blackHole(t *testing.T, addr string) {
	var l net.Listener
	var err error
	for i := 0; i < 50; i++ {
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	require.NoError(t, err)
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
}

// malformed are requests no client should send; each gets a clear error.
var malformed = []struct {
	name string
	req  []byte
	// want is in the error message, exec and gRPC alike.
	want string
	// marker must not be echoed back: requests can carry secrets.
	marker string
}{
	{"bad JSON", []byte(`{"op":"keyunwrap","keyunwrapparams":{"dc":null,"annotation":"c2VjcmV0LWxheWVyLWtleQ=="`),
		"request is not valid keyprovider JSON", "c2VjcmV0LWxheWVyLWtleQ"},
	{"empty request", []byte{}, "the request is empty", ""},
	{"bad base64 in optsdata", []byte(`{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"attested":["a2V5PWFwcA=="]},"DecryptConfig":{"Parameters":{}}},"optsdata":"c2VjcmV0LWxheWVyLWtleQ==*not*base64*"},"keyunwrapparams":{"dc":null,"annotation":null}}`),
		"base64", "c2VjcmV0LWxheWVyLWtleQ"},
	{"bad base64 in annotation", []byte(`{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":null},"annotation":"eyJhdHRlc3RlZCI6!!"}}`),
		"base64", "eyJhdHRlc3RlZCI6"},
	{"unknown op", []byte(`{"op":"rewrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":null,"annotation":null}}`),
		`unknown operation "rewrap"`, ""},
	{"annotation from another provider", []byte(`{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":null},"annotation":"` +
		base64.StdEncoding.EncodeToString([]byte(`{"kid":"x","wrapped":"c2VjcmV0LWxheWVyLWtleQ=="}`)) + `"}}`),
		"not an attested annotation", "c2VjcmV0LWxheWVyLWtleQ"},
	{"no annotation", []byte(`{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":null,"annotation":null}}`),
		"carries no annotation", ""},
}

// TestMalformedRequests: bad input straight to 'attested keyprovider' and to
// the agent's socket gets a clear error, a failure status, nothing on
// stdout, and changes nothing at the broker.
func TestMalformedRequests(t *testing.T) {
	w := newWorld(t, worldOptions{noImage: true})
	n := w.node1
	client := n.grpcClient() // the agent attests once at start-up
	huge := []byte(`{"op":"keyunwrap","keyunwrapparams":{"annotation":"` + strings.Repeat("A", 2<<20) + `"}}`)
	eventsBefore := len(w.audit())

	t.Run("exec", func(t *testing.T) {
		for _, c := range malformed {
			t.Run(c.name, func(t *testing.T) {
				r := n.keyprovider(c.req, false)
				assert.Equal(t, 1, r.code, "exit code; stderr: %s", r.stderr)
				assert.Empty(t, r.stdout, "stdout must stay empty on error")
				assert.True(t, strings.HasPrefix(r.msg(), "attested: "), "stderr: %q", r.stderr)
				assert.Contains(t, r.msg(), c.want)
				assert.Equal(t, 1, strings.Count(strings.TrimSpace(r.msg()), "\n")+1, "one line of error: %q", r.stderr)
				if c.marker != "" {
					assert.NotContains(t, r.msg(), c.marker, "the error echoes the request")
				}
			})
		}
		t.Run("huge request", func(t *testing.T) {
			r := n.keyprovider(huge, false)
			assert.Equal(t, 1, r.code, "stderr: %s", r.stderr)
			assert.Empty(t, r.stdout)
			assert.Contains(t, r.msg(), "limit")
			assert.Less(t, len(r.stderr), 500)
		})
	})

	t.Run("grpc", func(t *testing.T) {
		for _, c := range malformed {
			t.Run(c.name, func(t *testing.T) {
				for _, call := range []string{"WrapKey", "UnWrapKey"} {
					out, err := n.grpcCall(client, call, c.req)
					require.Error(t, err, "%s accepted it: %s", call, out)
					st := status.Convert(err)
					assert.Equal(t, codes.InvalidArgument, st.Code(), "%s: %v", call, err)
					assert.Contains(t, st.Message(), c.want, call)
					if c.marker != "" {
						assert.NotContains(t, st.Message(), c.marker, "the error echoes the request")
					}
				}
			})
		}
		t.Run("huge request", func(t *testing.T) {
			_, err := n.grpcCall(client, "UnWrapKey", huge)
			require.Error(t, err)
			assert.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
		})
	})

	assert.Len(t, w.audit(), eventsBefore, "malformed requests must not change broker state")
	total, _ := w.quotes(n)
	assert.Equal(t, 1, total, "only the agent's start-up attestation")
}

// grpcClient connects to the node's agent (starting it) with ocicrypt's
// own generated stub.
func (n *node) grpcClient() keyproviderpb.KeyProviderServiceClient {
	n.ocicryptConfig(grpcMode)
	cc, err := grpc.NewClient("unix://"+n.sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(8<<20)))
	require.NoError(n.w.t, err)
	n.w.t.Cleanup(func() { cc.Close() })
	return keyproviderpb.NewKeyProviderServiceClient(cc)
}

// grpcCall sends req through the stub and records any error for leak checks.
func (n *node) grpcCall(c keyproviderpb.KeyProviderServiceClient, call string, req []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	in := &keyproviderpb.KeyProviderKeyWrapProtocolInput{KeyProviderKeyWrapProtocolInput: req}
	var out *keyproviderpb.KeyProviderKeyWrapProtocolOutput
	var err error
	if call == "WrapKey" {
		out, err = c.WrapKey(ctx, in)
	} else {
		out, err = c.UnWrapKey(ctx, in)
	}
	if err != nil {
		n.w.outputs = append(n.w.outputs, output{"grpc " + call + " error", []byte(err.Error())})
		return nil, err
	}
	return out.GetKeyProviderKeyWrapProtocolOutput(), nil
}

// TestRebootEndsSession: after the node's TPM reboots (reset counter up),
// the old session is not reused: the next pull quotes again, and the old
// session token is dead at the broker.
func TestRebootEndsSession(t *testing.T) {
	eachMode(t, func(t *testing.T, m mode) {
		w := newWorld(t, worldOptions{})
		n := w.node1
		w.mustPull(n, m)
		var oldToken []byte
		if m == execMode {
			oldToken = n.session().Token
		}
		before, _ := w.quotes(n)
		n.tpm.Reboot()
		w.mustPull(n, m)
		after, allowed := w.quotes(n)
		assert.Equal(t, before+1, after, "the first pull after a reboot quotes once")
		evs := w.audit("--node", n.name, "--kind", "attest")
		require.NotEmpty(t, evs)
		last := evs[len(evs)-1]
		assert.True(t, last.Allowed)
		assert.Contains(t, last.Reason, "rebooted")
		assert.Equal(t, after, allowed)
		if m == execMode {
			assert.NotEqual(t, oldToken, n.session().Token)
			err := w.replayToken(oldToken)
			require.Error(t, err, "the pre-reboot session token still releases keys")
			assert.Equal(t, codes.Unauthenticated, status.Code(err), "%v", err)
		}
	})
}

// session is the exec-mode session file of the node.
type sessionFile struct {
	Token []byte `json:"token"`
	Key   struct {
		Private []byte `json:"private"`
	} `json:"key"`
}

func (n *node) session() sessionFile {
	b, err := os.ReadFile(filepath.Join(n.runDir, "session.json"))
	require.NoError(n.w.t, err)
	var s sessionFile
	require.NoError(n.w.t, json.Unmarshal(b, &s))
	require.NotEmpty(n.w.t, s.Token)
	return s
}

// TestNoSecretsInOutput: layer keys (optsdata and the symmetric keys in
// it), session tokens and keys, and the admin credential appear in no log,
// error or audit output, across success, refusal and bad input, in both
// modes.
func TestNoSecretsInOutput(t *testing.T) {
	w := newWorld(t, worldOptions{})
	n := w.node1
	var secrets []secret

	// Pulls in both modes; the exec one leaves a session file.
	w.mustPull(n, execMode)
	s1 := n.session()
	secrets = append(secrets, secret{"session token", s1.Token}, secret{"session TPM key blob", s1.Key.Private})
	w.mustPull(n, grpcMode)

	// A layer key we choose, wrapped and unwrapped directly in both modes.
	symkey := randomBytes(t, 32)
	optsdata := fmt.Appendf(nil, `{"symkey":%q,"digest":"sha256:%x","cipheroptions":{"nonce":%q}}`,
		base64.StdEncoding.EncodeToString(symkey), randomBytes(t, 32), base64.StdEncoding.EncodeToString(randomBytes(t, 16)))
	secrets = append(secrets, secret{"direct optsdata", optsdata}, secret{"direct symkey", symkey})
	wrapReq := func(param string) []byte {
		return fmt.Appendf(nil, `{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"attested":[%q]},"DecryptConfig":{"Parameters":{}}},"optsdata":%q},"keyunwrapparams":{"dc":null,"annotation":null}}`,
			base64.StdEncoding.EncodeToString([]byte(param)), base64.StdEncoding.EncodeToString(optsdata))
	}
	r := n.keyprovider(wrapReq("key=app"), false)
	require.NoError(t, r.err, "keywrap: %s", r.stderr)
	var wrapped struct {
		Results struct {
			Annotation []byte `json:"annotation"`
		} `json:"keywrapresults"`
	}
	require.NoError(t, json.Unmarshal(r.stdout, &wrapped))
	require.NotEmpty(t, wrapped.Results.Annotation)
	assert.Equal(t, optsdata, n.unwrapDirect(wrapped.Results.Annotation), "exec keyunwrap returns the byte-identical optsdata")
	// The search is not vacuous: the one place optsdata belongs, the
	// keyunwrap reply (kept out of the corpus), is found by it.
	reply := n.keyprovider(unwrapReq(wrapped.Results.Annotation), true)
	require.NoError(t, reply.err, "keyunwrap: %s", reply.stderr)
	assert.Contains(t, string(reply.stdout), string(secret{"", optsdata}.forms()["base64"]))

	client := n.grpcClient()
	out, err := n.grpcCall(client, "WrapKey", wrapReq("key=app"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(out, &wrapped))
	out, err = n.grpcCall(client, "UnWrapKey", unwrapReq(wrapped.Results.Annotation))
	require.NoError(t, err)
	var unwrapped struct {
		Results struct {
			OptsData []byte `json:"optsdata"`
		} `json:"keyunwrapresults"`
	}
	require.NoError(t, json.Unmarshal(out, &unwrapped))
	assert.Equal(t, optsdata, unwrapped.Results.OptsData, "gRPC UnWrapKey returns the byte-identical optsdata")

	// Failures with the layer key in hand: unknown key, bad parameters.
	for _, p := range []string{"key=nosuchkey", "Enabled", "key=app;key=other", "kee=app"} {
		r := n.keyprovider(wrapReq(p), false)
		assert.Equal(t, 1, r.code, "keywrap %q: %s", p, r.stderr)
		assert.Empty(t, r.stdout)
		_, err := n.grpcCall(client, "WrapKey", wrapReq(p))
		assert.Error(t, err, p)
	}

	// The real layers' keys, recovered with direct unwraps of the pushed
	// annotations.
	for i, l := range w.inspect(w.image).Layers {
		ann, err := base64.StdEncoding.DecodeString(l.Annotations[providerAnnotation])
		require.NoError(t, err)
		od := n.unwrapDirect(ann)
		var opts struct {
			SymKey []byte `json:"symkey"`
		}
		require.NoError(t, json.Unmarshal(od, &opts), "layer %d optsdata", i)
		require.Len(t, opts.SymKey, 32, "layer %d symkey", i)
		secrets = append(secrets, secret{fmt.Sprintf("layer %d optsdata", i), od}, secret{fmt.Sprintf("layer %d symkey", i), opts.SymKey})
	}

	// Bad input and refusals after all that.
	for _, c := range malformed {
		n.keyprovider(c.req, false)
		n.grpcCall(client, "UnWrapKey", c.req)
	}
	n.tpm.ExtendPCR(16, []byte("changed boot"))
	w.refusedPull(n, execMode)
	w.refusedPull(n, grpcMode)
	s2 := n.session()
	require.NotEqual(t, s1.Token, s2.Token, "the exec pull after the PCR change attested again")
	secrets = append(secrets, secret{"second session token", s2.Token}, secret{"second session TPM key blob", s2.Key.Private})

	// What an admin reads.
	w.admin("audit", "list", "--json")
	w.admin("audit", "list")
	w.admin("node", "list")
	w.admin("key", "list")

	admin, err := os.ReadFile(filepath.Join(w.brokerDir, "admin.token"))
	require.NoError(t, err)
	secrets = append(secrets, secret{"admin credential", []byte(strings.TrimSpace(string(admin)))})

	checked := w.assertNoSecrets(secrets)
	t.Logf("checked %d secrets in %d outputs plus log files (%d comparisons)", len(secrets), len(w.outputs), checked)
}

func unwrapReq(annotation []byte) []byte {
	return fmt.Appendf(nil, `{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":null},"annotation":%q}}`,
		base64.StdEncoding.EncodeToString(annotation))
}

// unwrapDirect has 'attested keyprovider' unwrap one annotation and returns
// the optsdata it released.
func (n *node) unwrapDirect(annotation []byte) []byte {
	t := n.w.t
	t.Helper()
	r := n.keyprovider(unwrapReq(annotation), true)
	require.NoError(t, r.err, "keyunwrap: %s", r.stderr)
	var out struct {
		Results struct {
			OptsData []byte `json:"optsdata"`
		} `json:"keyunwrapresults"`
	}
	require.NoError(t, json.Unmarshal(r.stdout, &out))
	require.NotEmpty(t, out.Results.OptsData)
	return out.Results.OptsData
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}
