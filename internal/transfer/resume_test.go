package transfer

import (
	"context"
	crand "crypto/rand"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/testenv"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// scatteredRaw writes a sparse raw image of size bytes with n chunks of
// random data at random 4 KiB-aligned offsets.
func scatteredRaw(t *testing.T, path string, r *rand.Rand, size int64, n int) {
	t.Helper()
	writeAt(t, path, size-1, []byte{1})
	for range n {
		l := 4096 * (1 + r.Int64N(700)) // up to 2.7 MiB
		off := r.Int64N((size-l)/4096) * 4096
		b := make([]byte, l)
		_, _ = crand.Read(b)
		writeAt(t, path, off, b)
	}
}

// overlapping counts the calls of b whose range overlaps a call of a.
func overlapping(a, b []wireCall) (n int, bytes int64) {
	for _, y := range b {
		for _, x := range a {
			if x.off < y.end && y.off < x.end {
				n++
				bytes += min(x.end, y.end) - max(x.off, y.off)
				break
			}
		}
	}
	return n, bytes
}

// TestImportResumeAfterCancel stops an import at a random moment (a
// context cancelled at a random Put Page, after a random delay), checks
// that a changed source is refused, and resumes: the second run may send
// again at most one range per worker of what the first run sent, and the
// blob ends identical to the source.
func TestImportResumeAfterCancel(t *testing.T) {
	qemu := testenv.QemuImg(t)
	az := azurite.Start(t)
	ctx := context.Background()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 11))
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.raw")
	scatteredRaw(t, src, r, 160<<20, 30)
	want := nonZeroBytes(t, src)
	const workers = 4
	url := az.BlobURL("disks", "resume.vhd")
	state := filepath.Join(dir, "state")

	// Run 1, cancelled.
	w1 := &wire{}
	ctx1, cancel1 := context.WithCancel(ctx)
	defer cancel1()
	k := 2 + r.IntN(15)
	delay := time.Duration(r.IntN(3000)) * time.Microsecond
	w1.before = func(n int, _ wireCall) {
		if n == k {
			time.AfterFunc(delay, cancel1)
		}
	}
	im1, err := PrepareImport(ctx1, ImportOptions{Source: src, Client: newClient(t, url, w1), StateDir: state, CreateContainer: true, Workers: workers})
	if err != nil {
		t.Fatal(err)
	}
	vsize := im1.Plan().VirtualSize
	res1, err := im1.Run(ctx1)
	im1.Close()
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("run 1: want context.Canceled, got %v (result %+v)", err, res1.Stats)
	}
	if _, err := os.Stat(filepath.Join(state, ProgressFile)); err != nil {
		t.Fatalf("no progress saved: %v", err)
	}
	tried1 := w1.putsTried(vsize)
	ok1, ack1 := w1.putsOK(vsize)

	// A changed source is refused; restored, it is accepted again.
	st, _ := os.Stat(src)
	if err := os.Chtimes(src, time.Now(), st.ModTime().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareImport(ctx, ImportOptions{Source: src, Client: newClient(t, url, nil), StateDir: state}); !errors.Is(err, ErrSourceChanged) {
		t.Fatalf("changed mtime: want ErrSourceChanged, got %v", err)
	}
	if err := os.Chtimes(src, time.Now(), st.ModTime()); err != nil {
		t.Fatal(err)
	}

	// Run 2 finishes. What the blob held when it listed the page ranges
	// must not be sent again. (A request of run 1 that its cancellation
	// abandoned may still land after that: the service finishes what it
	// received. It is then sent again, with the same data.)
	w2 := &wire{}
	im2 := mustPrepare(t, ctx, ImportOptions{Source: src, Client: newClient(t, url, w2), StateDir: state, Workers: workers})
	heldBefore := im2.held
	if p := im2.Plan(); !p.Resumed || p.Reset != "" {
		t.Fatalf("plan %+v", p)
	}
	res2, err := im2.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ok2, sent2 := w2.putsOK(vsize)
	tried2 := w2.putsTried(vsize)
	dup, dupBytes := overlapping(tried1, tried2)
	var again int64
	for _, c := range tried2 {
		again += c.end - c.off - spansBytes(heldBefore.missing(c.off, c.end))
	}
	t.Logf("cancelled at put %d (+%v): run 1 tried %d puts, %d acknowledged (%s), the blob held %s; run 2 sent %s in %d puts, skipped %s the blob held; ranges run 1 had tried sent again: %d (%d bytes; limit one per worker, %d); bytes the blob held sent again: %d; non-zero data %s",
		k, delay, len(tried1), len(ok1), mib(ack1), mib(heldBefore.total()), mib(sent2), len(ok2), mib(res2.Held), dup, dupBytes, workers, again, mib(want))
	if dup > workers {
		t.Fatalf("run 2 sent %d ranges that run 1 had sent, more than one per worker (%d)", dup, workers)
	}
	if again != 0 {
		t.Fatalf("run 2 sent %d bytes the blob already held", again)
	}
	if res2.NonZeroTotal != want {
		t.Fatalf("non-zero total %d, want %d", res2.NonZeroTotal, want)
	}
	ranges, err := newClient(t, url, nil).PageRanges(ctx, 0, vsize)
	if err != nil {
		t.Fatal(err)
	}
	if held := newHeldSet(ranges).total(); heldBefore.total()+sent2 < held || res2.Held+sent2 > held {
		t.Fatalf("the blob held %d bytes, run 2 sent %d (and skipped %d), but the blob holds %d", heldBefore.total(), sent2, res2.Held, held)
	}
	out := filepath.Join(dir, "out.raw")
	dl, err := PrepareDownload(ctx, newClient(t, url, nil), DownloadOptions{Raw: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dl.Run(ctx, out); err != nil {
		t.Fatal(err)
	}
	qemuCompare(t, qemu, "raw", out, "raw", src)
	qemuCompare(t, qemu, "raw", filepath.Join(state, "disk.img"), "raw", src)
}

// TestResumeChecksTheBlob: the recorded progress is checked against the
// blob's page ranges. Pages cleared behind the importer's back in a window
// recorded as done are noticed and sent again; a blob replaced by another
// is refused; a deleted one is created again and the import starts over.
func TestResumeChecksTheBlob(t *testing.T) {
	qemu := testenv.QemuImg(t)
	az := azurite.Start(t)
	ctx := context.Background()
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.raw")
	scatteredRaw(t, src, rand.New(rand.NewPCG(3, 4)), 96<<20, 24)
	url := az.BlobURL("disks", "checked.vhd")
	state := filepath.Join(dir, "state")

	interrupt := func(after int) {
		t.Helper()
		w := &wire{}
		c, cancel := context.WithCancel(ctx)
		defer cancel()
		w.before = func(n int, _ wireCall) {
			if n == after {
				cancel()
			}
		}
		im, err := PrepareImport(c, ImportOptions{Source: src, Client: newClient(t, url, w), StateDir: state, CreateContainer: true, Workers: 2})
		if err != nil {
			t.Fatal(err)
		}
		defer im.Close()
		if _, err := im.Run(c); !errors.Is(err, context.Canceled) {
			t.Fatalf("want cancelled, got %v", err)
		}
	}
	interrupt(8)
	p, err := loadProgress(state)
	if err != nil {
		t.Fatal(err)
	}
	if p.DoneBelow == 0 && len(p.Done) == 0 {
		t.Fatalf("no window recorded done after 8 puts: %+v", p)
	}
	client := newClient(t, url, nil)
	ranges, err := client.PageRanges(ctx, 0, p.VirtualSize)
	if err != nil || len(ranges) == 0 {
		t.Fatalf("page ranges %v %v", ranges, err)
	}
	// Clear a range the blob holds in a window recorded as done, under
	// the import's lease.
	var first pageblob.Range
	for _, r := range ranges {
		if p.isDone(r.Off / WindowSize) {
			first = r
			break
		}
	}
	if first.Len == 0 {
		t.Fatalf("no page range in a done window: %v, %+v", ranges, p)
	}
	if err := client.ClearPages(ctx, first.Off, first.Len, p.LeaseID, nil); err != nil {
		t.Fatal(err)
	}
	w := &wire{}
	im := mustPrepare(t, ctx, ImportOptions{Source: src, Client: newClient(t, url, w), StateDir: state, Workers: 2})
	if im.Plan().Reset == "" {
		t.Fatal("cleared pages in a done window went unnoticed")
	}
	t.Logf("reset: %s", im.Plan().Reset)
	if _, err := im.Run(ctx); err != nil {
		t.Fatal(err)
	}
	im.Close()
	resent := false
	for _, c := range w.putsTried(p.VirtualSize) {
		if c.off <= first.Off && first.Off < c.end {
			resent = true
		}
	}
	if !resent {
		t.Fatalf("the cleared range %v was not sent again", first)
	}
	out := filepath.Join(dir, "out.vhd")
	dl, err := PrepareDownload(ctx, client, DownloadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dl.Run(ctx, out); err != nil {
		t.Fatal(err)
	}
	qemuCompare(t, qemu, "vpc", out, "raw", src)

	// A deleted blob is made again; a replaced one is refused.
	state2 := filepath.Join(dir, "state2")
	url2 := az.BlobURL("disks", "gone.vhd")
	url, state = url2, state2
	interrupt(3)
	p2, err := loadProgress(state2)
	if err != nil {
		t.Fatal(err)
	}
	c2 := newClient(t, url2, nil)
	if err := c2.BreakLease(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c2.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	im = mustPrepare(t, ctx, ImportOptions{Source: src, Client: newClient(t, url2, nil), StateDir: state2, Workers: 2})
	if im.Plan().Reset == "" || im.Plan().WindowsLeft != im.Plan().WindowsTotal {
		t.Fatalf("deleted blob: plan %+v", im.Plan())
	}
	im.Close()
	if err := c2.BreakLease(ctx); err != nil {
		t.Fatal(err)
	}
	other := vhdlayer.NewFixedFooter(uint64(p2.VirtualSize), time.Now())
	if err := c2.Create(ctx, uint64(p2.VirtualSize), other.Encode(), pageblob.CreateOptions{Overwrite: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareImport(ctx, ImportOptions{Source: src, Client: newClient(t, url2, nil), StateDir: state2}); !errors.Is(err, ErrBlobReplaced) {
		t.Fatalf("replaced blob: want ErrBlobReplaced, got %v", err)
	}
}
