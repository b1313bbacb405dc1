package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

func appendData(t *testing.T, j *Journal, off int64, fill byte, n int) Record {
	t.Helper()
	r := Record{Offset: off, Length: int64(n), Kind: KindData, Data: bytes.Repeat([]byte{fill}, n)}
	if err := j.Append(context.Background(), &r); err != nil {
		t.Fatal(err)
	}
	return r
}

func TestJournalRecoversCounters(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	a := appendData(t, j, 0, 1, 512)
	b := appendData(t, j, 512, 2, 1024)
	if a.Seq != 1 || b.Seq != 2 || a.Epoch != b.Epoch {
		t.Fatalf("seqs %d %d epochs %d %d", a.Seq, b.Seq, a.Epoch, b.Epoch)
	}
	closed, err := j.Barrier()
	if err != nil || closed != a.Epoch {
		t.Fatalf("barrier closed %d, want %d (%v)", closed, a.Epoch, err)
	}
	c := appendData(t, j, 0, 3, 512)
	if c.Epoch != a.Epoch+1 {
		t.Fatalf("epoch after barrier %d", c.Epoch)
	}
	// A barrier with nothing new does not open an empty epoch.
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	d := appendData(t, j, 0, 4, 512)
	if d.Epoch != c.Epoch+1 {
		t.Fatalf("empty barriers advanced the epoch: %d after %d", d.Epoch, c.Epoch)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	j, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	st := j.Stats()
	if st.PendingRecords != 4 || st.OldestNotOnRemote.IsZero() {
		t.Fatalf("recovered stats %+v", st)
	}
	var got []Record
	if err := j.ReadAll(func(r Record) error { got = append(got, r); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 || !bytes.Equal(got[1].Data, b.Data) || got[3].Epoch != d.Epoch {
		t.Fatalf("recovered records %+v", got)
	}
	// The open epoch at the crash counts as closed; new writes go after it.
	if j.ClosedEpoch() != d.Epoch {
		t.Fatalf("closed epoch after reopen %d, want %d", j.ClosedEpoch(), d.Epoch)
	}
	e := appendData(t, j, 0, 5, 512)
	if e.Seq != 5 || e.Epoch != d.Epoch+1 {
		t.Fatalf("after reopen: seq %d epoch %d", e.Seq, e.Epoch)
	}
}

func TestJournalReadBatchWholeEpochs(t *testing.T) {
	j, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	// Three epochs of 4 records x 4 KiB.
	for e := 0; e < 3; e++ {
		for i := 0; i < 4; i++ {
			appendData(t, j, int64(i)*4096, byte(e), 4096)
		}
		if _, err := j.Barrier(); err != nil {
			t.Fatal(err)
		}
	}
	appendData(t, j, 0, 9, 512) // open epoch: never read
	// A limit inside the first epoch still returns it whole.
	recs, err := j.ReadBatch(1, 100, 0)
	if err != nil || len(recs) != 4 {
		t.Fatalf("small limit: %d records, %v", len(recs), err)
	}
	// A limit of 1.5 epochs returns exactly one epoch.
	recs, _ = j.ReadBatch(1, 6*4096, 0)
	if len(recs) != 4 {
		t.Fatalf("1.5 epochs: %d records", len(recs))
	}
	// minLastEpoch forces the batch up to that epoch.
	recs, _ = j.ReadBatch(1, 100, recs[0].Epoch+1)
	if len(recs) != 8 {
		t.Fatalf("minLast: %d records", len(recs))
	}
	// A large limit stops before the open epoch.
	recs, _ = j.ReadBatch(1, 1<<30, 0)
	if len(recs) != 12 || recs[11].Epoch != j.ClosedEpoch() {
		t.Fatalf("all closed: %d records", len(recs))
	}
	if err := j.Delete(recs[:4], recs[3].Epoch); err != nil {
		t.Fatal(err)
	}
	if st := j.Stats(); st.PendingRecords != 9 {
		t.Fatalf("pending after delete: %d", st.PendingRecords)
	}
	recs, _ = j.ReadBatch(recs[3].Seq+1, 1, 0)
	if len(recs) != 4 || recs[0].Seq != 5 {
		t.Fatalf("after delete: %d records from seq %d", len(recs), recs[0].Seq)
	}
}

func TestJournalMaxEpochBytesClosesEpochs(t *testing.T) {
	j, err := Open(t.TempDir(), Options{MaxEpochBytes: 10000})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	var last uint64
	epochs := 0
	for i := 0; i < 20; i++ {
		r := appendData(t, j, 0, byte(i), 4096)
		if r.Epoch != last {
			epochs++
			last = r.Epoch
		}
	}
	// 20 x ~4 KiB with a 10000-byte cap: an epoch closes every 3 records.
	if epochs < 6 || epochs > 8 {
		t.Fatalf("%d epochs for 20 records of 4 KiB with a 10000-byte cap", epochs)
	}
}

func TestJournalBackpressureCancel(t *testing.T) {
	j, err := Open(t.TempDir(), Options{MaxPendingBytes: 8192})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	appendData(t, j, 0, 1, 4096)
	appendData(t, j, 0, 1, 3584)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		r := Record{Offset: 0, Length: 4096, Kind: KindData, Data: make([]byte, 4096)}
		errc <- j.Append(ctx, &r)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for j.Stats().BlockedWriters == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the writer over the cap did not block")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled writer: %v", err)
	}
	if st := j.Stats(); st.PendingRecords != 2 {
		t.Fatalf("a cancelled append was journaled: %+v", st)
	}
}

func TestRecordValidation(t *testing.T) {
	j, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	for _, r := range []Record{
		{Offset: 1, Length: 512, Kind: KindData, Data: make([]byte, 512)},
		{Offset: 0, Length: 100, Kind: KindZero},
		{Offset: 0, Length: 512, Kind: 9},
		{Offset: 0, Length: 1024, Kind: KindData, Data: make([]byte, 512)},
	} {
		if err := j.Append(context.Background(), &r); err == nil {
			t.Errorf("bad record accepted: %+v", r)
		}
	}
	if _, err := decodeRecord(1, []byte{1, 2, 3}); err == nil {
		t.Error("short record decoded")
	}
}

// TestJournalReclaimsDrainedSegments is the regression test for the
// unbounded journal: after writing and draining far more than a segment,
// the journal's disk use falls back to about one segment (and the intent
// log files, small here: their size does not depend on what is pending).
func TestJournalReclaimsDrainedSegments(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{SegmentBytes: 1 << 20, IntentLogSlots: 4 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	for i := 0; i < 40; i++ {
		appendData(t, j, int64(i%8)*(256<<10), byte(i), 256<<10)
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	peak := j.Stats().DiskBytes
	if peak < 10<<20 {
		t.Fatalf("10 MiB written but the journal holds %d bytes", peak)
	}
	recs, err := j.ReadBatch(1, 1<<30, 0)
	if err != nil || len(recs) != 40 {
		t.Fatalf("read %d records: %v", len(recs), err)
	}
	for i := range recs {
		if recs[i].Data[0] != byte(i) || len(recs[i].Data) != 256<<10 {
			t.Fatalf("record %d payload wrong", i)
		}
	}
	if err := j.Delete(recs, recs[39].Epoch); err != nil {
		t.Fatal(err)
	}
	// The trimmer deletes them in the background (trim.go).
	waitSegments(t, j, 0, "after draining everything")
	appendData(t, j, 0, 1, 512) // a new segment starts
	if n := len(j.segs.ids()); n != 1 {
		t.Fatalf("%d segments after a new append, want 1", n)
	}
	after := j.Stats().DiskBytes
	t.Logf("journal disk bytes: %d at peak, %d after the drain", peak, after)
	if after > 4<<20+peak/10 {
		t.Fatalf("journal still takes %d bytes after the drain (peak %d)", after, peak)
	}
}

// TestJournalDetectsCorruptPayload: a payload that changed under the index
// is refused with both CRCs named, never sent.
func TestJournalDetectsCorruptPayload(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	r := appendData(t, j, 0, 7, 4096)
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	// The payload rode in the intent log: wait until the indexer has put
	// it in its segment, or it would overwrite the corruption.
	if err := j.idx.flush(); err != nil {
		t.Fatal(err)
	}
	seg, _ := j.segs.get(r.seg)
	if _, err := seg.f.WriteAt([]byte{8}, r.segOff+100); err != nil {
		t.Fatal(err)
	}
	if _, err := j.ReadBatch(1, 1<<20, 0); err == nil || !strings.Contains(err.Error(), "CRC-32C") {
		t.Fatalf("corrupt payload read without error: %v", err)
	}
}

// TestValuesBelowThreshold: no value the journal writes is big enough for
// badger's value log, so every index entry lives in the memtable log and
// the LSM tree, which syncFiles makes durable.
func TestValuesBelowThreshold(t *testing.T) {
	if IndexSize >= valueThreshold || 8 >= valueThreshold {
		t.Fatalf("index entries of %d bytes would go to badger's value log (threshold %d)", IndexSize, valueThreshold)
	}
}

// TestSyncCoalesces: concurrent Sync calls share syncs, and each returns
// only after a sync that started after the call was made.
func TestSyncCoalesces(t *testing.T) {
	j, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	const writers, calls = 16, 40
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < calls; i++ {
				rec := Record{Offset: int64(w) * 4096, Length: 4096, Kind: KindData, Data: make([]byte, 4096)}
				if err := j.Append(context.Background(), &rec); err != nil {
					errs <- err
					return
				}
				j.syncState.Lock()
				before := j.syncStarted
				j.syncState.Unlock()
				if err := j.Sync(); err != nil {
					errs <- err
					return
				}
				j.syncState.Lock()
				after := j.syncFinished
				j.syncState.Unlock()
				if after <= before {
					errs <- fmt.Errorf("Sync returned on sync %d, which started before the call (%d had started)", after, before)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := j.syncStarted; n >= writers*calls {
		t.Fatalf("%d syncs for %d calls: nothing was shared", n, writers*calls)
	} else {
		t.Logf("%d syncs for %d concurrent calls", n, writers*calls)
	}
}

// waitSegments waits (10 s at most) until j has n segment files, in its
// table and on disk.
func waitSegments(t *testing.T, j *Journal, n int, when string) {
	t.Helper()
	files := func() int {
		ents, err := os.ReadDir(j.dir)
		if err != nil {
			t.Fatal(err)
		}
		c := 0
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), "seg-") && strings.HasSuffix(e.Name(), ".dat") {
				c++
			}
		}
		return c
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(j.segs.ids()) != n || files() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d segments (%d files) left %s, want %d", len(j.segs.ids()), files(), when, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
