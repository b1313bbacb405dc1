package writeback

import "sort"

// extent is one piece of the coalesced view of a batch: a sector range and
// what the batch last did to it. Data extents reference (slices of) the
// records' data; nothing is copied until ranges are built.
type extent struct {
	off, end int64
	zero     bool   // zero or discard: cleared on the remote
	data     []byte // len == end-off when !zero
}

// coalescer keeps an interval map of non-overlapping extents sorted by
// offset: adding a record trims or splits whatever it overlaps, so the
// last write to each sector wins. Its size is bounded by the number of
// distinct ranges, not the number of sectors.
type coalescer struct {
	ext []extent
}

func (c *coalescer) add(r *Record) {
	n := extent{off: r.Offset, end: r.End(), zero: r.Kind != KindData, data: r.Data}
	// First extent that ends after n starts.
	i := sort.Search(len(c.ext), func(i int) bool { return c.ext[i].end > n.off })
	var out []extent
	j := i
	for ; j < len(c.ext) && c.ext[j].off < n.end; j++ {
		e := c.ext[j]
		if e.off < n.off { // keep the head of e
			out = append(out, e.slice(e.off, n.off))
		}
		if e.end > n.end { // keep the tail of e
			out = append(out, e.slice(n.end, e.end))
		}
	}
	// Insert the new extent in order among the kept pieces.
	merged := make([]extent, 0, len(out)+1)
	placed := false
	for _, e := range out {
		if !placed && e.off >= n.end {
			merged = append(merged, n)
			placed = true
		}
		merged = append(merged, e)
	}
	if !placed {
		merged = append(merged, n)
	}
	c.ext = append(c.ext[:i], append(merged, c.ext[j:]...)...)
}

func (e extent) slice(from, to int64) extent {
	s := extent{off: from, end: to, zero: e.zero}
	if !e.zero {
		s.data = e.data[from-e.off : to-e.off]
	}
	return s
}

// span is one remote request: a Put Page of data, or a Clear Pages.
type span struct {
	off, end int64
	clear    bool
	data     []byte
}

// minZeroRun is the smallest all-zero run inside written data that is
// sent as Clear Pages instead of zeros: smaller runs would cost more
// requests than the bytes they save.
const minZeroRun = 64 << 10

// spans turns the coalesced extents into remote requests: adjacent data
// joined into Put Pages of at most maxPut bytes, adjacent zero and discard
// ranges (and long all-zero runs inside data) joined into single Clear
// Pages. Spans are disjoint, which the ordering argument relies on.
func (c *coalescer) spans(maxPut int64) []span {
	var pieces []extent
	for _, e := range c.ext {
		if e.zero {
			pieces = append(pieces, e)
			continue
		}
		pieces = append(pieces, splitZeroRuns(e)...)
	}
	// Group the pieces into runs first, then copy each data run once.
	type run struct {
		off, end int64
		clear    bool
		parts    [][]byte
	}
	var runs []run
	for _, p := range pieces {
		if n := len(runs); n > 0 {
			last := &runs[n-1]
			if last.end == p.off && last.clear && p.zero {
				last.end = p.end
				continue
			}
			if last.end == p.off && !last.clear && !p.zero && last.end-last.off+(p.end-p.off) <= maxPut {
				last.parts = append(last.parts, p.data)
				last.end = p.end
				continue
			}
		}
		if p.zero {
			runs = append(runs, run{off: p.off, end: p.end, clear: true})
		} else {
			runs = append(runs, run{off: p.off, end: p.end, parts: [][]byte{p.data}})
		}
	}
	var out []span
	for _, r := range runs {
		if r.clear {
			out = append(out, span{off: r.off, end: r.end, clear: true})
			continue
		}
		data := r.parts[0]
		if len(r.parts) > 1 {
			data = make([]byte, 0, r.end-r.off)
			for _, p := range r.parts {
				data = append(data, p...)
			}
		}
		// Long data extents are cut into maxPut pieces.
		for off := r.off; off < r.end; off += maxPut {
			end := min(off+maxPut, r.end)
			out = append(out, span{off: off, end: end, data: data[off-r.off : end-r.off]})
		}
	}
	return out
}

// splitZeroRuns cuts a data extent at all-zero runs of at least minZeroRun
// bytes (sector aligned), or returns it whole as zero if all of it is zero.
func splitZeroRuns(e extent) []extent {
	if isZero(e.data) {
		return []extent{{off: e.off, end: e.end, zero: true}}
	}
	if e.end-e.off < 2*minZeroRun {
		return []extent{e}
	}
	var out []extent
	start := int64(0) // start of the current non-zero piece, relative
	n := int64(len(e.data))
	for s := int64(0); s < n; {
		if !isZero(e.data[s : s+SectorSize]) {
			s += SectorSize
			continue
		}
		z := s
		for z < n && isZero(e.data[z:z+SectorSize]) {
			z += SectorSize
		}
		if z-s >= minZeroRun {
			if s > start {
				out = append(out, e.slice(e.off+start, e.off+s))
			}
			out = append(out, extent{off: e.off + s, end: e.off + z, zero: true})
			start = z
		}
		s = z
	}
	if start < n {
		out = append(out, e.slice(e.off+start, e.end))
	}
	return out
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
