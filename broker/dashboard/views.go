package dashboard

import (
	"bytes"
	"context"
	"fmt"
	"html/template"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// page is what every template gets.
type page struct {
	Title    string
	BrokerID string
	// CSRF is the session's form token; empty when logged out.
	CSRF string
	// Refresh is the period, in seconds, at which the page refreshes its
	// live part; 0 for pages that do not.
	Refresh int
	Flash   string
	Error   string
	Updated time.Time
	Data    any
}

func (d *Dashboard) newPage(title string, s *session) *page {
	p := &page{Title: title, BrokerID: d.id, Updated: d.now()}
	if s != nil {
		p.CSRF = s.csrf
		p.Refresh = max(1, int(d.refresh/time.Second))
	}
	return p
}

var pageNames = []string{"login", "error", "overview", "node", "key", "policy", "audit"}

func (d *Dashboard) parseTemplates() error {
	funcs := template.FuncMap{
		"ts":          func(unix int64) string { return d.ts(unix) },
		"tsnano":      func(n int64) string { return d.ts(n / int64(time.Second)) },
		"ago":         func(unix int64) string { return d.ago(unix) },
		"clip":        clip,
		"statusClass": statusClass,
	}
	d.pages = map[string]*template.Template{}
	for _, name := range pageNames {
		t, err := template.New("layout.html").Funcs(funcs).ParseFS(templateFS, "templates/layout.html", "templates/partials.html", "templates/"+name+".html")
		if err != nil {
			return fmt.Errorf("dashboard: template %s: %w", name, err)
		}
		d.pages[name] = t
	}
	return nil
}

// render writes a page, or only its live part when the page refreshes
// itself.
func (d *Dashboard) render(w http.ResponseWriter, r *http.Request, code int, name string, p *page) {
	tmpl := "layout.html"
	if isPartial(r) && p.CSRF != "" {
		tmpl = "live"
	}
	var buf bytes.Buffer
	if err := d.pages[name].ExecuteTemplate(&buf, tmpl, p); err != nil {
		d.log.Error("dashboard: rendering failed", "page", name, "err", err)
		http.Error(w, "the dashboard failed to render this page; the broker log says why", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	w.Write(buf.Bytes())
}

func (d *Dashboard) ts(unix int64) string {
	if unix == 0 {
		return "-"
	}
	return time.Unix(unix, 0).UTC().Format("2006-01-02 15:04:05Z")
}

// ago says how long ago a time was, roughly.
func (d *Dashboard) ago(unix int64) string {
	if unix == 0 {
		return "never"
	}
	age := d.now().Sub(time.Unix(unix, 0))
	switch {
	case age < 0:
		return "in the future"
	case age < time.Minute:
		return fmt.Sprintf("%ds ago", int(age/time.Second))
	case age < time.Hour:
		return fmt.Sprintf("%dm ago", int(age/time.Minute))
	case age < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(age/time.Hour))
	default:
		return fmt.Sprintf("%dd ago", int(age/(24*time.Hour)))
	}
}

// clip shortens s to n characters for a table cell; the full text is a
// click away.
func clip(n int, s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n]) + "…"
}

// statusClass maps a status to a CSS class from a fixed set.
func statusClass(s string) string {
	switch s {
	case "trusted", "untrusted", "stale", "revoked", "pending":
		return "st-" + s
	}
	return "st-unknown"
}

// --- data --------------------------------------------------------------

// nodeRow is a node as the tables show it.
type nodeRow struct {
	Name         string
	Status       string
	Reason       string
	Since        int64
	LastEvidence int64
	Enrolled     int64
	Tags         []tag
	EK           string
	EKIssuer     string
	PendingUntil int64
}

type tag struct {
	Key, Value string
	Certified  bool // the node's TPM certified this tag
}

func toRow(n *apiv1.Node) nodeRow {
	st, reason, since := nodeStatus(n)
	r := nodeRow{Name: n.GetName(), Status: st, Reason: reason, Since: since, LastEvidence: n.GetLastAttestedUnix(),
		Enrolled: n.GetEnrolledUnix(), EK: n.GetEkFingerprint(), EKIssuer: n.GetEkIssuer(), PendingUntil: n.GetPendingExpiresUnix()}
	for k, v := range n.GetTags() {
		cv, ok := n.GetCertifiedTags()[k]
		r.Tags = append(r.Tags, tag{Key: k, Value: v, Certified: ok && cv == v})
	}
	sort.Slice(r.Tags, func(i, j int) bool { return r.Tags[i].Key < r.Tags[j].Key })
	return r
}

// nodeStatus is the node's status as the broker states it; a broker that
// does not yet fill in status (older API) has it derived from state and
// trust, as 'node list' showed it.
func nodeStatus(n *apiv1.Node) (status, reason string, since int64) {
	if n.GetStatus() != "" {
		return n.GetStatus(), n.GetStatusReason(), n.GetStatusSinceUnix()
	}
	switch {
	case n.GetState() == apiv1.NodeState_NODE_STATE_REVOKED:
		return "revoked", "revoked by an admin", 0
	case n.GetState() == apiv1.NodeState_NODE_STATE_PENDING:
		return "pending", "enrolled, waiting for an admin's approval", 0
	case n.GetTrust() == "trusted" || n.GetTrust() == "untrusted":
		return n.GetTrust(), n.GetTrustReason(), 0
	}
	return "stale", "no evidence received since enrollment", 0
}

// eventRow is an audit record as the tables show it.
type eventRow struct {
	*apiv1.AuditEvent
	Refusal bool
}

func toEvents(evs []*apiv1.AuditEvent) []eventRow {
	out := make([]eventRow, 0, len(evs))
	// The API lists oldest first; the page shows the newest first.
	for _, e := range slices.Backward(evs) {
		out = append(out, eventRow{AuditEvent: e, Refusal: !e.GetAllowed()})
	}
	return out
}

type statusCount struct {
	Status string
	N      int
}

type overviewData struct {
	Nodes    []nodeRow
	Pending  []nodeRow
	Counts   []statusCount
	Keys     []*apiv1.Key
	Policies []*apiv1.Policy
	Events   []eventRow
	// Problems lists what could not be read.
	Problems []string
}

// recentEvents is how many audit records the overview shows.
const recentEvents = 50

func (d *Dashboard) overview(w http.ResponseWriter, r *http.Request, s *session) {
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()
	var o overviewData
	if nodes, err := d.admin.ListNodes(ctx, &apiv1.ListNodesRequest{}); err != nil {
		o.Problems = append(o.Problems, "nodes: "+message(err))
	} else {
		counts := map[string]int{}
		for _, n := range nodes.GetNodes() {
			row := toRow(n)
			counts[row.Status]++
			o.Nodes = append(o.Nodes, row)
		}
		for _, n := range nodes.GetPending() {
			o.Pending = append(o.Pending, toRow(n))
		}
		for _, st := range []string{"trusted", "untrusted", "stale", "revoked", "pending"} {
			o.Counts = append(o.Counts, statusCount{st, counts[st]})
		}
	}
	if keys, err := d.admin.ListKeys(ctx, &apiv1.ListKeysRequest{}); err != nil {
		o.Problems = append(o.Problems, "keys: "+message(err))
	} else {
		o.Keys = keys.GetKeys()
	}
	if ps, err := d.admin.ListPolicies(ctx, &apiv1.ListPoliciesRequest{}); err != nil {
		o.Problems = append(o.Problems, "policies: "+message(err))
	} else {
		o.Policies = ps.GetPolicies()
	}
	if evs, err := d.admin.ListAudit(ctx, &apiv1.ListAuditRequest{Limit: recentEvents}); err != nil {
		o.Problems = append(o.Problems, "audit: "+message(err))
	} else {
		o.Events = toEvents(evs.GetEvents())
	}
	p := d.newPage("Overview", s)
	p.Data = o
	d.render(w, r, http.StatusOK, "overview", p)
}

type nodeData struct {
	Name  string
	Found bool
	Node  nodeRow
	// Detail is the broker's evidence summary, sessions and history; nil
	// when it could not be read (DetailNote says why).
	Detail     *apiv1.NodeDetail
	DetailNote string
	Events     []eventRow
	Problems   []string
}

func (d *Dashboard) nodePage(w http.ResponseWriter, r *http.Request, s *session) {
	flash := ""
	if r.URL.Query().Get("done") == "revoked" {
		flash = "Node revoked: its sessions have ended and it gets no key until it is removed and enrolled again."
	}
	d.renderNode(w, r, s, http.StatusOK, r.PathValue("name"), flash, "")
}

// renderNode shows a node's page, with a message about an action.
func (d *Dashboard) renderNode(w http.ResponseWriter, r *http.Request, s *session, code int, name, flash, errMsg string) {
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()
	nd := nodeData{Name: name}
	detail, err := d.admin.GetNode(ctx, &apiv1.NodeRequest{Name: name})
	switch status.Code(err) {
	case codes.OK:
		nd.Detail, nd.Found = detail, detail.GetNode() != nil
		if nd.Found {
			nd.Node = toRow(detail.GetNode())
		}
	case codes.Unimplemented:
		nd.DetailNote = "This broker does not report evidence summaries, sessions and status history yet (GetNode)."
	case codes.NotFound:
	default:
		nd.Problems = append(nd.Problems, "node detail: "+message(err))
	}
	if !nd.Found {
		// From the node list: a broker without GetNode, or a pending
		// enrollment.
		if nodes, err := d.admin.ListNodes(ctx, &apiv1.ListNodesRequest{}); err != nil {
			nd.Problems = append(nd.Problems, "nodes: "+message(err))
		} else {
			for _, n := range append(nodes.GetNodes(), nodes.GetPending()...) {
				if n.GetName() == name {
					nd.Node, nd.Found = toRow(n), true
					break
				}
			}
		}
	}
	if evs, err := d.admin.ListAudit(ctx, &apiv1.ListAuditRequest{Node: name, Limit: recentEvents}); err != nil {
		nd.Problems = append(nd.Problems, "audit: "+message(err))
	} else {
		nd.Events = toEvents(evs.GetEvents())
	}
	if !nd.Found && code == http.StatusOK {
		code = http.StatusNotFound
	}
	p := d.newPage("Node "+name, s)
	p.Flash, p.Error, p.Data = flash, errMsg, nd
	d.render(w, r, code, "node", p)
}

type keyData struct {
	Name     string
	Versions []*apiv1.Key
	Counts   map[uint32]*apiv1.KeyVersionCounts
	Note     string
	Events   []eventRow
	Problems []string
}

func (d *Dashboard) keyPage(w http.ResponseWriter, r *http.Request, s *session) {
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()
	name := r.PathValue("name")
	kd := keyData{Name: name, Counts: map[uint32]*apiv1.KeyVersionCounts{}}
	detail, err := d.admin.GetKey(ctx, &apiv1.KeyRequest{Name: name})
	switch status.Code(err) {
	case codes.OK:
		kd.Versions = detail.GetVersions()
		for _, c := range detail.GetCounts() {
			kd.Counts[c.GetVersion()] = c
		}
	case codes.Unimplemented:
		kd.Note = "This broker does not report key versions and release counts yet (GetKey)."
		if keys, err := d.admin.ListKeys(ctx, &apiv1.ListKeysRequest{}); err != nil {
			kd.Problems = append(kd.Problems, "keys: "+message(err))
		} else {
			for _, k := range keys.GetKeys() {
				if k.GetName() == name {
					kd.Versions = append(kd.Versions, k)
				}
			}
		}
	case codes.NotFound:
	default:
		kd.Problems = append(kd.Problems, "key: "+message(err))
	}
	if evs, err := d.admin.ListAudit(ctx, &apiv1.ListAuditRequest{Key: name, Limit: recentEvents}); err != nil {
		kd.Problems = append(kd.Problems, "audit: "+message(err))
	} else {
		kd.Events = toEvents(keyEvents(evs.GetEvents(), name))
	}
	code := http.StatusOK
	if len(kd.Versions) == 0 && len(kd.Problems) == 0 {
		code = http.StatusNotFound
	}
	p := d.newPage("Key "+name, s)
	p.Data = kd
	d.render(w, r, code, "key", p)
}

// keyEvents keeps the records of one key: a broker that does not filter
// the audit by key yet returns them all.
func keyEvents(evs []*apiv1.AuditEvent, key string) []*apiv1.AuditEvent {
	out := evs[:0:0]
	for _, e := range evs {
		if e.GetKey() == key {
			out = append(out, e)
		}
	}
	return out
}

type policyData struct {
	Name      string
	Current   *apiv1.Policy
	Revisions []*apiv1.Policy
	Keys      []string
	Note      string
	Problems  []string
}

func (d *Dashboard) policyPage(w http.ResponseWriter, r *http.Request, s *session) {
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()
	name := r.PathValue("name")
	pd := policyData{Name: name}
	if ps, err := d.admin.ListPolicies(ctx, &apiv1.ListPoliciesRequest{}); err != nil {
		pd.Problems = append(pd.Problems, "policies: "+message(err))
	} else {
		for _, p := range ps.GetPolicies() {
			if p.GetName() == name {
				pd.Current = p
			}
		}
	}
	if keys, err := d.admin.ListKeys(ctx, &apiv1.ListKeysRequest{}); err == nil {
		for _, k := range keys.GetKeys() {
			if k.GetPolicy() == name && !slices.Contains(pd.Keys, k.GetName()) {
				pd.Keys = append(pd.Keys, k.GetName())
			}
		}
	}
	revs, err := d.admin.ListPolicyRevisions(ctx, &apiv1.PolicyRequest{Name: name})
	switch status.Code(err) {
	case codes.OK:
		// Newest first.
		pd.Revisions = slices.Clone(revs.GetPolicies())
		slices.Reverse(pd.Revisions)
	case codes.Unimplemented:
		pd.Note = "This broker does not keep earlier policy revisions yet (ListPolicyRevisions)."
	case codes.NotFound:
	default:
		pd.Problems = append(pd.Problems, "revisions: "+message(err))
	}
	code := http.StatusOK
	if pd.Current == nil && len(pd.Problems) == 0 {
		code = http.StatusNotFound
	}
	p := d.newPage("Policy "+name, s)
	p.Data = pd
	d.render(w, r, code, "policy", p)
}

type auditData struct {
	Kind, Node, Key string
	Events          []eventRow
	Problems        []string
}

// auditLimit is how many records the audit page shows.
const auditLimit = 200

func (d *Dashboard) auditPage(w http.ResponseWriter, r *http.Request, s *session) {
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()
	q := r.URL.Query()
	ad := auditData{Kind: q.Get("kind"), Node: q.Get("node"), Key: q.Get("key")}
	code := http.StatusOK
	evs, err := d.admin.ListAudit(ctx, &apiv1.ListAuditRequest{Kind: ad.Kind, Node: ad.Node, Key: ad.Key, Limit: auditLimit})
	if err != nil {
		ad.Problems = append(ad.Problems, message(err))
		code = httpCode(err)
	} else {
		list := evs.GetEvents()
		if ad.Key != "" {
			list = keyEvents(list, ad.Key)
		}
		ad.Events = toEvents(list)
	}
	p := d.newPage("Audit", s)
	p.Data = ad
	d.render(w, r, code, "audit", p)
}
