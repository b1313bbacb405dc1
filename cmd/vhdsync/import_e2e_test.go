package main

import (
	"os"
	"path/filepath"
	"testing"
)

// TestE2EImportMountWrite: a qemu-made dynamic VHD imported with the real
// binary, mounted, written through the .img view (over imported data,
// across the rounded-up tail), unmounted: verify passes, the blob is the
// local image byte for byte, and the image is the source plus the writes.
func TestE2EImportMountWrite(t *testing.T) {
	e := newE2E(t, "qemu-img", "qemu-io")
	src := e.path("src.vhd")
	qemuDynamic(t, src)
	url, state := e.az.BlobURL("disks", "imp.vhd"), e.path("state")
	e.mustVhdsync("import", "--blob", url, "--state", state, "--create-container", src)

	const size = 269484032 // 268886016 rounded up to 257 MiB
	mp := e.path("mnt")
	e.mount(state, mp)
	chunks := map[int64][]byte{
		1 << 20:     pattern("over imported data", 64<<10),
		50 << 20:    pattern("new data", 1<<20),
		size - 8192: pattern("in the rounded-up tail", 8192),
	}
	writeAtSync(t, filepath.Join(mp, "imp.img"), chunks)
	e.mustVhdsync("unmount", mp)
	e.mustVhdsync("verify", "--state", state)
	e.checkBlobIsImage(url, state, size)

	// The expected disk: the source as raw, rounded up, plus the writes.
	want := e.path("want.raw")
	e.must("qemu-img", "convert", "-f", "vpc", "-O", "raw", src, want)
	if err := os.Truncate(want, size); err != nil {
		t.Fatal(err)
	}
	writeAtSync(t, want, chunks)
	e.must("qemu-img", "compare", "-f", "raw", "-F", "raw", want, filepath.Join(state, "disk.img"))
}
