package broker

import "testing"

// An EK certificate's issuer is the certificate's text: control characters
// in it are escaped before it reaches lists and messages.
func TestPrintableEscapesControlCharacters(t *testing.T) {
	for in, want := range map[string]string{
		"CN=Infineon OPTIGA(TM) RSA Manufacturing CA 003": "CN=Infineon OPTIGA(TM) RSA Manufacturing CA 003",
		"CN=evil\nnode1 trusted":                          `CN=evil\nnode1 trusted`,
		"CN=\x1b[2Jclear":                                 `CN=\x1b[2Jclear`,
		"CN=\u202eright-to-left":                          `CN=\u202eright-to-left`,
	} {
		if got := printable(in); got != want {
			t.Errorf("printable(%q) = %q, want %q", in, got, want)
		}
	}
}
