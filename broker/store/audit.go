package store

import (
	"context"
	"strings"
	"unicode/utf8"

	"github.com/attested-dev/attested/broker/auditchain"
)

// Stored is ev as every store keeps it, and so as the audit chain covers
// it: its time as auditchain.Time keeps it (PostgreSQL keeps microseconds),
// and its text as valid UTF-8 without NUL, each invalid byte and each NUL
// replaced by U+FFFD (JSON replaces invalid bytes so; PostgreSQL's text
// holds neither). A store chains the record Stored returns, so that what a
// later scan reads is exactly what was hashed: a record must never be lost,
// or fail verification, for the bytes a caller chose.
func (e AuditEvent) Stored() AuditEvent {
	e.Time = auditchain.Time(e.Time)
	for _, s := range []*string{&e.Kind, &e.Node, &e.Key, &e.Reason, &e.Actor, &e.LayerDigest, &e.Policy} {
		*s = storedText(*s)
	}
	return e
}

func storedText(s string) string {
	if utf8.ValidString(s) && strings.IndexByte(s, 0) < 0 {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 8)
	for _, r := range s { // an invalid byte comes as one utf8.RuneError
		if r == 0 {
			r = utf8.RuneError
		}
		b.WriteRune(r)
	}
	return b.String()
}

// VerifyAudit checks the audit chain of s under k: every record, in the
// store's order, against the checkpoint of the same snapshot.
func VerifyAudit(ctx context.Context, s Store, k *auditchain.Key) (auditchain.Result, error) {
	v := k.NewVerifier()
	cp, err := s.ScanAudit(ctx, func(seq uint64, ev AuditEvent, derr error) error {
		switch {
		case derr != nil:
			v.Unreadable(seq, derr)
		case seq != ev.Seq:
			v.Misplaced(seq, ev.Seq)
		default:
			v.Add(ev.Entry(), ev.Chain)
		}
		return nil
	})
	if err != nil {
		return auditchain.Result{}, err
	}
	return v.Result(cp), nil
}
