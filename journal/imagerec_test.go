package journal

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// appendImage appends a data record of n bytes of b at off with an apply
// function that writes it to img, as Disk does.
func appendImage(t *testing.T, j *Journal, img *os.File, off int64, n int, b byte) Record {
	t.Helper()
	r := Record{Offset: off, Length: int64(n), Kind: KindData, Data: bytes.Repeat([]byte{b}, n)}
	if err := j.AppendApply(context.Background(), &r, func() error {
		_, err := img.WriteAt(r.Data, off)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestCaptureTornByPowerLossReverts: a capture's copy that a power loss
// took (its sync never finished, so the write over the record never
// reached the image either) turns back into the image-backed record it
// was, rather than being dropped or refused.
func TestCaptureTornByPowerLossReverts(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	imgPath := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(imgPath, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	img, err := os.OpenFile(imgPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	j.AttachImage(img)
	v := appendImage(t, j, img, 0, 128<<10, 9)
	if !v.ImageBacked() {
		t.Fatalf("a 128 KiB write with an apply function is not image-backed")
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	// A zero range over v's second half (no payload, so the only
	// segment bytes are the capture's).
	z := Record{Offset: 64 << 10, Length: 128 << 10, Kind: KindZero}
	if err := j.AppendApply(context.Background(), &z, func() error {
		_, err := img.WriteAt(make([]byte, z.Length), z.Offset)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.Captures != 1 || st.ImageBacked != 0 {
		t.Fatalf("%d captures, %d image-backed; want 1, 0", st.Captures, st.ImageBacked)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	// The power loss: the capture's copy is gone, and so is the write
	// over v (the image holds v again).
	segs, err := filepath.Glob(filepath.Join(dir, "seg-*.dat"))
	if err != nil || len(segs) == 0 {
		t.Fatalf("no segment files (%v)", err)
	}
	for _, s := range segs {
		if err := os.Truncate(s, 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{9}, 64<<10), 64<<10); err != nil {
		t.Fatal(err)
	}

	j2, err := Open(dir, Options{})
	if err != nil {
		t.Fatalf("reopen after the capture was lost: %v", err)
	}
	defer j2.Close()
	j2.AttachImage(img)
	var got []Record
	if err := j2.Scan(0, func(r Record) (bool, error) {
		got = append(got, r)
		return false, nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Seq != v.Seq {
		t.Fatalf("pending records after the reopen: %+v", got)
	}
	if !got[0].ImageBacked() {
		t.Fatalf("record %d is not image-backed again: %+v", v.Seq, got[0])
	}
	p, err := j2.Payload(&got[0])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, v.Data) {
		t.Fatal("the reverted record does not read back as written")
	}
	if _, held, err := j2.Capture(got[0], true); err != nil || !held {
		t.Fatalf("capture of the reverted record: held %v, %v; want held", held, err)
	}
}

// TestHotRanges: the ranges of pending large writes merge where they
// touch, answer overlaps, and go once drained.
func TestHotRanges(t *testing.T) {
	var h hotRanges
	h.add(0, 256<<10, 1)
	h.add(256<<10, 512<<10, 2) // touches: merges
	h.add(1<<20, 2<<20, 3)
	if len(h.ranges) != 2 || h.ranges[0] != (hotRange{0, 512 << 10, 2}) {
		t.Fatalf("ranges %+v", h.ranges)
	}
	for _, c := range []struct {
		off, end int64
		want     bool
	}{{0, 1, true}, {511 << 10, 512 << 10, true}, {512 << 10, 1 << 20, false}, {1<<20 - 1, 1 << 20, false}, {1 << 20, 1<<20 + 1, true}, {2 << 20, 3 << 20, false}, {100, 3 << 20, true}} {
		if got := h.overlaps(c.off, c.end); got != c.want {
			t.Errorf("overlaps(%d, %d) = %v, want %v", c.off, c.end, got, c.want)
		}
	}
	h.add(400<<10, 1<<20+1, 4) // bridges both: one range
	if len(h.ranges) != 1 || h.ranges[0] != (hotRange{0, 2 << 20, 4}) {
		t.Fatalf("after a bridging write: %+v", h.ranges)
	}
	h.drained(3)
	if len(h.ranges) != 1 {
		t.Fatalf("a range with a pending write went: %+v", h.ranges)
	}
	h.drained(4)
	if len(h.ranges) != 0 || h.overlaps(0, 1<<30) {
		t.Fatalf("drained ranges stay: %+v", h.ranges)
	}
}

// TestLargeWriteOverPendingLargeWriteGoesToSegment: only a large write
// over space no pending large write covers is written once.
func TestLargeWriteOverPendingLargeWriteGoesToSegment(t *testing.T) {
	imgPath := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(imgPath, make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	img, err := os.OpenFile(imgPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	j, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	j.AttachImage(img)
	a := appendImage(t, j, img, 0, 1<<20, 1)
	b := appendImage(t, j, img, 1<<20, 1<<20, 2)
	c := appendImage(t, j, img, 512<<10, 128<<10, 3)
	if !a.ImageBacked() || !b.ImageBacked() || c.ImageBacked() {
		t.Fatalf("image-backed: fresh %v, fresh %v, over pending %v; want true, true, false", a.ImageBacked(), b.ImageBacked(), c.ImageBacked())
	}
	if st := j.Stats(); st.Captures != 1 || st.ImageBacked != 1 {
		t.Fatalf("%d captures, %d image-backed; want 1, 1", st.Captures, st.ImageBacked)
	}
}

// TestHotRangesBounded: past maxHotRanges a new range joins its nearest
// neighbour; nothing recorded stops counting as hot.
func TestHotRangesBounded(t *testing.T) {
	var h hotRanges
	const step = 1 << 20
	for i := range maxHotRanges + 100 {
		h.add(int64(i)*step, int64(i)*step+64<<10, uint64(i+1))
	}
	if len(h.ranges) > maxHotRanges {
		t.Fatalf("%d ranges, want at most %d", len(h.ranges), maxHotRanges)
	}
	for i := range maxHotRanges + 100 {
		if !h.overlaps(int64(i)*step, int64(i)*step+1) {
			t.Fatalf("write %d no longer counts as hot", i)
		}
	}
	for i := 1; i < len(h.ranges); i++ {
		if h.ranges[i].off < h.ranges[i-1].end {
			t.Fatalf("ranges %d and %d overlap or are out of order: %+v %+v", i-1, i, h.ranges[i-1], h.ranges[i])
		}
	}
	h.add(int64(maxHotRanges+200)*step, int64(maxHotRanges+200)*step+64<<10, 1<<40) // past the last: joins it
	if !h.overlaps(int64(maxHotRanges+200)*step, int64(maxHotRanges+200)*step+1) || len(h.ranges) > maxHotRanges {
		t.Fatalf("a range past the end was lost or grew the set: %d ranges", len(h.ranges))
	}
}
