package ear_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/attested-dev/attested/broker/ear"
)

// Parse reads what relying parties receive from nodes: it must refuse
// garbage with an error, never panic, and what it accepts must encode and
// read back to the same claims-set.
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "draft", "*.json"))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte(`{"eat_profile":"` + ear.Profile + `","iat":1,"ear_verifier_id":{"developer":"d","build":"b"},"submods":{"a":{"ear_status":"none","ear_trustworthiness_vector":{"hardware":-128}}},"eat_nonce":["aaaaaaaaaaaa","bbbbbbbbbbbb"]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ear.Parse(data)
		if err != nil {
			return
		}
		once, err := r.Marshal()
		if err != nil {
			return // an extension the encoder will not write (a legacy claim name)
		}
		r2, err := ear.Parse(once)
		if err != nil {
			t.Fatalf("re-parse of %s: %v", once, err)
		}
		twice, err := r2.Marshal()
		if err != nil || string(once) != string(twice) {
			t.Fatalf("not stable: %s then %s (%v)", once, twice, err)
		}
	})
}

// Verify is the relying party's entry point: any input, an error or a
// verified result, never a panic.
func FuzzVerify(f *testing.F) {
	key := []byte(`{"keys":[{"kty":"EC","crv":"P-256","x":"usWxHK2PmfnHKwXPS54m0kTcGJ90UiglWiGahtagnv8","y":"IBOL-C3BttVivg-lSreASjpkttcsz-1rb7btKLv8EX4"}]}`)
	set, err := ear.ParseJWKS(key)
	if err != nil {
		f.Fatal(err)
	}
	f.Add("eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.e30.9Tvx3hVBNfkmVXTndrVfv9ZeNJgX59w0JpR2vyjUn8lGxL8VT7OggUeYSYFnxrouSi2TusNh61z8rLdOqxGA-A")
	f.Add("a.b.c")
	f.Fuzz(func(t *testing.T, tok string) {
		_, _ = ear.Verify(tok, set, time.Now())
	})
}
