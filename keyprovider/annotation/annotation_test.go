package annotation

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRoundTrip(t *testing.T) {
	a := New("broker-1", Recipient{Key: "app-eu", KeyVersion: 2, Suite: "S", Ciphertext: []byte{1, 2, 3}})
	data, err := a.Marshal()
	require.NoError(t, err)
	got, err := Parse(data)
	require.NoError(t, err)
	assert.Equal(t, a, got)
}

func TestParseRefuses(t *testing.T) {
	for _, tc := range []struct {
		in      string
		notOurs bool
		want    string
	}{
		{`{"kid":"demo-kid","wrapped":"eyJ"}`, true, ""},
		{`not json`, true, ""},
		{``, true, ""},
		{`{"attested":"layer-key","v":2,"broker":"b","recipients":[]}`, false, "format version 2 is not supported"},
		{`{"attested":"layer-key","v":1,"broker":"","recipients":[]}`, false, "no broker identity"},
		{`{"attested":"layer-key","v":1,"broker":"b","recipients":[]}`, false, "no recipients"},
		{`{"attested":"layer-key","v":1,"broker":"b","recipients":[{"key":"a,b","kv":1,"suite":"s","ct":"AQ=="}]}`, false, "invalid key name"},
		{`{"attested":"layer-key","v":1,"broker":"b","recipients":[{"key":"a","kv":0,"suite":"s","ct":"AQ=="}]}`, false, "key version missing"},
		{`{"attested":"layer-key","v":1,"broker":"b","recipients":[{"key":"a","kv":1,"suite":"s","ct":""}]}`, false, "ciphertext missing"},
		{`{"attested":"layer-key","v":1,"broker":"b","recipients":[{"key":"a","kv":1,"suite":"s","ct":"AQ=="}]}{}`, false, "trailing data"},
	} {
		_, err := Parse([]byte(tc.in))
		require.Error(t, err, tc.in)
		if tc.notOurs {
			assert.ErrorIs(t, err, ErrNotOurs, tc.in)
		} else {
			assert.Contains(t, err.Error(), tc.want, tc.in)
		}
	}
	_, err := Parse(make([]byte, MaxSize+1))
	assert.ErrorContains(t, err, "limit")
}

func TestInfoBindsEveryField(t *testing.T) {
	r := Recipient{Key: "k", KeyVersion: 1, Suite: "s"}
	base := string(Info("b", r))
	for _, other := range []string{
		string(Info("b2", r)),
		string(Info("b", Recipient{Key: "k2", KeyVersion: 1, Suite: "s"})),
		string(Info("b", Recipient{Key: "k", KeyVersion: 2, Suite: "s"})),
		string(Info("b", Recipient{Key: "k", KeyVersion: 1, Suite: "s2"})),
	} {
		assert.NotEqual(t, base, other)
	}
}

func FuzzParse(f *testing.F) {
	good, _ := New("b", Recipient{Key: "k", KeyVersion: 1, Suite: "s", Ciphertext: []byte("x")}).Marshal()
	f.Add(good)
	f.Add([]byte(`{"kid":"demo-kid","wrapped":"eyJ"}`))
	f.Add([]byte(`{"attested":"layer-key","v":1}`))
	f.Add([]byte(`{"attested":"layer-key","v":1,"broker":"b","recipients":[{"key":"k","kv":4294967295,"suite":"s","ct":"AA=="}]} `))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := Parse(data)
		if err != nil {
			return
		}
		// Whatever parses re-encodes and parses to the same document.
		again, err := a.Marshal()
		require.NoError(t, err)
		b, err := Parse(again)
		require.NoError(t, err)
		require.Equal(t, a, b)
	})
}
