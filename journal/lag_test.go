package journal

import (
	"testing"
	"time"
)

// TestOldestNotOnRemote: the replica's lag counts from the first write of
// the oldest epoch the remote lacks, not from records the remote holds
// and the journal has yet to delete; neighbours merged beyond
// maxEpochFirst keep the earlier time; a reopened journal counts every
// pending record until told otherwise.
func TestOldestNotOnRemote(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := j.OldestNotOnRemote(); !got.IsZero() {
		t.Fatalf("empty journal: oldest not on the remote %v, want none", got)
	}
	before1 := time.Now()
	appendData(t, j, 0, 1, 4096)
	e1, err := j.Barrier()
	if err != nil {
		t.Fatal(err)
	}
	clockAdvance() // the epochs' first writes must differ in time
	before2 := time.Now()
	appendData(t, j, 4096, 2, 4096)
	e2, err := j.Barrier()
	if err != nil {
		t.Fatal(err)
	}
	clockAdvance()
	before3 := time.Now()
	appendData(t, j, 8192, 3, 4096) // the open epoch
	if got := j.OldestNotOnRemote(); got.Before(before1) || !got.Before(before2) {
		t.Fatalf("nothing on the remote: oldest %v, want epoch %d's first write (after %v, before %v)", got, e1, before1, before2)
	}
	j.OnRemote(e1)
	if got := j.Stats().OldestNotOnRemote; got.Before(before2) || !got.Before(before3) {
		t.Fatalf("epoch %d on the remote, its records still pending: oldest %v, want epoch %d's first write (after %v, before %v)", e1, got, e2, before2, before3)
	}
	if st := j.Stats(); st.PendingRecords != 3 {
		t.Fatalf("pending records %d, want 3 (OnRemote deletes nothing)", st.PendingRecords)
	}
	j.OnRemote(e2)
	if got := j.OldestNotOnRemote(); got.Before(before3) {
		t.Fatalf("epochs up to %d on the remote: oldest %v, want the open epoch's first write (after %v)", e2, got, before3)
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	j.OnRemote(j.Stats().ClosedEpoch)
	if got := j.OldestNotOnRemote(); !got.IsZero() {
		t.Fatalf("every epoch on the remote: oldest %v, want none", got)
	}

	// Merging beyond the bound keeps the earlier time of each pair.
	j.remoteMu.Lock()
	base := j.onRemote
	j.remoteMu.Unlock()
	for i := range maxEpochFirst + 1 {
		j.noteEpochFirst(base+1+uint64(i), int64(1000+i))
	}
	j.remoteMu.Lock()
	n := len(j.epochFirst)
	j.remoteMu.Unlock()
	if n > maxEpochFirst/2+1 {
		t.Fatalf("%d entries after the bound was passed, want at most %d", n, maxEpochFirst/2+1)
	}
	j.OnRemote(base + 1) // half of the first merged pair: its time stays
	if got := j.OldestNotOnRemote().UnixNano(); got != 1000 {
		t.Fatalf("after a merged pair was half delivered: oldest %d, want 1000 (never less lag than the truth)", got)
	}
	j.OnRemote(base + 2)
	if got := j.OldestNotOnRemote().UnixNano(); got != 1002 {
		t.Fatalf("after the first merged pair was delivered: oldest %d, want 1002", got)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	// Reopened, with records pending: they all count until OnRemote.
	j, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if got := j.OldestNotOnRemote(); got.Before(before1) || !got.Before(before2) {
		t.Fatalf("reopened: oldest not on the remote %v, want the oldest pending record's time (after %v, before %v)", got, before1, before2)
	}
}

// clockAdvance returns once the clock has moved on a millisecond.
func clockAdvance() {
	for start := time.Now(); time.Since(start) < time.Millisecond; {
	}
}
