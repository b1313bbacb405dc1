package powercut

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pc wraps Test with the helpers below.
type pc struct {
	*Test
	t *testing.T
}

func mountPC(t *testing.T) *pc { return &pc{Test: Start(t), t: t} }

func (p *pc) path(name string) string { return p.Path(name) }
func (p *pc) cut() CutStats           { return p.Cut() }
func (p *pc) remount()                { p.Remount() }

// write writes b at off in name (created if missing), and fsyncs it with
// sync.
func (p *pc) write(name string, b []byte, off int64, sync bool) {
	p.t.Helper()
	f, err := os.OpenFile(p.path(name), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		p.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		p.t.Fatal(err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			p.t.Fatal(err)
		}
	}
}

// syncDir fsyncs a directory of the mount.
func (p *pc) syncDir(name string) {
	p.t.Helper()
	d, err := os.Open(p.path(name))
	if err != nil {
		p.t.Fatal(err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		p.t.Fatal(err)
	}
}

// want checks name's contents (nil: the file must not exist).
func (p *pc) want(name string, want []byte) {
	p.t.Helper()
	got, err := os.ReadFile(p.path(name))
	switch {
	case want == nil && errors.Is(err, os.ErrNotExist):
	case want == nil:
		p.t.Errorf("%s exists (%d bytes, %v); it must not", name, len(got), err)
	case err != nil:
		p.t.Errorf("%s: %v", name, err)
	case !bytes.Equal(got, want):
		p.t.Errorf("%s holds %q, want %q", name, trunc(got), trunc(want))
	}
}

func trunc(b []byte) []byte {
	if len(b) > 40 {
		return append(b[:40:40], "..."...)
	}
	return b
}

// TestDataNeedsFsync: a write is lost at a cut until its file is fsynced
// (or fdatasynced); what was synced stays.
func TestDataNeedsFsync(t *testing.T) {
	p := mountPC(t)
	p.write("f", []byte("synced"), 0, true)
	p.syncDir(".")
	p.write("f", []byte("SYNCED-NOT"), 0, false)
	p.want("f", []byte("SYNCED-NOT"))
	s := p.cut()
	p.want("f", []byte("synced"))
	if s.Files != 1 || s.Bytes == 0 || s.Entries != 0 {
		t.Errorf("cut dropped %+v; want 1 file, some bytes, no entries", s)
	}

	// fdatasync makes data and size durable.
	f, err := os.OpenFile(p.path("f"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("longer data"), 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("X"), 100); err != nil { // a hole, then X: lost
		t.Fatal(err)
	}
	f.Close()
	p.cut()
	p.want("f", []byte("longer data"))
}

// TestCreateNeedsDirFsync: a new name is durable only once its directory
// is fsynced, whatever the file's own fsyncs; its data only once the file
// is.
func TestCreateNeedsDirFsync(t *testing.T) {
	p := mountPC(t)
	p.write("a", []byte("data of a"), 0, true) // file synced, directory not
	p.write("b", []byte("data of b"), 0, false)
	p.syncDir(".") // both names durable, b's data not
	p.write("c", []byte("data of c"), 0, true)
	s := p.cut()
	p.want("a", []byte("data of a"))
	p.want("b", []byte{})
	p.want("c", nil)
	if s.Entries != 1 {
		t.Errorf("cut reverted %d entries, want 1 (c)", s.Entries)
	}

	// A directory: itself durable through its parent, its entries through
	// itself.
	if err := os.Mkdir(p.path("d"), 0o700); err != nil {
		t.Fatal(err)
	}
	p.write("d/x", []byte("x"), 0, true)
	p.syncDir("d")
	p.cut()
	p.want("d", nil)
	if err := os.MkdirAll(p.path("d/e"), 0o700); err != nil {
		t.Fatal(err)
	}
	p.write("d/e/y", []byte("y"), 0, true)
	p.syncDir("d/e")
	p.syncDir("d")
	p.syncDir(".")
	p.cut()
	p.want("d/e/y", []byte("y"))
}

// TestRenameNeedsDirFsync: a rename reverts at a cut until its directory
// is fsynced; the atomic-replace pattern without the directory fsync
// leaves the old file.
func TestRenameNeedsDirFsync(t *testing.T) {
	p := mountPC(t)
	p.write("state", []byte("old state"), 0, true)
	p.syncDir(".")
	p.write("state.tmp", []byte("new state"), 0, true)
	if err := os.Rename(p.path("state.tmp"), p.path("state")); err != nil {
		t.Fatal(err)
	}
	p.want("state", []byte("new state"))
	p.cut()
	p.want("state", []byte("old state"))
	p.want("state.tmp", nil)

	p.write("state.tmp", []byte("new state"), 0, true)
	if err := os.Rename(p.path("state.tmp"), p.path("state")); err != nil {
		t.Fatal(err)
	}
	p.syncDir(".")
	p.cut()
	p.want("state", []byte("new state"))
	p.want("state.tmp", nil)

	// A plain rename of a durable file.
	if err := os.Rename(p.path("state"), p.path("moved")); err != nil {
		t.Fatal(err)
	}
	p.cut()
	p.want("state", []byte("new state"))
	p.want("moved", nil)
}

// TestRenameAcrossDirectories: each directory's side of a rename is
// durable when that directory is fsynced.
func TestRenameAcrossDirectories(t *testing.T) {
	p := mountPC(t)
	for _, d := range []string{"a", "b"} {
		if err := os.Mkdir(p.path(d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	p.write("a/f", []byte("f"), 0, true)
	p.syncDir("a")
	p.syncDir(".")
	if err := os.Rename(p.path("a/f"), p.path("b/f")); err != nil {
		t.Fatal(err)
	}
	p.syncDir("b") // the new name durable, the old name not yet gone
	p.cut()
	p.want("a/f", []byte("f"))
	p.want("b/f", []byte("f"))

	if err := os.Remove(p.path("b/f")); err != nil {
		t.Fatal(err)
	}
	p.syncDir("a") // a/f gone durably, b/f's removal not durable
	if err := os.Remove(p.path("a/f")); err != nil {
		t.Fatal(err)
	}
	p.syncDir("a")
	p.cut()
	p.want("a/f", nil)
	p.want("b/f", []byte("f"))
}

// TestUnlinkNeedsDirFsync: an unlinked file comes back with its durable
// contents until its directory is fsynced.
func TestUnlinkNeedsDirFsync(t *testing.T) {
	p := mountPC(t)
	p.write("f", []byte("durable"), 0, true)
	p.syncDir(".")
	p.write("f", []byte("lost----"), 0, false)
	if err := os.Remove(p.path("f")); err != nil {
		t.Fatal(err)
	}
	p.cut()
	p.want("f", []byte("durable"))
	if err := os.Remove(p.path("f")); err != nil {
		t.Fatal(err)
	}
	p.syncDir(".")
	p.cut()
	p.want("f", nil)
	if ents, err := os.ReadDir(filepath.Join(p.backing, dataDir)); err != nil || len(ents) != 0 {
		t.Errorf("backing data files left: %v (%v)", ents, err)
	}

	// An unlinked file still open keeps its data for its user.
	p.write("g", []byte("open"), 0, true)
	p.syncDir(".")
	g, err := os.OpenFile(p.path("g"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(p.path("g")); err != nil {
		t.Fatal(err)
	}
	p.syncDir(".")
	if _, err := g.WriteAt([]byte("OPEN"), 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := g.ReadAt(buf, 0); err != nil || string(buf) != "OPEN" {
		t.Errorf("unlinked open file reads %q, %v", buf, err)
	}
	g.Close()
}

// TestTruncateAndHoles: truncation, punched holes and zeroed ranges are
// data changes, lost at a cut until the file is fsynced.
func TestTruncateAndHoles(t *testing.T) {
	p := mountPC(t)
	orig := bytes.Repeat([]byte("0123456789abcdef"), 3*pageSize/16)
	p.write("f", orig, 0, true)
	p.syncDir(".")
	if err := os.Truncate(p.path("f"), 1000); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p.path("f"), 2*pageSize); err != nil {
		t.Fatal(err)
	}
	shrunk := append(bytes.Clone(orig[:1000]), make([]byte, 2*pageSize-1000)...)
	p.want("f", shrunk)
	p.cut()
	p.want("f", orig)

	f, err := os.OpenFile(p.path("f"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { f.Close() }()
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 100, pageSize+200); err != nil {
		t.Fatal(err)
	}
	punched := bytes.Clone(orig)
	clear(punched[100 : 100+pageSize+200])
	p.want("f", punched)
	f.Close()
	p.cut()
	p.want("f", orig)

	f, err = os.OpenFile(p.path("f"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 100, pageSize+200); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, 5*pageSize); err != nil { // grows the file
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	p.cut()
	p.want("f", append(punched, make([]byte, 2*pageSize)...))
}

// TestMmapNeedsMsync: writes through a shared mapping reach the file
// system when the kernel writes them back and are durable only at msync
// (or fsync), as badger's tables and logs rely on.
func TestMmapNeedsMsync(t *testing.T) {
	p := mountPC(t)
	p.write("m", make([]byte, 2*pageSize), 0, true)
	p.syncDir(".")
	mapWrite := func(s string, msync bool) {
		f, err := os.OpenFile(p.path("m"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		m, err := unix.Mmap(int(f.Fd()), 0, 2*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		copy(m[pageSize:], s)
		if msync {
			if err := unix.Msync(m, unix.MS_SYNC); err != nil {
				t.Fatal(err)
			}
		}
		if err := unix.Munmap(m); err != nil {
			t.Fatal(err)
		}
	}
	want := make([]byte, 2*pageSize)
	mapWrite("not synced", false)
	p.cut()
	p.want("m", want)
	mapWrite("msynced", true)
	copy(want[pageSize:], "msynced")
	p.cut()
	p.want("m", want)
}

// TestDirectIONeedsFsync: an O_DIRECT write is volatile too until fsync.
func TestDirectIONeedsFsync(t *testing.T) {
	p := mountPC(t)
	p.write("d", make([]byte, 2*pageSize), 0, true)
	p.syncDir(".")
	direct := func(b []byte, sync bool) {
		f, err := os.OpenFile(p.path("d"), os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		buf := alignedPage()
		copy(buf, b)
		if _, err := f.WriteAt(buf, pageSize); err != nil {
			t.Fatal(err)
		}
		if sync {
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
		}
	}
	direct([]byte("direct, not synced"), false)
	want := make([]byte, 2*pageSize)
	p.cut()
	p.want("d", want)
	direct([]byte("direct, synced"), true)
	copy(want[pageSize:], "direct, synced")
	p.cut()
	p.want("d", want)
}

// alignedPage returns a page-aligned page (O_DIRECT buffers).
func alignedPage() []byte {
	b, err := unix.Mmap(-1, 0, pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		panic(err)
	}
	return b
}

// TestCleanUnmountKeepsEverything: an unmount without a cut is a clean
// shutdown.
func TestCleanUnmountKeepsEverything(t *testing.T) {
	p := mountPC(t)
	p.write("f", []byte("never synced"), 0, false)
	if err := os.MkdirAll(p.path("x/y"), 0o700); err != nil {
		t.Fatal(err)
	}
	p.write("x/y/z", []byte("z"), 0, false)
	if err := os.Symlink("x/y/z", p.path("link")); err != nil {
		t.Fatal(err)
	}
	p.remount()
	p.want("f", []byte("never synced"))
	p.want("link", []byte("z"))
	if fi, err := os.Stat(p.path("x/y/z")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("x/y/z: %v, %v", fi, err)
	}
}

// TestCutAfter: a cut armed for an operation falls right after it: the
// operation succeeds, every later one fails with EIO, and what the
// operation made durable is kept.
func TestCutAfter(t *testing.T) {
	p := mountPC(t)
	p.write("f", []byte("v1"), 0, true)
	p.syncDir(".")
	fired := p.FS().CutAfter(func(op Op) bool { return op.Kind == OpFsync && op.Path == "f" })
	f, err := os.OpenFile(p.path("f"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("v2"), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("the fsync the cut follows failed: %v", err)
	}
	var s CutStats
	select {
	case s = <-fired:
	case <-time.After(10 * time.Second):
		t.Fatal("the armed cut did not fire")
	}
	if s.After == nil || s.After.Kind != OpFsync || s.After.Path != "f" {
		t.Errorf("cut after %+v", s.After)
	}
	if _, err := f.WriteAt([]byte("v3"), 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("a write after the cut: %v, want EIO", err)
	}
	if _, err := os.Stat(p.path("g")); !errors.Is(err, syscall.EIO) {
		t.Errorf("a lookup after the cut: %v, want EIO", err)
	}
	f.Close()
	p.remount()
	p.want("f", []byte("v2"))
}

// TestControlFile: another process cuts the power through the control
// file.
func TestControlFile(t *testing.T) {
	p := mountPC(t)
	p.write("f", []byte("durable"), 0, true)
	p.syncDir(".")
	p.write("f", []byte("lost---"), 0, false)
	if b, err := os.ReadFile(p.path(ControlName)); err != nil || string(b) != "alive\n" {
		t.Errorf("control file reads %q, %v", b, err)
	}
	if out, err := exec.Command("sh", "-c", "echo cut > "+p.path(ControlName)).CombinedOutput(); err != nil {
		t.Fatalf("echo cut: %v: %s", err, out)
	}
	waitDead(t, p.FS())
	if _, err := os.ReadFile(p.path("f")); !errors.Is(err, syscall.EIO) {
		t.Errorf("a read after the cut: %v, want EIO", err)
	}
	p.remount()
	p.want("f", []byte("durable"))
	ents, err := os.ReadDir(p.Dir)
	if err != nil || len(ents) != 1 || ents[0].Name() != "f" {
		t.Errorf("root lists %v (%v); the control file is not listed", ents, err)
	}
}

func waitDead(t *testing.T, fs *FS) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !fs.Dead(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the file system is still alive")
		}
	}
}

// TestSocketsAndSpecialFiles: a unix socket (the daemon's control socket)
// can be bound and reached in the mount.
func TestSocketsAndSpecialFiles(t *testing.T) {
	p := mountPC(t)
	l, err := net.Listen("unix", p.path("s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			fmt.Fprint(c, "hello")
			c.Close()
		}
	}()
	c, err := net.Dial("unix", p.path("s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 5)
	if _, err := c.Read(b); err != nil || string(b) != "hello" {
		t.Errorf("socket read %q, %v", b, err)
	}
	c.Close()
	if err := unix.Mkfifo(p.path("fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(p.path("fifo")); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("fifo: %v %v", fi, err)
	}
}

// TestMountDescriptorNotInherited: a process started while the file system
// mounts never inherits the server's /dev/fuse descriptor. One that did
// kept the connection alive after a cut, and, killed, waited for ever on
// a request of its own (a daemon left in D state after the power-cut
// loop). Children are started without a pause from another goroutine
// while the file system is cut and mounted again, and each lists its own
// descriptors.
func TestMountDescriptorNotInherited(t *testing.T) {
	p := mountPC(t)
	stop := make(chan struct{})
	found := make(chan string, 1)
	children := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			out, err := exec.Command("ls", "-l", "/proc/self/fd/").Output()
			if err != nil {
				continue
			}
			children++
			if bytes.Contains(out, []byte("/dev/fuse")) {
				select {
				case found <- string(out):
				default:
				}
			}
		}
	}()
	for range 30 {
		p.cut()
		p.remount()
	}
	close(stop)
	<-done
	select {
	case out := <-found:
		t.Fatalf("a child started during a mount holds /dev/fuse:\n%s", out)
	default:
	}
	if children < 30 {
		t.Fatalf("only %d children ran during 30 mounts: the test is too weak", children)
	}
	t.Logf("%d children started during 30 mounts, none inherited /dev/fuse", children)
}
