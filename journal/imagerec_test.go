package journal

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
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
	// The flusher claims v's epoch: a write over it captures it rather
	// than binds (bind.go).
	j.ClaimBatch(j.ClosedEpoch())
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

// openImageJournal opens a journal in a temp dir with a zeroed image of
// size bytes attached.
func openImageJournal(t *testing.T, size int64, o Options) (*Journal, *os.File) {
	t.Helper()
	imgPath := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(imgPath, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	img, err := os.OpenFile(imgPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	j, err := Open(t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	j.AttachImage(img)
	return j, img
}

// TestLargeRewriteBindsEpochs: a large write over a pending image-backed
// record no batch has claimed is written once too, without a capture; the
// record reads back as the image now holds it, and no batch may end
// between the two writes' epochs (bind.go).
func TestLargeRewriteBindsEpochs(t *testing.T) {
	j, img := openImageJournal(t, 4<<20, Options{})
	a := appendImage(t, j, img, 0, 1<<20, 1)
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	// Over a's second half, and past it.
	c := appendImage(t, j, img, 512<<10, 1<<20, 3)
	if !a.ImageBacked() || !c.ImageBacked() {
		t.Fatalf("image-backed: first %v, over it %v; want both", a.ImageBacked(), c.ImageBacked())
	}
	if st := j.Stats(); st.Captures != 0 || st.Binds != 1 || st.ImageBacked != 2 {
		t.Fatalf("%d captures, %d binds, %d image-backed; want 0, 1, 2", st.Captures, st.Binds, st.ImageBacked)
	}
	if j.imgSynced.Load() < a.Seq {
		t.Fatalf("bound record %d above the durable image-synced mark %d", a.Seq, j.imgSynced.Load())
	}
	// c's epoch is open: a batch may not hold a's.
	if limit, _ := j.ClaimBatch(j.ClosedEpoch()); limit >= a.Epoch {
		t.Fatalf("limit %d with a's epoch %d bound to the open epoch %d", limit, a.Epoch, c.Epoch)
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	limit, endsAt := j.ClaimBatch(j.ClosedEpoch())
	if limit < c.Epoch || endsAt(a.Epoch) || !endsAt(c.Epoch) {
		t.Fatalf("limit %d (want >= %d), a batch may end at a's epoch %d: %v, at c's %d: %v; want false, true",
			limit, c.Epoch, a.Epoch, endsAt(a.Epoch), c.Epoch, endsAt(c.Epoch))
	}
	p, err := j.Payload(&a)
	if err != nil {
		t.Fatalf("read the overwritten record: %v", err)
	}
	want := append(bytes.Repeat([]byte{1}, 512<<10), bytes.Repeat([]byte{3}, 512<<10)...)
	if !bytes.Equal(p, want) {
		t.Fatal("the overwritten record does not read back as the image holds it")
	}
	// Both epochs are claimed now: a write over c captures it, with
	// what the image holds.
	appendImage(t, j, img, 0, 2<<20, 4)
	if st := j.Stats(); st.Captures != 2 || st.Binds != 1 {
		t.Fatalf("after a write over claimed records: %d captures, %d binds; want 2, 1", st.Captures, st.Binds)
	}
	if p, err := j.Payload(&c); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{3}, 1<<20)) {
		t.Fatalf("the captured record does not read back as written (%v)", err)
	}
}

// TestBindWaitsForImageSyncedMark: a record above the durable
// image-synced mark is bound only after the image and the mark are synced,
// and a writer runs that sync at most every imageSyncEvery; otherwise it
// captures.
func TestBindWaitsForImageSyncedMark(t *testing.T) {
	// Image syncs for binds at most hourly: the first one runs (none ran
	// before), the second does not.
	j, img := openImageJournal(t, 4<<20, Options{ImageSyncEvery: time.Hour})
	a := appendImage(t, j, img, 0, 1<<20, 1)
	// No barrier: the mark is below a. The first write over it syncs the
	// image, makes the mark durable and binds.
	appendImage(t, j, img, 0, 128<<10, 2)
	if st := j.Stats(); st.Binds != 1 || st.Captures != 0 {
		t.Fatalf("%d binds, %d captures; want 1, 0", st.Binds, st.Captures)
	}
	if j.imgSynced.Load() < a.Seq {
		t.Fatalf("durable image-synced mark %d below the bound record %d", j.imgSynced.Load(), a.Seq)
	}
	// A second record over other space, rewritten: the last image sync
	// is too recent to run another, so it is captured.
	b := appendImage(t, j, img, 2<<20, 1<<20, 5)
	appendImage(t, j, img, 2<<20, 128<<10, 6)
	if st := j.Stats(); st.Binds != 1 || st.Captures != 1 {
		t.Fatalf("%d binds, %d captures; want 1, 1", st.Binds, st.Captures)
	}
	if p, err := j.Payload(&b); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{5}, 1<<20)) {
		t.Fatalf("the captured record does not read back as written (%v)", err)
	}
}

// TestBindingSpanBounded: a write binds only while the records from the
// oldest bound record up to it number at most MaxBindRecords; past that it
// captures, so that a batch no binding lets the flusher cut stays bounded.
func TestBindingSpanBounded(t *testing.T) {
	j, img := openImageJournal(t, 8<<20, Options{MaxBindRecords: 4})
	appendImage(t, j, img, 0, 1<<20, 1)
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	appendImage(t, j, img, 0, 4096, 2) // 1 record after a: bound
	if st := j.Stats(); st.Binds != 1 || st.Captures != 0 {
		t.Fatalf("%d binds, %d captures; want 1, 0", st.Binds, st.Captures)
	}
	for i := range 4 {
		appendImage(t, j, img, 4<<20+int64(i)*4096, 4096, 3)
	}
	// a, the oldest bound record, is now 6 records back.
	appendImage(t, j, img, 512<<10, 4096, 4)
	if st := j.Stats(); st.Binds != 1 || st.Captures != 1 {
		t.Fatalf("past the bound: %d binds, %d captures; want 1, 1", st.Binds, st.Captures)
	}
	if j.MaxBindRecords() != 4 {
		t.Fatalf("MaxBindRecords %d, want 4", j.MaxBindRecords())
	}
}

// TestBindNotHeldWhileWaitingForSpace: a writer that waits for journal
// space holds no bind. A bind not yet settled keeps the flusher from
// sending the bound record's epoch (ClaimBatch), and only the flusher frees
// space: binding before the wait deadlocked a full journal
// (TestAzuriteBackpressure, now and then).
func TestBindNotHeldWhileWaitingForSpace(t *testing.T) {
	j, img := openImageJournal(t, 8<<20, Options{MaxPendingBytes: 2 << 20})
	a := appendImage(t, j, img, 0, 1<<20, 1)
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	appendImage(t, j, img, 4<<20, 1<<20-8<<10, 2) // the cap is nearly full
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		r := Record{Offset: 0, Length: 128 << 10, Kind: KindData, Data: bytes.Repeat([]byte{3}, 128<<10)}
		done <- j.AppendApply(ctx, &r, func() error {
			_, err := img.WriteAt(r.Data, r.Offset)
			return err
		})
	}()
	deadline := time.Now().Add(10 * time.Second)
	for j.Stats().BlockedWriters != 1 {
		if time.Now().After(deadline) {
			cancel()
			t.Fatal("the write over a did not wait for journal space")
		}
		time.Sleep(time.Millisecond)
	}
	if limit, _ := j.ClaimBatch(j.ClosedEpoch()); limit < a.Epoch {
		t.Errorf("a writer waiting for space keeps the flusher from a's epoch %d (limit %d)", a.Epoch, limit)
	}
	cancel()
	if err := <-done; err == nil {
		t.Fatal("the waiting write succeeded without space")
	}
}

// TestBindReplayJoinsSpans: replay's spans, given in seq order, join
// where they overlap or touch, and the flusher's limits are those of the
// spans given: no batch ends inside 2..8 or 12..13.
func TestBindReplayJoinsSpans(t *testing.T) {
	j, _ := openImageJournal(t, 1<<20, Options{})
	for _, s := range []epochSpan{{2, 5}, {3, 7}, {7, 9}, {12, 14}} {
		j.BindReplay(s.from, s.to)
	}
	if want := []epochSpan{{2, 9}, {12, 14}}; !slices.Equal(j.replayBound, want) {
		t.Fatalf("replay spans %v, want %v", j.replayBound, want)
	}
	limit, endsAt := j.ClaimBatch(8)
	if limit != 1 {
		t.Errorf("limit %d with epoch 8 closed inside 2..8, want 1", limit)
	}
	for e := uint64(1); e <= 15; e++ {
		want := e < 2 || (e >= 9 && e < 12) || e >= 14
		if got := endsAt(e); got != want {
			t.Errorf("a batch may end at epoch %d: %v, want %v", e, got, want)
		}
	}
}
