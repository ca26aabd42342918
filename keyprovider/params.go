package keyprovider

import (
	"errors"
	"fmt"
	"strings"

	"github.com/attested-dev/attested/keyprovider/annotation"
)

// enabled is what ocicrypt sends for a bare "provider:NAME" with no
// parameters.
const enabled = "Enabled"

// keyNames parses the build-time parameters: each value (one per
// --encryption-key provider:NAME:PARAMS) is "key=NAME". Settings are
// separated by ';' because skopeo, buildah and podman < 5 split flags on
// ','. Unknown settings are errors: a typo must not encrypt for the wrong
// key or none.
func keyNames(values [][]byte) ([]string, error) {
	var names []string
	seen := map[string]bool{}
	for _, v := range values {
		s := string(v)
		if s == enabled || s == "" {
			return nil, errInput(errors.New("no key named: use --encryption-key provider:attested:key=NAME"))
		}
		found := false
		for _, part := range strings.Split(s, ";") {
			k, val, ok := strings.Cut(strings.TrimSpace(part), "=")
			switch {
			case !ok:
				return nil, errInput(fmt.Errorf("parameter %q is not key=NAME", part))
			case k != "key":
				return nil, errInput(fmt.Errorf("unknown parameter %q (known: key)", k))
			case !annotation.ValidKeyName(val):
				return nil, errInput(fmt.Errorf("invalid key name %q: 1-63 letters, digits, '.', '_' or '-'", val))
			case found:
				return nil, errInput(fmt.Errorf("parameter %q names two keys; repeat --encryption-key instead", s))
			}
			found = true
			if !seen[val] {
				seen[val] = true
				names = append(names, val)
			}
		}
	}
	if len(names) == 0 {
		return nil, errInput(errors.New("no key named: use --encryption-key provider:attested:key=NAME"))
	}
	return names, nil
}
