// Package binding defines what a node's quote and a broker's release are
// bound to. Node and broker must compute these identically, so both import
// this package rather than each keeping a copy.
package binding

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"sort"
)

// QualifyingData is the quote's extraData: a hash over the broker nonce, the
// session public key and the node name, each length-prefixed so no two
// inputs collide. A quote over it proves the TPM saw this nonce for this
// session key, so the evidence cannot be replayed or lent to another key.
func QualifyingData(nonce, sessionPublic []byte, node string) []byte {
	h := sha256.New()
	h.Write([]byte("attested/v1/quote\x00"))
	for _, part := range [][]byte{nonce, sessionPublic, []byte(node)} {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(part)))
		h.Write(n[:])
		h.Write(part)
	}
	return h.Sum(nil)
}

// ReleaseInfo is the HPKE info for a layer key released to a session.
func ReleaseInfo(node string, sessionPublic []byte, key string, version uint32) []byte {
	sum := sha256.Sum256(sessionPublic)
	return fmt.Appendf(nil, "attested/v1/release\x00%s\x00%x\x00%s\x00%d", node, sum, key, version)
}

// TagDigest is what a node's TPM holds in its tag NV index: a hash over the
// node name and its tags, sorted, so node and broker agree byte for byte.
func TagDigest(node string, tags map[string]string) []byte {
	keys := make([]string, 0, len(tags))
	for k := range tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	fmt.Fprintf(h, "attested/v1/tags\x00%s\x00", node)
	for _, k := range keys {
		fmt.Fprintf(h, "%s=%s\n", k, tags[k])
	}
	return h.Sum(nil)
}

// TagIndex is the NV index holding the tag digest, in the owner range.
const TagIndex = 0x01800A77
