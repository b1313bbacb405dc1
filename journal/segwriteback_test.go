package journal

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCopiedPayloadsWrittenBackEarly: as the indexer copies small payloads
// from the intent log to their segment, it starts their writeback every
// writebackChunk, so that the fdatasync before the intent log file is
// recycled does not write them all at once. 4 MiB of 4 KiB payloads,
// copied with no fdatasync of the segment: at most about one chunk of them
// may still be dirty in the page cache (cachestat, Linux 6.5).
func TestCopiedPayloadsWrittenBackEarly(t *testing.T) {
	dir := t.TempDir()
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	if fs.Type == unix.TMPFS_MAGIC {
		t.Skip("the test directory is on tmpfs, which has no writeback: set TMPDIR to a disk-backed directory")
	}
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	const n, size = 1024, 4096
	for i := range n {
		// One writer: every payload rides inline (see inlineBusy).
		appendData(t, j, int64(i)*size, byte(i), size)
	}
	if err := j.idx.flush(); err != nil {
		t.Fatal(err)
	}
	ids := j.segs.ids()
	if len(ids) != 1 {
		t.Fatalf("segments %v, want one", ids)
	}
	seg, err := j.segs.get(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if !seg.copied.Load() {
		t.Fatal("no payload was copied to the segment: the test wants inline payloads")
	}
	var st unix.Cachestat_t
	if err := unix.Cachestat(uint(seg.f.Fd()), &unix.CachestatRange{Off: 0, Len: 0}, &st, 0); err != nil {
		if errors.Is(err, unix.ENOSYS) {
			t.Skip("cachestat needs Linux 6.5 or later")
		}
		t.Fatal(err)
	}
	pageSize := uint64(unix.Getpagesize())
	limit := 2 * writebackChunk / pageSize
	t.Logf("segment pages: %d cached, %d dirty, %d under writeback", st.Cache, st.Dirty, st.Writeback)
	if st.Dirty > limit {
		t.Fatalf("%d of the segment's pages are dirty after %d KiB of payloads were copied, want at most %d: their writeback was not started", st.Dirty, n*size>>10, limit)
	}
}
