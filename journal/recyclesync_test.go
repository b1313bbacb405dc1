package journal

import (
	"bytes"
	"context"
	"testing"
	"time"
)

// TestBarrierDuringRecycleSync: while the indexer fsyncs what a full
// intent log file's entries became (badger's logs, the segments it copied
// payloads to) before recycling it, barriers go on: they wait for neither
// those fsyncs nor the recycle. The indexer is held inside that window;
// a write and its barrier must complete meanwhile, and everything reads
// back once it is released.
func TestBarrierDuringRecycleSync(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{IntentLogSlots: 1 << 10})
	if err != nil {
		t.Fatal(err)
	}
	entered := make(chan struct{})
	release := make(chan struct{})
	first := true
	testDuringLogSync = func(*Journal) {
		if first {
			first = false
			close(entered)
			<-release
		}
	}
	released := false
	defer func() {
		testDuringLogSync = nil
		if !released {
			close(release)
		}
		j.Close()
	}()
	// 4 KiB inline entries take 34 slots: a 1,024-slot file fills after
	// 30 of them, and the indexer then syncs before recycling it.
	n := 0 // appends made
	for n < 200 {
		appendData(t, j, int64(n)*4096, byte(n), 4096)
		n++
		select {
		case <-entered:
		default:
			continue
		}
		break
	}
	select {
	case <-entered:
	case <-time.After(20 * time.Second):
		t.Fatalf("no intent log file reached its recycle after %d appends", n)
	}
	done := make(chan error, 1)
	go func() {
		r := Record{Offset: 1 << 30, Length: 4096, Kind: KindData, Data: bytes.Repeat([]byte{0xee}, 4096)}
		if err := j.Append(context.Background(), &r); err != nil {
			done <- err
			return
		}
		_, err := j.Barrier()
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a barrier waited for the indexer's fsyncs before a recycle")
	}
	close(release)
	released = true
	if err := j.idx.flush(); err != nil {
		t.Fatal(err)
	}
	recs, err := j.ReadBatch(1, 1<<30, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != n+1 {
		t.Fatalf("read %d records, want %d", len(recs), n+1)
	}
	last := recs[len(recs)-1]
	if last.Offset != 1<<30 || last.Data[0] != 0xee {
		t.Fatalf("last record at %d, first byte %#x: the write made during the recycle is missing", last.Offset, last.Data[0])
	}
}
