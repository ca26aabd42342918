package keyprovider_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	keyproviderpb "github.com/containers/ocicrypt/utils/keyprovider"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/attest"
	_ "github.com/attested-dev/attested/attest/simtpm" // --tpm simulator
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/keyprovider"
)

// One simulator per process: tests run serially and share it.

var quotes atomic.Int32

func init() { attest.QuoteHook = func() { quotes.Add(1) } }

type fixture struct {
	b        *brokertest.Broker
	h        *keyprovider.Handler
	sessions *attest.Sessions
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func newFixture(t *testing.T, store *attest.FileStore) *fixture {
	t.Helper()
	ctx := context.Background()
	b := brokertest.Start(t)
	tok, err := b.Admin.CreateJoinToken(ctx, &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	tpm, err := attest.OpenTPM(ctx, "simulator")
	require.NoError(t, err)
	st, _, err := attest.Enroll(ctx, b.Node, tpm, attest.EnrollOptions{Name: "node1", JoinToken: tok.GetToken(), BrokerID: "broker-test"})
	tpm.Close()
	require.NoError(t, err)
	_, err = b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: any-boot\npcrs:\n  23: [\"" + fmt.Sprintf("%064d", 0) + "\"]\n"})
	require.NoError(t, err)
	for _, k := range []string{"app", "other"} {
		_, err = b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: k, Policy: "any-boot"})
		require.NoError(t, err)
	}
	sessions := &attest.Sessions{Broker: b.Node, State: st, Store: store,
		TPM: func(ctx context.Context) (*attest.TPM, error) { return attest.OpenTPM(ctx, "simulator") }}
	h := &keyprovider.Handler{
		Keys:      &keyprovider.BrokerKeys{Broker: b.Node, CA: b.CA, Addr: b.Addr, CacheDir: t.TempDir()},
		Unwrapper: &keyprovider.NodeUnwrapper{Broker: b.Node, Sessions: sessions, BrokerID: "broker-test"},
	}
	return &fixture{b: b, h: h, sessions: sessions}
}

const optsdata = `{"symkey":"6hhrnsVyAehYVsew5b+yYtoAQZ6xqmBvHt6ft5b2sV0=","digest":"sha256:01","cipheroptions":{"nonce":"pOcthL1UTb+O9vM8Y2zEvA=="}}`

func wrapReq(params ...string) string {
	vals := make([]string, len(params))
	for i, p := range params {
		vals[i] = fmt.Sprintf("%q", b64(p))
	}
	return fmt.Sprintf(`{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"attested":[%s],"pubkeys":["LS0tLS1CRUdJTg=="]},"DecryptConfig":{"Parameters":{}}},"optsdata":%q},"keyunwrapparams":{"dc":null,"annotation":null}}`,
		joinComma(vals), b64(optsdata))
}

func joinComma(v []string) string {
	out := ""
	for i, s := range v {
		if i > 0 {
			out += ","
		}
		out += s
	}
	return out
}

func (f *fixture) wrap(t *testing.T, params ...string) []byte {
	t.Helper()
	out, err := f.h.Handle(context.Background(), []byte(wrapReq(params...)))
	require.NoError(t, err)
	var r struct {
		KeyWrapResults struct {
			Annotation []byte `json:"annotation"`
		} `json:"keywrapresults"`
	}
	require.NoError(t, json.Unmarshal(out, &r))
	require.NotEmpty(t, r.KeyWrapResults.Annotation)
	return r.KeyWrapResults.Annotation
}

func unwrapReq(dc string, ann []byte) string {
	return fmt.Sprintf(`{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":%s,"annotation":%q}}`,
		dc, base64.StdEncoding.EncodeToString(ann))
}

func (f *fixture) unwrap(t *testing.T, dc string, ann []byte) ([]byte, error) {
	t.Helper()
	out, err := f.h.Handle(context.Background(), []byte(unwrapReq(dc, ann)))
	if err != nil {
		return nil, err
	}
	var r struct {
		KeyUnwrapResults struct {
			OptsData []byte `json:"optsdata"`
		} `json:"keyunwrapresults"`
	}
	require.NoError(t, json.Unmarshal(out, &r))
	return r.KeyUnwrapResults.OptsData, nil
}

// TestUnwrapEveryDecryptConfigShape: dc is ignored however clients send it
// (research notes a.3), and optsdata returns byte-identical.
func TestUnwrapEveryDecryptConfigShape(t *testing.T) {
	f := newFixture(t, nil)
	ann := f.wrap(t, "key=app")
	for _, dc := range []string{
		`null`,
		`{"Parameters":null}`,
		`{}`,
		`{"Parameters":{}}`,
		`{"Parameters":{"attested":["` + b64("Enabled") + `"]}}`,
		`{"Parameters":{"OTHERNAME":["` + b64("Enabled") + `"]}}`,
		`{"Parameters":{"gpg-privatekeys":[""]}}`,
		`{"Parameters":{"attested":["ZDE="],"privkeys":["LS0tLS1CRUdJTiBQUklW"],"privkeys-passwords":[null]}}`,
	} {
		got, err := f.unwrap(t, dc, ann)
		require.NoError(t, err, dc)
		assert.Equal(t, optsdata, string(got), dc)
	}
}

func TestWrapSeveralKeysOneAnnotation(t *testing.T) {
	f := newFixture(t, nil)
	ann := f.wrap(t, "key=app", "key=other", "key=app")
	var doc struct {
		Recipients []struct{ Key string } `json:"recipients"`
	}
	require.NoError(t, json.Unmarshal(ann, &doc))
	require.Len(t, doc.Recipients, 2, "duplicates collapse, both keys present")
	got, err := f.unwrap(t, "null", ann)
	require.NoError(t, err)
	assert.Equal(t, optsdata, string(got))
}

func TestWrapRefusals(t *testing.T) {
	f := newFixture(t, nil)
	for _, tc := range []struct{ req, want string }{
		{wrapReq("Enabled"), "no key named: use --encryption-key provider:attested:key=NAME"},
		{wrapReq("kid=app"), `unknown parameter "kid"`},
		{wrapReq("app"), `parameter "app" is not key=NAME`},
		{wrapReq("key=nosuch"), `has no key "nosuch"`},
		{wrapReq("key=a:b"), `invalid key name "a:b"`},
		{`{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"other":["eA=="]}},"optsdata":"eA=="}}`, `no parameters for provider "attested"`},
		{`{"op":"keywrap","keywrapparams":{"ec":null,"optsdata":"eA=="}}`, "no encryption config"},
		{`{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{}},"optsdata":null}}`, "no optsdata"},
	} {
		_, err := f.h.Handle(context.Background(), []byte(tc.req))
		require.Error(t, err, tc.req)
		assert.Contains(t, err.Error(), tc.want, tc.req)
	}
}

func TestMalformedRequests(t *testing.T) {
	h := &keyprovider.Handler{}
	for _, tc := range []struct{ req, want string }{
		{`{"op":`, "not valid keyprovider JSON"},
		{`{"op":"keyunwrap","keyunwrapparams":{"dc":null,"annotation":"%%%"}}`, "not valid keyprovider JSON"},
		{`{"op":"keyunwrap","keyunwrapparams":{"dc":null,"annotation":"YWI"}}`, "not valid keyprovider JSON"},
		{`{"op":"rewrap"}`, `unknown operation "rewrap"`},
		{`{"op":"keyunwrap","keyunwrapparams":{"dc":null,"annotation":"` + b64(`{"kid":"demo-kid","wrapped":"eyJ"}`) + `"}}`, "not an attested annotation"},
		{`{"op":"keyunwrap","keyunwrapparams":{"dc":null,"annotation":null}}`, "carries no annotation"},
		{"", "the request is empty"},
		{" \n", "the request is empty"},
	} {
		_, err := h.Handle(context.Background(), []byte(tc.req))
		require.Error(t, err, tc.req)
		assert.Contains(t, err.Error(), tc.want, tc.req)
		assert.Equal(t, codes.InvalidArgument, keyprovider.Code(err), tc.req)
	}
}

func TestAnotherBrokersAnnotationFailsFast(t *testing.T) {
	f := newFixture(t, nil)
	ann := f.wrap(t, "key=app")
	var doc map[string]any
	require.NoError(t, json.Unmarshal(ann, &doc))
	doc["broker"] = "broker-elsewhere"
	moved, err := json.Marshal(doc)
	require.NoError(t, err)
	before := quotes.Load()
	_, err = f.unwrap(t, "null", moved)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "sealed by broker broker-elsewhere")
	assert.Equal(t, before, quotes.Load(), "no TPM work for a layer this node cannot open")
}

// TestConcurrentLayersShareOneQuote: ocicrypt unwraps up to 6 layers in
// parallel; a pull must cost one quote, and a warm node none.
func TestConcurrentLayersShareOneQuote(t *testing.T) {
	f := newFixture(t, nil)
	anns := make([][]byte, 6)
	for i := range anns {
		anns[i] = f.wrap(t, "key=app")
	}
	before := quotes.Load()
	var wg sync.WaitGroup
	errs := make([]error, len(anns))
	for i, ann := range anns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = f.unwrap(t, "null", ann)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	assert.Equal(t, int32(1), quotes.Load()-before, "one quote for a cold pull")
	_, err := f.unwrap(t, "null", anns[0])
	require.NoError(t, err)
	assert.Equal(t, int32(1), quotes.Load()-before, "no quote when warm")
}

// TestSessionSharedAcrossProcesses: exec mode runs one process per layer;
// they share the session through the run directory.
func TestSessionSharedAcrossProcesses(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	f := newFixture(t, &attest.FileStore{Dir: dir})
	ann := f.wrap(t, "key=app")
	before := quotes.Load()
	_, err := f.unwrap(t, "null", ann)
	require.NoError(t, err)
	// A second "process": fresh Sessions, same store.
	second := &attest.Sessions{Broker: f.b.Node, State: f.sessions.State, Store: &attest.FileStore{Dir: dir},
		TPM: func(ctx context.Context) (*attest.TPM, error) { return attest.OpenTPM(ctx, "simulator") }}
	h2 := &keyprovider.Handler{Unwrapper: &keyprovider.NodeUnwrapper{Broker: f.b.Node, Sessions: second, BrokerID: "broker-test"}}
	_, err = h2.Handle(context.Background(), []byte(unwrapReq("null", ann)))
	require.NoError(t, err)
	assert.Equal(t, int32(1), quotes.Load()-before)
}

// TestGRPCWithOcicryptStubs serves the handler on a unix socket and calls
// it with ocicrypt's own generated client, as ocicrypt does.
func TestGRPCWithOcicryptStubs(t *testing.T) {
	f := newFixture(t, nil)
	sock := filepath.Join(t.TempDir(), "kp.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	g := grpc.NewServer()
	keyproviderpb.RegisterKeyProviderServiceServer(g, &keyprovider.Service{Handler: f.h})
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	cc, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer cc.Close()
	c := keyproviderpb.NewKeyProviderServiceClient(cc)
	ctx := context.Background()
	w, err := c.WrapKey(ctx, &keyproviderpb.KeyProviderKeyWrapProtocolInput{KeyProviderKeyWrapProtocolInput: []byte(wrapReq("key=app"))})
	require.NoError(t, err)
	var wr struct {
		KeyWrapResults struct{ Annotation []byte } `json:"keywrapresults"`
	}
	require.NoError(t, json.Unmarshal(w.GetKeyProviderKeyWrapProtocolOutput(), &wr))
	u, err := c.UnWrapKey(ctx, &keyproviderpb.KeyProviderKeyWrapProtocolInput{KeyProviderKeyWrapProtocolInput: []byte(unwrapReq(`{"Parameters":null}`, wr.KeyWrapResults.Annotation))})
	require.NoError(t, err)
	var ur struct {
		KeyUnwrapResults struct{ OptsData []byte } `json:"keyunwrapresults"`
	}
	require.NoError(t, json.Unmarshal(u.GetKeyProviderKeyWrapProtocolOutput(), &ur))
	assert.Equal(t, optsdata, string(ur.KeyUnwrapResults.OptsData))

	_, err = c.UnWrapKey(ctx, &keyproviderpb.KeyProviderKeyWrapProtocolInput{KeyProviderKeyWrapProtocolInput: []byte(`{"op":"keyunwrap"`)})
	require.Error(t, err)
	assert.Equal(t, codes.InvalidArgument, status.Code(err))
	assert.Contains(t, status.Convert(err).Message(), "not valid keyprovider JSON")
}

func FuzzHandle(f *testing.F) {
	f.Add([]byte(wrapReq("key=app")))
	f.Add([]byte(unwrapReq("null", []byte(`{"attested":"layer-key","v":1,"broker":"b","recipients":[{"key":"k","kv":1,"suite":"s","ct":"AA=="}]}`))))
	f.Add([]byte(`{"op":"keyunwrap","keyunwrapparams":{"dc":{"Parameters":{"x":[null]}},"annotation":"e30="}}`))
	f.Add([]byte(`{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"attested":["a2V5PQ=="]}},"optsdata":"eA=="}}`))
	h := &keyprovider.Handler{}
	f.Fuzz(func(t *testing.T, data []byte) {
		// No broker behind it: every request must end in a clear error or
		// a reply, never a panic.
		out, err := h.Handle(context.Background(), data)
		if err == nil {
			require.True(t, json.Valid(out))
		}
	})
}
