package journal

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/journal/intentlog"
	"github.com/vhdsync/vhdsync/journal/internal/files"
)

// step is one write of the direct-intent test: a payload of n bytes of
// fill, then a barrier if barrier is set; direct says whether its entry
// must go to the intent log with O_DIRECT.
type step struct {
	n       int
	barrier bool
	direct  bool
}

// A lone writer that fsyncs after every write gets its entries written to
// the intent log with O_DIRECT, at block boundaries and never through the
// page cache; every other write (the first of a run, several writes per
// barrier, the write after such an epoch) is buffered. Every record reads
// back from the intent log alone after a kill, direct or not.
func TestDirectIntentsForFsyncEachWriter(t *testing.T) {
	steps := []step{
		{4096, true, false},  // no barrier seen yet
		{4096, true, true},   // the last epoch held one write
		{1536, true, true},   // a partial block: padded to the block's end
		{4096, false, true},  // first after a one-write epoch
		{4096, true, false},  // second in its epoch
		{4096, true, false},  // the last epoch held two
		{4096, true, true},   // one again
		{12288, true, true},  // three blocks and the entry: four blocks
		{512, false, true},   // first after a one-write epoch
		{512, false, false},  // then a run without barriers
		{4096, false, false}, //
	}
	wantDirect := uint64(0)
	for _, s := range steps {
		if s.direct {
			wantDirect++
		}
	}
	t.Run("direct", func(t *testing.T) { runDirectIntents(t, steps, Options{DirectStreak: 1}, wantDirect) })
	// The same writes with direct intents off: none is direct, and the
	// residency check below sees all of them cached (it would fail if the
	// buffered path bypassed the page cache too).
	none := make([]step, len(steps))
	for i, s := range steps {
		s.direct = false
		none[i] = s
	}
	t.Run("buffered", func(t *testing.T) { runDirectIntents(t, none, Options{BufferedIntents: true}, 0) })
}

// Direct writes start only after directStreak barriers in a row that each
// closed one append, and one epoch of several appends stops them: writers
// that fsync after every write but run side by side (epochs of one append
// between epochs of three) stay buffered, where a streak of one would
// have written some of them direct.
func TestDirectIntentsNeedAStreak(t *testing.T) {
	var lone []step
	for i := 0; i < directStreak; i++ {
		lone = append(lone, step{4096, true, false}) // the streak builds up
	}
	lone = append(lone,
		step{4096, true, true},   // after directStreak one-append epochs
		step{4096, false, true},  // first after a one-append epoch
		step{4096, true, false},  // second in its epoch: the streak ends
		step{4096, true, false},  // buffered again
		step{4096, false, false}, // a one-append epoch is not a streak
	)
	var side []step // epochs of 1 and 3 appends in turn
	for i := 0; i < 4*directStreak; i++ {
		side = append(side, step{4096, true, false}, step{4096, false, false}, step{4096, false, false}, step{4096, true, false})
	}
	t.Run("lone", func(t *testing.T) { runDirectIntents(t, lone, Options{}, 2) })
	t.Run("side by side", func(t *testing.T) { runDirectIntents(t, side, Options{}, 0) })
	t.Run("side by side, streak 1", func(t *testing.T) {
		j, err := Open(t.TempDir(), Options{DirectStreak: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer j.Close()
		for i, s := range side {
			appendData(t, j, int64(i)<<16, 0x33, s.n)
			if s.barrier {
				if _, err := j.Barrier(); err != nil {
					t.Fatal(err)
				}
			}
		}
		if got := j.Stats().DirectEntries; got == 0 {
			t.Errorf("no entry written direct with a streak of one barrier: the side-by-side steps no longer tell the streak apart")
		}
	})
}

func runDirectIntents(t *testing.T, steps []step, o Options, wantDirect uint64) {
	dir := t.TempDir()
	j, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	// The indexer waits: the payloads stay in the intent log only, which
	// is what a kill right after the barriers finds.
	j.idx.gate.Lock()
	held := true
	defer func() {
		if held {
			j.idx.gate.Unlock()
		}
	}()
	var want []Record
	for i, s := range steps {
		want = append(want, appendData(t, j, int64(i)<<16, byte(0x50+i), s.n))
		if s.barrier {
			if _, err := j.Barrier(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if got := j.Stats().DirectEntries; got != wantDirect {
		t.Errorf("%d entries written direct, want %d", got, wantDirect)
	}
	// Every entry is in the first file, the lowest id (the next one is
	// made ahead).
	ids, err := intentlog.List(dir)
	if err != nil || len(ids) == 0 {
		t.Fatalf("intent log files: %v %v", ids, err)
	}
	path := filepath.Join(dir, intentlog.Name(ids[0]))
	// The log writes direct where the filesystem opens its files so.
	if f, err := os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0); err != nil {
		t.Skipf("the filesystem of %s refuses O_DIRECT: nothing to check", dir)
	} else {
		f.Close()
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	// Residency first: reading the file below caches it.
	cached := resident(t, path, 0, st.Size())
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range steps {
		p := bytes.Index(b, bytes.Repeat([]byte{byte(0x50 + i)}, s.n))
		if p < 0 {
			t.Fatalf("write %d: its payload is not in the intent log", i)
		}
		entry := int64(p) - intentlog.SlotSize - intentlog.InlineHeader
		if s.direct && (entry%files.DirectAlign != 0 || entry < intentlog.HeaderSize) {
			t.Errorf("write %d: direct entry at offset %d, not at a block boundary", i, entry)
		}
		// A direct entry's pages must be out of the page cache: its write
		// bypassed it, and invalidated what creating the file had cached.
		// Without direct writes every entry is cached. (With them, a
		// buffered entry may be dropped too: the kernel invalidates whole
		// folios, and creating the file cached it in large ones.)
		if !s.direct && wantDirect > 0 {
			continue
		}
		for pg := entry / 4096; pg <= (int64(p)+int64(s.n)-1)/4096; pg++ {
			if cached[pg] == s.direct {
				t.Errorf("write %d (direct %v): page %d of its entry cached %v", i, s.direct, pg, cached[pg])
				break
			}
		}
	}
	killed := copyDir(t, dir)
	j.idx.gate.Unlock()
	held = false
	// Without the segment, replay must take every payload from the intent
	// log, direct or buffered.
	segs, err := files.ListNumbered(killed, "seg-")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range segs {
		if err := os.Remove(filepath.Join(killed, segName(id))); err != nil {
			t.Fatal(err)
		}
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
	if len(got) != len(want) {
		t.Fatalf("%d records after replay, want %d", len(got), len(want))
	}
	for i, w := range want {
		if g, ok := got[w.Seq]; !ok || g.Offset != w.Offset || !bytes.Equal(g.Data, w.Data) {
			t.Errorf("write %d (%d bytes): lost or changed by replay", i, w.Length)
		}
	}
}
