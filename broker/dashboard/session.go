package dashboard

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"sync"
	"time"
)

// session is one admin's login. The cookie carries a random identifier;
// the table keys sessions by its hash, so the table itself holds nothing a
// browser could present.
type session struct {
	csrf     string // the token every form of the session must carry
	source   string // where the login came from, for the log
	created  time.Time
	lastUsed time.Time // the last request the admin made (polling excluded)
}

// sessions is the bounded table of live sessions.
type sessions struct {
	mu     sync.Mutex
	m      map[[sha256.Size]byte]*session
	idle   time.Duration
	maxAge time.Duration
	max    int
	now    func() time.Time
}

func newSessions(idle, maxAge time.Duration, max int, now func() time.Time) *sessions {
	return &sessions{m: map[[sha256.Size]byte]*session{}, idle: idle, maxAge: maxAge, max: max, now: now}
}

func randomToken() string {
	// crypto/rand.Read never fails on supported platforms.
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// create opens a session and returns its cookie value. A full table drops
// the session used least recently: only admins open sessions, so this
// never lets anyone else in, and the table stays bounded.
func (t *sessions) create(source string) (string, *session) {
	id := randomToken()
	now := t.now()
	s := &session{csrf: randomToken(), source: source, created: now, lastUsed: now}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sweep(now)
	for len(t.m) >= t.max {
		var oldest [sha256.Size]byte
		var at time.Time
		first := true
		for k, v := range t.m {
			if first || v.lastUsed.Before(at) {
				oldest, at, first = k, v.lastUsed, false
			}
		}
		delete(t.m, oldest)
	}
	t.m[sha256.Sum256([]byte(id))] = s
	return id, s
}

// get returns the live session of a cookie value; touch counts the request
// as the admin's activity (page views and actions do, polling does not, so
// an unattended page still logs out after the idle timeout).
func (t *sessions) get(id string, touch bool) (*session, bool) {
	if id == "" {
		return nil, false
	}
	k := sha256.Sum256([]byte(id))
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	s, ok := t.m[k]
	if !ok {
		return nil, false
	}
	if t.expired(s, now) {
		delete(t.m, k)
		return nil, false
	}
	if touch {
		s.lastUsed = now
	}
	return s, true
}

func (t *sessions) delete(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.m, sha256.Sum256([]byte(id)))
}

func (t *sessions) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sweep(t.now())
	return len(t.m)
}

func (t *sessions) expired(s *session, now time.Time) bool {
	return now.Sub(s.lastUsed) >= t.idle || now.Sub(s.created) >= t.maxAge || now.Before(s.created)
}

// sweep drops expired sessions; the caller holds mu.
func (t *sessions) sweep(now time.Time) {
	for k, s := range t.m {
		if t.expired(s, now) {
			delete(t.m, k)
		}
	}
}
