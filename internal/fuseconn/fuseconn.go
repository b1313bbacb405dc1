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
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/internal/mountinfo"
)

// ctlDir is where fusectl is usually mounted.
const ctlDir = "/sys/fs/fuse/connections"

// ID returns the connection id of the FUSE mount at path: the number of its
// directory under fusectl, the mount's device number (major 0). It reads
// mountinfo rather than stat the mount point, which would wait for ever on
// a server that cannot answer.
func ID(path string) (uint32, error) {
	mounts, err := mountinfo.Read()
	if err != nil {
		return 0, fmt.Errorf("fuse connection of %s: %w", path, err)
	}
	for i := len(mounts) - 1; i >= 0; i-- { // the last mount at path is the one on top
		m := mounts[i]
		if m.Mountpoint == path && (m.FSType == "fuse" || m.FSType == "fuseblk" || strings.HasPrefix(m.FSType, "fuse.")) {
			return m.Minor()
		}
	}
	return 0, fmt.Errorf("fuse connection of %s: %w", path, os.ErrNotExist)
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
