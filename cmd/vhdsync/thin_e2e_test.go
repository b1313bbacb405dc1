package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fillExt4 makes ext4 on the disk of state (mounted at mp as name.img),
// writes files of random data, and returns their sha256 by name. The disk
// is unmounted (drained) at the end.
func (e *e2e) fillExt4(state, name, mp string, files, sizeMiB int) map[string]string {
	e.t.Helper()
	d := e.mount(state, mp)
	loop := e.losetup(filepath.Join(mp, name+".img"))
	e.must("mkfs.ext4", "-q", "-E", "nodiscard", loop)
	fs := e.mkdir("fs-" + name)
	e.mountFS(loop, fs)
	sums := map[string]string{}
	for i := range files {
		p := filepath.Join(fs, fmt.Sprintf("f%d", i))
		e.must("dd", "if=/dev/urandom", "of="+p, "bs=1M", fmt.Sprintf("count=%d", sizeMiB), "status=none")
		sums[filepath.Base(p)] = fileSum(e.t, p)
	}
	umountFS(e.t, fs)
	detachLoop(e.t, loop, filepath.Join(mp, name+".img"))
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	return sums
}

func fileSum(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestE2EThinAttach: a thin attach of a blob holding ext4 with files is
// ready at once and reads nothing; the files read back correctly before
// any prefetch (each chunk fetched when first read); a file written then
// reaches the blob; an unmount keeps the lease while chunks are missing,
// and what a thin disk cannot do is refused; a mount with the prefetch
// completes the disk, after which the image and the blob are byte-equal
// and the lease is released.
func TestE2EThinAttach(t *testing.T) {
	e := newE2E(t, "mkfs.ext4", "dd")
	const size = 128 << 20
	url, srcState := e.createDisk("thinsrc", 128)
	sums := e.fillExt4(srcState, "thinsrc", e.path("mnt-src"), 4, 8)

	state := e.path("state-thin")
	// A crash between the lease and the state file loses the record of
	// the lease; the same command, rerun on the same directory (emptied),
	// takes it back.
	e.mustVhdsync("create", "--from-blob", url, "--state", state, "--thin")
	if err := os.RemoveAll(state); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	r := e.mustVhdsync("create", "--from-blob", url, "--state", state, "--thin")
	took := time.Since(start)
	if !strings.Contains(r.stdout, "created thin state directory") {
		t.Fatalf("create --thin said: %s", r)
	}
	img, err := os.Stat(filepath.Join(state, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	if used := img.Sys().(*syscall.Stat_t).Blocks * 512; img.Size() != size || used != 0 {
		t.Fatalf("the thin image is %d bytes with %d allocated, want %d and none", img.Size(), used, size)
	}
	if st := getBlobState(t, url); st.lease != "leased" {
		t.Fatalf("after create --thin the blob's lease is %q, want leased", st.lease)
	}
	s := e.mustStatus(state)
	if s.Thin == nil || s.Thin.PresentBytes != 0 || s.Thin.MissingChunks == 0 {
		t.Fatalf("status of the new thin disk: %+v", s.Thin)
	}
	t.Logf("create --thin: %v; %d bytes of data on the blob in %d chunks", took.Round(time.Millisecond), s.Thin.AllocatedBytes, s.Thin.MissingChunks)

	// What a thin disk refuses, before anything changes.
	if r := e.mountAttempt(state, e.path("mnt-x"), "--break-lease"); r.code != ExitUsage || !strings.Contains(r.stderr, "thin") {
		t.Errorf("mount --break-lease of a thin disk: want exit %d naming thin: %s", ExitUsage, r)
	}
	if r := e.vhdsync("resize", "--state", state, "--size", "256MiB"); r.code != ExitUsage || !strings.Contains(r.stderr, "thin") {
		t.Errorf("resize of a thin disk: want exit %d naming thin: %s", ExitUsage, r)
	}

	mp := e.path("mnt-thin")
	d := e.mount(state, mp, "--prefetch", "off")
	loop := e.losetup(filepath.Join(mp, "thinsrc.img"))
	fs := e.mkdir("fs-thin")
	e.mountFS(loop, fs)
	for n, want := range sums {
		if got := fileSum(t, filepath.Join(fs, n)); got != want {
			t.Errorf("%s read through the thin disk: sha256 %s, want %s", n, got, want)
		}
	}
	s = e.mustStatus(state)
	if s.Thin == nil || s.Thin.PrefetchChunks != 0 || s.Thin.DemandChunks == 0 {
		t.Fatalf("the reads should have fetched chunks themselves, with no prefetch: %+v", s.Thin)
	}
	t.Logf("read %d files through the thin disk: %d chunks fetched on demand (%d bytes, %d requests, waited %.2f s), %d still missing",
		len(sums), s.Thin.DemandChunks, s.Thin.FetchedBytes, s.Thin.FetchRequests, s.Thin.DemandWaitSeconds, s.Thin.MissingChunks)
	e.must("dd", "if=/dev/urandom", "of="+filepath.Join(fs, "new"), "bs=1M", "count=4", "status=none", "conv=fsync")
	sums["new"] = fileSum(t, filepath.Join(fs, "new"))
	umountFS(t, fs)
	detachLoop(t, loop, filepath.Join(mp, "thinsrc.img"))
	r = e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	if s := e.mustStatus(state); s.Thin != nil && s.Thin.MissingChunks > 0 {
		if !strings.Contains(r.stdout, "lease kept") || getBlobState(t, url).lease != "leased" {
			t.Errorf("unmount of a thin disk with %d chunks missing must keep the lease: %s (blob lease %q)", s.Thin.MissingChunks, r, getBlobState(t, url).lease)
		}
	} else {
		t.Fatalf("the disk completed without a prefetch; the test needs chunks left: %+v", s.Thin)
	}
	// Verify compares what is local.
	if r := e.mustVhdsync("verify", "--state", state); !strings.Contains(r.stdout, "not local yet, not compared") {
		t.Errorf("verify of a thin disk should say what it did not compare: %s", r)
	}

	// The prefetch completes the disk.
	d = e.mount(state, mp)
	// Complete: the state says so, and the thin record is gone.
	waitFor(t, 2*time.Minute, "the prefetch to complete the disk", func() (bool, error) {
		b, err := os.ReadFile(filepath.Join(state, "vhdsync.json"))
		if err != nil || strings.Contains(string(b), `"thin": true`) {
			return false, err
		}
		for _, f := range []string{"thin.ranges", "thin.present"} {
			if _, err := os.Stat(filepath.Join(state, f)); err == nil {
				return false, nil
			}
		}
		return true, nil
	})
	loop = e.losetup(filepath.Join(mp, "thinsrc.img"))
	e.mountFS(loop, fs)
	for n, want := range sums {
		if got := fileSum(t, filepath.Join(fs, n)); got != want {
			t.Errorf("%s after the prefetch: sha256 %s, want %s", n, got, want)
		}
	}
	umountFS(t, fs)
	e.must("e2fsck", "-fn", loop)
	detachLoop(t, loop, filepath.Join(mp, "thinsrc.img"))
	r = e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	if !strings.Contains(r.stdout, "lease released") || getBlobState(t, url).lease == "leased" {
		t.Errorf("unmount of a complete disk must release the lease: %s", r)
	}
	e.mustVhdsync("verify", "--state", state)
	e.checkBlobIsImage(url, state, size)
}

// TestE2EThinKill9: a thin disk is killed with SIGKILL while its prefetch
// runs (capped, so that chunks are still missing) and fio writes O_SYNC
// blocks with verify headers through a loop device, several times over.
// After each kill the disk is mounted again (the journal replayed, the
// prefetch resumed): the data the blob held when attached (fio verify
// headers of its own job) and every write fio saw acknowledged in every
// cycle (into chunks the blob held data in) read back intact; at the end the disk completes and the blob
// equals the image.
func TestE2EThinKill9(t *testing.T) {
	e := newE2E(t, "fio")
	const size = 96 << 20
	cycles := 3
	url, srcState := e.createDisk("thinkill", 96)
	fioDir := e.mkdir("fio")
	// The attached data: 32 MiB of fio blocks with verify headers.
	base := func(dev string) []string {
		return []string{"--name=base", "--filename=" + dev, "--rw=write", "--bs=64k", "--size=32M", "--direct=1",
			"--verify=crc32c", "--ioengine=psync", "--output-format=json"}
	}
	mp := e.path("mnt")
	d := e.mount(srcState, mp)
	loop := e.losetup(filepath.Join(mp, "thinkill.img"))
	if r := execTimeout(t, fioDir, 2*time.Minute, "fio", append(base(loop), "--do_verify=0", "--output="+filepath.Join(fioDir, "base.json"))...); r.code != 0 {
		t.Fatalf("fio base: %s", r)
	}
	// Data under the cycles' writes too: each of their chunks must be
	// fetched before a write touches it, and never fetched over it.
	if r := execTimeout(t, fioDir, 2*time.Minute, "fio", "--name=under", "--filename="+loop, "--rw=write", "--bs=1M", "--offset=32M", "--size=32M", "--direct=1", "--ioengine=psync"); r.code != 0 {
		t.Fatalf("fio under: %s", r)
	}
	detachLoop(t, loop, filepath.Join(mp, "thinkill.img"))
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)

	state := e.path("state-thin")
	e.mustVhdsync("create", "--from-blob", url, "--state", state, "--thin")
	// Cycle i writes 8 MiB at 32 MiB + i*8 MiB, over data the blob held.
	cycleJob := func(dev string, i int) []string {
		return []string{"--name=c", "--filename=" + dev, "--rw=randwrite", "--bs=4k", fmt.Sprintf("--offset=%d", 32<<20+i*(8<<20)), "--size=8M",
			"--direct=1", "--sync=1", "--verify=crc32c", "--ioengine=psync", "--randrepeat=1", fmt.Sprintf("--randseed=%d", 100+i), "--output-format=json"}
	}
	acked := make([]int64, cycles)
	for i := range cycles {
		d := e.mount(state, mp, "--prefetch", "1")
		loop := e.losetup(filepath.Join(mp, "thinkill.img"))
		w := e.startBackground(fioDir, fmt.Sprintf("fio-%d.log", i), "fio", append(cycleJob(loop, i), "--do_verify=0", fmt.Sprintf("--output=%s/c%d.json", fioDir, i))...)
		const minWrites = 300
		var before statusReport
		waitFor(t, 90*time.Second, fmt.Sprintf("fio to write %d blocks", minWrites), func() (bool, error) {
			if w.exited() {
				t.Fatalf("fio ended before the kill: %v", w.err)
			}
			s, err := e.status(state)
			before = s
			return err == nil && s.FuseWrites >= minWrites, err
		})
		if before.Thin == nil || before.Thin.MissingChunks == 0 {
			t.Fatalf("cycle %d: the prefetch finished before the kill (capped at 1 MiB/s): %+v", i, before.Thin)
		}
		if err := syscall.Kill(d.pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		d.waitExit(10 * time.Second)
		waitFor(t, 60*time.Second, "fio to fail", func() (bool, error) { return w.exited(), nil })
		acked[i] = readFioJSON(t, fmt.Sprintf("%s/c%d.json", fioDir, i)).Jobs[0].Write.IOBytes / 4096
		t.Logf("cycle %d: killed with %d of %d chunks missing (%d fetched by reads and writes, %d by the prefetch); fio had %d writes acknowledged",
			i, before.Thin.MissingChunks, before.Thin.MissingChunks+before.Thin.PrefetchChunks+before.Thin.DemandChunks, before.Thin.DemandChunks, before.Thin.PrefetchChunks, acked[i])
		detachLoop(t, loop, filepath.Join(mp, "thinkill.img"))
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
			t.Fatalf("umount -l %s: %v", mp, err)
		}
	}

	// Mounted again after the last kill: everything reads back.
	d = e.mount(state, mp, "--prefetch", "off")
	loop = e.losetup(filepath.Join(mp, "thinkill.img"))
	if r := execTimeout(t, fioDir, 2*time.Minute, "fio", append(base(loop), "--verify_only", "--output="+filepath.Join(fioDir, "base-verify.json"))...); r.code != 0 {
		t.Fatalf("fio verify of the data the blob held when attached: %s", r)
	}
	for i := range cycles {
		r := execTimeout(t, fioDir, 2*time.Minute, "fio", append(cycleJob(loop, i), "--verify_only", fmt.Sprintf("--number_ios=%d", acked[i]), fmt.Sprintf("--output=%s/v%d.json", fioDir, i))...)
		if r.code != 0 {
			t.Fatalf("fio verify of cycle %d's %d acknowledged writes: %s", i, acked[i], r)
		}
	}
	detachLoop(t, loop, filepath.Join(mp, "thinkill.img"))
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	// The prefetch completes the disk (if the verify's reads did not
	// already); then blob and image are equal.
	d = e.mount(state, mp)
	waitFor(t, 2*time.Minute, "the disk to complete", func() (bool, error) {
		b, err := os.ReadFile(filepath.Join(state, "vhdsync.json"))
		return err == nil && !strings.Contains(string(b), `"thin": true`), err
	})
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	e.mustVhdsync("verify", "--state", state)
	e.checkBlobIsImage(url, state, size)
}
