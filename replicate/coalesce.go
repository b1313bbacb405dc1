package replicate

import (
	"bytes"
	"cmp"
	"context"
	"slices"

	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
)

// extent is one piece of the coalesced view of a batch: a sector range and
// what the batch last did to it. Data extents reference (slices of) the
// records' data; nothing is copied until ranges are built.
type extent struct {
	off, end int64
	zero     bool   // zero or discard: cleared on the remote
	data     []byte // len == end-off when !zero (nil when only ranges are coalesced)
	src      int32  // index of the record it came from (replay)
	// rec is the record whose payload holds the data (lazy batches: the
	// payload is read from the journal when the span is sent).
	rec *journal.Record
}

// coalescer builds the coalesced view of a batch: non-overlapping extents
// sorted by offset, the last write winning on each sector. Its size is
// bounded by the number of distinct ranges, not the number of sectors.
//
// Records arriving in offset order (sequential writes) are appended to the
// map directly; any other record is queued, and the queue is merged into
// the map in one sweep (O(n log n)) when the spans are built. Splicing
// each random record into a sorted slice cost O(n) per record: with the
// 16 k records of a 64 MiB batch of 4 KiB random writes that was gigabytes
// of memmove per batch (8-12 % of the CPU in the write profile).
type coalescer struct {
	ext     []extent // disjoint, sorted
	pending []extent // later than ext, in record order, not yet merged
}

func (c *coalescer) add(r *journal.Record) {
	c.addExtent(extent{off: r.Offset, end: r.End(), zero: r.Kind != journal.KindData, data: r.Data})
}

// addExtent adds n as the youngest extent.
func (c *coalescer) addExtent(n extent) {
	if len(c.pending) == 0 && (len(c.ext) == 0 || c.ext[len(c.ext)-1].end <= n.off) {
		c.ext = append(c.ext, n)
		return
	}
	c.pending = append(c.pending, n)
}

// resolve merges the queued records into the map: a sweep over every
// extent boundary with a heap of the extents covering the current point,
// ordered by age; the youngest covers the piece up to the next boundary.
func (c *coalescer) resolve() {
	if len(c.pending) == 0 {
		return
	}
	all := append(c.ext[:len(c.ext):len(c.ext)], c.pending...) // index = age
	c.pending = nil
	byOff := make([]int32, len(all))
	bounds := make([]int64, 0, 2*len(all))
	for i, e := range all {
		byOff[i] = int32(i)
		bounds = append(bounds, e.off, e.end)
	}
	slices.SortFunc(byOff, func(a, b int32) int { return cmp.Compare(all[a].off, all[b].off) })
	slices.Sort(bounds)
	bounds = slices.Compact(bounds)
	var h ageHeap
	out := make([]extent, 0, len(all))
	var winner []int32 // of each out extent
	k := 0
	for bi := 0; bi+1 < len(bounds); bi++ {
		b, next := bounds[bi], bounds[bi+1]
		for k < len(byOff) && all[byOff[k]].off <= b {
			h.push(byOff[k])
			k++
		}
		for len(h) > 0 && all[h[0]].end <= b {
			h.pop()
		}
		if len(h) == 0 {
			continue
		}
		w := h[0]
		if n := len(out); n > 0 && winner[n-1] == w && out[n-1].end == b {
			out[n-1].end = next
			continue
		}
		out = append(out, extent{off: b, end: next})
		winner = append(winner, w)
	}
	for i := range out {
		out[i] = all[winner[i]].slice(out[i].off, out[i].end)
	}
	c.ext = out
}

// ageHeap is a max-heap of extent indexes (the higher, the younger).
type ageHeap []int32

func (h *ageHeap) push(x int32) {
	*h = append(*h, x)
	a := *h
	for i := len(a) - 1; i > 0; {
		p := (i - 1) / 2
		if a[p] >= a[i] {
			break
		}
		a[p], a[i] = a[i], a[p]
		i = p
	}
}

func (h *ageHeap) pop() {
	a := *h
	n := len(a) - 1
	a[0] = a[n]
	a = a[:n]
	for i := 0; ; {
		l, m := 2*i+1, i
		if l < n && a[l] > a[m] {
			m = l
		}
		if l+1 < n && a[l+1] > a[m] {
			m = l + 1
		}
		if m == i {
			break
		}
		a[i], a[m] = a[m], a[i]
		i = m
	}
	*h = a
}

func (e extent) slice(from, to int64) extent {
	s := extent{off: from, end: to, zero: e.zero, src: e.src, rec: e.rec}
	if !e.zero && e.data != nil {
		s.data = e.data[from-e.off : to-e.off]
	}
	return s
}

// Span is one remote request: a Put Page of data ([Off, End) with Data),
// or a Clear Pages of [Off, End).
type Span struct {
	Off, End int64
	Clear    bool
	// Data is the Put Page's payload as slices of the records' payloads
	// (and of zeroPages), sent back to back: joining them into one buffer
	// copied every byte of a batch once more and held the batch twice
	// while the spans were built.
	Data remote.Pages
	// Load, when set, reads the payload of a planned Put Page when it is
	// sent (Data is nil then): the requests it becomes, and what its fills
	// found. Fill is the planned fill bytes (see plan.go).
	Load func(ctx context.Context) ([]Span, LoadStats, error)
	Fill int64
}

// zeroPages backs the zero runs sent inside a Put Page that no single
// record's payload holds. Never written: it stays the kernel's zero page.
var zeroPages [remote.MaxPutPage]byte

// requestCost is what one extra request costs, in bytes of Put Page
// payload: a page blob takes about 60 MiB/s and 500 requests/s, so a
// request spends the budget of 60 MiB / 500 = 123 KiB. A zero run inside
// written data is cleared instead of sent when the bytes it saves outweigh
// the requests it adds (see zeroRunCost). The value was chosen by measuring
// the wire-efficiency workload (BENCHMARKS.md) at several costs.
const requestCost = (60 << 20) / 500

// spans turns the coalesced extents into remote requests: adjacent data
// joined into Put Pages of at most maxPut bytes, adjacent zero and discard
// ranges joined into single Clear Pages, and all-zero sector runs inside
// data either sent with the data or cleared, whichever costs less (see
// zeroRunCost). Spans are disjoint, which the ordering argument relies on.
func (c *coalescer) spans(maxPut int64) []Span {
	return c.spansCost(maxPut, requestCost)
}

// pieceKind classifies the pieces spans is built from.
type pieceKind uint8

const (
	pieceData  pieceKind = iota // non-zero data: a Put Page
	pieceClear                  // a zero or discard record: a Clear Pages
	pieceZeros                  // zero sectors written as data: either
	pieceGap                    // nothing in the batch (a neighbour only)
)

type piece struct {
	off, end int64
	kind     pieceKind
	data     []byte // its bytes (pieceData, and pieceZeros cut from one extent); nil: zeros
}

// spansCost is spans with the cost of a request given in bytes.
func (c *coalescer) spansCost(maxPut, reqCost int64) []Span {
	c.resolve()
	// Cut data extents into non-zero and all-zero sector runs; adjacent
	// zero runs (of neighbouring extents) become one.
	var pieces []piece
	push := func(p piece) {
		if n := len(pieces); n > 0 && p.kind == pieceZeros {
			if last := &pieces[n-1]; last.kind == pieceZeros && last.end == p.off {
				// Zeros of two extents (each run is maximal within its
				// own): if sent, they come from zeroPages.
				last.end, last.data = p.end, nil
				return
			}
		}
		pieces = append(pieces, p)
	}
	for _, e := range c.ext {
		if e.zero {
			push(piece{off: e.off, end: e.end, kind: pieceClear})
			continue
		}
		splitZeroSectors(e, push)
	}
	// Decide each zero run by its neighbours (never zero runs themselves).
	for i := range pieces {
		p := &pieces[i]
		if p.kind != pieceZeros {
			continue
		}
		left, right := pieceGap, pieceGap
		if i > 0 && pieces[i-1].end == p.off {
			left = pieces[i-1].kind
		}
		if i+1 < len(pieces) && pieces[i+1].off == p.end {
			right = pieces[i+1].kind
		}
		if p.end-p.off > zeroRunCost(left, right)*reqCost {
			p.kind = pieceClear
		} else {
			p.kind = pieceData
		}
	}
	// Group the pieces into runs first (a run's parts are consecutive
	// pieces), then build each data run's payload.
	type run struct {
		off, end int64
		clear    bool
		parts    []piece // a window of pieces
	}
	var runs []run
	for i, p := range pieces {
		clear := p.kind == pieceClear
		if n := len(runs); n > 0 {
			last := &runs[n-1]
			if last.end == p.off && last.clear && clear {
				last.end = p.end
				continue
			}
			if last.end == p.off && !last.clear && !clear && last.end-last.off+(p.end-p.off) <= maxPut {
				last.parts = pieces[i-len(last.parts) : i+1]
				last.end = p.end
				continue
			}
		}
		if clear {
			runs = append(runs, run{off: p.off, end: p.end, clear: true})
		} else {
			runs = append(runs, run{off: p.off, end: p.end, parts: pieces[i : i+1]})
		}
	}
	var out []Span
	// Every span's buffer list is a window of bufs: one allocation per
	// batch, not one per span (a batch of random 4 KiB writes has
	// thousands of spans).
	bufs := make(remote.Pages, 0, len(pieces))
	for _, r := range runs {
		if r.clear {
			out = append(out, Span{Off: r.off, End: r.end, Clear: true})
			continue
		}
		// The payload references the pieces' bytes; pieces cut from one
		// extent one after the other are one slice again.
		start := len(bufs)
		for _, p := range r.parts {
			if p.data == nil {
				for n := p.end - p.off; n > 0; {
					k := min(n, int64(len(zeroPages)))
					bufs = append(bufs, zeroPages[:k])
					n -= k
				}
				continue
			}
			if n := len(bufs); n > start {
				if j := joinAdjacent(bufs[n-1], p.data); j != nil {
					bufs[n-1] = j
					continue
				}
			}
			bufs = append(bufs, p.data)
		}
		data := bufs[start:len(bufs):len(bufs)]
		// Long data extents are cut into maxPut pieces.
		for off := r.off; off < r.end; off += maxPut {
			end := min(off+maxPut, r.end)
			var head remote.Pages
			head, data = data.Cut(end - off)
			out = append(out, Span{Off: off, End: end, Data: head})
		}
	}
	return out
}

// zeroRunCost is how many more requests a zero run costs cleared than sent
// with the data, given what touches it on the left and on the right. Sent,
// it joins the Put Page of a data neighbour (or is one by itself); cleared,
// it joins the Clear Pages of a clear neighbour (or is one by itself), and
// splits the data around it. Negative: clearing also saves requests.
func zeroRunCost(left, right pieceKind) int64 {
	reqs := func(sent bool) int64 {
		var puts, clears int64
		nd, nc := int64(0), int64(0)
		for _, k := range []pieceKind{left, right} {
			if k == pieceData {
				nd++
			} else if k == pieceClear {
				nc++
			}
		}
		if sent {
			puts, clears = max(1, nd)-boolInt(nd == 2), nc
		} else {
			puts, clears = nd, max(1, nc)-boolInt(nc == 2)
		}
		return puts + clears
	}
	return reqs(false) - reqs(true)
}

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

var zeroSector [journal.SectorSize]byte

// splitZeroSectors cuts data extent e into maximal runs of
// non-zero and all-zero sectors and passes them to push in order.
func splitZeroSectors(e extent, push func(piece)) {
	n := int64(len(e.data))
	for s := int64(0); s < n; {
		zero := bytes.Equal(e.data[s:s+journal.SectorSize], zeroSector[:])
		t := s + journal.SectorSize
		for t < n && bytes.Equal(e.data[t:t+journal.SectorSize], zeroSector[:]) == zero {
			t += journal.SectorSize
		}
		if zero {
			push(piece{off: e.off + s, end: e.off + t, kind: pieceZeros, data: e.data[s:t]})
		} else {
			push(piece{off: e.off + s, end: e.off + t, kind: pieceData, data: e.data[s:t]})
		}
		s = t
	}
}

func isZero(b []byte) bool {
	for len(b) >= journal.SectorSize {
		if !bytes.Equal(b[:journal.SectorSize], zeroSector[:]) {
			return false
		}
		b = b[journal.SectorSize:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// joinAdjacent returns a and b as one slice when b starts where a ends in
// the same array (pieces cut one after the other from one payload), and
// nil otherwise.
func joinAdjacent(a, b []byte) []byte {
	if len(a) == 0 || len(b) == 0 || cap(a) < len(a)+len(b) || &a[:len(a)+1][len(a)] != &b[0] {
		return nil
	}
	return a[:len(a)+len(b)]
}

// Extent is one piece of the last word of a list of records on the
// sectors they touch: [Off, End), zeroed (Zero) or written by record Src.
type Extent struct {
	Off, End int64
	Zero     bool
	Src      int
}

// Resolve returns the last word of recs (in seq order) on every sector
// they touch, as disjoint extents sorted by offset. Replay uses it to
// re-apply a journal to the image.
func Resolve(recs []journal.Record) []Extent {
	var c coalescer
	for i := range recs {
		r := &recs[i]
		c.addExtent(extent{off: r.Offset, end: r.End(), zero: r.Kind != journal.KindData, src: int32(i)})
	}
	c.resolve()
	out := make([]Extent, len(c.ext))
	for i, e := range c.ext {
		out[i] = Extent{Off: e.off, End: e.end, Zero: e.zero, Src: int(e.src)}
	}
	return out
}
