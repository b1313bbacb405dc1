package writeback

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// resizeRemote is a MemRemote holding a fixed VHD of size bytes whose
// every even mark is checked: the blob must then end with a valid footer
// of its own length (the disk at some barrier), never a footerless end or
// a footer of another size.
func resizeRemote(t *testing.T, size int64) (*remote.MemRemote, vhdlayer.Footer, *atomic.Int64) {
	t.Helper()
	r := remote.NewMemRemote(size + vhdlayer.FooterSize)
	f := vhdlayer.NewFixedFooter(uint64(size), time.Now())
	raw := f.Encode()
	if err := r.PutPages(context.Background(), size, remote.Pages{raw[:]}, remote.Cond{}); err != nil {
		t.Fatal(err)
	}
	var bad atomic.Int64
	r.Observe = func(data []byte, seq int64) {
		if seq%2 != 0 {
			return
		}
		n := int64(len(data)) - vhdlayer.FooterSize
		got, err := vhdlayer.DecodeFooter(data[n:])
		if err != nil || int64(got.CurrentSize) != n || got.UniqueID != f.UniqueID {
			bad.Add(1)
		}
	}
	return r, f, &bad
}

// TestResizeWhileWriting grows a disk with writers busy on it, then
// shrinks it: every even mark on the blob is a valid fixed VHD of the
// blob's length, writers never fail, writes beyond the old end land once
// the disk is grown, and after the drain the blob is the image plus the
// new footer.
func TestResizeWhileWriting(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const small, big, mid = 8 << 20, 24 << 20, 16 << 20
	r, f, bad := resizeRemote(t, small)
	d := newTestDisk(t, dir, small, r, DiskOptions{})

	var stop atomic.Bool
	var wg sync.WaitGroup
	var writes atomic.Int64
	busy := make(chan struct{})
	var busyOnce sync.Once
	errc := make(chan error, 4)
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for !stop.Load() {
				p := bytes.Repeat([]byte{byte(1 + rng.IntN(250))}, 512*(1+rng.IntN(64)))
				off := rng.Int64N(small-int64(len(p))) &^ 511
				if err := d.WriteAt(ctx, p, off); err != nil {
					errc <- err
					return
				}
				if rng.IntN(8) == 0 {
					if err := d.Flush(); err != nil {
						errc <- err
						return
					}
				}
				if writes.Add(1) == 200 {
					busyOnce.Do(func() { close(busy) })
				}
			}
		}()
	}
	// Let the writers get going, so that the resize finds a busy journal.
	<-busy
	grown := f.Resized(big).Encode()
	var began uint64
	var resized atomic.Int64
	st, err := d.Resize(ctx, ResizeOptions{
		Size: big, Footer: grown,
		Begin:   func(e uint64) error { began = e; return nil },
		Resized: func(n int64) { resized.Store(n) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if st.Epoch == 0 || began != st.Epoch || resized.Load() != big || d.Size() != big {
		t.Fatalf("resize stats %+v, began %d, views told %d, size %d", st, began, resized.Load(), d.Size())
	}
	t.Logf("grown while writing: writers held %v (drain %v, change %v), whole resize %v, %d writes so far", st.Held, st.HeldDrain, st.Changed, st.Total, writes.Load())
	// The new region takes writes.
	tail := bytes.Repeat([]byte{0xab}, 1<<20)
	if err := d.WriteAt(ctx, tail, big-int64(len(tail))); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, []byte{1}, small-1); err != nil {
		t.Fatal(err)
	}
	stop.Store(true)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatalf("a writer failed during the resize: %v", err)
	}
	if err := d.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	checkBlobIsDisk(t, dir, r, big, grown)

	// Shrink: refused without Shrink, done with it.
	shrunk := f.Resized(mid).Encode()
	if _, err := d.Resize(ctx, ResizeOptions{Size: mid, Footer: shrunk}); !errors.Is(err, ErrResizeRefused) {
		t.Fatalf("a shrink without Shrink: %v", err)
	}
	if _, err := d.Resize(ctx, ResizeOptions{Size: mid, Footer: shrunk, Shrink: true}); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, []byte{1}, mid); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("a write beyond the shrunk end: %v", err)
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	checkBlobIsDisk(t, dir, r, mid, shrunk)
	if n := bad.Load(); n > 0 {
		t.Fatalf("%d even marks found the blob without a valid footer of its size", n)
	}
	t.Logf("calls %v", r.Calls)
}

// checkBlobIsDisk: the blob is the image followed by footer, and even.
func checkBlobIsDisk(t *testing.T, dir string, r *remote.MemRemote, size int64, footer [vhdlayer.FooterSize]byte) {
	t.Helper()
	img := readImage(t, dir)
	blob := r.Bytes()
	if int64(len(img)) != size || int64(len(blob)) != size+vhdlayer.FooterSize {
		t.Fatalf("image %d bytes, blob %d bytes, want %d and %d", len(img), len(blob), size, size+vhdlayer.FooterSize)
	}
	if i := firstDiff(img, blob[:size]); i >= 0 {
		t.Fatalf("blob differs from the image at byte %d", i)
	}
	if !bytes.Equal(blob[size:], footer[:]) {
		t.Fatal("the blob does not end with the new footer")
	}
	if seq, _ := r.Sequence(context.Background()); seq%2 != 0 {
		t.Fatalf("sequence number %d is odd after the drain", seq)
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestResizeCutShort: a resize that fails at the blob's new footer leaves
// the blob odd, the flusher stopped (nothing may mark the blob even
// again) and the writes after it in the journal; FinishResize with the
// recorded intent completes it, and the disk opened at the new size sends
// those writes after it.
func TestResizeCutShort(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const small, big = 8 << 20, 12 << 20
	r, f, bad := resizeRemote(t, small)
	d := newTestDisk(t, dir, small, r, DiskOptions{})
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{7}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	grown := f.Resized(big).Encode()
	refuse := errors.New("refused for the test")
	r.Fault = func(op string, off, n int64) (bool, error) {
		if op == "put" && off == big {
			return false, refuse
		}
		return true, nil
	}
	var epoch uint64
	_, err := d.Resize(ctx, ResizeOptions{Size: big, Footer: grown, Begin: func(e uint64) error { epoch = e; return nil }})
	if err == nil || !errors.Is(err, refuse) {
		t.Fatalf("resize with its footer refused: %v", err)
	}
	if seq, _ := r.Sequence(ctx); seq%2 == 0 {
		t.Fatalf("the blob is even (%d) after a resize cut short", seq)
	}
	// Writes go on at the old size, into the journal only.
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{9}, 4096), 8192); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(ctx, true); err == nil {
		t.Fatal("a disk whose resize was cut short drained")
	}
	r.Fault = nil
	lease := r.Lease()
	if err := FinishResize(ctx, r, lease, small, big, epoch, grown, filepath.Join(dir, "disk.img")); err != nil {
		t.Fatal(err)
	}
	d2 := newTestDisk(t, dir, big, r, DiskOptions{LeaseID: lease})
	if err := d2.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	checkBlobIsDisk(t, dir, r, big, grown)
	if got := r.Bytes()[8192]; got != 9 {
		t.Fatalf("the write after the cut resize is not on the blob: %d", got)
	}
	if n := bad.Load(); n > 0 {
		t.Fatalf("%d even marks found the blob without a valid footer of its size", n)
	}
}

// TestAllocResize: the allocation map remembers only chunks inside both
// sizes.
func TestAllocResize(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const mib = allocChunk
	if err := f.Truncate(4*mib + 4096); err != nil {
		t.Fatal(err)
	}
	var a imageAlloc
	a.init(4*mib + 4096)
	if err := a.ensure(f, 0, 4*mib+4096); err != nil {
		t.Fatal(err)
	}
	a.resize(200 * mib)
	for c, want := range []bool{true, true, true, true, false, false} {
		if a.has(int64(c)) != want {
			t.Fatalf("chunk %d remembered %v after growing", c, !want)
		}
	}
	a.resize(2 * mib)
	a.resize(8 * mib)
	if a.has(2) || !a.has(1) {
		t.Fatal("chunks cut off by a shrink are remembered")
	}
}

// TestResizeGivesUpWhenTheBlobStalls: with writers held, a blob that does
// not take the last writes within MaxHold makes the resize give up before
// anything changed (no intent, no mark, the old size), and the writers go
// on; once the blob answers again the resize goes through.
func TestResizeGivesUpWhenTheBlobStalls(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const small, big = 8 << 20, 16 << 20
	r, f, _ := resizeRemote(t, small)
	d := newTestDisk(t, dir, small, r, DiskOptions{})
	var stalled atomic.Bool
	stalled.Store(true)
	r.Fault = func(op string, _, _ int64) (bool, error) {
		if op == "put" && stalled.Load() {
			return false, &remote.TransientError{Msg: "the remote is away (test)"}
		}
		return true, nil
	}
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{3}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	seq0, _ := r.Sequence(ctx)
	began := false
	o := ResizeOptions{Size: big, Footer: f.Resized(big).Encode(), MaxHold: 200 * time.Millisecond,
		Begin: func(uint64) error { began = true; return nil }}
	rz, _ := d.o.Remote.(remote.Resizer)
	st := ResizeStats{From: small, To: big}
	err := d.resizeHeld(ctx, rz, o, &st)
	if err == nil || began || d.Size() != small {
		t.Fatalf("resize with the blob stalled: %v, began %v, size %d", err, began, d.Size())
	}
	if seq, _ := r.Sequence(ctx); seq != seq0 || len(r.Bytes()) != small+vhdlayer.FooterSize {
		t.Fatalf("the blob changed: sequence %d -> %d, %d bytes", seq0, seq, len(r.Bytes()))
	}
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{4}, 4096), 4096); err != nil {
		t.Fatalf("a write after the resize gave up: %v", err)
	}
	stalled.Store(false)
	if _, err := d.Resize(ctx, o); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	checkBlobIsDisk(t, dir, r, big, f.Resized(big).Encode())
}

// TestResizeSynchronousBarrier: with synchronous barriers (mount --sync),
// a barrier right after a resize, with no write since, returns at once:
// the epoch it names is the resize's own, which the blob holds.
func TestResizeSynchronousBarrier(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const small, big = 8 << 20, 12 << 20
	r, f, _ := resizeRemote(t, small)
	d := newTestDisk(t, dir, small, r, DiskOptions{Sync: true, SyncTimeout: 10 * time.Second})
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{5}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Resize(ctx, ResizeOptions{Size: big, Footer: f.Resized(big).Encode()}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 5*time.Second || d.Sync().Timeouts > 0 {
		t.Fatalf("a synchronous barrier after the resize took %v (timeouts %d)", took, d.Sync().Timeouts)
	}
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{6}, 4096), big-4096); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := r.Bytes()[big-1]; got != 6 {
		t.Fatalf("a synchronous barrier returned before the blob held the write beyond the old end: %d", got)
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	checkBlobIsDisk(t, dir, r, big, f.Resized(big).Encode())
}
