package pgstore

import (
	"fmt"
	"net/url"
	"strings"
)

// IsURL reports whether s names a PostgreSQL database (postgres:// or
// postgresql://).
func IsURL(s string) bool {
	return strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://")
}

// secretParams are the URL parameters that carry secrets.
var secretParams = []string{"password", "sslpassword"}

const mask = "xxxxx"

// splitURL splits a PostgreSQL URL the way libpq (and pgx) read it: the
// userinfo is what precedes the first '@' found before any '/', so a URL
// with several hosts (which net/url refuses) splits too.
func splitURL(s string) (scheme, user, password string, hasPassword bool, rest, query string) {
	// Any scheme: a URL of the wrong kind is redacted in the error that
	// refuses it, too.
	if i := strings.Index(s, "://"); i >= 0 && !strings.ContainsAny(s[:i], "/@?") {
		scheme, s = s[:i+3], s[i+3:]
	}
	if i := strings.IndexAny(s, "@/"); i >= 0 && s[i] == '@' {
		user, password, hasPassword = strings.Cut(s[:i], ":")
		s = s[i+1:]
	}
	rest, query, _ = strings.Cut(s, "?")
	return scheme, user, password, hasPassword, rest, query
}

// Redact returns the URL with every password masked, for logs and errors;
// it masks the userinfo password of a URL of any scheme.
func Redact(s string) string {
	scheme, user, password, hasPassword, rest, query := splitURL(s)
	var b strings.Builder
	b.WriteString(scheme)
	if user != "" || hasPassword {
		b.WriteString(user)
		if hasPassword && password != "" {
			b.WriteString(":" + mask)
		}
		b.WriteString("@")
	}
	b.WriteString(rest)
	if query != "" {
		parts := strings.Split(query, "&")
		for i, p := range parts {
			k, _, _ := strings.Cut(p, "=")
			if name, err := url.QueryUnescape(k); err == nil && isSecretParam(name) {
				parts[i] = k + "=" + mask
			}
		}
		b.WriteString("?" + strings.Join(parts, "&"))
	}
	return b.String()
}

func isSecretParam(name string) bool {
	for _, p := range secretParams {
		if strings.EqualFold(name, p) {
			return true
		}
	}
	return false
}

// checkNoSecret refuses a URL that carries a password: store URLs are
// given on command lines and in broker.yaml, neither of which is a place
// for secrets.
func checkNoSecret(s string) error {
	_, _, password, hasPassword, _, query := splitURL(s)
	found := ""
	if hasPassword && password != "" {
		found = "a password"
	}
	if query != "" {
		vals, err := url.ParseQuery(query)
		if err != nil {
			return fmt.Errorf("store URL %s: its parameters do not parse: %v", Redact(s), err)
		}
		for k, v := range vals {
			if isSecretParam(k) && len(v) > 0 && v[0] != "" {
				found = "a " + k + " parameter"
			}
		}
	}
	if found == "" {
		return nil
	}
	return fmt.Errorf("store URL %s carries %s: command lines and %s are no place for secrets; "+
		"give the password in a passfile (mode 0600) named by PGPASSFILE or ?passfile=, or in the PGPASSWORD environment variable, "+
		"or authenticate with a client certificate (?sslcert=...&sslkey=...)", Redact(s), found, "broker.yaml")
}
