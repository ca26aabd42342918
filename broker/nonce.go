package broker

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"time"
)

// Nonces are stateless: a challenge is a random value, its issue time and
// a MAC over both, the node and the broker, under a key derived from the
// master key (so replicas sharing the master key accept each other's). An
// unauthenticated caller can ask for as many as it likes and the broker
// stores nothing; only a nonce answered with evidence the node's AK signed
// is recorded, as spent, until it expires.
const (
	nonceVersion = 1
	nonceRandom  = 16
	nonceSize    = 1 + 8 + nonceRandom + sha256.Size
	// nonceSkew tolerates replicas whose clocks differ a little.
	nonceSkew = 5 * time.Second
	// spentMargin keeps a spent nonce past its expiry, so a clock stepped
	// back by less than this cannot make its evidence acceptable again.
	spentMargin = 10 * time.Minute
)

func (s *Server) issueNonce(node string, now time.Time) []byte {
	b := make([]byte, nonceSize-sha256.Size, nonceSize)
	b[0] = nonceVersion
	binary.BigEndian.PutUint64(b[1:9], uint64(now.UnixNano()))
	copy(b[9:], randomBytes(nonceRandom))
	return append(b, s.nonceMAC(node, b)...)
}

func (s *Server) nonceMAC(node string, body []byte) []byte {
	m := hmac.New(sha256.New, s.master.nonceKey)
	m.Write([]byte("attested/v1/nonce\x00"))
	m.Write([]byte(s.cfg.ID))
	m.Write([]byte{0})
	m.Write([]byte(node))
	m.Write([]byte{0})
	m.Write(body)
	return m.Sum(nil)
}

var (
	errNonceInvalid = errors.New("nonce was not issued by this broker for this node (forged, or for another node)")
	errNonceExpired = errors.New("nonce expired before the evidence arrived; ask for a new challenge")
	errNonceFuture  = errors.New("nonce was issued in the future (a clock stepped back?); ask for a new challenge")
)

// checkNonce verifies a nonce was issued to node and is fresh; it returns
// when it stops being acceptable.
func (s *Server) checkNonce(node string, nonce []byte, now time.Time) (time.Time, error) {
	if len(nonce) != nonceSize || nonce[0] != nonceVersion {
		return time.Time{}, errNonceInvalid
	}
	body, mac := nonce[:nonceSize-sha256.Size], nonce[nonceSize-sha256.Size:]
	if !hmac.Equal(mac, s.nonceMAC(node, body)) {
		return time.Time{}, errNonceInvalid
	}
	issued := time.Unix(0, int64(binary.BigEndian.Uint64(body[1:9])))
	expires := issued.Add(s.cfg.NonceTTL)
	switch {
	case issued.After(now.Add(nonceSkew)):
		return time.Time{}, errNonceFuture
	case now.After(expires):
		return time.Time{}, errNonceExpired
	}
	return expires, nil
}
