package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/attested-dev/attested/broker/store"
)

// DashboardActor is the audit actor of admin actions taken in the
// dashboard.
const DashboardActor = "admin (dashboard)"

// Dashboard login refusals: what AdminLogin's errors wrap.
var (
	ErrLoginRefused     = errors.New("wrong admin credential")
	ErrLoginRateLimited = errors.New("too many failed logins")
)

// methodDashboardLogin names dashboard logins in the metrics and the audit
// of unauthenticated refusals, beside the gRPC methods.
const methodDashboardLogin = "DashboardLogin"

// AdminLogin checks the admin credential presented at the dashboard login
// by a caller at remote ("host:port"): the same credential, checked the
// same way (constant time against adminTokenSHA256), as an Admin gRPC
// call. Failed logins draw from the source's limits.rates.login bucket;
// once it is empty every login from the source is refused, right or
// wrong, until it refills. Refusals are counted and audited sampled like
// other unauthenticated refusals; a login is audited as kind "login".
func (s *Server) AdminLogin(ctx context.Context, remote, token string) error {
	key := s.guard.sourceOf(remoteAddr(remote))
	src := s.guard.sourceLabel(key)
	ok, limited := s.guard.login(key, func() bool { return s.isAdminToken(token) })
	if ok {
		s.audit(ctx, store.AuditEvent{Kind: "login", Allowed: true, Actor: DashboardActor,
			Reason: "dashboard session opened from " + src})
		return nil
	}
	reason, err := ReasonAdminCredential, fmt.Errorf("%w: give the admin credential, the token in the broker's admin.token (what the CLI reads with --admin-token-file)", ErrLoginRefused)
	if limited {
		reason, err = ReasonRateLimited, fmt.Errorf("%w from %s: a source may fail %s (limits.rates.login); retry later", ErrLoginRateLimited, src, s.limits.Rates[rateLogin])
	}
	if rec, due := s.sampleRefusal(methodDashboardLogin, reason, src, store.AuditEvent{Reason: "dashboard login refused: " + err.Error()}); due {
		s.audit(ctx, rec)
	}
	return err
}

// login runs check unless the source's failed-login bucket is empty, and
// draws from it when check fails. It holds the guard's lock throughout, so
// concurrent guesses cannot all pass the bucket check before one draws.
func (g *guard) login(key netip.Prefix, check func() bool) (ok, limited bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.get(key)
	defer g.settle(s)
	l := g.limiter(s, rateLogin)
	if l.Tokens() < 1 {
		return false, true
	}
	if check() {
		return true, false
	}
	l.Allow()
	return false, false
}

// remoteAddr parses net/http's Request.RemoteAddr; nil if it is not
// host:port (the source is then the shared non-IP one).
func remoteAddr(remote string) net.Addr {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return nil
	}
	return net.TCPAddrFromAddrPort(ap)
}

type actorKey struct{}

// WithActor names the actor that admin actions taken with ctx are audited
// under, instead of "admin": in-process callers (the dashboard) that have
// authenticated the admin themselves. gRPC callers cannot set it.
func WithActor(ctx context.Context, actor string) context.Context {
	return context.WithValue(ctx, actorKey{}, actor)
}

// actorOf is the audit actor of a record written with ctx.
func actorOf(ctx context.Context, actor string) string {
	if a, ok := ctx.Value(actorKey{}).(string); ok && actor == "admin" {
		return a
	}
	return actor
}
