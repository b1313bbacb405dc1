// Package fuseconn aborts the kernel's connection of a FUSE mount, through
// fusectl's abort file. It is the way out for a request nobody will answer
// any more: a FUSE server killed while a file on its own mount, or on a
// mount whose server descriptor it inherited, was being closed leaves that
// thread waiting in the kernel (state D, request_wait_answer) for ever,
// since the server's end of the connection is in the very file table being
// closed. Aborting the connection fails the request, and the process ends.
//
// fusectl is often not mounted (as on the machines the tests run on): Abort
// then mounts it on a private temporary directory for the one write and
// unmounts it again, so that nothing outside stays changed.
package fuseconn

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ctlDir is where fusectl is usually mounted.
const ctlDir = "/sys/fs/fuse/connections"

// ID returns the connection id of the FUSE mount at path: the number of its
// directory under fusectl, the mount's device number (major 0). It reads
// /proc/self/mountinfo rather than stat the mount point, which would wait
// for ever on a server that cannot answer.
func ID(path string) (uint32, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return 0, fmt.Errorf("fuse connection of %s: %w", path, err)
	}
	var id uint32
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		// id parent major:minor root mountpoint options... - type source ...
		f := strings.Fields(line)
		if len(f) < 5 || unescape(f[4]) != path {
			continue
		}
		sep := slices.Index(f, "-")
		if sep < 0 || sep+1 >= len(f) || !strings.HasPrefix(f[sep+1], "fuse") {
			continue
		}
		_, minor, ok := strings.Cut(f[2], ":")
		n, err := strconv.ParseUint(minor, 10, 32)
		if !ok || err != nil {
			return 0, fmt.Errorf("fuse connection of %s: bad device %q in mountinfo", path, f[2])
		}
		id, found = uint32(n), true // the last mount at path is the one on top
	}
	if !found {
		return 0, fmt.Errorf("fuse connection of %s: %w", path, os.ErrNotExist)
	}
	return id, nil
}

// unescape undoes mountinfo's octal escapes (\040 for a space, ...).
func unescape(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Abort aborts connection id: every request waiting on it fails, and later
// ones fail at once. A connection that is already gone is no error. Root.
func Abort(id uint32) error {
	if isFusectl(ctlDir) {
		return abortIn(ctlDir, id)
	}
	dir, err := os.MkdirTemp("", "fusectl-")
	if err != nil {
		return fmt.Errorf("abort fuse connection %d: %w", id, err)
	}
	defer os.Remove(dir)
	if err := unix.Mount("fusectl", dir, "fusectl", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("abort fuse connection %d: mount fusectl on %s: %w", id, dir, err)
	}
	err = abortIn(dir, id)
	if uerr := unix.Unmount(dir, 0); uerr != nil {
		err = errors.Join(err, fmt.Errorf("unmount fusectl from %s: %w", dir, uerr))
	}
	return err
}

// abortIn writes the abort file of connection id in fusectl mounted at dir.
func abortIn(dir string, id uint32) error {
	err := os.WriteFile(filepath.Join(dir, strconv.FormatUint(uint64(id), 10), "abort"), []byte("1"), 0)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("abort fuse connection %d: %w", id, err)
	}
	return nil
}

// isFusectl reports whether fusectl is mounted at dir.
func isFusectl(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == fusectlMagic
}

// fusectlMagic is fusectl's file system type (linux/magic.h FUSE_CTL_SUPER_MAGIC).
const fusectlMagic = 0x65735543
