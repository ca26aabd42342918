package auditchain_test

import (
	"bytes"
	"reflect"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/auditchain"
)

func key(t *testing.T, b byte) *auditchain.Key {
	k, err := auditchain.NewKey(bytes.Repeat([]byte{b}, auditchain.KeySize))
	require.NoError(t, err)
	return k
}

type rec struct {
	e auditchain.Entry
	l auditchain.Link
}

// trail chains n records after before unchained ones.
func trail(t *testing.T, k *auditchain.Key, before, n int) ([]rec, auditchain.Checkpoint) {
	t.Helper()
	var out []rec
	t0 := auditchain.Time(time.Date(2025, 1, 2, 3, 4, 5, 6789, time.UTC))
	for i := 1; i <= before; i++ {
		out = append(out, rec{e: auditchain.Entry{Seq: uint64(i), Time: t0, Kind: "attest", Reason: "legacy"}})
	}
	c := k.Resume(k.Start(uint64(before+1), uint64(before), t0))
	for i := before + 1; i <= before+n; i++ {
		e := auditchain.Entry{Seq: uint64(i), Time: t0.Add(time.Duration(i) * time.Second), Kind: "release", Node: "n", Key: "k",
			Allowed: true, KeyVersion: 1, LayerDigest: "sha256:ab", Policy: "p", PolicyRevision: 2, Reason: "ok", Actor: "node"}
		l, err := c.Append(e)
		require.NoError(t, err)
		out = append(out, rec{e, l})
	}
	return out, c.Checkpoint()
}

func verify(k *auditchain.Key, recs []rec, cp *auditchain.Checkpoint) auditchain.Result {
	v := k.NewVerifier()
	for _, r := range recs {
		v.Add(r.e, r.l)
	}
	return v.Result(cp)
}

func TestIntactTrailVerifies(t *testing.T) {
	k := key(t, 1)
	recs, cp := trail(t, k, 0, 5)
	res := verify(k, recs, &cp)
	require.True(t, res.OK, res.Problem)
	assert.EqualValues(t, 5, res.Records)
	assert.EqualValues(t, 5, res.HeadSeq)
	assert.Len(t, res.HeadHash, 2*auditchain.HashSize)

	empty := k.Start(1, 0, time.Now())
	assert.True(t, verify(k, nil, &empty).OK, "a new store")
	assert.True(t, verify(k, nil, nil).OK, "nothing at all")
}

// TestTamperingIsDetected: each way an attacker without the key can change
// a trail is reported at the record it affects.
func TestTamperingIsDetected(t *testing.T) {
	k := key(t, 1)
	cases := []struct {
		name    string
		tamper  func(recs []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint)
		bad     uint64
		problem string
	}{
		{"edit", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			r[2].e.Allowed = false
			return r, cp
		}, 3, "content does not match its hash"},
		{"edit and rehash", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			r[2].e.Node = "other"
			r[2].l.Hash = auditchain.Hash(r[2].l.Prev, r[2].e)
			return r, cp
		}, 3, "MAC does not verify"},
		{"delete", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			return append(r[:2:2], r[3:]...), cp
		}, 4, "does not follow record seq 2"},
		{"delete first", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			return r[1:], cp
		}, 2, "records before it were deleted"},
		{"insert", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			fake := r[2]
			fake.e.Seq, fake.e.Node = 3, "intruder"
			fake.l.Hash = auditchain.Hash(r[1].l.Hash, fake.e)
			return append(r[:2:2], append([]rec{fake}, r[2:]...)...), cp
		}, 3, "MAC does not verify"},
		{"replay a record", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			return append(r[:3:3], append([]rec{r[1]}, r[3:]...)...), cp
		}, 2, "out of order"},
		{"swap", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			r[1], r[2] = r[2], r[1]
			return r, cp
		}, 3, "does not follow record seq 1"},
		{"swap contents keeping sequence numbers", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			r[1].e.Seq, r[2].e.Seq = r[2].e.Seq, r[1].e.Seq
			r[1], r[2] = r[2], r[1]
			return r, cp
		}, 2, "content does not match its hash"},
		{"truncate", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			return r[:3], cp
		}, 4, "newest records were deleted"},
		{"strip chain values", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			r[4].l = auditchain.Link{}
			return r, cp
		}, 5, "carries no chain values"},
		{"delete checkpoint", func(r []rec, _ *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			return r, nil
		}, 1, "no audit checkpoint"},
		{"edit checkpoint", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			cp.Count, cp.Last, cp.Head = 3, 3, r[2].l.Hash
			return r[:3], cp
		}, 0, "checkpoint (count and head of the chain) does not verify"},
		{"claim records predate the chain", func(r []rec, cp *auditchain.Checkpoint) ([]rec, *auditchain.Checkpoint) {
			for i := range r {
				r[i].l = auditchain.Link{}
			}
			cp.First, cp.Before = 6, 5
			return r, cp
		}, 0, "does not verify"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			recs, cp := trail(t, k, 0, 5)
			r, p := c.tamper(recs, &cp)
			res := verify(k, r, p)
			require.False(t, res.OK, "tampering went unnoticed")
			assert.Equal(t, c.bad, res.FirstBad, res.Problem)
			assert.Contains(t, res.Problem, c.problem)
		})
	}
}

// TestOlderCheckpointNeedsAnAnchor: putting back an older checkpoint with
// the records after it deleted is what the MAC cannot see (the attacker
// replays the broker's own values); an anchor kept elsewhere can: the
// anchored record is gone.
func TestOlderCheckpointNeedsAnAnchor(t *testing.T) {
	k := key(t, 1)
	recs, _ := trail(t, k, 0, 5)
	// The checkpoint as it was after three records.
	c := k.Resume(k.Start(1, 0, recs[0].e.Time))
	for _, r := range recs[:3] {
		_, err := c.Append(r.e)
		require.NoError(t, err)
	}
	old := c.Checkpoint()
	res := verify(k, recs[:3], &old)
	assert.True(t, res.OK, "rolled back consistently: only an anchor tells")
	assert.EqualValues(t, 3, res.HeadSeq)

	res = verify(k, recs, &old)
	assert.False(t, res.OK, "an old checkpoint with the records after it kept")
	assert.Contains(t, res.Problem, "replaced by an older copy")
}

func TestWrongKeyFails(t *testing.T) {
	recs, cp := trail(t, key(t, 1), 0, 2)
	res := verify(key(t, 2), recs, &cp)
	assert.False(t, res.OK)
}

func TestRecordsBeforeTheChainAreCountedNotCovered(t *testing.T) {
	k := key(t, 1)
	recs, cp := trail(t, k, 3, 2)
	res := verify(k, recs, &cp)
	require.True(t, res.OK, res.Problem)
	assert.EqualValues(t, 5, res.Records)
	assert.EqualValues(t, 2, res.Chained)
	assert.EqualValues(t, 3, res.Before)

	res = verify(k, append(recs[:1:1], recs[2:]...), &cp)
	assert.False(t, res.OK, "deleting a record from before the chain changes the count")
	assert.Contains(t, res.Problem, "records before the chain were deleted or inserted")
}

// TestEveryFieldIsCovered: changing any field of an entry changes its
// hash, so a field added to Entry but not to Encode fails here.
func TestEveryFieldIsCovered(t *testing.T) {
	base := auditchain.Entry{Seq: 1, Time: auditchain.Time(time.Unix(1, 0))}
	h0 := auditchain.Hash(make([]byte, 32), base)
	v := reflect.ValueOf(&base).Elem()
	for i := 0; i < v.NumField(); i++ {
		e := base
		f := reflect.ValueOf(&e).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString("x")
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Uint32, reflect.Uint64:
			f.SetUint(f.Uint() + 7)
		case reflect.Struct:
			e.Time = e.Time.Add(time.Microsecond)
		default:
			t.Fatalf("field %s of kind %s: teach this test to change it", v.Type().Field(i).Name, f.Kind())
		}
		assert.NotEqual(t, h0, auditchain.Hash(make([]byte, 32), e), "field %s is not covered by the hash", v.Type().Field(i).Name)
	}
	// Strings cannot run into each other.
	a := base
	a.Kind, a.Node = "ab", "c"
	b := base
	b.Kind, b.Node = "a", "bc"
	assert.NotEqual(t, auditchain.Hash(make([]byte, 32), a), auditchain.Hash(make([]byte, 32), b))
}

func TestAppendRefusesWhatWouldNotVerify(t *testing.T) {
	k := key(t, 1)
	c := k.Resume(k.Start(1, 0, time.Now()))
	_, err := c.Append(auditchain.Entry{Seq: 1, Time: time.Unix(1, 5)})
	assert.Error(t, err, "nanoseconds the store may not keep")
	_, err = c.Append(auditchain.Entry{Seq: 1, Time: time.Unix(1, 0)})
	require.NoError(t, err)
	_, err = c.Append(auditchain.Entry{Seq: 1, Time: time.Unix(1, 0)})
	assert.Error(t, err, "a sequence number used twice")
}

// BenchmarkAppend is the chain's cost per record on the append path (a
// SHA-256 and an HMAC over a few hundred bytes), apart from the store's
// commit.
func BenchmarkAppend(b *testing.B) {
	k, err := auditchain.NewKey(bytes.Repeat([]byte{1}, auditchain.KeySize))
	require.NoError(b, err)
	c := k.Resume(k.Start(1, 0, time.Now()))
	e := auditchain.Entry{Time: auditchain.Time(time.Now()), Kind: "release", Node: "node1", Key: "app", KeyVersion: 1, Allowed: true,
		LayerDigest: "sha256:4a1b3e3c8b5d1f1e9d6a0e2c7b4f3a2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f", Policy: "prod", PolicyRevision: 3,
		Reason: "policy satisfied (key app v1)", Actor: "node"}
	for i := range b.N {
		e.Seq = uint64(i + 1)
		if _, err := c.Append(e); err != nil {
			b.Fatal(err)
		}
	}
	_ = c.Checkpoint()
}
