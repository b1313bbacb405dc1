package journal

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/vhdsync/vhdsync/journal/intentlog"
	"github.com/vhdsync/vhdsync/journal/internal/files"
)

// copyDir copies every file of src into a new directory: with the journal
// still open in this process it is the state a kill -9 would leave (the
// page cache, badger's mmaps included).
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		in, err := os.Open(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(filepath.Join(dst, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, in); err != nil {
			t.Fatal(err)
		}
		in.Close()
		if err := out.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func ilogFiles(t *testing.T, dir string) int {
	t.Helper()
	ids, err := intentlog.List(dir)
	if err != nil {
		t.Fatal(err)
	}
	return len(ids)
}

// TestIntentLogReplay: appends acknowledged while the indexer had not put
// them in badger yet (held), spread over several intent log files, come
// back after a kill -9 (a copy of the live directory); records drained
// before the kill, whose slots are still in a file, do not.
func TestIntentLogReplay(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{IntentLogSlots: 64, SegmentBytes: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	// 100 records, drained: files fill, are recycled, and the current one
	// still holds slots of drained records.
	for i := range 100 {
		appendData(t, j, int64(i)*4096, byte(i), 4096)
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	recs, err := j.ReadBatch(1, 1<<30, 0)
	if err != nil || len(recs) != 100 {
		t.Fatalf("read %d records: %v", len(recs), err)
	}
	if err := j.Delete(recs, recs[99].Epoch); err != nil {
		t.Fatal(err)
	}
	// 150 more with the indexer held: in the intent log only.
	j.idx.gate.Lock()
	want := map[uint64]Record{}
	for i := range 150 {
		r := Record{Offset: int64(i) * 8192, Length: 1024, Kind: KindData, Data: bytes.Repeat([]byte{byte(i + 1)}, 1024)}
		if i%10 == 9 {
			r = Record{Offset: int64(i) * 8192, Length: 4096, Kind: KindZero}
		}
		if err := j.Append(context.Background(), &r); err != nil {
			j.idx.gate.Unlock()
			t.Fatal(err)
		}
		want[r.Seq] = r
		if i == 74 {
			if _, err := j.Barrier(); err != nil {
				j.idx.gate.Unlock()
				t.Fatal(err)
			}
		}
	}
	files := ilogFiles(t, dir)
	killed := copyDir(t, dir)
	j.idx.gate.Unlock()
	if files < 3 {
		t.Fatalf("%d intent log files: the test wants the entries spread over several", files)
	}

	k, err := Open(killed, Options{IntentLogSlots: 64, SegmentBytes: 256 << 10})
	if err != nil {
		t.Fatalf("reopen after the kill: %v", err)
	}
	if k.replayedIntents < len(want) {
		t.Fatalf("replayed %d intent log entries, want at least %d", k.replayedIntents, len(want))
	}
	got := map[uint64]Record{}
	if err := k.ReadAll(func(r Record) error { got[r.Seq] = r; return nil }); err != nil {
		t.Fatal(err)
	}
	for seq, w := range want {
		g, ok := got[seq]
		if !ok {
			t.Fatalf("acknowledged record %d lost", seq)
		}
		if g.Offset != w.Offset || g.Kind != w.Kind || g.Length != w.Length || !bytes.Equal(g.Data, w.Data) {
			t.Fatalf("record %d came back as %v %d+%d, want %v %d+%d", seq, g.Kind, g.Offset, g.Length, w.Kind, w.Offset, w.Length)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d records after the kill, want %d: drained records came back", len(got), len(want))
	}
	// Epochs survive too: the barrier after record 75 split them.
	if got[recs[99].Seq+1].Epoch == got[recs[99].Seq+150].Epoch {
		t.Fatal("the barrier in the middle of the held appends was lost")
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if n := ilogFiles(t, killed); n != 0 {
		t.Fatalf("%d intent log files left after a clean close", n)
	}
}

// TestIntentLogReplayOrder: a key set in two files is replayed in the
// order it was written (by generation), not by file name: a recycled file
// has the lowest id and the newest entries.
func TestIntentLogReplayOrder(t *testing.T) {
	dir := t.TempDir()
	l := intentlog.New(dir, 2, 1, 0)
	rec := func(seq uint64, off int64) intentlog.Entry {
		r := Record{Seq: seq, Epoch: 1, Offset: off, Length: SectorSize, Kind: KindZero}
		return intentlog.Entry{Key: recKey(seq), Val: r.encode()}
	}
	steps := [][]intentlog.Entry{{rec(1, 0), rec(2, 0)}, {rec(5, 0), rec(3, 0)}}
	var spans [][]intentlog.Span
	for _, entries := range steps {
		sp, err := l.Write(entries)
		if err != nil {
			t.Fatal(err)
		}
		spans = append(spans, sp)
	}
	l.Resolve(spans[0]) // file 1 is in badger
	if err := l.Recycle(l.Done()); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Write([]intentlog.Entry{rec(5, 4096)}); err != nil { // into file 1, generation 3
		t.Fatal(err)
	}
	if err := l.Close(false); err != nil {
		t.Fatal(err)
	}
	if gen, entries, err := intentlog.Read(dir, 1); err != nil || gen != 3 || len(entries) != 1 {
		t.Fatalf("the recycled file was not reused: generation %d, %d entries (%v)", gen, len(entries), err)
	}
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	r, err := j.getRecord(5)
	if err != nil {
		t.Fatal(err)
	}
	if r.Offset != 4096 {
		t.Fatalf("record 5 replayed at offset %d, want 4096 (its newest entry)", r.Offset)
	}
}

// TestIndexerFailure: when badger refuses the indexer's commits, the
// append already acknowledged stays in the intent log (and comes back
// after a kill -9), reads report the failure, and later appends fail
// instead of piling up.
func TestIndexerFailure(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	a := appendData(t, j, 0, 1, 4096)
	if err := j.idx.flush(); err != nil {
		t.Fatal(err)
	}
	// badger refuses every commit from now on.
	j.idx.gate.Lock()
	j.group.failCommit = func() error { return errors.New("injected: badger refuses the write") }
	j.idx.gate.Unlock()
	defer func() {
		j.idx.gate.Lock()
		j.group.failCommit = nil
		j.idx.gate.Unlock()
		j.Close()
	}()
	b := appendData(t, j, 4096, 2, 4096) // logged before the indexer fails
	if err := j.idx.flush(); err == nil {
		t.Fatal("flush returned nil while badger refuses every commit")
	}
	c := Record{Offset: 8192, Length: 4096, Kind: KindData, Data: bytes.Repeat([]byte{3}, 4096)}
	if err := j.Append(context.Background(), &c); !errors.Is(err, ErrIndexRefused) {
		t.Fatalf("an append while the index cannot take entries returned %v, want ErrIndexRefused", err)
	}
	if _, err := j.ReadBatch(1, 1<<30, 0); err == nil {
		t.Fatal("ReadBatch succeeded while the index is behind")
	}

	k, err := Open(copyDir(t, dir), Options{})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer k.Close()
	got := map[uint64]Record{}
	if err := k.ReadAll(func(r Record) error { got[r.Seq] = r; return nil }); err != nil {
		t.Fatal(err)
	}
	for _, w := range []Record{a, b} {
		if g, ok := got[w.Seq]; !ok || !bytes.Equal(g.Data, w.Data) {
			t.Fatalf("acknowledged record %d lost or changed after the index failed", w.Seq)
		}
	}
	if len(got) != 2 {
		t.Fatalf("%d records after reopening, want 2 (the refused append must not appear)", len(got))
	}
}

// TestInlinePayloadBarrier: a barrier after small writes fdatasyncs no
// segment (their payloads are in the intent log), one after a large write
// does; and before an intent log file is recycled, every segment the
// indexer copied payloads to is synced.
func TestInlinePayloadBarrier(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{IntentLogSlots: 1 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if j.inlineMax <= 4096 || j.inlineMax >= 64<<10 {
		t.Fatalf("inline limit %d: the test wants 4 KiB inline and 64 KiB not", j.inlineMax)
	}
	recycled := 0
	testBeforeRecycle = func(j *Journal) {
		recycled++
		for _, id := range j.segs.ids() {
			if seg, err := j.segs.get(id); err == nil && seg.copied.Load() {
				t.Errorf("intent log recycled before segment %s, which holds its payloads, was synced", segName(id))
			}
		}
	}
	defer func() { testBeforeRecycle = nil }()
	appendData(t, j, 0, 1, 4096) // makes the segment: the directory is synced
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	before := j.segs.barrierSyncs.Load()
	for i := range 200 {
		appendData(t, j, int64(i)*4096, byte(i), 4096)
		if i%10 == 0 {
			if _, err := j.Barrier(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := j.segs.barrierSyncs.Load() - before; n != 0 {
		t.Fatalf("barriers after 4 KiB writes fdatasynced segments %d times, want 0", n)
	}
	appendData(t, j, 0, 9, 64<<10)
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	if n := j.segs.barrierSyncs.Load() - before; n == 0 {
		t.Fatal("a barrier after a 64 KiB write fdatasynced no segment")
	}
	if err := j.idx.flush(); err != nil {
		t.Fatal(err)
	}
	// 200 entries of 34 slots in 1,024-slot files: several were recycled.
	if recycled == 0 {
		t.Fatal("no intent log file was recycled")
	}
	recs, err := j.ReadBatch(1, 1<<30, 0)
	if err != nil || len(recs) != 202 {
		t.Fatalf("read %d records: %v", len(recs), err)
	}
	for i, r := range recs[1:201] {
		if !bytes.Equal(r.Data, bytes.Repeat([]byte{byte(i)}, 4096)) {
			t.Fatalf("record %d: wrong payload", r.Seq)
		}
	}
}

// TestInlinePayloadReplay: with the indexer held, small payloads exist in
// the intent log only. After a kill -9 (a copy of the live directory)
// whose segment file is gone as well (a power loss before the directory
// was synced), replay writes them back to a new segment file; a payload
// torn in the log voids its record and no other.
func TestInlinePayloadReplay(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	j.idx.gate.Lock()
	held := true
	defer func() {
		if held { // a failure below: let Close finish
			j.idx.gate.Unlock()
		}
	}()
	var want []Record
	for i := range 20 {
		want = append(want, appendData(t, j, int64(i)*8192, byte(0x40+i), 4096))
	}
	if _, err := j.Barrier(); err != nil {
		t.Fatal(err)
	}
	killed := copyDir(t, dir)
	j.idx.gate.Unlock()
	held = false
	segs, err := files.ListNumbered(killed, "seg-")
	if err != nil || len(segs) != 1 {
		t.Fatalf("segments in the copy: %v %v", segs, err)
	}
	segPath := filepath.Join(killed, segName(segs[0]))
	// The segment is allocated whole when made (zeros): none of the
	// payloads (all non-zero) may be in it yet.
	if b, err := os.ReadFile(segPath); err != nil || len(bytes.TrimLeft(b, "\x00")) > 0 {
		t.Fatalf("the segment (%d bytes, %v) holds data before replay: the test wants the payloads in the intent log only", len(b), err)
	}
	if err := os.Remove(segPath); err != nil {
		t.Fatal(err)
	}
	// Tear record 7's payload: flip one byte of it in the intent log.
	ids, err := intentlog.List(killed)
	if err != nil {
		t.Fatal(err)
	}
	torn := false
	for _, id := range ids {
		p := filepath.Join(killed, intentlog.Name(id))
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.Index(b, bytes.Repeat([]byte{0x47}, 4096)); i >= 0 {
			b[i+100] ^= 0xff
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			torn = true
		}
	}
	if !torn {
		t.Fatal("record 7's payload is not in the intent log")
	}
	k, err := Open(killed, Options{})
	if err != nil {
		t.Fatalf("reopen after the kill: %v", err)
	}
	defer k.Close()
	got := map[uint64]Record{}
	if err := k.ReadAll(func(r Record) error { got[r.Seq] = r; return nil }); err != nil {
		t.Fatal(err)
	}
	for i, w := range want {
		g, ok := got[w.Seq]
		if i == 7 {
			if ok {
				t.Fatal("record 7, whose payload was torn, was replayed")
			}
			continue
		}
		if !ok || !bytes.Equal(g.Data, w.Data) || g.Offset != w.Offset {
			t.Fatalf("record %d (%d bytes) lost or changed by replay", w.Seq, w.Length)
		}
	}
	if len(got) != len(want)-1 {
		t.Fatalf("%d records after replay, want %d", len(got), len(want)-1)
	}
}
