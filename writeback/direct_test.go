package writeback

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// resident says, page by page, whether [off, off+n) of the file at path is
// in the page cache.
func resident(t *testing.T, path string, off, n int64) []bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (st.Size()+4095)/4096)
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatalf("mincore: %v", e)
	}
	var out []bool
	for p := off / 4096; p < (off+n+4095)/4096; p++ {
		out = append(out, vec[p]&1 == 1)
	}
	return out
}

// Large payloads in whole 4 KiB blocks go to their segment with O_DIRECT,
// at aligned offsets, and never through the page cache; the others are
// buffered. Every payload reads back, also after a reopen.
func TestSegmentDirectWrites(t *testing.T) {
	dir := t.TempDir()
	j, err := OpenJournal(dir, JournalOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sizes := []int{1536, 256 << 10, 64<<10 + 512, 128 << 10, 4096, 1 << 20, 2 << 20}
	var recs []Record
	for i, n := range sizes {
		data := make([]byte, n)
		for k := range data {
			data[k] = byte(i*31 + k*7)
		}
		r := Record{Offset: int64(i) << 22, Length: int64(n), Kind: KindData, Data: data}
		if err := j.Append(context.Background(), &r); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, r)
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	if err := j.idx.flush(); err != nil {
		t.Fatal(err)
	}
	seg, err := j.segs.get(recs[1].seg)
	if err != nil {
		t.Fatal(err)
	}
	if seg.direct == nil {
		t.Skipf("the filesystem of %s refuses O_DIRECT: nothing to check", dir)
	}
	path := filepath.Join(dir, segName(seg.id))
	for i, r := range recs {
		direct := directSized(r.Length)
		if direct && r.segOff%directAlign != 0 {
			t.Errorf("record %d (%d bytes) at segment offset %d: not aligned for O_DIRECT", i, r.Length, r.segOff)
		}
		// Only whole pages: a small payload may share its page.
		first := (r.segOff + 4095) &^ 4095
		last := (r.segOff + r.Length) &^ 4095
		if last <= first {
			continue
		}
		for p, in := range resident(t, path, first, last-first) {
			if in == direct {
				t.Errorf("record %d (%d bytes, direct %v): page %d of its payload resident %v", i, r.Length, direct, p, in)
				break
			}
		}
	}
	check := func(j *Journal) {
		t.Helper()
		n := 0
		if err := j.ReadAll(func(r Record) error {
			if !bytes.Equal(r.Data, recs[n].Data) {
				t.Errorf("record %d (%d bytes) reads back different", n, r.Length)
			}
			n++
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if n != len(recs) {
			t.Fatalf("%d records read back, want %d", n, len(recs))
		}
	}
	check(j)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j, err = OpenJournal(dir, JournalOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	check(j)
}
