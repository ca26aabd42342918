// Package fsperm checks, as ssh does, that a file or directory holding
// secrets or trusted data belongs to the user that runs attested (or to
// root) and that nobody else may read or change it. Each refusal names the
// path and the command that fixes it.
package fsperm

import (
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"
)

// Masks of permission bits that must be clear.
const (
	// Private: neither group nor others may do anything (secrets, 0600/0700).
	Private fs.FileMode = 0o077
	// NotWritable: group and others may read but not write (trusted data).
	NotWritable fs.FileMode = 0o022
)

// Problem is an ownership or mode the caller must refuse.
type Problem struct {
	Path string
	// What is wrong, e.g. "has mode 0644: group and others may read it".
	What string
	// Fix is a command that repairs it.
	Fix string
}

func (p *Problem) Error() string {
	return fmt.Sprintf("%q %s; fix with: %s", p.Path, p.What, p.Fix)
}

// Check returns a *Problem when fi (the file at path) is owned by neither
// the running user nor root, or has any permission bit of forbidden set.
func Check(path string, fi fs.FileInfo, forbidden fs.FileMode) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return &Problem{Path: path, What: "has no owner this system reports", Fix: "keep it on a local file system"}
	}
	uid := os.Geteuid()
	if int(st.Uid) != uid && st.Uid != 0 {
		return &Problem{Path: path,
			What: fmt.Sprintf("is owned by uid %d, not by uid %d that runs attested", st.Uid, uid),
			Fix:  fmt.Sprintf("chown %d %q (or run attested as its owner)", uid, path)}
	}
	perm := fi.Mode().Perm()
	if bad := perm & forbidden; bad != 0 {
		return &Problem{Path: path,
			What: fmt.Sprintf("has mode %04o: %s", perm, describe(bad, fi.IsDir())),
			Fix:  fmt.Sprintf("chmod %o %q", perm&^forbidden, path)}
	}
	return nil
}

// Stat checks path, following symbolic links.
func Stat(path string, forbidden fs.FileMode) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	return Check(path, fi, forbidden)
}

// describe says who may do what, from the offending bits.
func describe(bad fs.FileMode, dir bool) string {
	verbs := func(bits fs.FileMode) string {
		var can []string
		if bits&4 != 0 {
			can = append(can, "read")
		}
		if bits&2 != 0 {
			can = append(can, "write")
		}
		if bits&1 != 0 {
			if dir {
				can = append(can, "enter")
			} else {
				can = append(can, "execute")
			}
		}
		return strings.Join(can, " and ")
	}
	g, o := verbs(bad>>3&7), verbs(bad&7)
	switch {
	case g == o:
		return "group and others may " + g + " it"
	case g == "":
		return "others may " + o + " it"
	case o == "":
		return "its group may " + g + " it"
	}
	return "its group may " + g + " it, others may " + o + " it"
}
