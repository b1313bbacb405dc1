package journal

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	badger "github.com/dgraph-io/badger/v4"
)

// legacyPiece is a piece's index value as mount --write-once wrote it.
func legacyPiece(end int64, seg uint64, segOff int64, crc uint32) []byte {
	v := make([]byte, pieceValueSize)
	binary.BigEndian.PutUint64(v[0:], uint64(end))
	binary.BigEndian.PutUint64(v[8:], seg)
	binary.BigEndian.PutUint64(v[16:], uint64(segOff))
	binary.BigEndian.PutUint32(v[24:], crc)
	return v
}

// TestLegacyImageBackedRecords: a journal left by a binary with mount
// --write-once holds an image-backed record (segment 0) of epoch 1, a piece
// of it copied aside before a zero record of epoch 2 overwrote that part of
// the image, and a piece whose record is gone. After a restart the record
// reads back as it was written (the image with the piece laid over), a
// write over it waits until it is drained while one elsewhere does not,
// and its deletion takes its piece along.
func TestLegacyImageBackedRecords(t *testing.T) {
	dir := t.TempDir()
	const size = 64 << 10
	a := bytes.Repeat([]byte{0xA1}, 16<<10) // the record's bytes
	b := bytes.Repeat([]byte{0xB2}, 4<<10)  // what it held at 4-8 KiB
	image := make([]byte, size)
	copy(image, a) // 4-8 KiB stays zero: the zero record of epoch 2
	imgPath := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(imgPath, image, 0o600); err != nil {
		t.Fatal(err)
	}

	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	seg, segOff, err := j.segs.reserve(int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := seg.writePayload(b, segOff); err != nil {
		t.Fatal(err)
	}
	seg.inflight.Add(-1)
	now := time.Now()
	r1 := Record{Epoch: 1, Offset: 0, Length: int64(len(a)), Kind: KindData, Time: now}
	r2 := Record{Epoch: 2, Offset: 4 << 10, Length: 4 << 10, Kind: KindZero, Time: now}
	err = j.db.Update(func(txn *badger.Txn) error {
		return errors.Join(
			txn.Set(recKey(1), r1.encode()),
			txn.Set(recKey(2), r2.encode()),
			txn.Set(pieceKey(1, 4<<10), legacyPiece(8<<10, seg.id, segOff, crc32c(b))),
			txn.Set(pieceKey(99, 0), legacyPiece(4<<10, seg.id, segOff, crc32c(b))),
		)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	j, err = Open(dir, Options{})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer j.Close()
	img, err := os.OpenFile(imgPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	j.AttachImage(img)
	if n := pieceCount(t, j); n != 1 {
		t.Fatalf("%d pieces after recovery, want 1 (the one without its record deleted)", n)
	}
	recs, err := j.ReadBatch(1, 1<<30, 0)
	if err != nil || len(recs) != 2 {
		t.Fatalf("read %d records: %v", len(recs), err)
	}
	want := append(append(append([]byte(nil), a[:4<<10]...), b...), a[8<<10:]...)
	if !recs[0].InImage() || !bytes.Equal(recs[0].Data, want) {
		t.Fatalf("image-backed record: in image %v, payload right %v", recs[0].InImage(), bytes.Equal(recs[0].Data, want))
	}

	// A write elsewhere goes through; one over the record waits for it.
	apply := func() error { return nil }
	other := Record{Offset: 32 << 10, Length: 4 << 10, Kind: KindData, Data: bytes.Repeat([]byte{1}, 4<<10)}
	if err := j.AppendApply(context.Background(), &other, apply); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	over := Record{Offset: 12 << 10, Length: 8 << 10, Kind: KindZero}
	if err := func() error { cancel(); return j.AppendApply(ctx, &over, apply) }(); !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled write over the record returned %v, want context.Canceled", err)
	}
	done := make(chan error, 1)
	go func() { done <- j.AppendApply(context.Background(), &over, apply) }()
	deadline := time.Now().Add(10 * time.Second)
	for j.Stats().BlockedWriters != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the write over the pending image-backed record did not wait")
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("the write over the pending image-backed record went through (%v)", err)
	case <-time.After(50 * time.Millisecond):
	}
	if err := j.Delete(recs[:1], 1); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the write still waits after the record was drained")
	}
	if n := pieceCount(t, j); n != 0 {
		t.Fatalf("%d pieces left after their record was deleted", n)
	}
	if n := j.legacyN.Load(); n != 0 {
		t.Fatalf("%d image-backed records pending after the delete", n)
	}
}

func pieceCount(t *testing.T, j *Journal) int {
	t.Helper()
	n := 0
	err := j.db.View(func(txn *badger.Txn) error {
		opts := badger.DefaultIteratorOptions
		opts.Prefix = pieceKeyPrefix
		it := txn.NewIterator(opts)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}
