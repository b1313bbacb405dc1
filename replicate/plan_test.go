package replicate

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"pgregory.net/rapid"

	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
)

// planCase draws a batch (records over a small disk), the ranges of later
// pending records, and a cost of a request.
func planCase(t *rapid.T) (recs []journal.Record, later []Range, reqCost int64) {
	const sectors = 4096 // a 2 MiB disk, small enough for gaps to matter
	n := rapid.IntRange(1, 60).Draw(t, "records")
	for i := range n {
		off := int64(rapid.IntRange(0, sectors-1).Draw(t, "off")) * journal.SectorSize
		l := int64(rapid.IntRange(1, 256).Draw(t, "sectors")) * journal.SectorSize
		l = min(l, sectors*journal.SectorSize-off)
		kind := journal.KindData
		if rapid.IntRange(0, 5).Draw(t, "kind") == 0 {
			kind = journal.KindZero
		}
		recs = append(recs, journal.Record{Seq: uint64(i), Epoch: 1, Offset: off, Length: l, Kind: kind})
	}
	for range rapid.IntRange(0, 10).Draw(t, "later") {
		off := int64(rapid.IntRange(0, sectors-1).Draw(t, "laterOff")) * journal.SectorSize
		l := int64(rapid.IntRange(1, 64).Draw(t, "laterSectors")) * journal.SectorSize
		later = append(later, Range{off, off + l})
	}
	reqCost = int64(rapid.IntRange(0, 512).Draw(t, "costSectors")) * journal.SectorSize
	return recs, mergeRanges(later), reqCost
}

// TestPlanSpansProperty: the planned requests of a batch are disjoint and
// sorted; Put Pages are at most maxPut bytes; every sector the batch
// writes is in exactly one request of the right kind (data in a Put Page,
// zeros in a Clear Pages); the only other sectors a Put Page covers are
// planned fills, each between two data parts, no longer than the cost of
// a request, and touching no later record's range.
func TestPlanSpansProperty(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		recs, later, reqCost := planCase(t)
		maxPut := int64(rapid.SampledFrom([]int{4096, 64 << 10, remote.MaxPutPage}).Draw(t, "maxPut"))
		b := &batch{later: later, watch: nopWatch{}}
		for i := range recs {
			r := &recs[i]
			e := extent{off: r.Offset, end: r.End(), zero: r.Kind != journal.KindData}
			if !e.zero {
				e.rec = r
			}
			b.c.addExtent(e)
		}
		b.resolve()
		want := map[int64]bool{} // sector -> written as data (false: zero)
		for _, e := range b.c.ext {
			for x := e.off; x < e.end; x += journal.SectorSize {
				want[x] = !e.zero
			}
		}
		spans := b.spans(nil, maxPut, reqCost)
		seen := map[int64]bool{}
		var prevEnd int64 = -1
		for k, sp := range spans {
			if sp.Off < prevEnd || sp.End <= sp.Off {
				t.Fatalf("span %d [%d,%d) not after %d or empty", k, sp.Off, sp.End, prevEnd)
			}
			prevEnd = sp.End
			if sp.Clear {
				for x := sp.Off; x < sp.End; x += journal.SectorSize {
					if w, ok := want[x]; !ok || w {
						t.Fatalf("clear span %d covers sector %d, which the batch does not zero", k, x)
					}
					seen[x] = true
				}
				continue
			}
			if sp.End-sp.Off > maxPut {
				t.Fatalf("Put Page %d of %d bytes, cap %d", k, sp.End-sp.Off, maxPut)
			}
			if sp.Load == nil {
				t.Fatalf("Put Page %d is not planned", k)
			}
			parts := spanParts(b, sp)
			for i, p := range parts {
				if p.rec == nil {
					if i == 0 || i == len(parts)-1 || parts[i-1].rec == nil || parts[i+1].rec == nil {
						t.Fatalf("span %d: fill [%d,%d) not between two data parts", k, p.off, p.end)
					}
					if p.end-p.off > reqCost {
						t.Fatalf("span %d: fill of %d bytes costs more than a request (%d)", k, p.end-p.off, reqCost)
					}
					if overlaps(later, p.off, p.end) {
						t.Fatalf("span %d: fill [%d,%d) touches a later record's range", k, p.off, p.end)
					}
					for x := p.off; x < p.end; x += journal.SectorSize {
						if _, ok := want[x]; ok {
							t.Fatalf("span %d: fill covers sector %d, which the batch writes", k, x)
						}
					}
					continue
				}
				for x := p.off; x < p.end; x += journal.SectorSize {
					if !want[x] {
						t.Fatalf("span %d: data part covers sector %d, which the batch does not write as data", k, x)
					}
					seen[x] = true
				}
			}
		}
		if len(seen) != len(want) {
			t.Fatalf("the requests cover %d of the batch's %d sectors", len(seen), len(want))
		}
	})
}

// spanParts recovers a planned span's parts by loading it with a watch
// that refuses every fill and records what was asked.
func spanParts(b *batch, sp Span) []part {
	var parts []part
	at := sp.Off
	for _, e := range b.c.ext {
		if e.zero || e.end <= sp.Off || e.off >= sp.End {
			continue
		}
		off, end := max(e.off, sp.Off), min(e.end, sp.End)
		if off > at {
			parts = append(parts, part{off: at, end: off})
		}
		parts = append(parts, part{off: off, end: end, rec: e.rec})
		at = end
	}
	return parts
}

// nopWatch refuses nothing and reads zeros.
type nopWatch struct{}

func (nopWatch) ReadClean(off int64, p []byte) ([]Range, bool, error) { return nil, true, nil }
func (nopWatch) Stop()                                                {}

// fakeWatch reads fills from an image and refuses the ranges in dirty.
type fakeWatch struct {
	img   []byte
	dirty []Range
	holes []Range
}

func (w fakeWatch) ReadClean(off int64, p []byte) ([]Range, bool, error) {
	end := off + int64(len(p))
	if overlaps(w.dirty, off, end) {
		return nil, false, nil
	}
	copy(p, w.img[off:end])
	var hs []Range
	for _, h := range w.holes {
		if h.Off < end && off < h.End {
			hs = append(hs, Range{max(h.Off, off), min(h.End, end)})
		}
	}
	return hs, true, nil
}
func (fakeWatch) Stop() {}

// TestLoadFillsAndRefusals: a planned Put Page loads its records' bytes
// and its fills from the image; a fill the watch refuses, and a hole, are
// not sent: the request is cut around them.
func TestLoadFillsAndRefusals(t *testing.T) {
	const sz = 64 << 10
	img := make([]byte, sz)
	for i := range img {
		img[i] = byte(i/512 + 1)
	}
	payload := func(n int, v byte) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = v
		}
		return p
	}
	a := &journal.Record{Offset: 0, Length: 4096, Kind: journal.KindData, Data: payload(4096, 0xA1)}
	c := &journal.Record{Offset: 8192, Length: 4096, Kind: journal.KindData, Data: payload(4096, 0xC1)}
	d := &journal.Record{Offset: 16384, Length: 4096, Kind: journal.KindData, Data: payload(4096, 0xD1)}
	parts := []part{{off: 0, end: 4096, rec: a}, {off: 4096, end: 8192}, {off: 8192, end: 12288, rec: c}, {off: 12288, end: 16384}, {off: 16384, end: 20480, rec: d}}
	for _, tc := range []struct {
		name         string
		dirty, holes []Range
		want         []Range
	}{
		{"all filled", nil, nil, []Range{{0, 20480}}},
		{"second fill refused", []Range{{13000, 13100}}, nil, []Range{{0, 12288}, {16384, 20480}}},
		{"hole in the first fill", nil, []Range{{5120, 6144}}, []Range{{0, 5120}, {6144, 20480}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &batch{watch: fakeWatch{img: img, dirty: tc.dirty, holes: tc.holes}}
			subs, st, err := b.load(payloadReader{}, 0, 20480, parts, remote.MaxPutPage, 0)
			if err != nil {
				t.Fatal(err)
			}
			var got []Range
			for _, s := range subs {
				if s.Clear {
					t.Fatalf("a clear request %d-%d (cost 0 sends zeros as data)", s.Off, s.End)
				}
				got = append(got, Range{s.Off, s.End})
				data := s.Data.Bytes()
				for x := s.Off; x < s.End; x++ {
					var w byte
					switch {
					case x < 4096:
						w = 0xA1
					case x >= 8192 && x < 12288:
						w = 0xC1
					case x >= 16384:
						w = 0xD1
					default:
						w = img[x]
					}
					if data[x-s.Off] != w {
						t.Fatalf("byte %d is %#x, want %#x", x, data[x-s.Off], w)
					}
				}
			}
			if len(got) != len(tc.want) {
				t.Fatalf("requests %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("requests %v, want %v", got, tc.want)
				}
			}
			var planned int64 = 8192
			if st.Filled+st.Unfilled != planned {
				t.Fatalf("filled %d + unfilled %d, want the planned %d", st.Filled, st.Unfilled, planned)
			}
		})
	}
}

// payloadReader serves records' payloads from their Data.
type payloadReader struct{}

func (payloadReader) Payload(r *journal.Record) ([]byte, error) { return r.Data, nil }

// TestFillThresholdBalancesLimits: fills are chosen for the blob's two
// separate budgets, requests and bytes, spent at once (fillThreshold). A
// batch bound by its requests fills its smallest gaps until the two cost
// about the same, and ends up faster than filling no gap and than filling
// every gap under a request's cost; a batch bound by its bytes fills none.
func TestFillThresholdBalancesLimits(t *testing.T) {
	const reqCost = 120 << 10
	build := func(exts [][2]int64) *batch {
		b := &batch{watch: nopWatch{}}
		for _, e := range exts {
			r := &journal.Record{Offset: e[0], Length: e[1] - e[0], Kind: journal.KindData}
			b.c.addExtent(extent{off: e[0], end: e[1], rec: r})
		}
		b.resolve()
		return b
	}
	// cost is the time a batch's requests take at the limits, in bytes:
	// max(requests * reqCost, bytes).
	cost := func(spans []Span) (reqs, bytes, c int64) {
		for _, sp := range spans {
			reqs++
			bytes += sp.End - sp.Off
		}
		return reqs, bytes, max(reqs*reqCost, bytes)
	}
	costWith := func(exts [][2]int64, fillUpTo int64) int64 {
		var reqs, bytes int64
		for i, e := range exts {
			bytes += e[1] - e[0]
			if i > 0 && e[0]-exts[i-1][1] <= fillUpTo {
				bytes += e[0] - exts[i-1][1]
				continue
			}
			reqs++
		}
		return max(reqs*reqCost, bytes)
	}

	// Request-bound: 200 writes of 8 KiB over a hot region, gaps of 4 KiB
	// to 100 KiB (all under a request's cost).
	var exts [][2]int64
	off := int64(0)
	for i := range 200 {
		exts = append(exts, [2]int64{off, off + 8192})
		off += 8192 + int64(1+i%25)*4096
	}
	spans := build(exts).spans(nil, remote.MaxPutPage, reqCost)
	reqs, bytes, c := cost(spans)
	none, all := costWith(exts, 0), costWith(exts, reqCost)
	// The fastest choice, by trying every threshold.
	best := none
	for g := int64(4096); g <= reqCost; g += 4096 {
		best = min(best, costWith(exts, g))
	}
	// Here: 36 requests and 8.5 MiB against 200 requests (23 MiB's worth)
	// or 11.6 MiB, the fastest 7.1 MiB.
	if 4*c > 3*none || 4*c > 3*all || 100*c > (100+fillSlack)*best {
		t.Fatalf("request-bound batch: %d requests, %d bytes, cost %d; no fills would cost %d, every gap filled %d, the fastest %d: want at most 3/4 of the first two and within %d%% of the last",
			reqs, bytes, c, none, all, best, fillSlack)
	}

	// A burst: random 4 KiB writes over three quarters of a 16 MiB region
	// (as fio's random map leaves it) are whole 4 MiB Put Pages.
	rnd := rand.New(rand.NewPCG(1, 2))
	exts = nil
	for blk := int64(0); blk < 4096; blk++ {
		if rnd.IntN(4) != 0 {
			exts = append(exts, [2]int64{blk * 4096, blk*4096 + 4096})
		}
	}
	spans = build(exts).spans(nil, remote.MaxPutPage, reqCost)
	// (Spans are cut 4 MiB from where they start, not on a 4 MiB grid:
	// 4 or 5 requests.)
	if reqs, bytes, _ := cost(spans); reqs > 5 {
		t.Fatalf("dense burst over 16 MiB: %d requests of %d bytes, want whole 4 MiB Put Pages, 5 at most", reqs, bytes)
	}

	// Byte-bound: two 2 MiB writes 4 KiB apart are two requests, the gap
	// not sent.
	two := [][2]int64{{0, 2 << 20}, {2<<20 + 4096, 4<<20 + 4096}}
	spans = build(two).spans(nil, remote.MaxPutPage, reqCost)
	if reqs, bytes, _ := cost(spans); reqs != 2 || bytes != 4<<20 {
		t.Fatalf("byte-bound batch: %d requests of %d bytes, want 2 of %d (no fill)", reqs, bytes, 4<<20)
	}
}

// liveWatch is a fakeWatch a test can write to after the plan, as a
// writer would: the bytes change and the range turns dirty.
type liveWatch struct {
	w       fakeWatch
	stopped bool
}

func (l *liveWatch) ReadClean(off int64, p []byte) ([]Range, bool, error) {
	return l.w.ReadClean(off, p)
}
func (l *liveWatch) Stop() { l.stopped = true }
func (l *liveWatch) write(off int64, v byte, n int) {
	for i := range n {
		l.w.img[off+int64(i)] = v
	}
	l.w.dirty = mergeRanges(append(l.w.dirty, Range{off, off + int64(n)}))
}

// TestReadAheadKeepsFillsFromLaterWrites: fills read when the batch is
// planned (readAhead) are sent as read then, whatever writers do to those
// sectors while the batch is sent, so the Put Page is not cut, and the
// watch is stopped once every fill is read; beyond the
// read-ahead budget a fill a writer touched is cut out (one request more),
// and never sent with the later write's bytes.
func TestReadAheadKeepsFillsFromLaterWrites(t *testing.T) {
	img := make([]byte, 64<<10)
	for i := range img {
		img[i] = 0x11
	}
	data := func(off int64, v byte) *journal.Record {
		return &journal.Record{Offset: off, Length: 4096, Kind: journal.KindData, Data: bytes.Repeat([]byte{v}, 4096)}
	}
	for _, tc := range []struct {
		name     string
		budget   int64
		wantReqs int
	}{{"read ahead", 64 << 10, 1}, {"no budget", 0, 2}} {
		t.Run(tc.name, func(t *testing.T) {
			w := &liveWatch{w: fakeWatch{img: bytes.Clone(img)}}
			b := &batch{watch: w}
			for _, r := range []*journal.Record{data(0, 0xA1), data(8192, 0xB1)} {
				b.c.addExtent(extent{off: r.Offset, end: r.End(), rec: r})
			}
			b.resolve()
			spans := b.spans(payloadReader{}, remote.MaxPutPage, 1<<20)
			if len(spans) != 1 || spans[0].Fill != 4096 {
				t.Fatalf("planned %d spans (fill %d), want one with a 4 KiB fill", len(spans), spans[0].Fill)
			}
			if err := b.readAhead(tc.budget); err != nil {
				t.Fatal(err)
			}
			// Every fill read ahead: writers need not be watched while the
			// batch is sent.
			if all := tc.budget >= 4096; w.stopped != all {
				t.Fatalf("watch stopped: %v, want %v", w.stopped, all)
			}
			w.write(4096, 0xEE, 4096) // a later epoch's write, in the gap
			subs, _, err := spans[0].Load(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if len(subs) != tc.wantReqs {
				t.Fatalf("%d requests, want %d", len(subs), tc.wantReqs)
			}
			for _, s := range subs {
				got := s.Data.Bytes()
				for x := s.Off; x < s.End; x++ {
					if x >= 4096 && x < 8192 && got[x-s.Off] != 0x11 {
						t.Fatalf("byte %d sent as %#x: the later write's, not the fill's 0x11", x, got[x-s.Off])
					}
				}
			}
		})
	}
}
