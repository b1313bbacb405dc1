package writeback

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdsync/vhdsync/internal/bytediff"
	"github.com/vhdsync/vhdsync/remote"
)

// fill returns n bytes of b.
func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

// TestImageBackedWritesOnceAndCaptures: a large write keeps its payload in
// the image only; a write over it, of the same or a later epoch, first
// copies it to the journal (a capture), so that each barrier's state
// still reaches the blob; the blob ends equal to the image.
func TestImageBackedWritesOnceAndCaptures(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 4 << 20
	r := remote.NewMemRemote(size + 512)
	f := newRemoteFault()
	f.setDown(true) // everything stays pending until the end
	r.Fault = f.fault
	d := newTestDisk(t, dir, size, r, DiskOptions{})
	t.Cleanup(func() { d.Close(ctx, false) })

	if err := d.WriteAt(ctx, fill(1<<20, 1), 0); err != nil {
		t.Fatal(err)
	}
	st := d.Stats().Journal
	if st.ImageBacked != 1 || st.Captures != 0 {
		t.Fatalf("after one 1 MiB write: %d image-backed records, %d captures; want 1, 0", st.ImageBacked, st.Captures)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	// A later epoch writes into it: the first 1 MiB is captured whole.
	if err := d.WriteAt(ctx, fill(4096, 2), 8192); err != nil {
		t.Fatal(err)
	}
	st = d.Stats().Journal
	if st.ImageBacked != 0 || st.Captures != 1 || st.CapturedBytes != 1<<20 {
		t.Fatalf("after a write over it: %d image-backed, %d captures of %d bytes; want 0, 1, 1 MiB", st.ImageBacked, st.Captures, st.CapturedBytes)
	}
	// Two large writes in one epoch, the second over the first: the
	// first is captured as well (the image never changes under an
	// uncaptured record), and the second, over pending large data, goes
	// to a segment.
	if err := d.WriteAt(ctx, fill(256<<10, 3), 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, fill(128<<10, 4), 2<<20+64<<10); err != nil {
		t.Fatal(err)
	}
	st = d.Stats().Journal
	if st.ImageBacked != 0 || st.Captures != 2 {
		t.Fatalf("after two overlapping large writes: %d image-backed, %d captures; want 0, 2", st.ImageBacked, st.Captures)
	}
	f.setDown(false)
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	img := readImage(t, dir)
	if i := bytediff.First(r.Bytes()[:size], img); i >= 0 {
		t.Fatalf("blob differs from the image at byte %d", i)
	}
	want := make([]byte, size)
	copy(want, fill(1<<20, 1))
	copy(want[8192:], fill(4096, 2))
	copy(want[2<<20:], fill(256<<10, 3))
	copy(want[2<<20+64<<10:], fill(128<<10, 4))
	if i := bytediff.First(img, want); i >= 0 {
		t.Fatalf("image differs from the writes at byte %d", i)
	}
}

// TestImageBackedTornByPowerLoss: an image-backed record whose bytes the
// image lost (a power loss before any barrier covered it) must not keep
// the older record under it from being re-applied. Y (4 KiB, in a
// segment) is acknowledged by a barrier; V, a later 128 KiB write over it,
// is not; the power loss takes both image writes (the image was never
// synced). Replay must restore Y, not leave the bytes from before Y.
func TestImageBackedTornByPowerLoss(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 1 << 20
	r := remote.NewMemRemote(size + 512)
	f := newRemoteFault()
	f.setDown(true)
	r.Fault = f.fault
	d := newTestDisk(t, dir, size, r, DiskOptions{})
	lease := d.Stats().LeaseID
	if err := d.WriteAt(ctx, fill(4096, 7), 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, fill(128<<10, 9), 0); err != nil {
		t.Fatal(err)
	}
	if got := d.Stats().Journal.ImageBacked; got != 1 {
		t.Fatalf("%d image-backed records, want 1", got)
	}
	if err := d.Close(ctx, false); err != nil {
		t.Fatal(err)
	}
	// The power loss: the image never got either write.
	if err := os.WriteFile(filepath.Join(dir, "disk.img"), make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	f.setDown(false)
	d2 := newTestDisk(t, dir, size, r, DiskOptions{LeaseID: lease})
	t.Cleanup(func() { d2.Close(ctx, false) })
	if rp := d2.Replay(); rp.ImageBacked != 1 || rp.Torn != 1 {
		t.Fatalf("replay: %d image-backed, %d torn; want 1, 1", rp.ImageBacked, rp.Torn)
	}
	if err := d2.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want, fill(4096, 7))
	img := readImage(t, dir)
	if i := bytediff.First(img, want); i >= 0 {
		t.Fatalf("image after replay differs at byte %d (got %d): the acknowledged 4 KiB write was not restored", i, img[i])
	}
	if i := bytediff.First(r.Bytes()[:size], img); i >= 0 {
		t.Fatalf("blob differs from the image at byte %d", i)
	}
}

// TestImageBackedSurvivesKill: after kill -9 (page cache intact), replay
// captures the pending image-backed records as the image holds them, and
// a write over them afterwards is still sent in its own epoch.
func TestImageBackedSurvivesKill(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 1 << 20
	r := remote.NewMemRemote(size + 512)
	f := newRemoteFault()
	f.setDown(true)
	r.Fault = f.fault
	d := newTestDisk(t, dir, size, r, DiskOptions{})
	lease := d.Stats().LeaseID
	if err := d.WriteAt(ctx, fill(4096, 7), 0); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, fill(128<<10, 9), 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(ctx, false); err != nil {
		t.Fatal(err)
	}
	f.setDown(false)
	d2 := newTestDisk(t, dir, size, r, DiskOptions{LeaseID: lease})
	t.Cleanup(func() { d2.Close(ctx, false) })
	if rp := d2.Replay(); rp.ImageBacked != 1 || rp.Torn != 0 {
		t.Fatalf("replay: %d image-backed, %d torn; want 1, 0", rp.ImageBacked, rp.Torn)
	}
	if st := d2.Stats().Journal; st.ImageBacked != 0 {
		t.Fatalf("%d image-backed records left after the replay, want 0 (all captured)", st.ImageBacked)
	}
	if err := d2.WriteAt(ctx, fill(64<<10, 5), 0); err != nil {
		t.Fatal(err)
	}
	if err := d2.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want, fill(128<<10, 9))
	copy(want, fill(64<<10, 5))
	img := readImage(t, dir)
	if i := bytediff.First(img, want); i >= 0 {
		t.Fatalf("image differs at byte %d", i)
	}
	if i := bytediff.First(r.Bytes()[:size], img); i >= 0 {
		t.Fatalf("blob differs from the image at byte %d", i)
	}
}
