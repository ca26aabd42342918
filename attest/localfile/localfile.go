// Package localfile opens the files a node process must be able to trust:
// its session directory and files, the agent socket, caches. A path that
// another local user could have planted or can change (owned by someone
// else, writable by group or others, a symlink) is refused, not used.
package localfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

// EnsureDir creates dir (0700) if it does not exist, and checks it.
func EnsureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	return CheckDir(dir)
}

// CheckDir refuses a directory that is a symlink, not owned by this user,
// or writable by group or others: whoever can write it can plant files or
// swap them for links.
func CheckDir(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("%s is a symbolic link; refusing to use it (use the real directory)", dir)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	return checkOwner(dir, fi, 0o022, "chmod go-w")
}

// CheckSocket refuses a unix socket that is not one, or that belongs to
// another user: a process that sends secrets to it must know who listens.
func CheckSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s is not a unix socket", path)
	}
	return checkOwner(path, fi, 0o022, "chmod go-w")
}

func checkOwner(path string, fi fs.FileInfo, forbidden fs.FileMode, fix string) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: cannot read its owner", path)
	}
	if uid := os.Geteuid(); int(st.Uid) != uid {
		return fmt.Errorf("%s is owned by uid %d, not by this user (uid %d); refusing to trust it", path, st.Uid, uid)
	}
	if fi.Mode().Perm()&forbidden != 0 {
		return fmt.Errorf("%s has mode %04o: others can change it; refusing to trust it (%s %s)", path, fi.Mode().Perm(), fix, path)
	}
	return nil
}

// Open opens a file without following a symlink at its last component and
// refuses one owned by another user or accessible to group or others.
// flag may include os.O_CREATE (mode 0600).
func Open(path string, flag int) (*os.File, error) {
	f, err := os.OpenFile(path, flag|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%s is a symbolic link; refusing to follow it", path)
		}
		return nil, err
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", path)
	}
	if err == nil {
		err = checkOwner(path, fi, 0o077, "chmod 600")
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// ReadFile reads a file opened with Open, at most limit bytes.
func ReadFile(path string, limit int64) ([]byte, error) {
	f, err := Open(path, os.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return data, nil
}
