// Package auditchain makes the broker's audit trail tamper-evident: each
// record is hash-chained to the one before it and its hash is MACed with a
// key only the broker holds (derived from its master key), and a MACed
// checkpoint (the number of records and the newest one's hash) is kept
// with them. Editing, deleting, inserting or reordering a record, or
// deleting the newest ones, is then detected by Verifier.
//
// Stores call Chain inside the transaction that appends records, so the
// chain follows commit order; everything about the chain's encoding and
// its verification is here, so every store chains the same way.
package auditchain

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"time"
)

// KeyLabel is the HKDF label under which the broker derives the audit MAC
// key from its master key.
const KeyLabel = "attested/v1/audit-mac"

// Sizes of the chain's values.
const (
	HashSize = sha256.Size
	KeySize  = 32
)

// Domain tags keep a record's hash, its MAC and the checkpoint's MAC apart
// from each other and from anything else the key or hash is used for.
const (
	recordDomain     = "attested/v1/audit-record\x00"
	recordMACDomain  = "attested/v1/audit-record-mac\x00"
	checkpointDomain = "attested/v1/audit-checkpoint\x00"
	encodingVersion  = 1
)

// Entry is what the chain covers of one audit record: every field of the
// record except its chain values (Link). A field added to the audit record
// must be added here and to Encode, or it is not covered (the store's tests
// check that every field of its record changes the hash).
type Entry struct {
	Seq  uint64
	Time time.Time // covered to the microsecond (see Time)
	Kind string
	Node string
	Key  string
	// Allowed is the decision the record states.
	Allowed        bool
	Reason         string
	Actor          string
	KeyVersion     uint32
	LayerDigest    string
	Policy         string
	PolicyRevision uint32
}

// Link is a record's place in the chain: the hash of the record before it
// (all zero for the first), its own hash, and the MAC of that hash.
type Link struct {
	Prev []byte `json:"prev,omitempty"`
	Hash []byte `json:"hash,omitempty"`
	MAC  []byte `json:"mac,omitempty"`
}

// Chained reports whether the record carries chain values at all.
func (l Link) Chained() bool { return l.Prev != nil || l.Hash != nil || l.MAC != nil }

// Time is t as the chain covers it: to the microsecond, in UTC. A store
// keeps a record's time as Time returns it, so what it stores is what the
// chain covers even where its clock type is coarser than Go's (PostgreSQL
// keeps microseconds).
func Time(t time.Time) time.Time { return time.UnixMicro(t.UnixMicro()).UTC() }

// Encode is an entry's canonical encoding: a version byte, the fixed-size
// fields in a fixed order, then each string length-prefixed (uint32, big
// endian), so no field can run into the next.
func Encode(e Entry) []byte {
	strs := []string{e.Kind, e.Node, e.Key, e.Reason, e.Actor, e.LayerDigest, e.Policy}
	n := 1 + 8 + 8 + 1 + 4 + 4
	for _, s := range strs {
		n += 4 + len(s)
	}
	b := make([]byte, 0, n)
	b = append(b, encodingVersion)
	b = binary.BigEndian.AppendUint64(b, e.Seq)
	b = binary.BigEndian.AppendUint64(b, uint64(e.Time.UnixMicro()))
	if e.Allowed {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = binary.BigEndian.AppendUint32(b, e.KeyVersion)
	b = binary.BigEndian.AppendUint32(b, e.PolicyRevision)
	for _, s := range strs {
		b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
		b = append(b, s...)
	}
	return b
}

// Hash is the hash of entry e following the record whose hash is prev:
// SHA-256 over a domain tag, prev and Encode(e). It needs no key, so anyone
// holding an export of the trail can recompute the chain up to a head hash
// recorded elsewhere.
func Hash(prev []byte, e Entry) []byte {
	h := sha256.New()
	h.Write([]byte(recordDomain))
	h.Write(prev)
	h.Write(Encode(e))
	return h.Sum(nil)
}

// zeroHash is the previous hash of the first record.
var zeroHash = make([]byte, HashSize)

// Key is the broker's audit MAC key.
type Key struct{ k []byte }

// NewKey wraps a KeySize-byte secret (derived from the broker's master key
// with KeyLabel).
func NewKey(secret []byte) (*Key, error) {
	if len(secret) != KeySize {
		return nil, fmt.Errorf("auditchain: key must be %d bytes, have %d", KeySize, len(secret))
	}
	return &Key{k: append([]byte(nil), secret...)}, nil
}

func (k *Key) mac(domain string, data []byte) []byte {
	m := hmac.New(sha256.New, k.k)
	m.Write([]byte(domain))
	m.Write(data)
	return m.Sum(nil)
}

// Checkpoint is the chain's head, MACed, kept by the store next to the
// records and rewritten in the transaction that appends them. It is what
// makes deleting the newest records detectable.
type Checkpoint struct {
	// First is the sequence number of the first chained record.
	First uint64 `json:"first"`
	// Before counts the records the store held when the chain started
	// (written by a broker that did not chain its audit): not covered.
	Before uint64 `json:"before"`
	// Started is when the chain started.
	Started time.Time `json:"started"`
	// Count is the number of chained records, Last the newest one's
	// sequence number (0 while there is none) and Head its hash (all zero
	// while there is none).
	Count uint64 `json:"count"`
	Last  uint64 `json:"last"`
	Head  []byte `json:"head"`
	MAC   []byte `json:"mac"`
}

func (c Checkpoint) encode() []byte {
	b := make([]byte, 0, 8*5+len(c.Head))
	b = binary.BigEndian.AppendUint64(b, c.First)
	b = binary.BigEndian.AppendUint64(b, c.Before)
	b = binary.BigEndian.AppendUint64(b, uint64(c.Started.UnixMicro()))
	b = binary.BigEndian.AppendUint64(b, c.Count)
	b = binary.BigEndian.AppendUint64(b, c.Last)
	return append(b, c.Head...)
}

func (k *Key) seal(c Checkpoint) Checkpoint {
	c.Started = Time(c.Started)
	c.MAC = k.mac(checkpointDomain, c.encode())
	return c
}

// Start is the checkpoint of a chain whose first record will have
// sequence number first, on a store that already holds before records the
// chain does not cover.
func (k *Key) Start(first, before uint64, now time.Time) Checkpoint {
	return k.seal(Checkpoint{First: first, Before: before, Started: now, Head: zeroHash})
}

// Chain appends to a chain. It is used inside one store transaction and is
// not safe for concurrent use.
type Chain struct {
	k  *Key
	cp Checkpoint
}

// Resume continues the chain whose checkpoint the store holds. It does not
// verify the checkpoint: a forged one only makes the records appended to
// it fail verification.
func (k *Key) Resume(cp Checkpoint) *Chain { return &Chain{k: k, cp: cp} }

// Append chains e (whose Time must already be as Time returns it, and Seq
// the store's next one) to the records before it and returns its Link.
func (c *Chain) Append(e Entry) (Link, error) {
	if e.Seq <= c.cp.Last || e.Seq < c.cp.First {
		return Link{}, fmt.Errorf("auditchain: record seq %d does not follow seq %d", e.Seq, c.cp.Last)
	}
	if !e.Time.Equal(Time(e.Time)) {
		return Link{}, errors.New("auditchain: record time is finer than a microsecond; store auditchain.Time(t)")
	}
	prev := c.cp.Head
	if len(prev) != HashSize {
		prev = zeroHash
	}
	h := Hash(prev, e)
	l := Link{Prev: prev, Hash: h, MAC: c.k.mac(recordMACDomain, h)}
	c.cp.Count++
	c.cp.Last = e.Seq
	c.cp.Head = h
	return l, nil
}

// Checkpoint is the chain's checkpoint after the records appended so far.
func (c *Chain) Checkpoint() Checkpoint { return c.k.seal(c.cp) }

// Result is what verifying a trail found.
type Result struct {
	OK bool
	// Records counts every record read; Chained those the chain covers.
	Records, Chained uint64
	// FirstBad is the first record that does not verify: for records
	// missing at the end, the sequence number after the last one read; 0
	// with OK, or when what fails is the checkpoint itself.
	FirstBad uint64
	// Problem says what is wrong, for an operator; empty with OK.
	Problem string
	// Head is the newest chained record that verified: its sequence
	// number, time and hash (hex), to be recorded outside the broker.
	HeadSeq  uint64
	HeadTime time.Time
	HeadHash string
	// Before is the checkpoint's count of records that predate the chain
	// (not covered), and Started when the chain started.
	Before  uint64
	Started time.Time
}

// Verifier checks a trail record by record, oldest first, in the order
// the store keeps it; Result then checks it against the checkpoint read in
// the same snapshot. It keeps nothing per record, so a trail of any length
// is verified in constant memory.
type Verifier struct {
	k      *Key
	res    Result
	head   []byte
	last   uint64 // seq of the last record read
	first  uint64 // seq of the first record read
	start  uint64 // seq of the first chained record
	before uint64 // unchained records before it
	bad    bool
}

// NewVerifier starts verifying a trail.
func (k *Key) NewVerifier() *Verifier { return &Verifier{k: k, head: zeroHash} }

func (v *Verifier) fail(seq uint64, format string, args ...any) {
	if v.bad {
		return
	}
	v.bad = true
	v.res.FirstBad = seq
	v.res.Problem = fmt.Sprintf(format, args...)
}

// next counts a record and checks it comes after the one before.
func (v *Verifier) next(seq uint64) bool {
	v.res.Records++
	prev := v.last
	v.last = seq
	if v.res.Records == 1 {
		v.first = seq
	} else if seq <= prev {
		v.fail(seq, "record seq %d is out of order: it comes after seq %d (records were moved)", seq, prev)
	}
	return !v.bad
}

// Add checks the next record.
func (v *Verifier) Add(e Entry, l Link) {
	if !v.next(e.Seq) {
		return
	}
	if !l.Chained() {
		if v.res.Chained > 0 {
			v.fail(e.Seq, "record seq %d carries no chain values: it was inserted, or its hash and MAC were stripped", e.Seq)
		}
		// Before the chain started: not covered, only counted (the
		// checkpoint says how many there were).
		v.before++
		return
	}
	if !hmac.Equal(l.MAC, v.k.mac(recordMACDomain, l.Hash)) {
		v.fail(e.Seq, "record seq %d: its MAC does not verify under this broker's key: the record was forged or its hash edited", e.Seq)
		return
	}
	if !hmac.Equal(l.Hash, Hash(l.Prev, e)) {
		v.fail(e.Seq, "record seq %d: its content does not match its hash: the record was edited", e.Seq)
		return
	}
	if !hmac.Equal(l.Prev, v.head) {
		if v.res.Chained == 0 {
			v.fail(e.Seq, "record seq %d does not follow the start of the chain: the records before it were deleted", e.Seq)
		} else {
			v.fail(e.Seq, "record seq %d does not follow record seq %d: a record between them was deleted, inserted or moved", e.Seq, v.res.HeadSeq)
		}
		return
	}
	if v.res.Chained == 0 {
		v.start = e.Seq
	}
	v.head = l.Hash
	v.res.Chained++
	v.res.HeadSeq, v.res.HeadTime, v.res.HeadHash = e.Seq, e.Time, hex.EncodeToString(l.Hash)
}

// Misplaced counts a record the store keeps at sequence number at whose
// content says it is seq: it was moved or copied there.
func (v *Verifier) Misplaced(at, seq uint64) {
	if v.next(at) {
		v.fail(at, "the record kept at seq %d says it is seq %d: records were moved or copied", at, seq)
	}
}

// Unreadable counts a record the store could not decode: it does not
// verify.
func (v *Verifier) Unreadable(seq uint64, err error) {
	if v.next(seq) {
		v.fail(seq, "record seq %d does not decode (%v): it was edited", seq, err)
	}
}

// Result ends verification against the store's checkpoint (nil if it has
// none): the records read must be the ones it counts, ending at its head.
func (v *Verifier) Result(cp *Checkpoint) Result {
	switch {
	case cp == nil:
		if v.res.Records > 0 {
			v.fail(v.first, "the store holds audit records but no audit checkpoint: the checkpoint was deleted")
		}
	case !hmac.Equal(cp.MAC, v.k.mac(checkpointDomain, cp.encode())):
		v.fail(0, "the audit checkpoint (count and head of the chain) does not verify under this broker's key: it was edited, or copied from another broker")
	}
	if !v.bad && cp != nil {
		v.res.Before, v.res.Started = cp.Before, cp.Started
		switch {
		case v.res.Chained > 0 && v.start < cp.First:
			v.fail(v.start, "record seq %d is chained, but the checkpoint says the chain starts at seq %d: the checkpoint was deleted, and a new one started over the records", v.start, cp.First)
		case v.before != cp.Before:
			v.fail(0, "the checkpoint counts %d records from before the chain started (at seq %d), the store holds %d unchained: records before the chain were deleted or inserted, or chain values stripped", cp.Before, cp.First, v.before)
		case v.res.Chained > 0 && v.start != cp.First:
			v.fail(v.start, "the chain starts at seq %d, the checkpoint says at seq %d: records were deleted", v.start, cp.First)
		case v.res.Chained < cp.Count || (v.res.Chained == cp.Count && !hmac.Equal(v.head, cp.Head)):
			v.fail(v.last+1, "the trail ends at seq %d after %d chained records, but the checkpoint says %d ending at seq %d: the newest records were deleted", v.last, v.res.Chained, cp.Count, cp.Last)
		case v.res.Chained > cp.Count:
			v.fail(cp.Last+1, "the trail goes on past seq %d, where the checkpoint ends (%d records): the checkpoint was replaced by an older copy, so records may also be missing at the end", cp.Last, cp.Count)
		}
	}
	v.res.OK = !v.bad
	return v.res
}
