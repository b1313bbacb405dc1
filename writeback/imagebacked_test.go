package writeback

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/bytediff"
	"github.com/vhdsync/vhdsync/remote"
)

// fill returns n bytes of b.
func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

// fillAt is a write of n bytes of b at off.
type fillAt struct {
	off int64
	n   int
	b   byte
}

// pendingDisk opens a disk of size bytes in dir whose remote is down until
// f.setDown(false): everything written stays pending.
func pendingDisk(t *testing.T, dir string, size int64) (*Disk, *remote.MemRemote, *remoteFault) {
	t.Helper()
	r := remote.NewMemRemote(size + 512)
	f := newRemoteFault()
	f.setDown(true)
	r.Fault = f.fault
	return newTestDisk(t, dir, size, r, DiskOptions{}), r, f
}

// writeFills makes the writes on d, in order.
func writeFills(t *testing.T, d *Disk, ws ...fillAt) {
	t.Helper()
	for _, w := range ws {
		if err := d.WriteAt(context.Background(), fill(w.n, w.b), w.off); err != nil {
			t.Fatal(err)
		}
	}
}

// drainAndCheck closes d with a drain, then wants the image to hold the
// writes ws (made in this order, over zeros) and the blob to equal it;
// what says what a difference in the image would mean.
func drainAndCheck(t *testing.T, d *Disk, dir string, r *remote.MemRemote, size int64, what string, ws ...fillAt) {
	t.Helper()
	if err := d.Close(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for _, w := range ws {
		copy(want[w.off:], fill(w.n, w.b))
	}
	img := readImage(t, dir)
	if i := bytediff.First(img, want); i >= 0 {
		t.Fatalf("image differs from the writes at byte %d (holds %d): %s", i, img[i], what)
	}
	if i := bytediff.First(r.Bytes()[:size], img); i >= 0 {
		t.Fatalf("blob differs from the image at byte %d", i)
	}
}

// TestImageBackedWritesOnceAndCaptures: a large write keeps its payload in
// the image only; a write over it once the flusher has claimed its epoch
// first copies it to the journal (a capture), so that each barrier's state
// still reaches the blob; the blob ends equal to the image.
func TestImageBackedWritesOnceAndCaptures(t *testing.T) {
	dir := t.TempDir()
	const size = 4 << 20
	d, r, f := pendingDisk(t, dir, size)
	t.Cleanup(func() { d.Close(context.Background(), false) })

	ws := []fillAt{{0, 1 << 20, 1}, {8192, 4096, 2}, {2 << 20, 256 << 10, 3}, {2<<20 + 64<<10, 128 << 10, 4}}
	writeFills(t, d, ws[0])
	st := d.Stats().Journal
	if st.ImageBacked != 1 || st.Captures != 0 {
		t.Fatalf("after one 1 MiB write: %d image-backed records, %d captures; want 1, 0", st.ImageBacked, st.Captures)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	// The flusher claims the closed epoch for a batch (it would at its
	// next plan; done here so the test does not race it), and a later
	// epoch writes into it: the first 1 MiB is captured whole.
	d.j.ClaimBatch(d.j.ClosedEpoch())
	writeFills(t, d, ws[1])
	st = d.Stats().Journal
	if st.ImageBacked != 0 || st.Captures != 1 || st.CapturedBytes != 1<<20 {
		t.Fatalf("after a write over it: %d image-backed, %d captures of %d bytes; want 0, 1, 1 MiB", st.ImageBacked, st.Captures, st.CapturedBytes)
	}
	// Two large writes in the open epoch, the second over the first:
	// the flusher has not claimed it, so the first is bound (written
	// once, its epoch tied to the second's) if the image-synced mark
	// covers it, else captured (the image never changes under an
	// uncaptured record it could lose); the second is written once.
	writeFills(t, d, ws[2], ws[3])
	st = d.Stats().Journal
	if st.Captures+st.Binds != 2 || st.ImageBacked != int64(1+st.Binds) {
		t.Fatalf("after two overlapping large writes: %d image-backed, %d captures, %d binds; want 1 image-backed and 1 capture more than binds, 2 captures and binds",
			st.ImageBacked, st.Captures, st.Binds)
	}
	f.setDown(false)
	drainAndCheck(t, d, dir, r, size, "a write lost", ws...)
}

// TestImageBackedTornByPowerLoss: an image-backed record whose bytes the
// image lost (a power loss before any barrier covered it) must not keep
// the older record under it from being re-applied. Y (4 KiB, in a
// segment) is acknowledged by a barrier; V, a later 128 KiB write over it,
// is not; the power loss takes both image writes (the image was never
// synced). Replay must restore Y, not leave the bytes from before Y.
func TestImageBackedTornByPowerLoss(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	d, r, f := pendingDisk(t, dir, size)
	lease := d.Stats().LeaseID
	y := fillAt{0, 4096, 7}
	writeFills(t, d, y)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	writeFills(t, d, fillAt{0, 128 << 10, 9})
	if got := d.Stats().Journal.ImageBacked; got != 1 {
		t.Fatalf("%d image-backed records, want 1", got)
	}
	if err := d.Close(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	// The power loss: the image never got either write.
	if err := os.WriteFile(filepath.Join(dir, "disk.img"), make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	f.setDown(false)
	d2 := newTestDisk(t, dir, size, r, DiskOptions{LeaseID: lease})
	t.Cleanup(func() { d2.Close(context.Background(), false) })
	if rp := d2.Replay(); rp.ImageBacked != 1 || rp.Torn != 1 {
		t.Fatalf("replay: %d image-backed, %d torn; want 1, 1", rp.ImageBacked, rp.Torn)
	}
	drainAndCheck(t, d2, dir, r, size, "the acknowledged 4 KiB write was not restored", y)
}

// TestImageBackedSurvivesKill: after kill -9 (page cache intact), replay
// captures the pending image-backed records as the image holds them, and
// a write over them afterwards is still sent in its own epoch.
func TestImageBackedSurvivesKill(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	d, r, f := pendingDisk(t, dir, size)
	lease := d.Stats().LeaseID
	ws := []fillAt{{0, 4096, 7}, {0, 128 << 10, 9}, {0, 64 << 10, 5}}
	writeFills(t, d, ws[0], ws[1])
	if err := d.Close(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	f.setDown(false)
	d2 := newTestDisk(t, dir, size, r, DiskOptions{LeaseID: lease})
	t.Cleanup(func() { d2.Close(context.Background(), false) })
	if rp := d2.Replay(); rp.ImageBacked != 1 || rp.Torn != 0 {
		t.Fatalf("replay: %d image-backed, %d torn; want 1, 0", rp.ImageBacked, rp.Torn)
	}
	if st := d2.Stats().Journal; st.ImageBacked != 0 {
		t.Fatalf("%d image-backed records left after the replay, want 0 (all captured)", st.ImageBacked)
	}
	writeFills(t, d2, ws[2])
	drainAndCheck(t, d2, dir, r, size, "a write lost", ws...)
}

// TestBoundRecordKeepsItsRangeAtReplay: Y (4 KiB at 100 KiB, in a
// segment) is acknowledged; V (128 KiB over it, image-backed) is written,
// and W (64 KiB at 0) goes over V in the same open epoch, bound, without a
// copy (journal/bind.go: V's bytes are synced to the image first, under
// the image-synced mark); the daemon dies. At replay V's bytes no longer
// match its CRC, but V is below the mark: W overwrote it, no power loss
// tore it. It must stay the winner of its range: re-applying Y over it,
// as for a torn record, would lose V's bytes at 100 KiB.
func TestBoundRecordKeepsItsRangeAtReplay(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	r := remote.NewMemRemote(size + 512)
	f := newRemoteFault()
	f.setDown(true)
	r.Fault = f.fault
	// Epochs close only at barriers: the flusher claims none but Y's.
	var o DiskOptions
	o.Flusher.Linger = time.Hour
	d := newTestDisk(t, dir, size, r, o)
	lease := d.Stats().LeaseID
	ws := []fillAt{{100 << 10, 4096, 7}, {0, 128 << 10, 9}, {0, 64 << 10, 5}}
	writeFills(t, d, ws[0])
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	writeFills(t, d, ws[1], ws[2])
	if st := d.Stats().Journal; st.Binds != 1 || st.Captures != 0 {
		t.Fatalf("%d binds, %d captures; want 1, 0", st.Binds, st.Captures)
	}
	if err := d.Close(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	f.setDown(false)
	d2 := newTestDisk(t, dir, size, r, DiskOptions{LeaseID: lease})
	t.Cleanup(func() { d2.Close(context.Background(), false) })
	if rp := d2.Replay(); rp.ImageBacked != 2 || rp.Torn != 0 || rp.Overwritten != 1 {
		t.Fatalf("replay: %d image-backed, %d torn, %d overwritten; want 2, 0, 1", rp.ImageBacked, rp.Torn, rp.Overwritten)
	}
	drainAndCheck(t, d2, dir, r, size, "the bound record lost its range to an older one", ws...)
}
