package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// TestE2EResize grows a mounted disk under write load: ext4 on a loop
// device over the .img view, files written and fsync'ed all along, a
// recovery point taken before. `vhdsync resize` 64 MiB -> 192 MiB (1 GiB
// -> 3 GiB with VHDSYNC_RESIZE_GIB set), then
// `losetup -c` and an online resize2fs; files written into the grown
// space. Afterwards: e2fsck clean, the blob equals the image with the new
// footer (qemu-img reads it at the new size), the recovery point from
// before restores at the old size. Then, unmounted: refusals (a shrink
// without --shrink, a size Azure refuses) and a resize done directly.
func TestE2EResize(t *testing.T) {
	e := newE2E(t, "mkfs.ext4", "e2fsck", "resize2fs", "blockdev", "qemu-img")
	// The 1 GiB -> 3 GiB with VHDSYNC_RESIZE_GIB=1 (slower: the
	// blob and image are compared whole).
	small, big := int64(64<<20), int64(192<<20)
	if os.Getenv("VHDSYNC_RESIZE_GIB") != "" {
		small, big = 1<<30, 3<<30
	}
	bigger := big + 64<<20
	mib := func(n int64) string { return fmt.Sprintf("%dMiB", n>>20) }
	url, state := e.createDisk("rz", int(small>>20))
	mp := e.path("mnt")
	e.mount(state, mp, "--recovery-points", "1s", "--keep", "20")
	img := filepath.Join(mp, "rz.img")
	loop := e.losetup(img)
	e.must("mkfs.ext4", "-q", "-E", "nodiscard", loop)
	fsdir := e.path("fs")
	e.mountFS(loop, fsdir)

	// A recovery point of the old size.
	writeFiles(t, fsdir, "before", 8, 1<<20)
	syncFS(t, fsdir)
	waitFor(t, 30*time.Second, "a recovery point before the resize", func() (bool, error) {
		s, err := e.status(state)
		return err == nil && s.RecoveryPoints != nil && s.RecoveryPoints.Taken > 0, err
	})

	// Write load: files rewritten and fsync'ed until stopped.
	load := startFileLoad(t, fsdir)
	waitFor(t, 30*time.Second, "the write load running", func() (bool, error) { return load.rounds.Load() >= 20, nil })

	start := time.Now()
	r := e.mustVhdsync("resize", "--state", state, "--size", mib(big))
	took := time.Since(start)
	before := load.rounds.Load()
	t.Logf("resize while mounted under load: %v (%d files written during it); %s", took, before, strings.TrimSpace(r.stdout))
	if b, err := os.ReadFile(filepath.Join(state, "vhdsync.log")); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "disk resized") {
				t.Logf("daemon: %s", l)
			}
		}
	}
	if !strings.Contains(r.stdout, "losetup -c "+loop) || !strings.Contains(r.stdout, "resize2fs "+loop) {
		t.Errorf("resize does not say how to grow the loop device and the file system: %s", r.stdout)
	}
	for name, want := range map[string]int64{"rz.img": big, "rz.vhd": big + 512} {
		if st, err := os.Stat(filepath.Join(mp, name)); err != nil || st.Size() != want {
			t.Errorf("%s after the resize: %v, %d bytes, want %d", name, err, st.Size(), want)
		}
	}
	e.must("losetup", "-c", loop)
	if got := strings.TrimSpace(e.must("blockdev", "--getsize64", loop)); got != strconv.FormatInt(big, 10) {
		t.Fatalf("the loop device after losetup -c: %s bytes, want %d", got, big)
	}
	if hasCapability(t, capSysResource) {
		e.must("resize2fs", loop)
	} else {
		// ext4's online resize needs CAP_SYS_RESOURCE, which this machine
		// withholds even from root: grow it offline on the same loop
		// device, which still proves the kernel took the new size.
		t.Log("no CAP_SYS_RESOURCE here (online resize2fs gets EPERM): the file system is grown offline on the same loop device")
		load.stop(t)
		umountFS(t, fsdir)
		e.must("e2fsck", "-fn", loop)
		e.must("resize2fs", "-f", loop)
		e.mountFS(loop, fsdir)
		load = startFileLoad(t, fsdir)
		before = 0
	}
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(fsdir, &sfs); err != nil || int64(sfs.Blocks)*sfs.Bsize < small*2 {
		t.Fatalf("ext4 after resize2fs: %v, %d bytes", err, int64(sfs.Blocks)*sfs.Bsize)
	}
	// Into the grown space: more than the old disk held.
	after := writeFiles(t, fsdir, "after", 96, 1<<20)
	waitFor(t, 30*time.Second, "writes go on after the resize", func() (bool, error) { return load.rounds.Load() > before+10, nil })
	load.stop(t)
	syncFS(t, fsdir)
	if s := e.mustStatus(state); s.LastError != "" || s.FlusherState == "failed" {
		t.Errorf("status after the resize: flusher %s, %s", s.FlusherState, s.LastError)
	}
	umountFS(t, fsdir)
	e.must("e2fsck", "-fn", loop)
	// Read back through a fresh mount of the file system.
	e.mountFS(loop, fsdir, "-o", "ro")
	for name, want := range after {
		if got, err := os.ReadFile(filepath.Join(fsdir, name)); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s after the resize: %v", name, err)
		}
	}
	umountFS(t, fsdir)
	detachLoop(t, loop, img)
	e.mustVhdsync("unmount", mp)

	local := e.checkBlobIsImage(url, state, big)
	checkQemuSize(t, e, local, big)

	// The recovery point from before the resize has the old size.
	var rep pointsReport
	if err := json.Unmarshal([]byte(e.mustVhdsync("points", "--blob", url, "--json").stdout), &rep); err != nil || len(rep.Points) == 0 {
		t.Fatalf("points: %v %+v", err, rep)
	}
	first := rep.Points[0]
	old := e.path("point-before.vhd")
	e.mustVhdsync("download", "--blob", url, "--point", first.ID, old)
	checkQemuSize(t, e, old, small)
	last := rep.Points[len(rep.Points)-1]
	newest := e.path("point-after.vhd")
	e.mustVhdsync("download", "--blob", url, "--point", last.ID, newest)
	checkQemuSize(t, e, newest, big)

	// Unmounted: refusals, then a resize done by the command itself.
	if r := e.vhdsync("resize", "--state", state, "--size", "100MiB"); r.code != ExitUsage || !strings.Contains(r.stderr, "--shrink") {
		t.Errorf("a shrink without --shrink: %s", r)
	}
	if r := e.vhdsync("resize", "--state", state, "--size", "300000KiB"); r.code != ExitBadSize {
		t.Errorf("a size that is no whole number of MiB: %s", r)
	}
	if r := e.vhdsync("resize", "--state", state, "--size", "9TiB"); r.code != ExitBadSize {
		t.Errorf("a size beyond a page blob: %s", r)
	}
	r = e.mustVhdsync("resize", "--state", state, "--size", mib(bigger))
	t.Logf("unmounted: %s", strings.TrimSpace(r.stdout))
	e.checkBlobIsImage(url, state, bigger)
	if r := e.mustVhdsync("verify", "--state", state); !strings.Contains(r.stdout, "identical") {
		t.Errorf("verify after the resize: %s", r)
	}
	// And shrunk back with --shrink (the file system ends at 192 MiB).
	e.mustVhdsync("resize", "--state", state, "--size", mib(big), "--shrink")
	local = e.checkBlobIsImage(url, state, big)
	checkQemuSize(t, e, local, big)
	e.must("e2fsck", "-fn", filepath.Join(state, "disk.img"))
}

// checkQemuSize: qemu-img reads file as a VHD of size bytes.
func checkQemuSize(t *testing.T, e *e2e, file string, size int64) {
	t.Helper()
	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal([]byte(e.must("qemu-img", "info", "-f", "vpc", "--output=json", file)), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != size || info.Format != "vpc" {
		t.Errorf("qemu-img info %s: %+v, want %d bytes", filepath.Base(file), info, size)
	}
}

// writeFiles writes n files of size bytes named prefix-i under dir, each
// fsync'ed, and returns their contents by name.
func writeFiles(t *testing.T, dir, prefix string, n, size int) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for i := range n {
		name := fmt.Sprintf("%s-%03d", prefix, i)
		b := pattern(name, size)
		if err := writeSynced(filepath.Join(dir, name), b); err != nil {
			t.Fatal(err)
		}
		out[name] = b
	}
	return out
}

// writeSynced writes b to path and fsyncs it.
func writeSynced(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// syncFS makes everything written to the file system at dir durable
// (syncfs).
func syncFS(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatalf("syncfs %s: %v", dir, err)
	}
}

// fileLoad rewrites and fsyncs files in a directory until stopped.
type fileLoad struct {
	quit   atomic.Bool
	wg     sync.WaitGroup
	err    error
	rounds atomic.Int64
}

// startFileLoad starts a fileLoad in dir; the test's cleanup stops it.
func startFileLoad(t *testing.T, dir string) *fileLoad {
	l := &fileLoad{}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for i := 0; !l.quit.Load(); i++ {
			p := filepath.Join(dir, fmt.Sprintf("load-%02d", i%16))
			if err := writeSynced(p, pattern(fmt.Sprint("load-", i), 256<<10)); err != nil {
				l.err = err
				return
			}
			l.rounds.Add(1)
		}
	}()
	t.Cleanup(func() { l.quit.Store(true); l.wg.Wait() })
	return l
}

// stop ends the load and fails the test if a write failed.
func (l *fileLoad) stop(t *testing.T) {
	t.Helper()
	l.quit.Store(true)
	l.wg.Wait()
	if l.err != nil {
		t.Fatalf("the write load failed: %v", l.err)
	}
}

// capSysResource is CAP_SYS_RESOURCE's bit (linux/capability.h).
const capSysResource = 24

// hasCapability reports whether this process has capability bit c in its
// effective set.
func hasCapability(t *testing.T, c uint) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && n&(1<<c) != 0
		}
	}
	return false
}

// TestResizeCutShortFinishedByReplay: a resize cut by a crash after the
// blob was grown (no footer at its new end, the blob odd, the intent in
// the state directory, the image still small) is finished by `vhdsync
// replay`: the blob is the fixed VHD of the new size, even, the image and
// the state file have the new size. A second replay has nothing to do.
func TestResizeCutShortFinishedByReplay(t *testing.T) {
	az := azurite.Start(t)
	const from, to = 32 << 20, 48 << 20
	url := az.BlobURL("disks", "cut.vhd")
	state := filepath.Join(t.TempDir(), "state")
	if code, out, errb := vhdsync(t, nil, "create", "--blob", url, "--size", "32MiB", "--state", state, "--create-container"); code != 0 {
		t.Fatalf("create: exit %d\n%s%s", code, out, errb)
	}
	d, err := statedir.Open(state)
	if err != nil {
		t.Fatal(err)
	}
	f, err := vhdlayer.DecodeFooter(d.State.Footer)
	if err != nil {
		t.Fatal(err)
	}
	grown := f.Resized(to).Encode()
	if err := d.BeginResize(statedir.ResizeIntent{From: from, To: to, Epoch: 1, Footer: grown[:]}); err != nil {
		t.Fatal(err)
	}
	c, err := pageblob.Open(url, &pageblob.Options{Env: func(string) string { return "" }})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := c.RaiseSequence(ctx, int64(remote.Started(1)), ""); err != nil {
		t.Fatal(err)
	}
	if err := c.Resize(ctx, to+512, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := statedir.Open(state); err != nil {
		t.Fatalf("a state directory with a cut resize does not open: %v", err)
	}
	if code, _, errb := vhdsync(t, nil, "verify", "--state", state); code != ExitNotDrained || !strings.Contains(errb, "vhdsync replay") {
		t.Errorf("verify of a disk whose resize was cut short: exit %d, %s", code, errb)
	}
	if code, out, errb := vhdsync(t, nil, "status", "--state", state); code != ExitNotDrained || !strings.Contains(out, "resize:") || !strings.Contains(out, "cut short") {
		t.Errorf("status of a disk whose resize was cut short: exit %d\n%s%s", code, out, errb)
	}
	for range 2 {
		if code, out, errb := vhdsync(t, nil, "replay", "--state", state); code != 0 {
			t.Fatalf("replay: exit %d\n%s%s", code, out, errb)
		}
	}
	d, err = statedir.Open(state)
	if err != nil {
		t.Fatal(err)
	}
	if d.State.VirtualSize != to || d.State.Resize != nil || !bytes.Equal(d.State.Footer, grown[:]) {
		t.Fatalf("state after replay: size %d, intent %+v", d.State.VirtualSize, d.State.Resize)
	}
	p, _, err := c.ReadFooter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p.Length != to+512 || p.SequenceNumber != int64(remote.Complete(1)) {
		t.Fatalf("blob after replay: %d bytes, sequence %d", p.Length, p.SequenceNumber)
	}
	if code, out, errb := vhdsync(t, nil, "verify", "--state", state); code != 0 || !strings.Contains(out, "identical") {
		t.Fatalf("verify: exit %d\n%s%s", code, out, errb)
	}
}
