// Package files holds the file primitives the journal's two file stores
// (payload segments and the intent log) share: fdatasync, a directory's
// fsync, buffers aligned for O_DIRECT, and numbered file names. They live
// apart so that neither store has to import the other.
package files

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/internal/durable"
)

// Datasync is fdatasync(2) on f, retried on EINTR: the data, and the
// metadata needed to read it back (a size change, an unwritten extent
// converted), but not the timestamps every write changes, whose
// filesystem journal commit doubled a barrier's latency.
func Datasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err != unix.EINTR {
			return err
		}
	}
}

// SyncDir fsyncs directory dir, which makes the names created in it since
// survive a power loss.
func SyncDir(dir string) error { return durable.SyncDir(dir) }

// MkdirDurable makes dir and its missing parents with perm, their names
// durable (see durable.MkdirAll).
func MkdirDurable(dir string, perm os.FileMode) error { return durable.MkdirAll(dir, perm) }

// DirectAlign is the alignment, in memory and in the file, of the buffers
// and offsets the journal writes with O_DIRECT: the page size, which every
// Linux filesystem that takes O_DIRECT accepts.
const DirectAlign = 4096

// AlignedBuf returns n bytes starting at a DirectAlign boundary (Go's
// allocator promises no such alignment).
func AlignedBuf(n int) []byte {
	b := make([]byte, n+DirectAlign)
	skip := DirectAlign - int(uintptr(unsafe.Pointer(&b[0]))%DirectAlign)
	if skip == DirectAlign {
		skip = 0
	}
	return b[skip : skip+n : skip+n]
}

// IsAligned reports whether p starts at a DirectAlign boundary.
func IsAligned(p []byte) bool { return uintptr(unsafe.Pointer(&p[0]))%DirectAlign == 0 }

// ListNumbered returns, sorted, the ids of the files in dir named
// prefix + 16 hex digits + ".dat" (segments, intent logs).
func ListNumbered(dir, prefix string) ([]uint64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var ids []uint64
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) || !strings.HasSuffix(name, ".dat") {
			continue
		}
		id, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(name, prefix), ".dat"), 16, 64)
		if err != nil {
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}
