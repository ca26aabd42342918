package dashboard_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/html"

	nodeattest "github.com/attested-dev/attested/attest"
	_ "github.com/attested-dev/attested/attest/simtpm"
	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
	"github.com/attested-dev/attested/broker/brokertest"
	"github.com/attested-dev/attested/broker/dashboard"
	"github.com/attested-dev/attested/test/h2attack"
)

// The go-tpm-tools simulator is one per process: these tests run serially.

// clock is a settable time source.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// fixture is a real broker (brokertest) and a dashboard over it driven
// through httptest, as a browser would drive it.
type fixture struct {
	b     *brokertest.Broker
	d     *dashboard.Dashboard
	clock *clock
	token string
}

func newFixture(t *testing.T, o dashboard.Options) *fixture {
	t.Helper()
	b := brokertest.Start(t)
	c := &clock{t: time.Now()}
	o.Broker, o.BrokerID, o.Now = b.Server, "broker-test", c.now
	o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	d, err := dashboard.New(o)
	require.NoError(t, err)
	tok, err := readToken(b)
	require.NoError(t, err)
	return &fixture{b: b, d: d, clock: c, token: tok}
}

func readToken(b *brokertest.Broker) (string, error) {
	data, err := os.ReadFile(filepath.Join(b.DataDir, broker.AdminTokenFile))
	return strings.TrimSpace(string(data)), err
}

// browser is one client of the dashboard: its address and cookie.
type browser struct {
	t      *testing.T
	f      *fixture
	remote string
	cookie string
}

func (f *fixture) browser(t *testing.T, remote string) *browser {
	return &browser{t: t, f: f, remote: remote}
}

// do sends a request as a same-origin browser page would; hdr overrides
// headers (a value of "" removes one).
func (c *browser) do(method, target string, form url.Values, hdr map[string]string) *http.Response {
	c.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	r := httptest.NewRequest(method, "https://broker.example"+target, body)
	r.RemoteAddr = c.remote
	if form != nil {
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if method == http.MethodPost {
		r.Header.Set("Sec-Fetch-Site", "same-origin")
		r.Header.Set("Origin", "https://broker.example")
	}
	if c.cookie != "" {
		r.AddCookie(&http.Cookie{Name: dashboard.CookieName, Value: c.cookie})
	}
	for k, v := range hdr {
		if v == "" {
			r.Header.Del(k)
		} else {
			r.Header.Set(k, v)
		}
	}
	w := httptest.NewRecorder()
	c.f.d.ServeHTTP(w, r)
	resp := w.Result()
	for _, ck := range resp.Cookies() {
		if ck.Name == dashboard.CookieName {
			c.cookie = ck.Value
			if ck.MaxAge < 0 {
				c.cookie = ""
			}
		}
	}
	return resp
}

func (c *browser) get(target string) (*http.Response, string) {
	c.t.Helper()
	resp := c.do(http.MethodGet, target, nil, nil)
	return resp, readBody(c.t, resp)
}

func (c *browser) login(token string) *http.Response {
	c.t.Helper()
	return c.do(http.MethodPost, "/login", url.Values{"token": {token}}, nil)
}

func (c *browser) mustLogin() {
	c.t.Helper()
	resp := c.login(c.f.token)
	require.Equal(c.t, http.StatusSeeOther, resp.StatusCode, readBody(c.t, resp))
	require.NotEmpty(c.t, c.cookie)
}

var csrfRe = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// csrf reads the session's form token from a page, as a page's form
// carries it.
func (c *browser) csrf() string {
	c.t.Helper()
	_, body := c.get("/")
	m := csrfRe.FindStringSubmatch(body)
	require.NotNil(c.t, m, "no CSRF token in the page")
	return m[1]
}

func readBody(t *testing.T, resp *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	resp.Body.Close()
	return string(b)
}

// auditOf returns the broker's audit records of a kind.
func auditOf(t *testing.T, b *brokertest.Broker, kind string) []*apiv1.AuditEvent {
	t.Helper()
	out, err := b.Admin.ListAudit(context.Background(), &apiv1.ListAuditRequest{Kind: kind})
	require.NoError(t, err)
	return out.GetEvents()
}

func TestPagesNeedALogin(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	c := f.browser(t, "192.0.2.1:1234")
	for _, p := range []string{"/", "/audit", "/nodes/node1", "/keys/app", "/policies/prod"} {
		resp, _ := c.get(p)
		assert.Equal(t, http.StatusSeeOther, resp.StatusCode, p)
		assert.Equal(t, "/login", resp.Header.Get("Location"), p)
	}
	// The page's refresher is told to go to the login.
	resp, _ := c.get("/?partial=1")
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	// A form posted without a session changes nothing.
	resp = c.do(http.MethodPost, "/nodes/node1/revoke", url.Values{"confirm": {"node1"}, "csrf": {"x"}}, nil)
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
	resp, body := c.get("/login")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, body, `type="password"`)
}

func TestLoginNeedsTheAdminCredential(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	c := f.browser(t, "192.0.2.1:1234")
	for _, wrong := range []string{"", "atk_guessed", f.token + "x", strings.ToUpper(f.token)} {
		resp := c.login(wrong)
		body := readBody(t, resp)
		assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, wrong)
		assert.Empty(t, resp.Cookies(), "no cookie for a wrong credential")
		assert.Contains(t, body, "wrong admin credential")
		assert.NotContains(t, body, f.token)
		if wrong != "" {
			assert.NotContains(t, body, wrong, "a credential given is never echoed")
		}
	}
	// The token as pasted from the file, newline and all.
	resp := c.login(f.token + "\n")
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	assert.Equal(t, "/", resp.Header.Get("Location"))
	var ck *http.Cookie
	for _, x := range resp.Cookies() {
		if x.Name == dashboard.CookieName {
			ck = x
		}
	}
	require.NotNil(t, ck, "a session cookie")
	assert.True(t, ck.Secure, "Secure")
	assert.True(t, ck.HttpOnly, "HttpOnly")
	assert.Equal(t, http.SameSiteStrictMode, ck.SameSite)
	assert.Equal(t, "/", ck.Path)
	assert.Empty(t, ck.Domain)
	assert.True(t, strings.HasPrefix(ck.Name, "__Host-"))
	assert.Equal(t, int((8 * time.Hour).Seconds()), ck.MaxAge)
	assert.GreaterOrEqual(t, len(ck.Value), 43, "256 random bits")
	assert.NotContains(t, ck.Value, f.token)

	resp, body := c.get("/")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, body, "Nodes")
	assert.NotContains(t, body, f.token, "the credential is never rendered")

	logins := auditOf(t, f.b, "login")
	require.Len(t, logins, 1)
	assert.Equal(t, broker.DashboardActor, logins[0].GetActor())
	assert.Contains(t, logins[0].GetReason(), "192.0.2.1")
	reg := f.b.Server.Metrics()
	assert.Equal(t, float64(4), counter(t, reg, "attested_broker_unauthenticated_refusals_total", "method", "DashboardLogin", "reason", "admin_credential"))
	refusals := auditOf(t, f.b, "refuse")
	require.NotEmpty(t, refusals, "failed logins are in the audit (sampled)")
	assert.Contains(t, refusals[0].GetReason(), "dashboard login refused")
	for _, e := range refusals {
		assert.NotContains(t, e.GetReason(), "atk_guessed", "a guessed credential is not recorded")
	}
}

func TestFailedLoginsAreRateLimited(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	attacker := f.browser(t, "192.0.2.66:4000")
	for i := range 10 {
		resp := attacker.login(fmt.Sprintf("atk_guess%d", i))
		assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, "guess %d", i)
	}
	// The bucket is empty: even the right credential waits.
	resp := attacker.login(f.token)
	body := readBody(t, resp)
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Contains(t, body, "too many failed logins from 192.0.2.66")
	assert.Contains(t, body, "limits.rates.login")
	assert.Empty(t, attacker.cookie)
	// Another address is not affected.
	admin := f.browser(t, "192.0.2.7:5000")
	admin.mustLogin()
	reg := f.b.Server.Metrics()
	assert.Equal(t, float64(1), counter(t, reg, "attested_broker_unauthenticated_refusals_total", "method", "DashboardLogin", "reason", "rate_limited"))
}

func TestSessionsEndWhenIdleOrOld(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	c := f.browser(t, "192.0.2.1:1234")
	c.mustLogin()
	// The page refreshing itself is not the admin's activity.
	for range 14 {
		f.clock.advance(time.Minute)
		resp, _ := c.get("/?partial=1")
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
	f.clock.advance(time.Minute + time.Second)
	resp, _ := c.get("/?partial=1")
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, "15 minutes without a page view end the session")
	resp, _ = c.get("/")
	assert.Equal(t, http.StatusSeeOther, resp.StatusCode)

	// Page views keep a session alive, but not past its maximum age.
	c.mustLogin()
	for elapsed := time.Duration(0); elapsed < 8*time.Hour-10*time.Minute; elapsed += 10 * time.Minute {
		f.clock.advance(10 * time.Minute)
		resp, _ := c.get("/")
		require.Equal(t, http.StatusOK, resp.StatusCode, "after %s", elapsed)
	}
	f.clock.advance(10 * time.Minute)
	resp, _ = c.get("/")
	assert.Equal(t, http.StatusSeeOther, resp.StatusCode, "no session outlives 8 hours")
}

func TestSessionTableIsBounded(t *testing.T) {
	f := newFixture(t, dashboard.Options{MaxSessions: 3, Metrics: prometheus.NewRegistry()})
	var cs []*browser
	for i := range 4 {
		c := f.browser(t, fmt.Sprintf("192.0.2.%d:1000", i+1))
		c.mustLogin()
		f.clock.advance(time.Second)
		cs = append(cs, c)
	}
	resp, _ := cs[0].get("/")
	assert.Equal(t, http.StatusSeeOther, resp.StatusCode, "the least recently used session made room")
	for _, c := range cs[1:] {
		resp, _ := c.get("/")
		assert.Equal(t, http.StatusOK, resp.StatusCode)
	}
}

func TestLogoutEndsTheSession(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	c := f.browser(t, "192.0.2.1:1234")
	c.mustLogin()
	old := c.cookie
	tok := c.csrf()
	resp := c.do(http.MethodPost, "/logout", url.Values{"csrf": {"wrong"}}, nil)
	assert.Equal(t, http.StatusForbidden, resp.StatusCode, "logout needs the form token too")
	resp = c.do(http.MethodPost, "/logout", url.Values{"csrf": {tok}}, nil)
	assert.Equal(t, http.StatusSeeOther, resp.StatusCode)
	assert.Empty(t, c.cookie, "the cookie is cleared")
	c.cookie = old // a copy of the cookie is worthless now
	resp, _ = c.get("/")
	assert.Equal(t, http.StatusSeeOther, resp.StatusCode)
}

func TestSecurityHeaders(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	c := f.browser(t, "192.0.2.1:1234")
	check := func(what string, resp *http.Response) {
		h := resp.Header
		csp := h.Get("Content-Security-Policy")
		assert.Contains(t, csp, "default-src 'none'", what)
		assert.Contains(t, csp, "script-src 'self'", what)
		assert.Contains(t, csp, "frame-ancestors 'none'", what)
		assert.Contains(t, csp, "form-action 'self'", what)
		assert.NotContains(t, csp, "unsafe-inline", what)
		assert.NotContains(t, csp, "unsafe-eval", what)
		assert.Equal(t, "DENY", h.Get("X-Frame-Options"), what)
		assert.Equal(t, "nosniff", h.Get("X-Content-Type-Options"), what)
		assert.Equal(t, "same-origin", h.Get("Referrer-Policy"), what)
		assert.Equal(t, "no-store", h.Get("Cache-Control"), what)
	}
	resp, _ := c.get("/login")
	check("login page", resp)
	check("failed login", c.login("atk_wrong"))
	resp, _ = c.get("/")
	check("redirect", resp)
	resp, _ = c.get("/static/dashboard.js")
	check("script", resp)
	assert.Equal(t, "text/javascript; charset=utf-8", resp.Header.Get("Content-Type"))
	resp, _ = c.get("/static/nothing.js")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	c.mustLogin()
	resp, body := c.get("/")
	check("overview", resp)
	assert.Contains(t, resp.Header.Get("Content-Type"), "text/html")
	// No inline script anywhere: the only script is the file.
	doc := parseHTML(t, body)
	scripts := elements(doc, "script")
	require.Len(t, scripts, 1)
	assert.Equal(t, "/static/dashboard.js", attr(scripts[0], "src"))
	resp, _ = c.get("/nodes/nosuchnode")
	check("missing node", resp)
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
}

// enroll enrolls a node on the simulator TPM and has it attest once.
func enroll(t *testing.T, b *brokertest.Broker, name string) {
	t.Helper()
	ctx := context.Background()
	tok, err := b.Admin.CreateJoinToken(ctx, &apiv1.CreateJoinTokenRequest{})
	require.NoError(t, err)
	tpm, err := nodeattest.OpenTPM(ctx, "simulator")
	require.NoError(t, err)
	defer tpm.Close()
	st, _, err := nodeattest.Enroll(ctx, b.Node, tpm, nodeattest.EnrollOptions{Name: name, JoinToken: tok.GetToken(), BrokerID: "broker-test"})
	require.NoError(t, err)
	_, err = nodeattest.NewSession(ctx, b.Node, tpm, st, nodeattest.Logs{})
	require.NoError(t, err, "the evidence is genuine; the policy refuses it")
}

// untrustedNode enrolls node1 under a policy its PCR 16 does not satisfy.
func untrustedNode(t *testing.T, b *brokertest.Broker) {
	t.Helper()
	ctx := context.Background()
	_, err := b.Admin.ApplyPolicy(ctx, &apiv1.ApplyPolicyRequest{Yaml: "name: prod\npcrs:\n  16: [\"" + strings.Repeat("ab", 32) + "\"]\n"})
	require.NoError(t, err)
	_, err = b.Admin.CreateKey(ctx, &apiv1.CreateKeyRequest{Name: "app", Policy: "prod"})
	require.NoError(t, err)
	enroll(t, b, "node1")
}

func TestUntrustedNodeShowsItsReason(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	untrustedNode(t, f.b)
	c := f.browser(t, "192.0.2.1:1234")
	c.mustLogin()
	resp, body := c.get("/")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	doc := parseHTML(t, body)
	row := byID(doc, "node-node1")
	require.NotNil(t, row, body)
	assert.Equal(t, "untrusted", attr(row, "data-status"))
	assert.Contains(t, text(row), "PCR 16")
	assert.Contains(t, text(row), "policy prod")
	// The keys and their policies.
	keys := byID(doc, "keys")
	require.NotNil(t, keys)
	assert.Contains(t, text(keys), "app")
	assert.Contains(t, text(keys), "prod")
	// The node's page says the same, and offers the revocation.
	resp, body = c.get("/nodes/node1")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	doc = parseHTML(t, body)
	require.NotNil(t, byID(doc, "status"))
	assert.Equal(t, "untrusted", text(byID(doc, "status")))
	assert.Contains(t, text(byID(doc, "reason")), "PCR 16")
	assert.NotNil(t, byID(doc, "revoke"), "a revoke form")
	// The policy page shows its YAML.
	resp, body = c.get("/policies/prod")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, body, strings.Repeat("ab", 32))
	// The key's page: its versions and policy.
	resp, body = c.get("/keys/app")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Contains(t, text(byID(parseHTML(t, body), "versions")), "prod")
	resp, _ = c.get("/keys/nokey")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	// The audit, filtered.
	resp, body = c.get("/audit?node=node1")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Contains(t, body, "evidence verified")
	assert.NotContains(t, body, "applied policy prod", "only node1's records")
	// The refresher gets the live part alone.
	resp, body = c.get("/?partial=1")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.NotContains(t, body, "<html")
	assert.Contains(t, body, `id="node-node1"`)
}

func TestRevokeNeedsSessionFormTokenAndConfirmation(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	untrustedNode(t, f.b)
	admin := f.browser(t, "192.0.2.1:1234")
	admin.mustLogin()
	tok := admin.csrf()
	revoked := func() bool {
		n, err := f.b.Admin.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
		require.NoError(t, err)
		return n.GetNodes()[0].GetState() == apiv1.NodeState_NODE_STATE_REVOKED
	}
	good := url.Values{"confirm": {"node1"}, "csrf": {tok}}
	for _, tc := range []struct {
		name   string
		c      *browser
		form   url.Values
		hdr    map[string]string
		code   int
		reason string
	}{
		{"no session", f.browser(t, "192.0.2.9:1"), good, nil, http.StatusForbidden, "session has ended"},
		{"no form token", admin, url.Values{"confirm": {"node1"}}, nil, http.StatusForbidden, "token"},
		{"another session's token", admin, url.Values{"confirm": {"node1"}, "csrf": {"AAAA" + tok[4:]}}, nil, http.StatusForbidden, "token"},
		{"cross-site post (Sec-Fetch-Site)", admin, good, map[string]string{"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}, http.StatusForbidden, "cross-origin"},
		{"cross-origin post (Origin only)", admin, good, map[string]string{"Sec-Fetch-Site": "", "Origin": "https://evil.example"}, http.StatusForbidden, "cross-origin"},
		{"not confirmed", admin, url.Values{"confirm": {"node"}, "csrf": {tok}}, nil, http.StatusBadRequest, "type the node&#39;s name"},
	} {
		resp := tc.c.do(http.MethodPost, "/nodes/node1/revoke", tc.form, tc.hdr)
		body := readBody(t, resp)
		assert.Equal(t, tc.code, resp.StatusCode, tc.name)
		assert.Contains(t, body, tc.reason, tc.name)
		assert.False(t, revoked(), "%s: the node was revoked", tc.name)
	}
	assert.Empty(t, auditOf(t, f.b, "revoke"))

	resp := admin.do(http.MethodPost, "/nodes/node1/revoke", good, nil)
	require.Equal(t, http.StatusSeeOther, resp.StatusCode, readBody(t, resp))
	assert.Equal(t, "/nodes/node1?done=revoked", resp.Header.Get("Location"))
	assert.True(t, revoked())
	recs := auditOf(t, f.b, "revoke")
	require.Len(t, recs, 1)
	assert.Equal(t, "node1", recs[0].GetNode())
	assert.Equal(t, "admin (dashboard)", recs[0].GetActor())
	_, body := admin.get("/nodes/node1?done=revoked")
	doc := parseHTML(t, body)
	assert.Equal(t, "revoked", text(byID(doc, "status")))
	assert.Nil(t, byID(doc, "revoke"), "no revoke form for a revoked node")
	assert.Contains(t, body, "Node revoked")
}

// TestMarkupRendersInert: node tags (set by an admin, maybe copied from
// elsewhere) and audit reasons (which quote what unauthenticated callers
// sent) render as text, never as markup.
func TestMarkupRendersInert(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	untrustedNode(t, f.b)
	const payload = `<img src=x onerror="document.title='pwned'"><script>alert(1)</script>`
	_, err := f.b.Admin.TagNode(context.Background(), &apiv1.TagNodeRequest{Name: "node1", Set: map[string]string{"owner": payload}})
	require.NoError(t, err)
	// An unauthenticated caller names a method with markup: the refusal
	// quotes it in the audit.
	cfg, err := h2attack.TLSConfig(filepath.Join(f.b.DataDir, broker.CACertFile))
	require.NoError(t, err)
	conn, err := h2attack.Dial(context.Background(), f.b.Addr, cfg, "")
	require.NoError(t, err)
	defer conn.Close()
	r := conn.Call("/attested.broker.v1.Broker/"+`<svg onload=alert(2)>`, nil, nil, 0, 0, 10*time.Second)
	require.NoError(t, r.Err)
	require.Eventually(t, func() bool {
		for _, e := range auditOf(t, f.b, "refuse") {
			if strings.Contains(e.GetReason(), "<svg onload") {
				return true
			}
		}
		return false
	}, 5*time.Second, 50*time.Millisecond, "the refusal is audited with the markup in it")

	c := f.browser(t, "192.0.2.1:1234")
	c.mustLogin()
	for _, p := range []string{"/", "/nodes/node1", "/audit", "/audit?kind=refuse", "/?partial=1", "/audit?kind=" + url.QueryEscape(payload)} {
		resp, body := c.get(p)
		require.Less(t, resp.StatusCode, 500, p)
		doc := parseHTML(t, body)
		assert.Empty(t, elements(doc, "img"), "%s: an <img> element", p)
		assert.Empty(t, elements(doc, "svg"), "%s: an <svg> element", p)
		for _, s := range elements(doc, "script") {
			assert.Equal(t, "/static/dashboard.js", attr(s, "src"), "%s: a script element", p)
		}
		walk(doc, func(n *html.Node) {
			for _, a := range n.Attr {
				assert.False(t, strings.HasPrefix(a.Key, "on"), "%s: an event handler attribute %s=%q", p, a.Key, a.Val)
			}
		})
	}
	_, body := c.get("/nodes/node1")
	assert.Contains(t, body, "owner=&lt;img src=x onerror=&#34;document.title=&#39;pwned&#39;&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;", "the tag shows as text")
	_, body = c.get("/audit?kind=refuse")
	assert.Contains(t, body, "&lt;svg onload=alert(2)&gt;", "the refusal shows as text")
}

// TestServedOnTheBrokerPort: a browser reaching the broker's TLS port
// (ALPN h2 and http/1.1 offered) gets the dashboard over HTTP/1.1 and can
// log in, while gRPC clients on the same port still work.
func TestServedOnTheBrokerPort(t *testing.T) {
	b := brokertest.Start(t)
	tok, err := readToken(b)
	require.NoError(t, err)
	jar, err := cookiejar.New(nil)
	require.NoError(t, err)
	client := &http.Client{
		Jar:       jar,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: b.CA, NextProtos: []string{"h2", "http/1.1"}, MinVersion: tls.VersionTLS13}},
		Timeout:   20 * time.Second,
	}
	defer client.CloseIdleConnections()
	base := "https://" + b.Addr
	resp, err := client.PostForm(base+"/login", url.Values{"token": {tok}})
	require.NoError(t, err)
	body := readBody(t, resp)
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Equal(t, "HTTP/1.1", resp.Proto)
	assert.Equal(t, "http/1.1", resp.TLS.NegotiatedProtocol)
	assert.Equal(t, "/", resp.Request.URL.Path, "logged in and sent to the overview")
	assert.Contains(t, body, `id="live"`)

	_, err = b.Admin.ListNodes(context.Background(), &apiv1.ListNodesRequest{})
	require.NoError(t, err, "gRPC on the same port")
}

// --- helpers -----------------------------------------------------------

func parseHTML(t *testing.T, body string) *html.Node {
	t.Helper()
	doc, err := html.Parse(strings.NewReader(body))
	require.NoError(t, err)
	return doc
}

func walk(n *html.Node, f func(*html.Node)) {
	f(n)
	for c := n.FirstChild; c != nil; c = c.NextSibling {
		walk(c, f)
	}
}

func elements(doc *html.Node, tag string) []*html.Node {
	var out []*html.Node
	walk(doc, func(n *html.Node) {
		if n.Type == html.ElementNode && n.Data == tag {
			out = append(out, n)
		}
	})
	return out
}

func attr(n *html.Node, key string) string {
	for _, a := range n.Attr {
		if a.Key == key {
			return a.Val
		}
	}
	return ""
}

func byID(doc *html.Node, id string) *html.Node {
	var found *html.Node
	walk(doc, func(n *html.Node) {
		if found == nil && n.Type == html.ElementNode && attr(n, "id") == id {
			found = n
		}
	})
	return found
}

func text(n *html.Node) string {
	if n == nil {
		return ""
	}
	var b strings.Builder
	walk(n, func(x *html.Node) {
		if x.Type == html.TextNode {
			b.WriteString(x.Data)
		}
	})
	return strings.Join(strings.Fields(b.String()), " ")
}

func counter(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := want[lp.GetName()]; ok && v != lp.GetValue() {
					continue metric
				}
			}
			if g := m.GetGauge(); g != nil {
				return g.GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// detailAdmin answers GetNode with a fixed detail and everything else
// from the real broker: the page of a broker that reports evidence
// summaries, sessions and status history.
type detailAdmin struct {
	apiv1.AdminServer
	detail *apiv1.NodeDetail
}

func (a detailAdmin) GetNode(context.Context, *apiv1.NodeRequest) (*apiv1.NodeDetail, error) {
	return a.detail, nil
}

type detailBroker struct {
	*broker.Server
	detail *apiv1.NodeDetail
}

func (b detailBroker) AdminServer() apiv1.AdminServer {
	return detailAdmin{AdminServer: b.Server.AdminServer(), detail: b.detail}
}

// TestNodeDetailRendersEvidenceSessionsAndHistory: what GetNode reports is
// on the node's page, as text: evidence facts come from the node's event
// log, which its owner writes.
func TestNodeDetailRendersEvidenceSessionsAndHistory(t *testing.T) {
	f := newFixture(t, dashboard.Options{})
	now := time.Now().Unix()
	long := "evidence satisfies no key's policy: policy prod: PCR 16 differs from policy prod " + strings.Repeat("x", 100)
	detail := &apiv1.NodeDetail{
		Node: &apiv1.Node{Name: "node9", Status: "untrusted", StatusReason: long, StatusSinceUnix: now - 60,
			LastAttestedUnix: now - 30, Tags: map[string]string{"region": "EU"}, CertifiedTags: map[string]string{"region": "EU"}},
		Evidence:         []string{"secure boot: enabled", `kernel command line: console=ttyS0 </li><script>alert(1)</script>`},
		LastEvidenceUnix: now - 30,
		Sessions:         []*apiv1.SessionInfo{{CreatedUnix: now - 30, ExpiresUnix: now + 270}},
		History: []*apiv1.StatusChange{
			{TimeUnix: now - 600, Status: "trusted", Reason: "evidence verified; satisfies policy prod"},
			{TimeUnix: now - 60, Status: "untrusted", Reason: long},
		},
	}
	d, err := dashboard.New(dashboard.Options{Broker: detailBroker{Server: f.b.Server, detail: detail}, Now: f.clock.now,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	require.NoError(t, err)
	f.d = d
	c := f.browser(t, "192.0.2.1:1234")
	c.mustLogin()
	resp, body := c.get("/nodes/node9")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	doc := parseHTML(t, body)
	assert.Equal(t, "untrusted", text(byID(doc, "status")))
	assert.Contains(t, text(byID(doc, "reason")), "PCR 16 differs")
	assert.Contains(t, body, "secure boot: enabled")
	assert.Contains(t, body, "console=ttyS0 &lt;/li&gt;&lt;script&gt;alert(1)&lt;/script&gt;")
	require.Len(t, elements(doc, "script"), 1, "only the dashboard's own script")
	hist := byID(doc, "history")
	require.NotNil(t, hist)
	assert.Contains(t, text(hist), "trusted")
	assert.NotNil(t, byID(doc, "history-1"), "a long reason is a click away")
	assert.Contains(t, text(doc), "region=EU")
	tags := elements(doc, "span")
	certified := false
	for _, s := range tags {
		if strings.Contains(attr(s, "class"), "certified") && text(s) == "region=EU" {
			certified = true
		}
	}
	assert.True(t, certified, "a TPM-certified tag is marked")
	assert.NotContains(t, body, "does not report evidence summaries")
}
