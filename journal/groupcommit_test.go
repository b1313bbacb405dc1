package journal

import (
	"context"
	"sync"
	"testing"
	"time"
)

// TestGroupCommitConcurrentAppends: many concurrent appends each return
// readable (a record is visible to reads once Append returns, before any
// barrier, though the indexer commits it later), seqs are unique and
// dense, and the indexer committed each append's entries exactly once
// (how many shared a transaction is logged, not asserted).
func TestGroupCommitConcurrentAppends(t *testing.T) {
	j, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	const writers, each = 32, 200
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				r := Record{Offset: int64(w*each+i) * SectorSize, Length: SectorSize, Kind: KindData, Data: make([]byte, SectorSize)}
				r.Data[0] = byte(w)
				if err := j.Append(context.Background(), &r); err != nil {
					errs <- err
					return
				}
				// Committed: the index entry is visible right away.
				found := false
				if err := j.scan(r.Seq, func(got Record) (bool, error) {
					found = got.Seq == r.Seq && got.Offset == r.Offset
					return true, nil
				}); err != nil {
					errs <- err
					return
				}
				if !found {
					t.Errorf("record %d not in the index after Append returned", r.Seq)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	if err := j.ReadAll(func(r Record) error {
		seen[r.Seq] = true
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(seen) != writers*each {
		t.Fatalf("%d records in the journal, want %d", len(seen), writers*each)
	}
	for s := uint64(1); s <= writers*each; s++ {
		if !seen[s] {
			t.Fatalf("seq %d missing", s)
		}
	}
	// The synced marks (see torn.go) are entries too.
	groups, entries := j.group.groups.Load(), j.group.entries.Load()-j.marks.Load()
	if entries != writers*each {
		t.Fatalf("group commit counted %d entries besides %d synced marks, want %d", entries, j.marks.Load(), writers*each)
	}
	t.Logf("%d entries in %d badger transactions (%.1f per transaction)", entries, groups, float64(entries)/float64(groups))
}

// TestGroupCommitBarrierWaits: a barrier taken while appends are in flight
// returns only when their entries are committed, and they land in the epoch
// it closed or a later one, never lost between.
func TestGroupCommitBarrierWaits(t *testing.T) {
	j, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				r := Record{Offset: int64(w) * SectorSize, Length: SectorSize, Kind: KindZero}
				if err := j.Append(context.Background(), &r); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		closed, err := j.Barrier()
		if err != nil {
			t.Fatal(err)
		}
		// Every record of a closed epoch is committed: no seq gap below
		// the first record of the open epoch.
		var prev uint64
		if err := j.scan(0, func(r Record) (bool, error) {
			if r.Epoch > closed {
				return true, nil
			}
			if prev != 0 && r.Seq != prev+1 {
				t.Errorf("closed epoch %d: seq %d follows %d", closed, r.Seq, prev)
				return true, nil
			}
			prev = r.Seq
			return false, nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
}
