package main

// End-to-end tests of the mount: the real binary (built once, with -race
// when the tests are), a fresh Azurite per test, real loop devices, ext4,
// qemu-nbd and fio. Every test needs root and /dev/fuse and undoes
// everything it made in t.Cleanup (see e2e_helpers_test.go).

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
)

// TestE2EExt4RoundTrip: create, mount, losetup, mkfs.ext4, a tree of files,
// a file deleted and fstrim, unmount everything; the blob, downloaded with
// the SDK, is a fixed VHD that qemu-img reads as the local image, whose
// ext4 is clean and holds the files.
func TestE2EExt4RoundTrip(t *testing.T) {
	e := newE2E(t, "mkfs.ext4", "e2fsck", "fstrim", "qemu-img")
	const size = 128 << 20
	url, state := e.createDisk("ext4", 128)
	mp := e.path("mnt")
	d := e.mount(state, mp)
	img, vhd := filepath.Join(mp, "ext4.img"), filepath.Join(mp, "ext4.vhd")
	for p, want := range map[string]int64{img: size, vhd: size + 512} {
		if st, err := os.Stat(p); err != nil || st.Size() != want {
			t.Fatalf("%s: %v, want %d bytes", p, err, want)
		}
	}

	loop := e.losetup(img)
	e.must("mkfs.ext4", "-q", "-L", "e2e", loop)
	fsDir := e.path("fs")
	e.mountFS(loop, fsDir)
	hashes := writeTree(t, fsDir)
	syscall.Sync()
	// A deleted file and fstrim: discards through the loop device.
	if err := os.Remove(filepath.Join(fsDir, "big/large")); err != nil {
		t.Fatal(err)
	}
	delete(hashes, "big/large")
	discards := e.mustStatus(state).FuseDiscards
	e.must("fstrim", fsDir)
	s := e.mustStatus(state)
	if s.FuseDiscards <= discards {
		t.Errorf("fstrim sent no discard (%d before, %d after)", discards, s.FuseDiscards)
	}
	t.Logf("while mounted: %d fuse writes (%d bytes), %d fsyncs, %d discards; %d Put Page, %d Clear Pages, journal %d records",
		s.FuseWrites, s.FuseBytesWritten, s.FuseFsyncs, s.FuseDiscards, s.PutCalls, s.ClearCalls, s.JournalRecords)
	if s.FuseDiscards == 0 || s.FuseFsyncs == 0 {
		t.Errorf("mkfs.ext4 and sync should have sent discards and fsyncs: %+v", s)
	}

	umountFS(t, fsDir)
	e.must("losetup", "-d", loop)
	r := e.mustVhdsync("unmount", mp)
	if !strings.Contains(r.stdout, "holds every write") {
		t.Errorf("unmount output: %s", r)
	}
	d.waitExit(30 * time.Second)
	if isMounted(mp) {
		t.Fatal("still mounted after vhdsync unmount")
	}
	if ls := readLastStop(t, state); !ls.Drained || ls.PendingRecords != 0 {
		t.Errorf("last stop: %+v", ls)
	}
	s = e.mustStatus(state)
	if s.Mounted || s.JournalRecords != 0 || s.LeaseState != "available" || s.RemoteSequence%2 != 0 {
		t.Errorf("status after unmount: mounted %v, %d records, lease %q, sequence %d", s.Mounted, s.JournalRecords, s.LeaseState, s.RemoteSequence)
	}
	if r := e.mustVhdsync("status", "--state", state, "--json"); strings.Contains(r.stdout, "oldest_pending") {
		t.Errorf("status --json of a drained disk shows an oldest pending write: %s", r.stdout)
	}
	if r := e.mustVhdsync("verify", "--state", state); !strings.Contains(r.stdout, "identical") {
		t.Errorf("verify: %s", r)
	}

	// The blob as any client sees it.
	local := e.checkBlobIsImage(url, state, size)
	var info struct {
		VirtualSize int64  `json:"virtual-size"`
		Format      string `json:"format"`
	}
	if err := json.Unmarshal([]byte(e.must("qemu-img", "info", "-f", "vpc", "--output=json", local)), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != size || info.Format != "vpc" {
		t.Errorf("qemu-img info: %+v", info)
	}
	if out := e.must("qemu-img", "compare", "-f", "vpc", "-F", "raw", local, filepath.Join(state, "disk.img")); !strings.Contains(out, "identical") {
		t.Errorf("qemu-img compare: %s", out)
	}
	bloop := e.losetup(local, "--read-only", "--sizelimit", strconv.Itoa(size))
	if r := execTimeout(t, e.dir, 2*time.Minute, "e2fsck", "-fn", bloop); r.code != 0 {
		t.Errorf("e2fsck -fn on the blob's filesystem: %s", r)
	}
	check := e.path("check")
	e.mountFS(bloop, check, "-o", "ro,noload")
	checkTree(t, check, hashes)
}

// treeFile is one file of writeTree.
type treeFile struct {
	path string
	size int
}

// writeTree writes a tree of files of known content (about 5 MiB: empty,
// tiny, block-edge, many small and a few big ones) under dir and returns
// their SHA-256.
func writeTree(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	files := []treeFile{
		{"empty", 0}, {"one", 1}, {"a/edge-4095", 4095}, {"a/edge-4097", 4097},
		{"a/b/c/deep-100k", 100 << 10}, {"big/one-mib", 1 << 20}, {"big/odd", 5<<19 + 123},
		{"big/large", 1<<20 + 4096*7},
	}
	for i := 0; i < 60; i++ {
		files = append(files, treeFile{fmt.Sprintf("many/%02d/f%03d", i%6, i), 1000 + i*97})
	}
	hashes := map[string][32]byte{}
	for _, f := range files {
		p := filepath.Join(dir, f.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		b := pattern("tree/"+f.path, f.size)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatalf("write %s: %v", p, err)
		}
		hashes[f.path] = sha256.Sum256(b)
	}
	return hashes
}

// checkTree compares the files under dir with their hashes, and that no
// other regular file is there (lost+found aside).
func checkTree(t *testing.T, dir string, hashes map[string][32]byte) {
	t.Helper()
	seen := 0
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if fi.IsDir() || strings.HasPrefix(rel, "lost+found") {
			return nil
		}
		want, ok := hashes[rel]
		if !ok {
			t.Errorf("unexpected file %s", rel)
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if sha256.Sum256(b) != want {
			t.Errorf("%s: content differs (%d bytes)", rel, len(b))
		}
		seen++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(hashes) {
		t.Errorf("found %d of %d files", seen, len(hashes))
	}
}

// TestE2EQemuNBD: qemu-nbd -f vpc serves the .vhd view; qemu-io writes
// patterns through it; writes into the footer through the .vhd file are
// refused unless identical; the downloaded blob holds the patterns and the
// unchanged footer.
func TestE2EQemuNBD(t *testing.T) {
	e := newE2E(t, "qemu-nbd", "qemu-io", "qemu-img")
	const size = 64 << 20
	url, state := e.createDisk("nbd", 64)
	mp := e.path("mnt")
	d := e.mount(state, mp)
	vhd := filepath.Join(mp, "nbd.vhd")

	sock := e.path("nbd.sock")
	nbd := e.startBackground("", "qemu-nbd.log", "qemu-nbd", "-f", "vpc", "--persistent", "--socket", sock, vhd)
	waitFor(t, 30*time.Second, "qemu-nbd's socket", func() (bool, error) {
		if nbd.exited() {
			b, _ := os.ReadFile(e.path("qemu-nbd.log"))
			t.Fatalf("qemu-nbd exited: %v\n%s", nbd.err, b)
		}
		c, err := net.Dial("unix", sock) // --persistent: a probe costs nothing
		if err == nil {
			c.Close()
		}
		return err == nil, err
	})
	nbdURL := "nbd+unix:///?socket=" + sock
	type pat struct {
		p        byte
		off, len int64
	}
	pats := []pat{
		{0x5a, 1 << 20, 64 << 10},
		{0xa5, 0, 4096},
		{0x3c, 33<<20 + 512, 1536},
		{0xc3, size - 1<<20, 1 << 20}, // the last MiB, next to the footer
		{0x77, 7<<20 + 100, 1000},     // not sector-aligned: qemu reads, modifies, writes
	}
	args := []string{"-f", "raw", nbdURL}
	for _, p := range pats {
		args = append(args, "-c", fmt.Sprintf("write -P 0x%02x %d %d", p.p, p.off, p.len))
	}
	args = append(args, "-c", "flush")
	if out := e.must("qemu-io", args...); strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io writes: %s", out)
	}
	args = []string{"-r", "-f", "raw", nbdURL}
	for _, p := range pats {
		args = append(args, "-c", fmt.Sprintf("read -P 0x%02x %d %d", p.p, p.off, p.len))
	}
	if out := e.must("qemu-io", args...); strings.Contains(out, "failed") {
		t.Fatalf("qemu-io reads back through qemu-nbd: %s", out)
	}

	// qemu-nbd holds the .vhd open: unmount refuses, says why, unmounts
	// nothing.
	if r := e.vhdsync("unmount", mp); r.code != ExitBusy || !strings.Contains(r.stderr, "in use") || !strings.Contains(r.stderr, "qemu-nbd") {
		t.Errorf("unmount while qemu-nbd runs: want exit %d naming qemu-nbd: %s", ExitBusy, r)
	}
	if !isMounted(mp) {
		t.Fatal("a refused unmount unmounted")
	}

	// The footer through the .vhd file: different bytes are refused
	// (EPERM), identical ones accepted; a write straddling data and footer
	// is all or nothing.
	footer := stateFooter(t, state)
	f, err := os.OpenFile(vhd, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, 512)
	if _, err := f.ReadAt(got, size); err != nil || !bytes.Equal(got, footer) {
		t.Fatalf("the .vhd's last 512 bytes are not the footer (%v)", err)
	}
	bad := bytes.Clone(footer)
	bad[100] ^= 0xff
	if _, err := f.WriteAt(bad, size); !errors.Is(err, syscall.EPERM) {
		t.Errorf("changing the footer: %v, want EPERM", err)
	}
	badTail := bytes.Clone(footer)
	badTail[505] ^= 0xff
	if _, err := f.WriteAt(badTail[500:], size+500); !errors.Is(err, syscall.EPERM) {
		t.Errorf("changing the footer's last bytes only: %v, want EPERM", err)
	}
	if n, err := f.WriteAt(footer, size); err != nil || n != 512 {
		t.Errorf("rewriting the identical footer: %d, %v", n, err)
	}
	lastSector := bytes.Repeat([]byte{0xc3}, 512)
	straddle := append(pattern("straddle", 512), bad...)
	if _, err := f.WriteAt(straddle, size-512); !errors.Is(err, syscall.EPERM) {
		t.Errorf("a write over the last sector and a changed footer: %v, want EPERM", err)
	}
	if _, err := f.ReadAt(got, size-512); err != nil || !bytes.Equal(got, lastSector) {
		t.Errorf("a refused straddling write changed the last data sector (%v)", err)
	}
	straddle = append(pattern("straddle", 512), footer...)
	if n, err := f.WriteAt(straddle, size-512); err != nil || n != 1024 {
		t.Errorf("a write over the last sector and the identical footer: %d, %v", n, err)
	}
	lastSector = pattern("straddle", 512)
	if _, err := f.WriteAt([]byte{1}, size+512); err == nil {
		t.Error("a write past the end of the .vhd succeeded")
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	s := e.mustStatus(state)
	if s.FuseRefused < 3 {
		t.Errorf("status counts %d refused writes, want at least 3", s.FuseRefused)
	}

	// Stop qemu-nbd, unmount, judge the blob.
	if err := nbd.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "qemu-nbd to exit", func() (bool, error) { return nbd.exited(), nil })
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	local := e.checkBlobIsImage(url, state, size)
	args = []string{"-r", "-f", "vpc", local}
	for _, p := range pats {
		n := p.len
		if p.off+n == size {
			n -= 512 // the last sector was rewritten through the .vhd
		}
		args = append(args, "-c", fmt.Sprintf("read -P 0x%02x %d %d", p.p, p.off, n))
	}
	if out := e.must("qemu-io", args...); strings.Contains(out, "failed") {
		t.Errorf("qemu-io -f vpc on the downloaded blob: %s", out)
	}
	if got := blobRange(t, url, size-512, 1024); !bytes.Equal(got[:512], lastSector) || !bytes.Equal(got[512:], footer) {
		t.Error("the blob's last sector or footer is not what was written")
	}
	if got := blobRange(t, url, 1<<20-512, 512); !bytes.Equal(got, make([]byte, 512)) {
		t.Error("the sector before the first pattern is not zero")
	}
}

// fioResult is the part of fio's JSON output the crash test reads.
type fioResult struct {
	Jobs []struct {
		Error int `json:"error"`
		Write struct {
			IOBytes  int64 `json:"io_bytes"`
			TotalIOs int64 `json:"total_ios"`
		} `json:"write"`
		Read struct {
			IOBytes  int64 `json:"io_bytes"`
			TotalIOs int64 `json:"total_ios"`
		} `json:"read"`
	} `json:"jobs"`
}

func readFioJSON(t *testing.T, path string) fioResult {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// fio may print notes before the JSON object.
	if i := bytes.IndexByte(b, '{'); i > 0 {
		b = b[i:]
	}
	var r fioResult
	if err := json.Unmarshal(b, &r); err != nil || len(r.Jobs) != 1 {
		t.Fatalf("fio JSON %s: %v\n%s", path, err, b)
	}
	return r
}

// TestE2EKill9Replay: fio writes 4 KiB blocks with O_SYNC and crc32c
// verify headers through a loop device; the daemon is killed with SIGKILL
// in the middle. After the dead mount is cleaned up and mounted again (the
// journal replayed), every write fio saw acknowledged reads back intact,
// and after unmount the blob equals the local image byte for byte.
//
// How the verify pass knows what was acknowledged: the write job is
// randwrite with a fixed seed and a random map, so a verify_only run of
// the same job with --number_ios=N checks exactly the first N writes; N is
// the acknowledged bytes of the write job's JSON / 4 KiB. (fio 3.33's
// verify_state_save after an I/O error records every planned write as
// issued, so --verify_state_load would check blocks never written.) A run
// with N past the writes issued must fail: the check has teeth.
func TestE2EKill9Replay(t *testing.T) {
	e := newE2E(t, "fio")
	const size = 64 << 20
	url, state := e.createDisk("crash", 64)
	mp := e.path("mnt")
	d := e.mount(state, mp)
	img := filepath.Join(mp, "crash.img")
	loop := e.losetup(img)
	fioDir := e.mkdir("fio")
	job := []string{"--name=w", "--filename=" + loop, "--rw=randwrite", "--bs=4k", "--size=32M",
		"--direct=1", "--sync=1", "--verify=crc32c", "--ioengine=psync", "--randrepeat=1", "--output-format=json"}
	w := e.startBackground(fioDir, "fio-write.log", "fio", append(job, "--do_verify=0", "--output="+filepath.Join(fioDir, "write.json"))...)

	const minWrites = 500
	var before statusReport
	waitFor(t, 90*time.Second, fmt.Sprintf("fio to write %d blocks", minWrites), func() (bool, error) {
		if w.exited() {
			b, _ := os.ReadFile(e.path("fio-write.log"))
			t.Fatalf("fio ended before the kill: %v\n%s", w.err, b)
		}
		s, err := e.status(state)
		before = s
		return err == nil && s.FuseWrites >= minWrites, err
	})
	if err := syscall.Kill(d.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitExit(10 * time.Second)
	waitFor(t, 60*time.Second, "fio to fail", func() (bool, error) { return w.exited(), nil })
	if w.err == nil {
		t.Fatal("fio succeeded although the daemon was killed")
	}
	wr := readFioJSON(t, filepath.Join(fioDir, "write.json"))
	acked := wr.Jobs[0].Write.IOBytes / 4096
	issued := wr.Jobs[0].Write.TotalIOs
	t.Logf("killed the daemon after %d fuse writes (journal %d records, blob sequence %d); fio: error %d, %d writes acknowledged, %d issued",
		before.FuseWrites, before.JournalRecords, before.RemoteSequence, wr.Jobs[0].Error, acked, issued)
	if acked < minWrites/2 || acked >= 8192 || issued < acked {
		t.Fatalf("fio acknowledged %d writes of %d issued", acked, issued)
	}

	// The dead mount: ENOTCONN; clean it up as the README says.
	if _, err := os.Stat(img); !errors.Is(err, syscall.ENOTCONN) {
		t.Errorf("stat on the dead mount: %v, want ENOTCONN", err)
	}
	if r := e.mountAttempt(state, mp); r.code != ExitBusy || !strings.Contains(r.stderr, "umount -l") {
		t.Errorf("mount on the dead mount: want exit %d with the cleanup advice: %s", ExitBusy, r)
	}
	if r := e.vhdsync("unmount", mp); r.code == 0 || !strings.Contains(r.stderr, "umount -l") || !strings.Contains(r.stderr, "losetup -d") {
		t.Errorf("unmount of the dead mount: want a failure with the cleanup advice: %s", r)
	}
	// status: not healthy (15), the dead mount named, the same advice.
	if r := e.vhdsync("status", "--state", state, "--json"); r.code != ExitUnhealthy || !strings.Contains(r.stdout, `"dead_mount": "`+mp+`"`) || !strings.Contains(r.stderr, "umount -l "+mp) {
		t.Errorf("status of the dead mount: want exit %d naming it with the cleanup advice: %s", ExitUnhealthy, r)
	}
	e.must("losetup", "-d", loop)
	if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
		t.Fatalf("umount -l %s: %v", mp, err)
	}
	crashed := e.mustStatus(state)
	if crashed.Mounted {
		t.Fatalf("status after the crash says mounted: %+v", crashed)
	}
	if crashed.JournalRecords > 0 && !strings.Contains(crashed.Note, "replay") {
		t.Errorf("status of a crashed disk with %d journal records should advise a replay: %q", crashed.JournalRecords, crashed.Note)
	}

	// Mount again: the journal is replayed.
	d2 := e.mount(state, mp)
	replayed, ok := logInt(d2.log(), "msg=mounted", "replayed_records")
	if !ok {
		t.Fatalf("the daemon log has no mounted line with replayed_records:\n%s", tail(d2.log(), 20))
	}
	t.Logf("status of the crashed disk: %d journal records (%d bytes), blob sequence %d; the mount replayed %d records",
		crashed.JournalRecords, crashed.JournalBytes, crashed.RemoteSequence, replayed)
	if int64(replayed) != crashed.JournalRecords {
		t.Errorf("replayed %d records, status counted %d in the journal", replayed, crashed.JournalRecords)
	}

	loop = e.losetup(img)
	job[1] = "--filename=" + loop
	vr := execTimeout(t, fioDir, 2*time.Minute, "fio", append(job, "--verify_only", fmt.Sprintf("--number_ios=%d", acked), "--output="+filepath.Join(fioDir, "verify.json"))...)
	if vr.code != 0 {
		b, _ := os.ReadFile(filepath.Join(fioDir, "verify.json"))
		t.Fatalf("fio verify of the %d acknowledged writes: %s\n%s", acked, vr, b)
	}
	if v := readFioJSON(t, filepath.Join(fioDir, "verify.json")); v.Jobs[0].Error != 0 || v.Jobs[0].Read.IOBytes != acked*4096 {
		t.Errorf("fio verify read %d bytes (error %d), want %d", v.Jobs[0].Read.IOBytes, v.Jobs[0].Error, acked*4096)
	}
	neg := execTimeout(t, fioDir, 2*time.Minute, "fio", append(job, "--verify_only", fmt.Sprintf("--number_ios=%d", issued+1), "--output="+filepath.Join(fioDir, "negative.json"))...)
	if neg.code == 0 {
		t.Errorf("fio verify of %d writes, one more than were issued, passed: the verify pass proves nothing", issued+1)
	}
	e.must("losetup", "-d", loop)

	e.mustVhdsync("unmount", mp)
	d2.waitExit(30 * time.Second)
	e.mustVhdsync("verify", "--state", state)
	e.checkBlobIsImage(url, state, size)
}

// TestE2ESecondMount: one writer per blob and per state directory. A copy
// of the state directory (another writer for the same blob) is refused
// with exit 9 and the blob is untouched; the same state directory twice,
// and a busy mountpoint, are refused with exit 10.
func TestE2ESecondMount(t *testing.T) {
	e := newE2E(t, "cp")
	const size = 64 << 20
	url, state := e.createDisk("lease", 64)
	mpA := e.path("mntA")
	e.mount(state, mpA)
	data := map[int64][]byte{4 << 20: pattern("lease-a", 1<<20), size - 4096: pattern("lease-b", 4096)}
	writeAtSync(t, filepath.Join(mpA, "lease.img"), data)
	waitFor(t, 60*time.Second, "the journal to drain", func() (bool, error) {
		s, err := e.status(state)
		return err == nil && s.JournalRecords == 0 && s.RemoteSequence > 0 && s.RemoteSequence%2 == 0, err
	})
	checkBlobHas(t, url, data)
	before := getBlobState(t, url)
	if before.lease != "leased" {
		t.Fatalf("the mounted blob's lease state is %q", before.lease)
	}
	probes := map[int64]int64{0: 512, 4<<20 - 512: 4096, size - 4096: 4096, size: 512}
	snap := map[int64][]byte{}
	for off, n := range probes {
		snap[off] = blobRange(t, url, off, n)
	}

	var copies []string
	for i, leaseID := range []string{"", uuid.NewString()} {
		dir := e.mkdir(fmt.Sprintf("copy%d", i))
		copies = append(copies, dir)
		var st map[string]any
		b, err := os.ReadFile(filepath.Join(state, "vhdsync.json"))
		if err == nil {
			err = json.Unmarshal(b, &st)
		}
		if err != nil {
			t.Fatal(err)
		}
		if st["lease_id"] == "" || st["lease_id"] == nil {
			t.Fatalf("the mounted state directory records no lease id: %s", b)
		}
		st["lease_id"] = leaseID
		b, _ = json.MarshalIndent(st, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, "vhdsync.json"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		e.must("cp", "--sparse=always", filepath.Join(state, "disk.img"), filepath.Join(dir, "disk.img"))
		mpB := e.path(fmt.Sprintf("mntB%d", i))
		r := e.mountAttempt(dir, mpB, "--foreground=false")
		if r.code != ExitLeased || !strings.Contains(r.stderr, "lease") || !strings.Contains(r.stderr, "--break-lease") {
			t.Errorf("second writer (lease id %q): want exit %d naming the lease and --break-lease: %s", leaseID, ExitLeased, r)
		}
		if isMounted(mpB) {
			t.Errorf("a refused mount left %s mounted", mpB)
		}
		if s := e.mustStatus(dir); s.Mounted {
			t.Errorf("a refused mount left a daemon: %+v", s)
		}
	}

	// The same state directory twice, and the commands that need it alone.
	for _, cmd := range [][]string{{"verify", "--state", state}, {"replay", "--state", state}} {
		if r := e.vhdsync(cmd...); r.code != ExitBusy || !strings.Contains(r.stderr, mpA) {
			t.Errorf("%s while mounted: want exit %d naming %s: %s", cmd[0], ExitBusy, mpA, r)
		}
	}
	mpC := e.path("mntC")
	if r := e.mountAttempt(state, mpC); r.code != ExitBusy || !strings.Contains(r.stderr, "in use") || !strings.Contains(r.stderr, mpA) {
		t.Errorf("same state directory twice: want exit %d naming %s: %s", ExitBusy, mpA, r)
	}
	if isMounted(mpC) {
		t.Error("a refused mount left a mount")
	}
	// A busy mountpoint: a vhdsync mount, then any other mount.
	if r := e.mountAttempt(copies[0], mpA); r.code != ExitBusy || !strings.Contains(r.stderr, "already a vhdsync mount") {
		t.Errorf("mount on a vhdsync mount: want exit %d: %s", ExitBusy, r)
	}
	tmpfs := e.mkdir("tmpfs")
	e.mountFS("tmpfs", tmpfs, "-t", "tmpfs", "-o", "size=1m")
	if r := e.mountAttempt(copies[0], tmpfs); r.code != ExitBusy || !strings.Contains(r.stderr, "already mounted") {
		t.Errorf("mount on a tmpfs: want exit %d: %s", ExitBusy, r)
	}

	// The blob is untouched and the first mount still serves.
	after := getBlobState(t, url)
	if after != before {
		t.Errorf("the blob changed: %+v, then %+v", before, after)
	}
	for off, n := range probes {
		if got := blobRange(t, url, off, n); !bytes.Equal(got, snap[off]) {
			t.Errorf("the blob's %d bytes at %d changed", n, off)
		}
	}
	f, err := os.Open(filepath.Join(mpA, "lease.img"))
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	_, err = f.ReadAt(got, size-4096)
	f.Close()
	if err != nil || !bytes.Equal(got, data[size-4096]) {
		t.Errorf("the first mount no longer reads its data: %v", err)
	}
	e.mustVhdsync("unmount", mpA)
	if s := getBlobState(t, url); s.lease != "available" {
		t.Errorf("lease after unmount: %q", s.lease)
	}
}

// mountAttempt runs `vhdsync mount` expecting it may fail; a mount it
// makes anyway is cleaned up like any other.
func (e *e2e) mountAttempt(state, mp string, extra ...string) result {
	e.t.Helper()
	ensureDir(e.t, mp)
	d := &daemon{e: e, state: state, mp: mp}
	wasMounted := isMounted(mp)
	r := e.vhdsync(append(append([]string{"mount", "--state", state}, extra...), mp)...)
	if m := daemonPidRE.FindStringSubmatch(r.stdout); m != nil {
		d.pid, _ = strconv.Atoi(m[1])
	}
	if d.pid != 0 || (!wasMounted && isMounted(mp)) {
		e.t.Cleanup(d.cleanup)
	}
	return r
}

// unsyncedWrites writes chunks into file without fsync (the daemon runs
// with a long --linger, so they stay in the journal's open epoch) and
// checks that they are journaled but not yet on the blob.
func (e *e2e) unsyncedWrites(state, url, file string, chunks map[int64][]byte) {
	e.t.Helper()
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	offs := make([]int64, 0, len(chunks))
	for off, b := range chunks {
		if _, err := f.WriteAt(b, off); err != nil {
			e.t.Fatalf("write at %d: %v", off, err)
		}
		offs = append(offs, off)
	}
	if err := f.Close(); err != nil {
		e.t.Fatal(err)
	}
	s := e.mustStatus(state)
	if s.JournalRecords == 0 {
		e.t.Fatalf("the writes are not pending in the journal: %+v", s)
	}
	sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
	if got := blobRange(e.t, url, offs[0], int64(len(chunks[offs[0]]))); bytes.Equal(got, chunks[offs[0]]) {
		e.t.Fatal("the blob already holds an unsynced write: the drain below would prove nothing")
	}
	e.t.Logf("pending before the stop: %d records, %d bytes", s.JournalRecords, s.JournalBytes)
}

// TestE2EPlainUmountDrains: writes through the .img with a plain os.File,
// one batch fsync'ed, the rest acknowledged but never fsync'ed (a long
// --linger keeps them in the journal's open epoch), then a plain
// umount(2): the daemon drains the journal before it exits.
func TestE2EPlainUmountDrains(t *testing.T) {
	e := newE2E(t)
	const size = 64 << 20
	url, state := e.createDisk("plain", 64)
	mp := e.path("mnt")
	d := e.mount(state, mp, "--linger", "10m")
	data := map[int64][]byte{
		1 << 20:          pattern("plain-1", 3<<20),
		40<<20 + 512:     pattern("plain-2", 1536),
		size - 1<<20:     pattern("plain-3", 1<<20),
		17<<20 + 4096*3:  pattern("plain-4", 4096*5),
		23<<20 + 123*512: pattern("plain-5", 512),
	}
	synced := map[int64][]byte{30 << 20: pattern("plain-synced", 2<<20)}
	writeAtSync(t, filepath.Join(mp, "plain.img"), synced)
	e.unsyncedWrites(state, url, filepath.Join(mp, "plain.img"), data)

	if err := syscall.Unmount(mp, 0); err != nil {
		t.Fatalf("umount %s: %v", mp, err)
	}
	d.waitExit(60 * time.Second)
	if ls := readLastStop(t, state); !ls.Drained || ls.PendingRecords != 0 || ls.Error != "" {
		t.Errorf("last stop: %+v", ls)
	}
	checkBlobHas(t, url, data)
	checkBlobHas(t, url, synced)
	e.checkBlobIsImage(url, state, size)
	if s := getBlobState(t, url); s.lease != "available" || s.seq%2 != 0 {
		t.Errorf("blob after the drain: %+v", s)
	}
}

// TestE2ESigtermDrains: SIGTERM drains and unmounts; with a loop device
// attached the daemon keeps serving and says why, until the loop device is
// detached and `vhdsync unmount` stops it.
func TestE2ESigtermDrains(t *testing.T) {
	e := newE2E(t)
	const size = 64 << 20
	url, state := e.createDisk("term", 64)
	mp := e.path("mnt")
	img := filepath.Join(mp, "term.img")

	d := e.mount(state, mp, "--linger", "10m")
	data := map[int64][]byte{2 << 20: pattern("term-1", 2<<20), 50<<20 + 512: pattern("term-2", 3*512)}
	e.unsyncedWrites(state, url, img, data)
	if err := syscall.Kill(d.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	d.waitExit(60 * time.Second)
	if isMounted(mp) {
		t.Fatal("still mounted after SIGTERM")
	}
	if ls := readLastStop(t, state); !ls.Drained {
		t.Errorf("last stop: %+v", ls)
	}
	checkBlobHas(t, url, data)
	if s := getBlobState(t, url); s.lease != "available" {
		t.Errorf("lease after SIGTERM: %q", s.lease)
	}

	// With a loop device attached, SIGTERM drains but cannot unmount: the
	// daemon keeps serving and status names the loop device. (This mount
	// names its state directory relative to the working directory, as a
	// user may; unmount runs from elsewhere.)
	rel, err := filepath.Rel(e.dir, state)
	if err != nil {
		t.Fatal(err)
	}
	d = e.mount(rel, mp, "--linger", "10m")
	if m := mountpoints()[mp]; m.fstype != "fuse.vhdsync" || m.source != state {
		t.Errorf("the mount's source is %q (%s), want the absolute state directory %s", m.source, m.fstype, state)
	}
	loop := e.losetup(img)
	more := map[int64][]byte{8 << 20: pattern("term-3", 1<<20)}
	writeAtSync(t, loop, more)
	if err := syscall.Kill(d.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var s statusReport
	waitFor(t, 60*time.Second, "status to name the loop device", func() (bool, error) {
		var err error
		s, err = e.status(state)
		return err == nil && s.Mounted && s.Phase == "serving" && strings.Contains(s.Note, loop), err
	})
	t.Logf("status note after SIGTERM with %s attached: %s", loop, s.Note)
	if !d.alive() || !isMounted(mp) {
		t.Fatal("the daemon stopped although the loop device is attached")
	}
	if s.JournalRecords != 0 {
		t.Errorf("SIGTERM should have drained the journal: %d records left", s.JournalRecords)
	}
	checkBlobHas(t, url, more)
	// Still serving: the loop device reads and writes.
	evenMore := map[int64][]byte{9 << 20: pattern("term-4", 64<<10)}
	writeAtSync(t, loop, evenMore)
	lf, err := os.Open(loop)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	_, err = lf.ReadAt(got, 8<<20)
	lf.Close()
	if err != nil || !bytes.Equal(got, more[8<<20]) {
		t.Errorf("reading through the loop device after SIGTERM: %v", err)
	}
	if r := execTimeout(t, e.dir, time.Minute, e.bin, "status", "--state", state); !strings.Contains(r.stdout, loop) {
		t.Errorf("status does not name the loop device: %s", r)
	}

	e.must("losetup", "-d", loop)
	if r := execTimeout(t, "/", 2*time.Minute, e.bin, "unmount", mp); r.code != 0 {
		t.Fatalf("vhdsync unmount, run from /: %s", r)
	}
	d.waitExit(30 * time.Second)
	checkBlobHas(t, url, more)
	checkBlobHas(t, url, evenMore)
	checkBlobHas(t, url, data)
	e.checkBlobIsImage(url, state, size)
}

// TestE2ESecondSignalWhileBusy: the remote is gone, so a SIGTERM's drain
// cannot finish; a second SIGTERM stops the drain, but a loop device keeps
// the mount busy: the daemon keeps serving and says why (it used to block,
// deaf to signals, with status stuck at "draining"). Detached and
// unmounted, it keeps the journal for the next mount.
func TestE2ESecondSignalWhileBusy(t *testing.T) {
	e := newE2E(t)
	_, state := e.createDisk("busy", 64)
	mp := e.path("mnt")
	d := e.mount(state, mp)
	img := filepath.Join(mp, "busy.img")
	loop := e.losetup(img)
	e.az.Stop()
	data := map[int64][]byte{5 << 20: pattern("busy", 256<<10)}
	writeAtSync(t, loop, data)

	phase := func(want, note string) {
		t.Helper()
		waitFor(t, 30*time.Second, fmt.Sprintf("phase %q with a note naming %q", want, note), func() (bool, error) {
			s, err := e.status(state)
			if err == nil && s.Phase == want && strings.Contains(s.Note, note) {
				return true, nil
			}
			return false, fmt.Errorf("%v: phase %q, note %q", err, s.Phase, s.Note)
		})
	}
	if err := syscall.Kill(d.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	phase("draining", "signal")
	if err := syscall.Kill(d.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	phase("serving", loop)
	if !d.alive() || !isMounted(mp) {
		t.Fatal("the daemon stopped although the loop device is attached")
	}
	lf, err := os.Open(loop)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 256<<10)
	_, err = lf.ReadAt(got, 5<<20)
	lf.Close()
	if err != nil || !bytes.Equal(got, data[5<<20]) {
		t.Errorf("reading through the loop device after two signals: %v", err)
	}

	// Detached, unmount cannot drain (no remote): it gives up after its
	// timeout, the daemon keeps trying until a signal stops it with the
	// journal kept.
	e.must("losetup", "-d", loop)
	if r := e.vhdsync("unmount", "--timeout", "1s", mp); r.code != ExitNotDrained || !strings.Contains(r.stderr, "keeps draining") {
		t.Errorf("unmount without a remote: want exit %d: %s", ExitNotDrained, r)
	}
	if isMounted(mp) {
		t.Fatal("still mounted after vhdsync unmount")
	}
	if err := syscall.Kill(d.pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	d.waitExit(30 * time.Second)
	ls := readLastStop(t, state)
	if ls.Drained || ls.PendingRecords == 0 || ls.Error == "" {
		t.Errorf("last stop should keep the undrained journal: %+v", ls)
	}
	// Status without the remote: the report, and the exit code of an
	// unreachable endpoint, at once (no retries before any answer).
	start := time.Now()
	r := e.vhdsync("status", "--state", state)
	if r.code != ExitUnreachable || time.Since(start) > 5*time.Second || !strings.Contains(r.stderr, "could not reach") {
		t.Errorf("status with the remote gone: want exit %d within 5 s saying what could not be reached, got it in %v: %s", ExitUnreachable, time.Since(start).Round(time.Millisecond), r)
	}
	for _, want := range []string{"mounted:        no", fmt.Sprintf("journal:        %d records", ls.PendingRecords), "vhdsync replay", "blob sequence:  unknown", "last error:"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("status after the stop lacks %q:\n%s", want, r.stdout)
		}
	}
}
