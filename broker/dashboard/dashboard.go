// Package dashboard is the broker's admin web page: nodes with their
// status, reason and last evidence; keys and their policies; recent
// releases and refusals, each refusal's explanation a click away; and the
// revocation of a node. The broker serves it on its TLS port (see
// broker.Frontend) to browsers; it reads everything through the broker's
// Admin API in-process, so it shows exactly what the CLI shows.
//
// Only admins get in: the login asks for the admin credential (the token
// the CLI reads with --admin-token-file, checked by the broker as it
// checks an Admin call) and answers with a session cookie (__Host- prefix,
// Secure, HttpOnly, SameSite=Strict) that ends after IdleTimeout without
// the admin's activity or MaxAge in all. Every form carries the session's
// CSRF token, and cross-origin browser POSTs are refused outright
// (net/http's CrossOriginProtection: Sec-Fetch-Site, else Origin against
// Host). Pages are server-rendered with html/template, which escapes
// every string (node names, tags, audit reasons: attacker-influenced
// text), under a Content-Security-Policy that allows only the dashboard's
// own script and style files. No secret is ever rendered: the Admin API
// returns none (public keys are not shown either).
package dashboard

import (
	"context"
	"crypto/subtle"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/attested-dev/attested/broker"
	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// Broker is what the dashboard needs of the broker (*broker.Server).
type Broker interface {
	// AdminServer is the Admin API, for callers that authenticated the
	// admin themselves.
	AdminServer() apiv1.AdminServer
	// AdminLogin checks the admin credential presented from remote
	// (host:port), rate-limiting and auditing failures.
	AdminLogin(ctx context.Context, remote, token string) error
}

// Defaults of Options.
const (
	DefaultIdleTimeout = 15 * time.Minute
	DefaultMaxAge      = 8 * time.Hour
	DefaultMaxSessions = 64
	DefaultRefresh     = 5 * time.Second
)

// requestTimeout bounds the Admin calls of one request.
const requestTimeout = 20 * time.Second

// maxFormBytes bounds a form body: a token or a node name.
const maxFormBytes = 4 << 10

// CookieName is the session cookie. The __Host- prefix makes browsers
// accept it only with Secure, Path=/ and no Domain, so no other host or
// plain-HTTP page can set or shadow it.
const CookieName = "__Host-attested-session"

// Options configures the dashboard.
type Options struct {
	Broker Broker
	// BrokerID names the broker in page titles.
	BrokerID string
	Log      *slog.Logger
	// Metrics, if set, gets the dashboard's metrics.
	Metrics prometheus.Registerer
	// IdleTimeout ends a session after this long without a page view or
	// action by the admin (the page's own refreshing does not count);
	// MaxAge ends it in any case; MaxSessions bounds the sessions held.
	IdleTimeout time.Duration
	MaxAge      time.Duration
	MaxSessions int
	// Refresh is how often open pages refresh their data.
	Refresh time.Duration
	Now     func() time.Time
}

// Dashboard is the dashboard's http.Handler.
type Dashboard struct {
	b        Broker
	admin    apiv1.AdminServer
	id       string
	log      *slog.Logger
	sessions *sessions
	refresh  time.Duration
	now      func() time.Time
	pages    map[string]*template.Template
	handler  http.Handler
}

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// New returns the dashboard.
func New(o Options) (*Dashboard, error) {
	if o.Broker == nil {
		return nil, errors.New("dashboard: no broker")
	}
	d := &Dashboard{b: o.Broker, admin: o.Broker.AdminServer(), id: o.BrokerID, log: o.Log, refresh: o.Refresh, now: o.Now}
	if d.log == nil {
		d.log = slog.Default()
	}
	if d.now == nil {
		d.now = time.Now
	}
	if d.refresh <= 0 {
		d.refresh = DefaultRefresh
	}
	idle, maxAge, maxSessions := o.IdleTimeout, o.MaxAge, o.MaxSessions
	if idle <= 0 {
		idle = DefaultIdleTimeout
	}
	if maxAge <= 0 {
		maxAge = DefaultMaxAge
	}
	if maxSessions <= 0 {
		maxSessions = DefaultMaxSessions
	}
	d.sessions = newSessions(idle, maxAge, maxSessions, d.now)
	if err := d.parseTemplates(); err != nil {
		return nil, err
	}
	if o.Metrics != nil {
		if err := o.Metrics.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "attested_broker_dashboard_sessions",
			Help: "Dashboard login sessions open.",
		}, func() float64 { return float64(d.sessions.len()) })); err != nil {
			return nil, fmt.Errorf("dashboard: metrics: %w", err)
		}
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /login", d.loginPage)
	mux.HandleFunc("POST /login", d.login)
	mux.HandleFunc("GET /static/{file}", d.static)
	mux.Handle("POST /logout", d.authed(d.logout))
	mux.Handle("GET /{$}", d.authed(d.overview))
	mux.Handle("GET /audit", d.authed(d.auditPage))
	mux.Handle("GET /nodes/{name}", d.authed(d.nodePage))
	mux.Handle("POST /nodes/{name}/revoke", d.authed(d.revoke))
	mux.Handle("GET /keys/{name}", d.authed(d.keyPage))
	mux.Handle("GET /policies/{name}", d.authed(d.policyPage))
	// Cross-origin browser POSTs are refused before any handler runs,
	// whatever cookie or token they carry.
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d.fail(w, r, http.StatusForbidden, "cross-origin request refused: the dashboard accepts forms only from its own pages")
	}))
	d.handler = cop.Handler(mux)
	return d, nil
}

// ServeHTTP implements http.Handler.
func (d *Dashboard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	securityHeaders(w.Header())
	if r.Method == http.MethodPost {
		r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	}
	d.handler.ServeHTTP(w, r)
}

// csp allows the dashboard's own script and style files and nothing else:
// no inline script or style, no other origin, no framing, no plugins.
const csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

func securityHeaders(h http.Header) {
	h.Set("Content-Security-Policy", csp)
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	// same-origin, not no-referrer: with no-referrer browsers send
	// "Origin: null" on the dashboard's own forms, and those without
	// Sec-Fetch-Site could then not be told from a cross-origin post.
	// No referrer ever leaves the dashboard's origin either way.
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cache-Control", "no-store")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
}

// authed admits requests of a live session, and POSTs only with the
// session's CSRF token.
func (d *Dashboard) authed(h func(http.ResponseWriter, *http.Request, *session)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var id string
		if c, err := r.Cookie(CookieName); err == nil {
			id = c.Value
		}
		partial := isPartial(r)
		s, ok := d.sessions.get(id, !partial)
		if !ok {
			switch {
			case partial:
				// The page's refresher sends the browser to the login.
				http.Error(w, "session ended; log in again", http.StatusUnauthorized)
			case r.Method == http.MethodGet:
				http.Redirect(w, r, "/login", http.StatusSeeOther)
			default:
				d.fail(w, r, http.StatusForbidden, "your session has ended (or you never logged in): log in again, then repeat the action")
			}
			return
		}
		if r.Method == http.MethodPost {
			tok := r.PostFormValue("csrf")
			if subtle.ConstantTimeCompare([]byte(tok), []byte(s.csrf)) != 1 {
				d.log.Warn("dashboard: form without this session's CSRF token refused", "path", r.URL.Path, "source", r.RemoteAddr)
				d.fail(w, r, http.StatusForbidden, "the form did not carry this session's token (it may come from another site or an old page): reload the page and try again")
				return
			}
		}
		h(w, r, s)
	})
}

// isPartial says whether the request is the page refreshing its data.
func isPartial(r *http.Request) bool { return r.URL.Query().Get("partial") == "1" }

func (d *Dashboard) loginPage(w http.ResponseWriter, r *http.Request) {
	p := d.newPage("Log in", nil)
	switch r.URL.Query().Get("m") {
	case "expired":
		p.Flash = "Your session ended. Log in again."
	case "out":
		p.Flash = "Logged out."
	}
	d.render(w, r, http.StatusOK, "login", p)
}

func (d *Dashboard) login(w http.ResponseWriter, r *http.Request) {
	token := strings.TrimSpace(r.PostFormValue("token"))
	if err := d.b.AdminLogin(r.Context(), r.RemoteAddr, token); err != nil {
		code := http.StatusUnauthorized
		if errors.Is(err, broker.ErrLoginRateLimited) {
			code = http.StatusTooManyRequests
		}
		d.log.Warn("dashboard: login refused", "source", r.RemoteAddr, "err", err)
		p := d.newPage("Log in", nil)
		p.Error = err.Error()
		d.render(w, r, code, "login", p)
		return
	}
	if c, err := r.Cookie(CookieName); err == nil {
		d.sessions.delete(c.Value)
	}
	id, _ := d.sessions.create(r.RemoteAddr)
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: id, Path: "/", MaxAge: int(d.sessions.maxAge / time.Second),
		Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	d.log.Info("dashboard: admin logged in", "source", r.RemoteAddr)
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

func (d *Dashboard) logout(w http.ResponseWriter, r *http.Request, _ *session) {
	if c, err := r.Cookie(CookieName); err == nil {
		d.sessions.delete(c.Value)
	}
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: "", Path: "/", MaxAge: -1,
		Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, "/login?m=out", http.StatusSeeOther)
}

// revoke revokes a node through the Admin API, audited as the dashboard's
// admin. The form names the node twice: in its path and typed by the admin
// to confirm.
func (d *Dashboard) revoke(w http.ResponseWriter, r *http.Request, s *session) {
	name := r.PathValue("name")
	if r.PostFormValue("confirm") != name {
		d.renderNode(w, r, s, http.StatusBadRequest, name, "", fmt.Sprintf("Not revoked: type the node's name, %s, in the box to confirm.", name))
		return
	}
	ctx, cancel := context.WithTimeout(broker.WithActor(r.Context(), broker.DashboardActor), requestTimeout)
	defer cancel()
	if _, err := d.admin.RevokeNode(ctx, &apiv1.NodeRequest{Name: name}); err != nil {
		d.renderNode(w, r, s, httpCode(err), name, "", "Not revoked: "+message(err))
		return
	}
	d.log.Info("dashboard: node revoked", "node", name, "source", r.RemoteAddr)
	http.Redirect(w, r, "/nodes/"+name+"?done=revoked", http.StatusSeeOther)
}

func (d *Dashboard) static(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("file")
	types := map[string]string{".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
	typ, ok := types[path.Ext(name)]
	b, err := fs.ReadFile(staticFS, "static/"+name)
	if !ok || err != nil {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", typ)
	w.Write(b)
}

// fail answers with an error page.
func (d *Dashboard) fail(w http.ResponseWriter, r *http.Request, code int, msg string) {
	p := d.newPage(http.StatusText(code), nil)
	p.Error = msg
	d.render(w, r, code, "error", p)
}

// message is what an operator reads of an Admin API error: its text,
// without gRPC's "rpc error: code = ..." wrapping.
func message(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	return err.Error()
}

func httpCode(err error) int {
	switch status.Code(err) {
	case codes.NotFound:
		return http.StatusNotFound
	case codes.InvalidArgument, codes.FailedPrecondition:
		return http.StatusBadRequest
	case codes.Unimplemented:
		return http.StatusNotImplemented
	default:
		return http.StatusInternalServerError
	}
}
