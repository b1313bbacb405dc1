package replicate

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/vhdsync/vhdsync/journal"
)

// A batch is planned from the journal's index alone: records are
// coalesced as extents that point at the record holding their bytes, and a
// span's payload is read from the journal only when the span is sent
// (Span.Load). Memory is therefore bounded by the distinct extents of a
// batch, not by its bytes, and a batch may grow far beyond what fits in
// memory when the journal holds a backlog (docs/DESIGN.md, "Catching up").
//
// Fills: a Put Page may carry clean sectors between two pending ranges
// when one larger request costs less than two (the cost model: a request
// costs RequestCost bytes). Clean sectors are read from the local image,
// and only where no pending record of any epoch covers them, so they are
// exactly what the blob holds already; the write is idempotent and cannot
// break the order (invariant 3). Three checks make sure of it:
//   - at planning, a gap is a fill candidate only if no record outside the
//     batch (a later epoch, the open epoch) covers any of it: the scan that
//     reads the batch goes on over every pending record after it;
//   - records appended after the scan are seen by the Watch, started
//     before the scan: Image.Watch records every range a writer releases
//     from then on, and ReadClean holds the writers' range lock while it
//     checks and reads, so no write can land between the check and the
//     read;
//   - holes in the image are never sent as data: the blob holds them
//     cleared or never written, and written pages are billed.
// A fill that fails a check is not sent: the span is cut around it.

// Image is the local image as the flusher may read it to fill gaps.
// writeback.Disk implements it.
type Image interface {
	// Watch starts recording the ranges writers change from now on.
	Watch() Watch
}

// Watch is a window in which fills may be read (see Image).
type Watch interface {
	// ReadClean holds the writers' range lock over [off, off+len(p)) and,
	// if no writer changed any of it since the watch started, reads the
	// image there into p and returns the parts of it that are holes. ok is
	// false when a writer changed some of it: p must not be used.
	ReadClean(off int64, p []byte) (holes []Range, ok bool, err error)
	// Stop ends the watch.
	Stop()
}

// Range is a byte range [Off, End).
type Range struct{ Off, End int64 }

// payloads reads records' payloads: the journal (Journal.Payload).
type payloads interface {
	Payload(r *journal.Record) ([]byte, error)
}

// part is a piece of a planned span: bytes of a record's payload, or (rec
// nil) a fill read from the image.
type part struct {
	off, end int64
	rec      *journal.Record
	// pre is the fill read ahead, before the batch was sent (see
	// batch.readAhead); nil: it is read when its span is sent.
	pre *filled
}

// filled is a fill read from the image: what Watch.ReadClean returned.
type filled struct {
	data  []byte
	holes []Range
	ok    bool
}

// batch is one planned batch: whole epochs first..last.
type batch struct {
	first, last uint64
	drained     journal.Drained
	c           coalescer
	// pendingLen is the length of the extents queued in c since the last
	// resolve (an upper bound of what they add to distinct).
	pendingLen, distinct int64
	// atBound is the distinct bytes when the batch first reached
	// MaxBatchDistinct (0: not yet).
	atBound int64
	// later is every range a pending record outside the batch covers
	// (sorted, disjoint after plan).
	later []Range
	watch Watch
	// oldest is when the batch's first record was written.
	oldest time.Time
	// cut: the batch ended at its size bound, with closed epochs left.
	cut bool
	// spanParts holds the parts of every lazy span, in span order (see
	// readAhead).
	spanParts [][]part
	// watchStopped: done ran; a fill not read ahead is no longer sent.
	watchStopped bool
}

// resolve merges the queued extents and recomputes the distinct bytes.
func (b *batch) resolve() {
	b.c.resolve()
	b.pendingLen, b.distinct = 0, 0
	for _, e := range b.c.ext {
		b.distinct += e.end - e.off
	}
}

// full reports whether the batch should end at this epoch boundary.
// Without a backlog: at MaxBatchBytes journal bytes. With one: at
// MaxBatchExtents ranges, or at MaxBatchDistinct distinct bytes, but only
// while the epochs still add new ranges: epochs that only overwrite what
// the batch holds already cost it nothing to send (the last write wins),
// so a region rewritten over and over is sent once.
func (b *batch) full(o *FlusherOptions, backlog bool) bool {
	if !backlog {
		return b.drained.Bytes >= o.MaxBatchBytes
	}
	if b.distinct+b.pendingLen < o.MaxBatchDistinct && len(b.c.ext)+len(b.c.pending) < o.MaxBatchExtents {
		return false
	}
	b.resolve()
	switch {
	case len(b.c.ext) >= o.MaxBatchExtents:
		return true
	case b.distinct < o.MaxBatchDistinct:
		return false
	case b.atBound == 0:
		// First time at the bound: note where, and go on while later
		// epochs add (almost) nothing new.
		b.atBound = b.distinct
		return false
	}
	return b.distinct-b.atBound > o.MaxBatchDistinct/64
}

// resolveEvery bounds the extents queued in the coalescer between merges,
// so that a batch of a million overwrites holds its distinct extents, not
// a million.
const resolveEvery = 1 << 16

// plan reads the next batch's index entries from the journal: whole
// closed epochs from seq next, the first batch reaching at least epoch
// minLast. Without a backlog the batch ends at the first epoch boundary
// past MaxBatchBytes journal bytes (as small as freshness wants); with one
// (more pending than MaxBatchBytes) it grows until its distinct bytes
// reach MaxBatchDistinct, so that data overwritten many times is sent once
// and dense regions become whole 4 MiB Put Pages. nil: nothing to send.
func (f *Flusher) plan() (*batch, error) {
	b := &batch{}
	if f.o.Image != nil {
		b.watch = f.o.Image.Watch()
	}
	backlog := f.j.PendingBytes() > f.o.MaxBatchBytes
	if backlog {
		// Catching up: the open epoch's writes join this batch rather
		// than stay behind as later records, whose scattered ranges would
		// keep the batch's gaps from being filled. Closing an epoch early
		// is what the linger does anyway.
		f.j.CloseEpoch()
	}
	closed := f.j.ClosedEpoch()
	// Every record of a closed epoch is committed; wait until they are
	// all in the image too, so that the image is the disk up to them.
	f.j.WaitApplied()
	// Writes over the closed epochs' image-backed records capture them
	// from now on; a batch ends at or below limit, and only where no
	// binding spans (journal/bind.go).
	limit, endsAt := f.j.ClaimBatch(closed)
	cut := false
	var cur uint64
	err := f.j.Scan(f.next, func(r journal.Record) (bool, error) {
		if !cut && r.Epoch <= limit && b.drained.Records > 0 && r.Epoch != cur && cur >= f.minLast && endsAt(cur) && b.full(&f.o, backlog) {
			cut = true
			b.cut = true
		}
		if cut || r.Epoch > limit {
			if b.watch == nil {
				return true, nil
			}
			b.later = append(b.later, Range{r.Offset, r.End()})
			return false, nil
		}
		if b.drained.Records == 0 {
			b.first, b.drained.FirstSeq, b.oldest = r.Epoch, r.Seq, r.Time
		}
		cur = r.Epoch
		b.last, b.drained.LastSeq, b.drained.LastEpoch = r.Epoch, r.Seq, r.Epoch
		b.drained.Records++
		b.drained.Bytes += r.JournalBytes()
		e := extent{off: r.Offset, end: r.End(), zero: r.Kind != journal.KindData}
		if !e.zero {
			rec := r
			e.rec = &rec
		}
		b.c.addExtent(e)
		b.pendingLen += e.end - e.off
		if len(b.c.pending) >= resolveEvery {
			b.resolve()
		}
		return false, nil
	})
	if err == nil && b.drained.Records > 0 && b.last < f.minLast && limit < f.minLast {
		// A binding keeps the batch from reaching minLast until the
		// epoch of the write that bound it closes.
		b.drained.Records = 0
	} else if err == nil && b.drained.Records > 0 && b.last < f.minLast {
		err = fmt.Errorf("the journal ends at epoch %d, but the blob's odd sequence number says a batch up to epoch %d was being sent: the journal lost records (a bug or a damaged state directory; `vhdsync verify` shows what differs)", b.last, f.minLast)
	}
	if err != nil || b.drained.Records == 0 {
		if b.watch != nil {
			b.watch.Stop()
		}
		if err != nil {
			return nil, fmt.Errorf("read journal from seq %d: %w", f.next, err)
		}
		return nil, nil
	}
	b.resolve()
	b.later = mergeRanges(b.later)
	return b, nil
}

// done ends the batch's watch: its fills are read.
func (b *batch) done() {
	if b.watch != nil && !b.watchStopped {
		b.watch.Stop()
		b.watchStopped = true
	}
}

// mergeRanges sorts rs and merges overlapping or touching ranges.
func mergeRanges(rs []Range) []Range {
	if len(rs) == 0 {
		return nil
	}
	slices.SortFunc(rs, func(a, b Range) int { return cmp.Compare(a.Off, b.Off) })
	out := rs[:1]
	for _, r := range rs[1:] {
		if last := &out[len(out)-1]; r.Off <= last.End {
			last.End = max(last.End, r.End)
			continue
		}
		out = append(out, r)
	}
	return out
}

// overlaps reports whether [off, end) touches any range of the sorted,
// disjoint rs.
func overlaps(rs []Range, off, end int64) bool {
	i, _ := slices.BinarySearchFunc(rs, off, func(r Range, off int64) int {
		if r.End <= off {
			return -1
		}
		return 1
	})
	return i < len(rs) && rs[i].Off < end
}

// fillable reports whether the gap [end, off) between two data extents of
// the batch may be filled: fills are on and no pending record outside the
// batch covers any of it.
func (b *batch) fillable(end, off int64) bool {
	return b.watch != nil && !overlaps(b.later, end, off)
}

// fillSlack is how much slower, in percent, than the fastest choice of
// fills a batch may be planned in exchange for fewer requests.
const fillSlack = 25

// fillThreshold says which gaps between data extents spans fills: every
// gap shorter than thr, and the first atThr (in offset order) of those
// exactly thr long, which are the batch's smallest gaps.
//
// The blob's two limits are separate budgets, spent at once: a batch of R
// requests carrying B bytes takes max(R/requests-per-second,
// B/bytes-per-second), which is max(R*reqCost, B) in bytes. Filling a gap
// of g bytes takes one request off R and puts g on B, so the fastest batch
// fills the smallest gaps until the two meet: a batch bound by its
// requests (small writes scattered over a hot region) fills its small
// gaps, a batch bound by its bytes almost none. Filling every gap under
// reqCost, as a sum of the two costs would have it, sends a hot region
// whole at every batch where half of it would do. But requests are billed
// and bytes are not, and near the meeting point the time hardly moves: so
// the plan takes the fewest requests that keep the batch within fillSlack
// of the fastest (a dense burst: whole 4 MiB Put Pages, 5% slower at the
// limits than the fastest mix, with thirty times fewer requests). No gap
// over reqCost is filled.
func (b *batch) fillThreshold(maxPut, reqCost int64) (thr int64, atThr int) {
	// Runs: maximal stretches of adjacent data extents. A gap between two
	// runs that may be filled is a candidate; any other gap, or a zero
	// extent, separates runs for good.
	type gap struct {
		size int64
		left int // the run before it
	}
	var runLen []int64
	var gaps []gap
	var bytes int64
	runEnd, joinable := int64(-1), false
	for _, e := range b.c.ext {
		if e.zero {
			joinable = false
			continue
		}
		bytes += e.end - e.off
		switch {
		case joinable && e.off == runEnd:
			runLen[len(runLen)-1] += e.end - e.off
		default:
			if joinable && e.off-runEnd <= reqCost && b.fillable(runEnd, e.off) {
				gaps = append(gaps, gap{e.off - runEnd, len(runLen) - 1})
			}
			runLen = append(runLen, e.end-e.off)
		}
		runEnd, joinable = e.end, true
	}
	if len(gaps) == 0 {
		return 0, 0
	}
	// A run of n bytes is sent as ceil(n/maxPut) requests (spans cuts it
	// where it reaches maxPut).
	puts := func(n int64) int64 { return (n + maxPut - 1) / maxPut }
	var reqs int64
	for _, n := range runLen {
		reqs += puts(n)
	}
	slices.SortStableFunc(gaps, func(a, b gap) int { return cmp.Compare(a.size, b.size) })
	// Fill the gaps smallest first, merging the runs on either side (a
	// union-find over runs, by their leftmost run), and note the requests
	// and bytes after each fill.
	parent := make([]int, len(runLen))
	for i := range parent {
		parent[i] = i
	}
	var find func(int) int
	find = func(i int) int {
		for parent[i] != i {
			parent[i] = parent[parent[i]]
			i = parent[i]
		}
		return i
	}
	type step struct{ reqs, bytes int64 }
	steps := make([]step, len(gaps))
	r, by := reqs, bytes
	for i, g := range gaps {
		a, c := find(g.left), find(g.left+1)
		merged := runLen[a] + g.size + runLen[c]
		r += puts(merged) - puts(runLen[a]) - puts(runLen[c])
		by += g.size
		parent[c], runLen[a] = a, merged
		steps[i] = step{r, by}
	}
	// cost is the batch's time at the limits, in bytes.
	cost := func(r, by int64) int64 { return max(r*reqCost, by) }
	best := cost(reqs, bytes)
	for _, st := range steps {
		best = min(best, cost(st.reqs, st.bytes))
	}
	// The fewest requests within fillSlack of the fastest, and of those
	// the fewest gaps filled.
	k, fewest := 0, reqs
	for i, st := range steps {
		if st.reqs < fewest && cost(st.reqs, st.bytes)*100 <= best*(100+fillSlack) {
			k, fewest = i+1, st.reqs
		}
	}
	if k == 0 {
		return 0, 0
	}
	thr = gaps[k-1].size
	for i := k - 1; i >= 0 && gaps[i].size == thr; i-- {
		atThr++
	}
	return thr, atThr
}

// spans turns the batch into requests: adjacent zero extents joined into
// Clear Pages; data extents joined into Put Pages of at most maxPut bytes,
// across the gaps that may be filled (no pending record outside the batch
// covers them) and are worth filling (fillThreshold). Each Put Page is
// loaded when it is sent (Span.Load).
func (b *batch) spans(j payloads, maxPut, reqCost int64) []Span {
	thr, atThr := b.fillThreshold(maxPut, reqCost)
	// fill decides on the gap between two data extents (once per gap).
	fill := func(gap int64) bool {
		if gap < thr {
			return true
		}
		if gap == thr && atThr > 0 {
			atThr--
			return true
		}
		return false
	}
	var out []Span
	var cur []part // the data span being built
	flush := func() {
		if len(cur) > 0 {
			out = append(out, b.lazySpan(j, cur, maxPut, reqCost))
			cur = nil
		}
	}
	for _, e := range b.c.ext {
		if e.zero {
			flush()
			if n := len(out); n > 0 && out[n-1].Clear && out[n-1].End == e.off {
				out[n-1].End = e.end
			} else {
				out = append(out, Span{Off: e.off, End: e.end, Clear: true})
			}
			continue
		}
		for off := e.off; off < e.end; {
			if n := len(cur); n > 0 {
				start, end := cur[0].off, cur[n-1].end
				gap := off - end
				switch {
				case end-start >= maxPut:
					flush()
				case gap == 0:
				case off-start < maxPut && b.fillable(end, off) && fill(gap):
					cur = append(cur, part{off: end, end: off})
				default:
					flush()
				}
			}
			start := off
			if len(cur) > 0 {
				start = cur[0].off
			}
			take := min(e.end, start+maxPut) - off
			cur = append(cur, part{off: off, end: off + take, rec: e.rec})
			off += take
		}
	}
	flush()
	return out
}

// lazySpan is a Put Page of parts whose payload is read when it is sent.
func (b *batch) lazySpan(j payloads, parts []part, maxPut, reqCost int64) Span {
	sp := Span{Off: parts[0].off, End: parts[len(parts)-1].end}
	b.spanParts = append(b.spanParts, parts)
	for _, p := range parts {
		if p.rec == nil {
			sp.Fill += p.end - p.off
		}
	}
	sp.Load = func(ctx context.Context) ([]Span, LoadStats, error) {
		return b.load(j, sp.Off, sp.End, parts, maxPut, reqCost)
	}
	return sp
}

// readAhead reads the fills of the batch's first spans, up to budget
// bytes, before any of it is sent. While the batch is sent the writers go
// on, and a fill a writer has touched since the watch began can no longer
// be sent (its bytes would be a later epoch's): its span is cut there, one
// request more for each. Under small random writes that race is lost for
// most fills of a batch sent over seconds, so they are read at once, at the
// plan's moment, into memory (bounded by budget; the rest are read when
// their spans are sent). The checks are the same (ReadClean), only earlier.
//
// When every fill is read ahead the watch is stopped at once: writers then
// record nothing for the seconds the batch takes to send.
func (b *batch) readAhead(budget int64) error {
	if b.watch == nil || b.watchStopped {
		return nil
	}
	for _, parts := range b.spanParts {
		for i := range parts {
			p := &parts[i]
			if p.rec != nil || p.pre != nil {
				continue
			}
			n := p.end - p.off
			if n > budget {
				return nil
			}
			budget -= n
			buf := make([]byte, n)
			holes, ok, err := b.watch.ReadClean(p.off, buf)
			if err != nil {
				return fmt.Errorf("fill %d+%d from the local image: %w", p.off, n, err)
			}
			if !ok {
				buf = nil
			}
			p.pre = &filled{data: buf, holes: holes, ok: ok}
		}
	}
	b.done()
	return nil
}

// LoadStats says what loading a span found.
type LoadStats struct {
	// Filled is the clean bytes read from the image and sent; Unfilled
	// the fill bytes that could not be (written since, or holes).
	Filled, Unfilled int64
}

// load reads a planned Put Page: record payloads from the journal, fills
// from the image (see the checks above). The result is one or more
// requests: the span cut around fills that failed their checks, and
// all-zero runs cleared instead of sent where that costs less (as in
// spansCost).
func (b *batch) load(j payloads, off, end int64, parts []part, maxPut, reqCost int64) ([]Span, LoadStats, error) {
	var st LoadStats
	buf := make([]byte, end-off)
	var runs []Range // the parts of buf that hold the bytes to send
	addRun := func(o, e int64) {
		if n := len(runs); n > 0 && runs[n-1].End == o {
			runs[n-1].End = e
			return
		}
		runs = append(runs, Range{o, e})
	}
	var cached *journal.Record
	var payload []byte
	for _, p := range parts {
		dst := buf[p.off-off : p.end-off]
		if p.rec != nil {
			if p.rec != cached {
				var err error
				if payload, err = j.Payload(p.rec); err != nil {
					return nil, st, err
				}
				cached = p.rec
			}
			copy(dst, payload[p.off-p.rec.Offset:p.end-p.rec.Offset])
			addRun(p.off, p.end)
			continue
		}
		var holes []Range
		var ok bool
		if p.pre != nil {
			copy(dst, p.pre.data)
			holes, ok = p.pre.holes, p.pre.ok
		} else if b.watchStopped {
			// Not read ahead, and writers are no longer watched: the fill
			// cannot be checked, so it is not sent.
			ok = false
		} else {
			var err error
			if holes, ok, err = b.watch.ReadClean(p.off, dst); err != nil {
				return nil, st, fmt.Errorf("fill %d+%d from the local image: %w", p.off, p.end-p.off, err)
			}
		}
		if !ok {
			st.Unfilled += p.end - p.off
			continue
		}
		at := p.off
		for _, h := range holes {
			if h.Off > at {
				addRun(at, h.Off)
				st.Filled += h.Off - at
			}
			st.Unfilled += h.End - h.Off
			at = h.End
		}
		if at < p.end {
			addRun(at, p.end)
			st.Filled += p.end - at
		}
	}
	var c coalescer
	for _, r := range runs {
		c.ext = append(c.ext, extent{off: r.Off, end: r.End, data: buf[r.Off-off : r.End-off]})
	}
	return c.spansCost(maxPut, reqCost), st, nil
}
