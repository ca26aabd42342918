package webhooksig_test

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/attested-dev/attested/broker/webhooksig"
)

var (
	secret = []byte("whsec_test-secret-for-signatures")
	body   = []byte(`{"id":"evt_1","kind":"status","node":"n1","status":"revoked"}`)
	now    = time.Unix(1_800_000_000, 0)
)

func TestSignedBodyVerifies(t *testing.T) {
	h := webhooksig.Sign(secret, now, body)
	assert.Regexp(t, `^t=1800000000,v1=[0-9a-f]{64}$`, h)
	require.NoError(t, webhooksig.Verify(secret, h, body, now.Add(time.Minute), webhooksig.DefaultTolerance))
}

// TestKnownVector pins the format: HMAC-SHA256(secret, t + "." + body),
// computed independently (openssl dgst -sha256 -hmac).
func TestKnownVector(t *testing.T) {
	h := webhooksig.Sign([]byte("whsec_x"), time.Unix(1700000000, 0), []byte(`{"a":1}`))
	assert.Equal(t, "t=1700000000,v1=b3438763ab46d9634b9844c8722818eaf523f803db1327484c6067462a5fd6d1", h)
}

func TestTamperingIsDetected(t *testing.T) {
	h := webhooksig.Sign(secret, now, body)
	tol := webhooksig.DefaultTolerance
	for name, tc := range map[string]struct {
		secret []byte
		header string
		body   []byte
		now    time.Time
		want   string
	}{
		"altered body":        {secret, h, []byte(strings.Replace(string(body), "revoked", "trusted", 1)), now, "does not match"},
		"wrong secret":        {[]byte("whsec_other"), h, body, now, "does not match"},
		"old timestamp":       {secret, h, body, now.Add(tol + time.Second), "more than the 5m0s allowed"},
		"future timestamp":    {secret, h, body, now.Add(-tol - time.Second), "more than the 5m0s allowed"},
		"timestamp moved":     {secret, strings.Replace(h, "t=1800000000", "t="+strconv.FormatInt(now.Unix()+60, 10), 1), body, now, "does not match"},
		"no signature":        {secret, "t=1800000000", body, now, "no v1= signature"},
		"no timestamp":        {secret, h[strings.Index(h, ",")+1:], body, now, "no t= timestamp"},
		"empty header":        {secret, "", body, now, "no t= timestamp"},
		"timestamp not a int": {secret, "t=soon,v1=00", body, now, "not a number"},
	} {
		t.Run(name, func(t *testing.T) {
			err := webhooksig.Verify(tc.secret, tc.header, tc.body, tc.now, tol)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

// TestSeveralSignaturesAccepted: a header may carry more than one v1 (a
// future secret rotation); one match is enough.
func TestSeveralSignaturesAccepted(t *testing.T) {
	h := webhooksig.Sign(secret, now, body)
	v1 := h[strings.Index(h, "v1="):]
	other := webhooksig.Sign([]byte("whsec_old"), now, body)
	require.NoError(t, webhooksig.Verify(secret, other+","+v1, body, now, time.Minute))
}
