//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The dashboard in a real browser: Debian's chromium, headless, driven
// over the DevTools protocol (chromedp), against 'attested broker serve'
// as built, with swtpm nodes. The broker's certificate comes from its own
// CA; the browser trusts exactly that certificate's key
// (--ignore-certificate-errors-spki-list), nothing else.

// spkiHash is what --ignore-certificate-errors-spki-list takes: the
// base64 SHA-256 of the certificate's public key.
func spkiHash(t *testing.T, certFile string) string {
	t.Helper()
	data, err := os.ReadFile(certFile)
	require.NoError(t, err)
	block, _ := pem.Decode(data)
	require.NotNil(t, block, "no PEM in %s", certFile)
	cert, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:])
}

// newBrowser starts headless chromium trusting the world's broker.
func (w *world) newBrowser(t *testing.T) context.Context {
	t.Helper()
	bin, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium not found in PATH: run 'make deps' (installs Debian's chromium)")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin),
		chromedp.NoSandbox, // root in CI
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("ignore-certificate-errors-spki-list", spkiHash(t, filepath.Join(w.brokerDir, "server.pem"))),
		chromedp.WindowSize(1500, 1100),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(cancel)
	ctx, cancelTimeout := context.WithTimeout(ctx, 3*time.Minute)
	t.Cleanup(cancelTimeout)
	return ctx
}

// waitJS evaluates a JavaScript expression until it is true. It evaluates
// through DevTools, which the page's CSP does not restrict (chromedp.Poll
// builds its predicate with new Function, which the CSP rightly blocks).
func waitJS(t *testing.T, ctx context.Context, what, expr string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, err := chromedp.Run(ctx, chromedp.Evaluate[bool](expr))
		if err == nil && ok {
			return
		}
		if time.Now().After(deadline) {
			body, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
			t.Fatalf("%s: not true after %s (last error %v); the page reads:\n%s", what, timeout, err, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func evalString(t *testing.T, ctx context.Context, expr string) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Evaluate[string](expr))
	require.NoError(t, err, expr)
	return s
}

// screenshot saves the page as a test artifact and says where.
func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	require.NoError(t, err)
	p := filepath.Join(t.ArtifactDir(), name)
	require.NoError(t, os.WriteFile(p, png, 0o644))
	t.Logf("screenshot: %s (kept with 'go test -artifacts -outputdir DIR')", p)
}

type actorRecord struct {
	Kind  string `json:"kind"`
	Node  string `json:"node"`
	Actor string `json:"actor"`
}

// TestDashboardInChromium: an admin logs in with the admin credential, sees
// an untrusted node with its reason and a refusal's explanation a click
// away, revokes a node from the page (audited as the dashboard's admin),
// and watches a revocation made with the CLI appear without reloading.
// Markup in attacker-influenced text (a tag, a refused method name)
// renders inert.
func TestDashboardInChromium(t *testing.T) {
	w := newWorld(t, worldOptions{})
	w.mustPull(w.node1, execMode) // releases to show

	// node2 boots something the policy does not allow: its evidence is
	// genuine, so it is untrusted, and its pull is refused.
	node2 := w.newNode("node2")
	node2.enroll()
	node2.tpm.ExtendPCR(16, []byte("a debugger was attached"))
	w.refusedPull(node2, execMode)
	const payload = `<img src=x onerror="document.title='pwned'">`
	w.admin("node", "tag", "node2", "owner="+payload)
	// An unauthenticated caller names a method with markup; its refusal
	// is audited, quoting it.
	c, err := w.attacker("")
	require.NoError(t, err)
	r := c.Call("/attested.broker.v1.Broker/<svg onload=alert(1)>", nil, nil, 0, 0, 10*time.Second)
	require.NoError(t, r.Err)
	c.Close()

	token, err := os.ReadFile(filepath.Join(w.brokerDir, "admin.token"))
	require.NoError(t, err)
	base := "https://" + w.brokerAddr

	// Without a session the revoke form is refused, whoever posts it.
	plain := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: w.caPool(t), NextProtos: []string{"http/1.1"}, MinVersion: tls.VersionTLS13}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := plain.PostForm(base+"/nodes/node1/revoke", url.Values{"confirm": {"node1"}, "csrf": {"guess"}})
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
	plain.CloseIdleConnections()

	ctx := w.newBrowser(t)
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(base+"/")))
	waitJS(t, ctx, "the login page", `location.pathname === "/login" && !!document.getElementById("token")`, 20*time.Second)
	require.NoError(t, chromedp.Do(ctx,
		chromedp.SendKeys(chromedp.ID("token"), strings.TrimSpace(string(token))),
		chromedp.Click(chromedp.ID("login")),
	))
	waitJS(t, ctx, "the overview after login", `location.pathname === "/" && !!document.getElementById("nodes")`, 20*time.Second)
	assert.Empty(t, evalString(t, ctx, `document.cookie`), "the session cookie is HttpOnly")

	// node2 is untrusted, and says why.
	waitJS(t, ctx, "node2 untrusted", `document.getElementById("node-node2").dataset.status === "untrusted"`, 10*time.Second)
	row := evalString(t, ctx, `document.getElementById("node-node2").innerText`)
	assert.Contains(t, row, "PCR 16")
	assert.Contains(t, row, "policy prod")
	assert.Equal(t, "trusted", evalString(t, ctx, `document.getElementById("node-node1").dataset.status`))

	// A refusal's explanation is a click away.
	id := evalString(t, ctx, `((Array.from(document.querySelectorAll("tr.refused[data-kind=refuse]")).find(r => r.cells[3].innerText === "node2") || {querySelector: () => ({})}).querySelector("details") || {}).id || ""`)
	require.NotEmpty(t, id, "a refusal of node2 in the recent events")
	require.NoError(t, chromedp.Do(ctx, chromedp.Click(chromedp.CSS("#"+id+" summary"))))
	waitJS(t, ctx, "the refusal opened", `document.getElementById("`+id+`").open`, 5*time.Second)
	why := evalString(t, ctx, `document.getElementById("`+id+`").querySelector("dd.full").innerText`)
	assert.Contains(t, why, "PCR 16")
	t.Logf("the refusal's explanation: %s", why)
	screenshot(t, ctx, "dashboard-untrusted.png")

	// Markup shows as text, and nothing ran.
	assert.Contains(t, evalString(t, ctx, `document.body.innerText`), payload)
	assert.Equal(t, "0", evalString(t, ctx, `String(document.querySelectorAll("main img, main svg").length)`))
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(base+"/audit?kind=refuse")))
	waitJS(t, ctx, "the refusals", `document.body.textContent.includes("<svg onload=alert(1)>")`, 10*time.Second)
	assert.Equal(t, "0", evalString(t, ctx, `String(document.querySelectorAll("svg, img").length)`))
	assert.NotEqual(t, "pwned", evalString(t, ctx, `document.title`))

	// A revocation made elsewhere (the CLI) appears on the open page
	// without a reload: the page refreshes its data itself.
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(base+"/")))
	waitJS(t, ctx, "the overview", `!!document.getElementById("node-node2")`, 10*time.Second)
	require.NoError(t, chromedp.Do(ctx, chromedp.Evaluate[chromedp.Void](`window.sameDocument = true`)))
	w.admin("node", "revoke", "node2")
	waitJS(t, ctx, "node2 revoked on the open page", `document.getElementById("node-node2").dataset.status === "revoked"`, 20*time.Second)
	assert.Equal(t, "true", evalString(t, ctx, `String(window.sameDocument === true)`), "the page was not reloaded")
	screenshot(t, ctx, "dashboard-overview.png")

	// Revoke node1 from its page, confirming by name.
	require.NoError(t, chromedp.Do(ctx, chromedp.Click(chromedp.CSS(`#node-node1 a[href="/nodes/node1"]`))))
	waitJS(t, ctx, "node1's page", `location.pathname === "/nodes/node1" && !!document.getElementById("revoke")`, 10*time.Second)
	// The node's page has its last evidence and status history
	// (GetNode).
	assert.Contains(t, evalString(t, ctx, `(document.querySelector("ul.evidence") || {}).innerText || ""`), "PCR 16")
	assert.Contains(t, evalString(t, ctx, `(document.getElementById("history") || {}).innerText || ""`), "trusted")
	require.NoError(t, chromedp.Do(ctx,
		chromedp.SendKeys(chromedp.ID("confirm"), "node1"),
		chromedp.Click(chromedp.ID("revoke-button")),
	))
	waitJS(t, ctx, "node1 revoked", `document.getElementById("status") && document.getElementById("status").innerText === "revoked"`, 10*time.Second)
	assert.Contains(t, evalString(t, ctx, `document.body.innerText`), "Node revoked")
	screenshot(t, ctx, "dashboard-node.png")
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(base+"/")))
	waitJS(t, ctx, "the revocation in the recent events",
		`Array.from(document.querySelectorAll("tr[data-kind=revoke]")).some(r => r.innerText.includes("node1") && r.innerText.includes("admin (dashboard)"))`, 10*time.Second)

	// The CLI sees the same: node1 revoked by the dashboard's admin, node2
	// by the CLI's; node1 gets no key any more.
	out := w.admin("audit", "list", "--json", "--kind", "revoke")
	actors := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var rec actorRecord
		require.NoError(t, json.Unmarshal([]byte(line), &rec), line)
		actors[rec.Node] = rec.Actor
	}
	assert.Equal(t, map[string]string{"node1": "admin (dashboard)", "node2": "admin"}, actors)
	list := w.admin("node", "list")
	found := false
	for _, l := range strings.Split(list, "\n") {
		if strings.HasPrefix(l, "node1 ") {
			found = true
			assert.Contains(t, l, "revoked", list)
		}
	}
	assert.True(t, found, "node1 in 'node list':\n%s", list)
	msg, _ := w.refusedPull(w.node1, execMode)
	assert.Contains(t, msg, "revoked")
	logins := w.audit("--kind", "login")
	require.Len(t, logins, 1)

	// Logging out ends the session: the page goes back to the login.
	require.NoError(t, chromedp.Do(ctx, chromedp.Click(chromedp.CSS(`form.logout button`))))
	waitJS(t, ctx, "logged out", `location.pathname === "/login"`, 10*time.Second)
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(base+"/")))
	waitJS(t, ctx, "the login again", `location.pathname === "/login"`, 10*time.Second)
}

// caPool is the broker CA, as clients pin it.
func (w *world) caPool(t *testing.T) *x509.CertPool {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(w.brokerDir, "ca.pem"))
	require.NoError(t, err)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		t.Fatal("no CA certificate in ca.pem")
	}
	return pool
}

// TestDashboardCanBeTurnedOff: with disableDashboard a browser's
// handshake gets h2 (gRPC) and no page; gRPC works as ever.
func TestDashboardCanBeTurnedOff(t *testing.T) {
	for _, off := range []bool{false, true} {
		cfg := ""
		if off {
			cfg = "disableDashboard: true\n"
		}
		w := brokerOnly(t, cfg)
		c, err := tls.Dial("tcp", w.brokerAddr, &tls.Config{RootCAs: w.caPool(t), ServerName: "localhost",
			NextProtos: []string{"h2", "http/1.1"}, MinVersion: tls.VersionTLS13})
		require.NoError(t, err)
		want := "http/1.1"
		if off {
			want = "h2"
		}
		assert.Equal(t, want, c.ConnectionState().NegotiatedProtocol, "disableDashboard %v", off)
		c.Close()
		log, err := os.ReadFile(w.broker.log)
		require.NoError(t, err)
		assert.Equal(t, !off, strings.Contains(string(log), "dashboard: open it in a browser"), "disableDashboard %v: the log says where the dashboard is", off)
		w.brokerAdmin("node", "list")
	}
}
