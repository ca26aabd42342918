// Package webhooksig signs webhook deliveries and verifies them, as a
// receiver must. The broker sends every delivery with the header
//
//	Attested-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t + "." + body)>
//
// where secret is the webhook's secret exactly as 'attested webhook add'
// printed it (the whole "whsec_..." string, as bytes) and body is the raw
// request body. The timestamp is signed with the body, so a receiver that
// refuses timestamps older than a few minutes also refuses replays of a
// captured delivery. Each attempt is signed afresh; the event's own time is
// in the body.
//
// Verify is self-contained (standard library only) so that receivers
// written in Go can copy it.
package webhooksig

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Header is the HTTP header that carries the signature.
const Header = "Attested-Signature"

// DefaultTolerance is how far a receiver should accept a signature's
// timestamp from its own clock.
const DefaultTolerance = 5 * time.Minute

// Sign returns the header value for body, signed at t.
func Sign(secret []byte, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac(secret, ts, body))
}

func mac(secret []byte, ts string, body []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(ts))
	m.Write([]byte("."))
	m.Write(body)
	return m.Sum(nil)
}

// Verify checks header (the Attested-Signature value) against the raw
// request body: an HMAC-SHA256 by secret over the timestamp and the body,
// and a timestamp within tolerance of now. Read the body with a size
// limit, verify it, and only then parse it.
func Verify(secret []byte, header string, body []byte, now time.Time, tolerance time.Duration) error {
	var ts string
	var sigs [][]byte
	for _, part := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			if sig, err := hex.DecodeString(v); err == nil {
				sigs = append(sigs, sig)
			}
		}
	}
	if ts == "" || len(sigs) == 0 {
		return errors.New("webhook signature: header has no t= timestamp or no v1= signature")
	}
	unix, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("webhook signature: timestamp %q is not a number", ts)
	}
	if age := now.Sub(time.Unix(unix, 0)); age > tolerance || age < -tolerance {
		return fmt.Errorf("webhook signature: timestamp is %s away from now, more than the %s allowed (replayed, or a clock is wrong)", age.Round(time.Second), tolerance)
	}
	want := mac(secret, ts, body)
	for _, sig := range sigs {
		if hmac.Equal(sig, want) {
			return nil
		}
	}
	return errors.New("webhook signature: does not match the body and timestamp (wrong secret, or the request was altered)")
}
