package writeback

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestImageAllocChunks: a write allocates its whole 1 MiB chunk once; a
// punch frees its range and forgets the chunk, so the next write there
// allocates again (the write must never meet a hole on a full filesystem).
func TestImageAllocChunks(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const size = 4 << 20
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	blocks := func() int64 {
		var st syscall.Stat_t
		if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	var a imageAlloc
	a.init(size)
	if err := a.ensure(f, 4096, 8192); err != nil {
		t.Fatal(err)
	}
	if a.unsup.Load() {
		t.Skip("this filesystem cannot fallocate")
	}
	if got := blocks(); got < allocChunk || !a.has(0) || a.has(1) {
		t.Fatalf("after a 4 KiB write: %d bytes allocated, chunk 0 known %v, chunk 1 known %v", got, a.has(0), a.has(1))
	}
	if err := a.ensure(f, allocChunk-512, allocChunk+512); err != nil || !a.has(1) {
		t.Fatalf("a write across chunks 0 and 1: %v, chunk 1 known %v", err, a.has(1))
	}
	if err := a.punch(f, 0, allocChunk); err != nil {
		t.Fatal(err)
	}
	if a.has(0) || !a.has(1) || blocks() > allocChunk {
		t.Fatalf("after punching chunk 0: chunk 0 known %v, chunk 1 known %v, %d bytes allocated", a.has(0), a.has(1), blocks())
	}
	if err := a.ensure(f, 512, 1024); err != nil || !a.has(0) || blocks() < 2*allocChunk {
		t.Fatalf("a write into the punched chunk: %v, known %v, %d bytes allocated", err, a.has(0), blocks())
	}
	// The last chunk of a size that is not a whole number of chunks.
	var b imageAlloc
	b.init(size - 512)
	if err := b.ensure(f, size-1024, size-512); err != nil || !b.has((size-1024)/allocChunk) {
		t.Fatalf("last chunk: %v", err)
	}
}
