package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/store"
)

// at is a time every store keeps exactly (UTC, whole microseconds:
// PostgreSQL's timestamps).
var at = time.Date(2031, 5, 6, 7, 8, 9, 123456000, time.UTC)

// sampleNode has a value in every field, so that a store which drops one
// fails the round trip (and a field added to Node fails checkFilled until
// the sample gives it one).
func sampleNode(name, ek string) store.Node {
	return store.Node{
		Name: name, EKFingerprint: ek, EKPublic: []byte("ek-public"), EKCertificate: []byte("ek-cert"), EKIssuer: "CN=Issuer",
		AKPublic: []byte("ak-public"), State: store.NodeActive, Tags: map[string]string{"region": "EU"}, TagsVersion: 3,
		EnrolledAt: at, Trust: "trusted", TrustReason: "because", LastAttested: at.Add(time.Second), ResetCount: 4, RestartCount: 5,
		ClockSeen: true, LastPCRs: map[int][]byte{0: {1, 2}, 16: {3}}, LastFacts: []byte(`{"secureBoot":true,"nul":"a\u0000b"}`),
		LastSeen: at.Add(2 * time.Second), CertifiedTagDigest: []byte("digest"), Status: "trusted", StatusReason: "why",
		StatusSince: at.Add(3 * time.Second), History: []store.StatusChange{{Time: at, Status: "stale", Reason: "old"}},
	}
}

func sampleSession(hash, node, ek string) store.Session {
	return store.Session{TokenHash: []byte(hash), Node: node, EKFingerprint: ek, PublicKey: []byte("pub"), Suite: "suite",
		PCRs: map[int][]byte{7: {9}}, ResetCount: 4, RestartCount: 5, Facts: []byte(`{"f":1}`),
		Created: at, Expires: time.Now().Add(time.Hour).UTC().Truncate(time.Microsecond)}
}

// checkFilled fails for every field of v (recursively through structs)
// that holds its zero value.
func checkFilled(t *testing.T, v any) {
	t.Helper()
	var walk func(path string, rv reflect.Value)
	walk = func(path string, rv reflect.Value) {
		if rv.Kind() == reflect.Struct && rv.Type() != reflect.TypeOf(time.Time{}) {
			for i := range rv.NumField() {
				walk(path+"."+rv.Type().Field(i).Name, rv.Field(i))
			}
			return
		}
		if rv.IsZero() {
			t.Errorf("field %s of the round-trip sample is empty: give it a value, so the stores are checked to keep it", path)
		}
	}
	rv := reflect.ValueOf(v)
	walk(rv.Type().String(), rv)
}

// diff returns where a and b differ, "" if nowhere: times by Equal (a
// store may return another location), byte slices by content.
func diff(path string, a, b reflect.Value) string {
	if a.Type() == reflect.TypeOf(time.Time{}) {
		if !a.Interface().(time.Time).Equal(b.Interface().(time.Time)) {
			return fmt.Sprintf("%s: %v != %v", path, a.Interface(), b.Interface())
		}
		return ""
	}
	switch a.Kind() {
	case reflect.Struct:
		for i := range a.NumField() {
			if d := diff(path+"."+a.Type().Field(i).Name, a.Field(i), b.Field(i)); d != "" {
				return d
			}
		}
		return ""
	case reflect.Slice:
		if a.Type().Elem().Kind() == reflect.Uint8 {
			if !bytes.Equal(a.Bytes(), b.Bytes()) {
				return fmt.Sprintf("%s: %q != %q", path, a.Bytes(), b.Bytes())
			}
			return ""
		}
		if a.Len() != b.Len() {
			return fmt.Sprintf("%s: %d elements != %d", path, a.Len(), b.Len())
		}
		for i := range a.Len() {
			if d := diff(fmt.Sprintf("%s[%d]", path, i), a.Index(i), b.Index(i)); d != "" {
				return d
			}
		}
		return ""
	case reflect.Map:
		if a.Len() != b.Len() {
			return fmt.Sprintf("%s: %d entries != %d", path, a.Len(), b.Len())
		}
		for _, k := range a.MapKeys() {
			bv := b.MapIndex(k)
			if !bv.IsValid() {
				return fmt.Sprintf("%s[%v] missing", path, k)
			}
			if d := diff(fmt.Sprintf("%s[%v]", path, k), a.MapIndex(k), bv); d != "" {
				return d
			}
		}
		return ""
	default:
		if !reflect.DeepEqual(a.Interface(), b.Interface()) {
			return fmt.Sprintf("%s: %v != %v", path, a.Interface(), b.Interface())
		}
		return ""
	}
}

func assertSame(t *testing.T, want, got any) {
	t.Helper()
	if d := diff(reflect.TypeOf(want).String(), reflect.ValueOf(want), reflect.ValueOf(got)); d != "" {
		t.Errorf("the store changed a record: %s", d)
	}
}

// runRecords checks that every field of every record comes back as it
// was written, and that calls honour their context.
func runRecords(t *testing.T, open func(t *testing.T) store.Store) {
	ctx := context.Background()

	t.Run("RecordsRoundTrip", func(t *testing.T) {
		s := open(t)
		n := sampleNode("n", "ek")
		checkFilled(t, n)
		require.NoError(t, s.CreateNode(ctx, n))
		got, err := s.GetNode(ctx, "n")
		require.NoError(t, err)
		assertSame(t, n, got)
		got, err = s.GetNodeByEK(ctx, "ek")
		require.NoError(t, err)
		assertSame(t, n, got)
		nodes, err := s.ListNodes(ctx)
		require.NoError(t, err)
		require.Len(t, nodes, 1)
		assertSame(t, n, nodes[0])

		// Written by UpdateNode and Appraise too.
		n.TrustReason = "updated"
		got, err = s.UpdateNode(ctx, "n", func(cur *store.Node) error { *cur = n; return nil })
		require.NoError(t, err)
		assertSame(t, n, got)
		sess := sampleSession("tok", "n", "ek")
		checkFilled(t, sess)
		n.TrustReason = "appraised"
		_, err = s.Appraise(ctx, "n", store.SpentNonce{Nonce: []byte("nonce"), Expires: time.Now().Add(time.Minute)}, time.Now(),
			func(cur *store.Node, _ []store.Session) (store.Outcome, error) {
				*cur = n
				return store.Outcome{Open: &sess}, nil
			})
		require.NoError(t, err)
		got, err = s.GetNode(ctx, "n")
		require.NoError(t, err)
		assertSame(t, n, got)
		gotSess, err := s.GetSession(ctx, []byte("tok"))
		require.NoError(t, err)
		assertSame(t, sess, gotSess)
		live, err := s.NodeSessions(ctx, "n", time.Now())
		require.NoError(t, err)
		require.Len(t, live, 1)
		assertSame(t, sess, live[0])

		e := store.Enrollment{ID: "e", Node: sampleNode("m", "ek-m"), SecretHash: []byte("secret"), Approved: true,
			JoinTokenHash: []byte("join"), Expires: time.Now().Add(time.Hour).UTC().Truncate(time.Microsecond)}
		checkFilled(t, e)
		require.NoError(t, s.PutEnrollment(ctx, e, 0, time.Now()))
		gotE, err := s.TakeEnrollment(ctx, "e")
		require.NoError(t, err)
		assertSame(t, e, gotE)

		p := store.PendingEnrollment{Node: sampleNode("p", "ek-p"), Expires: time.Now().Add(time.Hour).UTC().Truncate(time.Microsecond)}
		p.Node.State = store.NodePending
		checkFilled(t, p)
		require.NoError(t, s.AddPending(ctx, p, store.PendingLimits{}, time.Now()))
		pending, err := s.ListPending(ctx, time.Now())
		require.NoError(t, err)
		require.Len(t, pending, 1)
		assertSame(t, p, pending[0])
		approved, err := s.ApprovePending(ctx, "p", "ek-p", time.Now())
		require.NoError(t, err)
		p.Node.State = store.NodeActive
		assertSame(t, p.Node, approved)

		k := store.Key{Name: "k", Version: 7, Policy: "pol", Suite: "suite", PublicKey: []byte("pub"), SealedPrivate: []byte("sealed"), Created: at}
		checkFilled(t, k)
		require.NoError(t, s.CreateKey(ctx, k))
		gotK, err := s.GetKey(ctx, "k", 7)
		require.NoError(t, err)
		assertSame(t, k, gotK)
		keys, err := s.ListKeys(ctx)
		require.NoError(t, err)
		require.Len(t, keys, 1)
		assertSame(t, k, keys[0])

		pol := store.Policy{Name: "pol", YAML: "name: pol\n", Revision: 1, Updated: at}
		checkFilled(t, pol)
		gotP, err := s.PutPolicy(ctx, pol)
		require.NoError(t, err)
		assertSame(t, pol, gotP)
		gotP, err = s.GetPolicy(ctx, "pol")
		require.NoError(t, err)
		assertSame(t, pol, gotP)
		pols, err := s.ListPolicies(ctx)
		require.NoError(t, err)
		require.Len(t, pols, 1)
		assertSame(t, pol, pols[0])

		ev := store.AuditEvent{Seq: 1, Time: at, Kind: "release", Node: "n", Key: "k", Allowed: true, Reason: "ok", Actor: "admin"}
		checkFilled(t, ev)
		require.NoError(t, s.AppendAudit(ctx, ev))
		evs, err := s.ListAudit(ctx, store.AuditFilter{})
		require.NoError(t, err)
		require.Len(t, evs, 1)
		assertSame(t, ev, evs[0])
	})

	t.Run("AuditKeepsHostileText", func(t *testing.T) {
		// A refusal's reason may quote what a caller sent; no bytes it
		// chose may cost the record.
		s := open(t)
		require.NoError(t, s.AppendAudit(ctx, store.AuditEvent{Kind: "attest", Node: "n", Reason: "nul \x00 and invalid \xff utf-8"}))
		evs, err := s.ListAudit(ctx, store.AuditFilter{Node: "n"})
		require.NoError(t, err)
		require.Len(t, evs, 1)
		assert.Contains(t, evs[0].Reason, "and invalid")
	})

	t.Run("CallsHonourTheirContext", func(t *testing.T) {
		s := open(t)
		done, cancel := context.WithCancel(ctx)
		cancel()
		_, err := s.GetNode(done, "n")
		assert.True(t, errors.Is(err, context.Canceled), "%v", err)
		_, err = s.Appraise(done, "n", store.SpentNonce{Nonce: []byte("x"), Expires: time.Now().Add(time.Minute)}, time.Now(),
			func(*store.Node, []store.Session) (store.Outcome, error) { return store.Outcome{}, nil })
		assert.True(t, errors.Is(err, context.Canceled), "%v", err)
		assert.True(t, errors.Is(s.AppendAudit(done, store.AuditEvent{Kind: "x"}), context.Canceled))
	})

	t.Run("Stats", func(t *testing.T) {
		s := open(t)
		require.NoError(t, s.CreateNode(ctx, store.Node{Name: "a", EKFingerprint: "ek-a", State: store.NodeActive}))
		openSession(t, s, store.Session{TokenHash: []byte("live"), Node: "a", Expires: time.Now().Add(time.Hour)})
		openSession(t, s, store.Session{TokenHash: []byte("dead"), Node: "a", Expires: time.Now().Add(-time.Hour)})
		st, err := s.Stats(ctx, time.Now())
		require.NoError(t, err)
		assert.Equal(t, 1, st.LiveSessions)
		assert.Positive(t, st.Bytes)
	})
}
