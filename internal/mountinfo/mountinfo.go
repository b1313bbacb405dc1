// Package mountinfo reads /proc/self/mountinfo, the mounts this process
// sees, for the commands that find a vhdsync mount and for the test tools
// that find a FUSE mount's kernel connection. Reading it never touches a
// mount, so it cannot hang on a FUSE server that no longer answers, as a
// stat of the mount point would.
package mountinfo

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Mount is one line of mountinfo.
type Mount struct {
	// Dev is the mount's device, "major:minor".
	Dev        string
	Mountpoint string
	FSType     string
	Source     string
	// SuperOptions are the file system's own options (the last field).
	SuperOptions string
}

// Read returns the mounts of /proc/self/mountinfo in its order: a later
// mount at a mount point is the one on top.
func Read() ([]Mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	var out []Mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root mountpoint opts [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if !ok || len(pf) < 5 || len(qf) < 2 {
			continue
		}
		m := Mount{Dev: pf[2], Mountpoint: unescape(pf[4]), FSType: qf[0], Source: unescape(qf[1])}
		if len(qf) >= 3 {
			m.SuperOptions = qf[2]
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	return out, nil
}

// Minor is the minor number of the mount's device.
func (m Mount) Minor() (uint32, error) {
	_, minor, ok := strings.Cut(m.Dev, ":")
	n, err := strconv.ParseUint(minor, 10, 32)
	if !ok || err != nil {
		return 0, fmt.Errorf("mount %s: bad device %q in mountinfo", m.Mountpoint, m.Dev)
	}
	return uint32(n), nil
}

// unescape undoes mountinfo's octal escapes (\040 for a space, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
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
