package powercut

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdsync/vhdsync/internal/testenv"
)

// Test is a power-cut mount for one test: the backing directory survives
// cuts; the mount is made again after each.
type Test struct {
	t       testing.TB
	backing string
	// Dir is the mount point: the test's files go under it.
	Dir string
	fs  *FS
}

// Start mounts an empty power-cut file system in a temporary directory and
// unmounts it when the test ends. It skips the test (fails it under CI)
// without root or /dev/fuse.
func Start(t testing.TB) *Test {
	t.Helper()
	testenv.RequireRoot(t, "FUSE mounts")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Missing(t, "/dev/fuse", "modprobe fuse (or run the tests where FUSE is available)")
	}
	dir := t.TempDir()
	p := &Test{t: t, backing: filepath.Join(dir, "backing"), Dir: filepath.Join(dir, "mnt")}
	if err := os.Mkdir(p.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	p.mount()
	t.Cleanup(func() {
		if p.fs != nil {
			if err := p.fs.Unmount(); err != nil {
				t.Errorf("unmount the power-cut file system: %v", err)
			}
		}
	})
	return p
}

func (p *Test) mount() {
	p.t.Helper()
	fs, err := Mount(p.backing, p.Dir, Options{})
	if err != nil {
		p.t.Fatal(err)
	}
	p.fs = fs
}

// FS is the current mount.
func (p *Test) FS() *FS { return p.fs }

// Path names a file in the mount.
func (p *Test) Path(name string) string { return filepath.Join(p.Dir, name) }

// Cut cuts the power, unmounts and mounts the backing directory again:
// the mount now shows what survived. Every file the test had open in the
// mount must be closed (or its process killed) first.
func (p *Test) Cut() CutStats {
	p.t.Helper()
	s := p.fs.Cut()
	p.Remount()
	return s
}

// Remount unmounts (cleanly, unless the power was cut) and mounts the
// backing directory again.
func (p *Test) Remount() {
	p.t.Helper()
	if err := p.fs.Unmount(); err != nil {
		p.t.Fatal(err)
	}
	p.fs = nil
	p.mount()
}
