package transfer

import (
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

func TestScanZerosAndMerge(t *testing.T) {
	buf := make([]byte, 64<<10)
	mark := func(sec ...int) {
		for _, s := range sec {
			buf[s*512+17] = 1
		}
	}
	// Sectors 3-5 (a run with zero edges inside its 4 KiB block), 7, and
	// 100: gaps of 1 and 94 sectors.
	mark(3, 4, 5, 7, 100)
	runs, nz := scanZeros(buf, 0, int64(len(buf)))
	want := []span{{3 * 512, 6 * 512}, {7 * 512, 8 * 512}, {100 * 512, 101 * 512}}
	if !reflect.DeepEqual(runs, want) || nz != 5*512 {
		t.Fatalf("runs %v nonzero %d", runs, nz)
	}
	if got := mergeRuns(runs, 512); !reflect.DeepEqual(got, want) {
		t.Fatalf("gap 512 merged: %v", got)
	}
	if got := mergeRuns(runs, 1024); !reflect.DeepEqual(got, []span{{3 * 512, 8 * 512}, {100 * 512, 101 * 512}}) {
		t.Fatalf("gap 1 KiB: %v", got)
	}
	if got := mergeRuns(runs, 64<<10); !reflect.DeepEqual(got, []span{{3 * 512, 101 * 512}}) {
		t.Fatalf("gap 64 KiB: %v", got)
	}
	// A scan of part of the buffer sees only that part.
	if runs, nz := scanZeros(buf, 4*512, 7*512); !reflect.DeepEqual(runs, []span{{4 * 512, 6 * 512}}) || nz != 1024 {
		t.Fatalf("partial scan %v %d", runs, nz)
	}
}

func TestWindowIterCoversExtents(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := 0; round < 200; round++ {
		size := int64(1+r.IntN(40)) << 20
		var ext []vhdlayer.Extent
		for off := int64(r.IntN(3 << 20)); off < size; {
			n := int64(1 + r.IntN(9<<20))
			ext = append(ext, vhdlayer.Extent{Offset: off, Length: min(n, size-off)})
			off += n + int64(1+r.IntN(5<<20))
		}
		al := alignExtents(ext, size)
		var got []span
		it := windowIter{ext: al}
		prev := int64(-1)
		for w, ok := it.next(); ok; w, ok = it.next() {
			if w.idx <= prev {
				t.Fatalf("window %d after %d", w.idx, prev)
			}
			prev = w.idx
			for _, p := range w.parts {
				if p.off < w.off() || p.end > w.off()+WindowSize || p.off%512 != 0 || p.end%512 != 0 || p.off >= p.end {
					t.Fatalf("window %d part %v", w.idx, p)
				}
				if n := len(got); n > 0 && got[n-1].end == p.off {
					got[n-1].end = p.end
				} else {
					got = append(got, p)
				}
			}
		}
		if !reflect.DeepEqual(got, al) {
			t.Fatalf("round %d: windows give %v, extents %v", round, got, al)
		}
	}
}

func TestHeldMissing(t *testing.T) {
	h := newHeldSet([]pageblob.Range{{Off: 4096, Len: 1024}, {Off: 0, Len: 512}, {Off: 5120, Len: 512}, {Off: 8192, Len: 512}})
	if len(h) != 3 || h[1] != (pageblob.Range{Off: 4096, Len: 1536}) {
		t.Fatalf("merged %v", h)
	}
	cases := []struct {
		off, end int64
		want     []span
	}{
		{0, 512, nil},
		{0, 1024, []span{{512, 1024}}},
		{4096, 5632, nil},
		{3584, 9216, []span{{3584, 4096}, {5632, 8192}, {8704, 9216}}},
		{10000, 10512, []span{{10000, 10512}}},
	}
	for _, c := range cases {
		if got := h.missing(c.off, c.end); !reflect.DeepEqual(got, c.want) {
			t.Errorf("missing(%d,%d) = %v, want %v", c.off, c.end, got, c.want)
		}
	}
	if n := h.bytesIn(4608, 9000); n != 1024+512 {
		t.Fatalf("bytesIn %d", n)
	}
}

func TestTrackerFrontier(t *testing.T) {
	p := &progress{DoneBelow: 2, Done: []int64{5}}
	tr := newTracker(p)
	for _, idx := range []int64{0, 1} {
		tr.passed(idx, false)
	}
	tr.passed(3, true)
	tr.passed(4, true)
	tr.passed(5, false)
	tr.passed(7, true)
	tr.done(4, 10, 5)
	tr.done(7, 10, 5)
	var q progress
	tr.record(&q)
	if q.DoneBelow != 3 || !reflect.DeepEqual(q.Done, []int64{4, 5, 7}) || q.BlobBytesDone != 20 {
		t.Fatalf("record %+v", q)
	}
	tr.done(3, 1, 1)
	tr.record(&q)
	if q.DoneBelow != 8 || len(q.Done) != 0 {
		t.Fatalf("after 3: %+v", q)
	}
	if !q.isDone(6) || q.isDone(8) {
		t.Fatal("isDone")
	}
}
