package writeback

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/thin"
)

const mib = 1 << 20

// thinFixture is a blob holding data in some chunks and a thin state
// directory for it: an empty image and the thin record.
type thinFixture struct {
	dir    string
	size   int64
	r      *remote.MemRemote
	orig   []byte // the blob's data region when attached
	ranges []thin.Range
	lease  string // held across opens, as the state directory keeps it
}

func newThinFixture(t *testing.T) *thinFixture {
	t.Helper()
	const size = 32 * mib
	ranges := []thin.Range{{Off: 4 * mib, End: 4*mib + 8192}, {Off: 6 * mib, End: 9 * mib}, {Off: 20 * mib, End: 20*mib + 4096}, {Off: 31 * mib, End: 32 * mib}}
	r := remote.NewMemRemote(size + 512)
	rng := rand.New(rand.NewPCG(3, 4))
	for _, rg := range ranges {
		for off := rg.Off; off < rg.End; off += remote.MaxPutPage {
			p := make([]byte, min(rg.End-off, remote.MaxPutPage))
			for i := range p {
				p[i] = byte(1 + rng.IntN(255))
			}
			if err := r.PutPages(context.Background(), off, remote.Pages{p}, remote.Cond{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	dir := t.TempDir()
	if err := thin.Create(dir, size, 0, ranges); err != nil {
		t.Fatal(err)
	}
	return &thinFixture{dir: dir, size: size, r: r, orig: r.Bytes()[:size], ranges: ranges}
}

// open opens the thin disk; completed counts OnThinComplete calls.
func (f *thinFixture) open(t *testing.T, prefetch bool, completed *atomic.Int32) (*Disk, *thin.Map) {
	t.Helper()
	m, err := thin.Open(f.dir, f.size)
	if err != nil {
		t.Fatal(err)
	}
	o := DiskOptions{Thin: m, ThinSource: f.r, NoPrefetch: !prefetch, LeaseID: f.lease}
	o.OnThinComplete = func() error { completed.Add(1); return nil }
	d := newTestDisk(t, f.dir, f.size, f.r, o)
	f.lease = d.Stats().LeaseID
	return d, m
}

func TestThinDiskServesTheBlobAndKeepsWrites(t *testing.T) {
	ctx := context.Background()
	f := newThinFixture(t)
	var completed atomic.Int32
	d, m := f.open(t, false, &completed)

	// A read of a chunk not local returns the blob's data.
	got := make([]byte, 2*mib)
	if _, err := d.ReadAt(got, 6*mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, f.orig[6*mib:8*mib]) {
		t.Fatal("read of a chunk not local differs from the blob")
	}
	// A write into a chunk not local: the chunk is fetched first, so the
	// rest of it keeps the blob's data, and a later fetch cannot overwrite
	// the write. The blob refuses writes meanwhile, so that it cannot
	// hand the write back to such a fetch.
	var away atomic.Bool
	away.Store(true)
	f.r.Fault = func(op string, off, n int64) (bool, error) {
		if away.Load() {
			return false, &remote.TransientError{Msg: "away"}
		}
		return true, nil
	}
	w := bytes.Repeat([]byte{0xAB}, 1000)
	if err := d.WriteAt(ctx, w, 20*mib+100); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), f.orig[20*mib:24*mib]...)
	copy(want[100:], w)
	got = make([]byte, 4*mib)
	if _, err := d.ReadAt(got, 20*mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("a write into a chunk not local lost the chunk's other data")
	}
	// The flusher's fills never read a chunk not local.
	wt := d.Watch()
	if _, ok, err := wt.ReadClean(31*mib, make([]byte, 4096)); err != nil || ok {
		t.Fatalf("ReadClean of a chunk not local: ok %v err %v", ok, err)
	}
	wt.Stop()
	away.Store(false)
	if err := d.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	blob := f.r.Bytes()[:f.size]
	for c := int64(0); c < f.size; c += thin.ChunkSize {
		if m.Present(c, c+thin.ChunkSize) {
			if !bytes.Equal(blob[c:c+thin.ChunkSize], readImage(t, f.dir)[c:c+thin.ChunkSize]) {
				t.Fatalf("chunk at %d: blob differs from the image", c)
			}
		} else if !bytes.Equal(blob[c:c+thin.ChunkSize], f.orig[c:c+thin.ChunkSize]) {
			t.Fatalf("chunk at %d, not local, changed on the blob", c)
		}
	}
	if m.Present(31*mib, 32*mib) {
		t.Fatal("the last chunk was fetched without a read or prefetch")
	}
	// Not complete: the lease stays with the state directory.
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	if f.r.Lease() == "" {
		t.Fatal("a thin disk released the lease before every chunk was local")
	}
	if completed.Load() != 0 {
		t.Fatal("completed without every chunk")
	}

	// The next mount prefetches the rest and completes; the image and the
	// blob are then byte-equal, and the lease goes at close.
	d2, m2 := f.open(t, true, &completed)
	<-m2.Done()
	if err := d2.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	if completed.Load() != 1 {
		t.Fatalf("OnThinComplete ran %d times, want 1", completed.Load())
	}
	if !bytes.Equal(readImage(t, f.dir), f.r.Bytes()[:f.size]) {
		t.Fatal("image and blob differ after the prefetch")
	}
	if f.r.Lease() != "" {
		t.Fatal("lease kept after the disk became complete")
	}
	if !bytes.Equal(readImage(t, f.dir)[20*mib+100:20*mib+1100], w) {
		t.Fatal("the write was lost")
	}
}

// A crash after a write into a fetched chunk: the next open replays the
// write and does not fetch the chunk again over it.
func TestThinDiskCrashAfterWrite(t *testing.T) {
	ctx := context.Background()
	f := newThinFixture(t)
	var completed atomic.Int32
	// The blob refuses every write, so the write stays in the journal.
	f.r.Fault = func(op string, off, n int64) (bool, error) {
		return false, &remote.TransientError{Msg: "away"}
	}
	d, _ := f.open(t, false, &completed)
	w := bytes.Repeat([]byte{0xCD}, 4096)
	if err := d.WriteAt(ctx, w, 7*mib); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	// The crash: the daemon stops without draining, and the image loses
	// the write (as if never written back); only the journal has it.
	if err := d.Close(ctx, false); err != nil {
		t.Fatal(err)
	}
	img, err := os.OpenFile(filepath.Join(f.dir, "disk.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(f.orig[7*mib:7*mib+4096], 7*mib); err != nil {
		t.Fatal(err)
	}
	img.Close()
	f.r.Fault = nil
	d2, m2 := f.open(t, false, &completed)
	if !m2.Present(4*mib, 8*mib) {
		t.Fatal("the fetched chunk is not present after the crash")
	}
	got := make([]byte, 4096)
	if _, err := d2.ReadAt(got, 7*mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, w) {
		t.Fatal("the acknowledged write was lost: the chunk was fetched again over it, or not replayed")
	}
	if err := d2.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.r.Bytes()[7*mib:7*mib+4096], w) {
		t.Fatal("the blob lacks the write after the drain")
	}
	if err := d2.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
}

// A blob another writer moved on since the state directory took it is
// refused, and the lease just taken is given back; within what the
// journal wrote or the recorded base, it is not; without a base nothing
// is checked.
func TestBlobMovedOnRefused(t *testing.T) {
	ctx := context.Background()
	const size = 8 * mib
	r := remote.NewMemRemote(size + 512)
	dir := t.TempDir()
	base := int64(0)
	d := newTestDisk(t, dir, size, r, DiskOptions{BaseSequence: &base})
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	mine, _ := r.Sequence(ctx)
	// Reopened as is: the blob holds only this directory's epochs.
	d = newTestDisk(t, dir, size, r, DiskOptions{BaseSequence: &base})
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	// Another writer sends a later epoch.
	if err := r.RaiseSequence(ctx, mine+10, ""); err != nil {
		t.Fatal(err)
	}
	o := DiskOptions{BaseSequence: &base, ImagePath: filepath.Join(dir, "disk.img"), JournalDir: filepath.Join(dir, "journal"), VirtualSize: size, Remote: r}
	if _, err := Open(ctx, o); !errors.Is(err, ErrBlobMoved) {
		t.Fatalf("open after another writer: %v, want ErrBlobMoved", err)
	}
	if r.Lease() != "" {
		t.Fatal("the lease taken by the refused open was kept")
	}
	// A base at the other writer's mark (a resync) lets it open.
	moved := mine + 10
	d = newTestDisk(t, dir, size, r, DiskOptions{BaseSequence: &moved})
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := r.RaiseSequence(ctx, mine+20, ""); err != nil {
		t.Fatal(err)
	}
	// Without a base (an older state directory), nothing is checked.
	d = newTestDisk(t, dir, size, r, DiskOptions{})
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
}
