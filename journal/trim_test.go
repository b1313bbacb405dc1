package journal

import (
	"bytes"
	"testing"
	"time"
)

// entriesUpTo counts the index entries with a seq up to seq.
func entriesUpTo(t *testing.T, j *Journal, seq uint64) int {
	t.Helper()
	n := 0
	first, ok, err := j.firstEntry()
	if err != nil {
		t.Fatal(err)
	}
	for s := first; ok && s <= seq; s++ {
		if _, err := j.getRecordRaw(s); err == nil {
			n++
		}
	}
	return n
}

// TestDeleteRangeTrimsLazily: a drained batch is one key; its records'
// index entries, left behind (as after a crash before the trimmer reached
// them), are never read again, neither by Scan nor by recovery, and the
// trimmer deletes them once it runs.
func TestDeleteRangeTrimsLazily(t *testing.T) {
	dir := t.TempDir()
	testNoTrim = true
	t.Cleanup(func() { testNoTrim = false })
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	var first []Record
	for i := range 100 {
		first = append(first, appendData(t, j, int64(i)*4096, 1, 4096))
	}
	e1, err := j.Barrier()
	if err != nil {
		t.Fatal(err)
	}
	later := appendData(t, j, 0, 2, 4096)
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	var bytes1 int64
	for i := range first {
		bytes1 += first[i].JournalBytes()
	}
	d := Drained{FirstSeq: first[0].Seq, LastSeq: first[99].Seq, Records: 100, Bytes: bytes1, LastEpoch: e1}
	if err := j.DeleteRange(d); err != nil {
		t.Fatal(err)
	}
	check := func(j *Journal, when string) {
		t.Helper()
		if st := j.Stats(); st.PendingRecords != 1 || st.PendingBytes != later.JournalBytes() {
			t.Fatalf("%s: pending %d records, %d bytes; want 1, %d", when, st.PendingRecords, st.PendingBytes, later.JournalBytes())
		}
		var seen []uint64
		if err := j.Scan(0, func(r Record) (bool, error) { seen = append(seen, r.Seq); return false, nil }); err != nil {
			t.Fatal(err)
		}
		if len(seen) != 1 || seen[0] != later.Seq {
			t.Fatalf("%s: Scan(0) read seqs %v, want only %d", when, seen, later.Seq)
		}
		recs, err := j.ReadBatch(0, 1<<30, 0)
		if err != nil || len(recs) != 1 || !bytes.Equal(recs[0].Data, later.Data) {
			t.Fatalf("%s: ReadBatch(0) = %d records (%v), want the later one", when, len(recs), err)
		}
	}
	check(j, "after DeleteRange")
	if n := entriesUpTo(t, j, d.LastSeq); n != 100 {
		t.Fatalf("without the trimmer %d entries of the drained batch are left, want all 100 (the test would prove nothing)", n)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	// Recovery skips them: counts, seqs and epochs as if deleted.
	j, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	check(j, "after reopen")
	if r := appendData(t, j, 0, 3, 512); r.Seq != later.Seq+1 {
		t.Fatalf("seq after reopen %d, want %d", r.Seq, later.Seq+1)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	// With the trimmer, the left entries go.
	testNoTrim = false
	j, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	deadline := time.Now().Add(10 * time.Second)
	for entriesUpTo(t, j, d.LastSeq) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the trimmer left %d entries of drained records after 10 s", entriesUpTo(t, j, d.LastSeq))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := j.Stats(); st.PendingRecords != 2 {
		t.Fatalf("pending after trim: %d records, want 2", st.PendingRecords)
	}
}
