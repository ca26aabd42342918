// Package buildinfo says which attested a binary is: its version and the
// VCS revision and Go release it was built from, when Go recorded them.
package buildinfo

import (
	"runtime/debug"

	apiv1 "github.com/attested-dev/attested/broker/api/v1"
)

// String is program's version line, e.g.
// "attested 0.1.0 (0123456789ab+dirty) go1.26.8".
func String(program string) string {
	v := program + " " + apiv1.Version
	if bi, ok := debug.ReadBuildInfo(); ok {
		var rev, dirty string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					dirty = "+dirty"
				}
			}
		}
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if rev != "" {
			v += " (" + rev + dirty + ")"
		}
		v += " " + bi.GoVersion
	}
	return v
}
