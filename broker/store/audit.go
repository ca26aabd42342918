package store

import (
	"context"

	"github.com/attested-dev/attested/broker/auditchain"
)

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
