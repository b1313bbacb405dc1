package thin

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
)

// memSource is a blob in memory that counts its reads.
type memSource struct {
	data  []byte
	reads atomic.Int64
	fail  atomic.Bool
}

func (s *memSource) ReadAt(_ context.Context, p []byte, off int64) error {
	if s.fail.Load() {
		return errors.New("injected read failure")
	}
	s.reads.Add(1)
	copy(p, s.data[off:])
	return nil
}

// fixture is a thin record over a blob with data in some chunks.
type fixture struct {
	dir    string
	size   int64
	src    *memSource
	ranges []Range
	img    *os.File
}

func newFixture(t *testing.T, size int64, ranges []Range) *fixture {
	t.Helper()
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(7, 8))
	data := make([]byte, size)
	for _, r := range ranges {
		for i := r.Off; i < r.End; i++ {
			data[i] = byte(1 + rng.IntN(255))
		}
	}
	if err := Create(dir, size, 42, ranges); err != nil {
		t.Fatal(err)
	}
	img, err := os.Create(filepath.Join(dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return &fixture{dir: dir, size: size, src: &memSource{data: data}, ranges: ranges, img: img}
}

func (f *fixture) open(t *testing.T) *Map {
	t.Helper()
	m, err := Open(f.dir, f.size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	m.Bind(f.src, f.img, func() error { return f.img.Sync() })
	return m
}

func (f *fixture) image(t *testing.T) []byte {
	t.Helper()
	b := make([]byte, f.size)
	if _, err := f.img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

const mib = 1 << 20

var testRanges = []Range{{4 * mib, 4*mib + 8192}, {6 * mib, 9 * mib}, {20*mib + 512, 20*mib + 4096}, {31 * mib, 32 * mib}}

func TestOpenCountsChunksWithData(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	m := f.open(t)
	st := m.Stats()
	// Data in chunks 1 (4-8 MiB: both ranges' heads), 2 (8-9 MiB), 5 and 7.
	if st.MissingChunks != 4 {
		t.Fatalf("missing chunks %d, want 4", st.MissingChunks)
	}
	var want int64
	for _, r := range testRanges {
		want += r.End - r.Off
	}
	if st.AllocatedBytes != want || st.PresentBytes != 0 {
		t.Fatalf("allocated %d present %d, want %d and 0", st.AllocatedBytes, st.PresentBytes, want)
	}
	if !m.Present(0, 4*mib) || m.Present(0, 4*mib+1) || !m.Present(12*mib, 20*mib) {
		t.Fatal("chunks without data must be present, chunks with data not")
	}
	if m.BaseSequence() != 42 {
		t.Fatalf("base sequence %d", m.BaseSequence())
	}
}

func TestEnsureFetchesOnlyTheRangesAndOnce(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	m := f.open(t)
	ctx := context.Background()
	if err := m.Ensure(ctx, 7*mib, 7*mib+4096); err != nil {
		t.Fatal(err)
	}
	if n := f.src.reads.Load(); n != 1 {
		t.Fatalf("%d reads for one chunk, want 1", n)
	}
	img := f.image(t)
	if !bytes.Equal(img[4*mib:8*mib], f.src.data[4*mib:8*mib]) {
		t.Fatal("fetched chunk differs from the blob")
	}
	// The gap between the chunk's two ranges stays a hole (zeros).
	if !bytes.Equal(img[4*mib+8192:6*mib], make([]byte, 2*mib-8192)) {
		t.Fatal("the gap between ranges was written")
	}
	if err := m.Ensure(ctx, 4*mib, 8*mib); err != nil {
		t.Fatal(err)
	}
	if n := f.src.reads.Load(); n != 1 {
		t.Fatalf("a present chunk was fetched again (%d reads)", n)
	}
}

func TestConcurrentEnsureFetchesOnce(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	m := f.open(t)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := int64(4*mib + i*4096)
			errs <- m.Ensure(context.Background(), off, off+9*mib)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	// Chunks 1 and 2 (and 3, which has no data), each read once.
	if n := f.src.reads.Load(); n != 2 {
		t.Fatalf("%d reads, want 2", n)
	}
}

// A chunk is marked present only after the image is synced, and a mark
// survives a reopen: the next mount does not fetch it again (which would
// overwrite writes made since).
func TestMarkFollowsSyncAndSurvivesReopen(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	m, err := Open(f.dir, f.size)
	if err != nil {
		t.Fatal(err)
	}
	var marksAtSync []byte
	m.Bind(f.src, f.img, func() error {
		b, err := os.ReadFile(filepath.Join(f.dir, PresentFile))
		marksAtSync = b
		return err
	})
	if err := m.Ensure(context.Background(), 20*mib, 20*mib+1); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(marksAtSync, make([]byte, len(marksAtSync))) {
		t.Fatal("the chunk was marked before the image sync")
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	// A write after the fetch, then a reopen.
	if _, err := f.img.WriteAt([]byte("newer"), 20*mib+1000); err != nil {
		t.Fatal(err)
	}
	m2 := f.open(t)
	if !m2.Present(20*mib, 24*mib) {
		t.Fatal("the mark did not survive a reopen")
	}
	before := f.src.reads.Load()
	if err := m2.Ensure(context.Background(), 20*mib, 24*mib); err != nil {
		t.Fatal(err)
	}
	if f.src.reads.Load() != before {
		t.Fatal("a chunk marked present was fetched again")
	}
	if got := f.image(t)[20*mib+1000 : 20*mib+1005]; string(got) != "newer" {
		t.Fatalf("the write after the fetch was overwritten: %q", got)
	}
}

// A failed fetch marks nothing and reports the error; the next try works.
func TestFailedFetchMarksNothing(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	m := f.open(t)
	f.src.fail.Store(true)
	if err := m.Ensure(context.Background(), 31*mib, 32*mib); err == nil {
		t.Fatal("a failed read was not reported")
	}
	if m.Present(31*mib, 32*mib) {
		t.Fatal("a chunk whose fetch failed is marked present")
	}
	f.src.fail.Store(false)
	if err := m.Ensure(context.Background(), 31*mib, 32*mib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.image(t)[31*mib:], f.src.data[31*mib:]) {
		t.Fatal("fetched chunk differs from the blob")
	}
}

func TestPrefetchCompletes(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	m := f.open(t)
	if err := m.Prefetch(context.Background(), PrefetchOptions{Workers: 2, Group: 2}); err != nil {
		t.Fatal(err)
	}
	if !m.Complete() {
		t.Fatalf("not complete after prefetch: %+v", m.Stats())
	}
	select {
	case <-m.Done():
	default:
		t.Fatal("Done not closed")
	}
	if !bytes.Equal(f.image(t), f.src.data) {
		t.Fatal("image differs from the blob after prefetch")
	}
	st := m.Stats()
	if st.PrefetchChunks != 4 || st.PresentBytes != st.AllocatedBytes {
		t.Fatalf("stats after prefetch: %+v", st)
	}
	// Complete at the next open too.
	m2 := f.open(t)
	if !m2.Complete() {
		t.Fatal("not complete after a reopen")
	}
}

func TestPrefetchStopsWithItsContext(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	m := f.open(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := m.Prefetch(ctx, PrefetchOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("prefetch with a cancelled context: %v", err)
	}
}

func TestDamagedRecordRefused(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	p := filepath.Join(f.dir, RangesFile)
	b, _ := os.ReadFile(p)
	b[40] ^= 1
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(f.dir, f.size); !errors.Is(err, ErrDamaged) {
		t.Fatalf("flipped bit: %v", err)
	}
	g := newFixture(t, 32*mib, testRanges)
	if _, err := Open(g.dir, 64*mib); !errors.Is(err, ErrDamaged) {
		t.Fatalf("wrong size: %v", err)
	}
	if err := os.Truncate(filepath.Join(g.dir, PresentFile), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(g.dir, g.size); !errors.Is(err, ErrDamaged) {
		t.Fatalf("short bitmap: %v", err)
	}
	if err := Create(t.TempDir(), 32*mib, 0, []Range{{8 * mib, 9 * mib}, {4 * mib, 5 * mib}}); err == nil {
		t.Fatal("ranges out of order accepted")
	}
}

func TestRemove(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	if err := Remove(f.dir); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{RangesFile, PresentFile} {
		if _, err := os.Stat(filepath.Join(f.dir, n)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s left: %v", n, err)
		}
	}
	if err := Remove(f.dir); err != nil {
		t.Fatalf("second remove: %v", err)
	}
}

// A first read inside a chunk not present gets its bytes from the blob and
// starts the chunk's fetch; reads across chunks, or of a present one, are
// left to Ensure and the image.
func TestReadThrough(t *testing.T) {
	f := newFixture(t, 32*mib, testRanges)
	m := f.open(t)
	ctx := context.Background()
	p := make([]byte, 8192)
	ok, err := m.ReadThrough(ctx, p, 7*mib)
	if err != nil || !ok {
		t.Fatalf("read through: ok %v err %v", ok, err)
	}
	if !bytes.Equal(p, f.src.data[7*mib:7*mib+8192]) {
		t.Fatal("read through returned other bytes than the blob's")
	}
	m.Wait()
	if !m.Present(4*mib, 8*mib) {
		t.Fatal("the read did not fetch its chunk behind it")
	}
	if !bytes.Equal(f.image(t)[4*mib:8*mib], f.src.data[4*mib:8*mib]) {
		t.Fatal("the chunk fetched behind the read differs from the blob")
	}
	if ok, _ := m.ReadThrough(ctx, p, 7*mib); ok {
		t.Fatal("a present chunk was read from the blob")
	}
	if ok, _ := m.ReadThrough(ctx, p, 24*mib-4096); ok {
		t.Fatal("a read across two chunks was read from the blob")
	}
	if st := m.Stats(); st.ReadThroughBytes != 8192 || st.DemandChunks != 1 || st.BackgroundFailures != 0 {
		t.Fatalf("stats: %+v", st)
	}
}
