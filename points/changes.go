package points

import (
	"bytes"
	"compress/flate"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"slices"
	"strings"
)

// Range is a byte range [Off, End) of the disk.
type Range struct{ Off, End int64 }

// Changes is a set of disk ranges: what was written to the blob between
// two recovery points. It may hold more than was written (ranges are
// widened to its grain, and coarsened when there are too many), never
// less: a restore that rewrites every range in it is exact.
type Changes struct {
	grain   int64   // ranges are aligned to it: a power of two, at least 512
	r       []Range // sorted, disjoint, not touching (after normalize)
	pending int     // ranges appended to r since the last normalize
}

const (
	// minGrain is a page of the page blob: the least a write touches.
	minGrain = 512
	// maxRanges bounds a Changes in memory (16 bytes a range): past it
	// the grain is doubled until the ranges merge below it.
	maxRanges = 1 << 16
	// changesBudget bounds the encoded record, a metadata value of the
	// snapshot: Azure allows 8 KiB of metadata in all, and the point's
	// other values take less than 200 bytes.
	changesBudget = 6 << 10
	// changesVersion prefixes an encoded record.
	changesVersion = "v1."
)

// NewChanges returns an empty set.
func NewChanges() *Changes { return &Changes{grain: minGrain} }

// Add records the ranges (widened to the grain).
func (c *Changes) Add(rs ...Range) {
	for _, r := range rs {
		if r.End <= r.Off {
			continue
		}
		c.r = append(c.r, Range{alignDown(r.Off, c.grain), alignUp(r.End, c.grain)})
		c.pending++
	}
	// Normalized once enough piled up, so that a batch of many spans
	// costs one sort, not one per span.
	if c.pending > maxRanges || c.pending > len(c.r)/2+1024 {
		c.normalize()
	}
}

// Union adds every range of o.
func (c *Changes) Union(o *Changes) {
	if o == nil {
		return
	}
	c.r = append(c.r, o.r...)
	c.pending += len(o.r)
	if o.grain > c.grain {
		c.coarsen(o.grain)
	}
	c.normalize()
}

// Ranges returns the set's ranges, sorted and disjoint.
func (c *Changes) Ranges() []Range {
	c.normalize()
	return slices.Clone(c.r)
}

// Bytes is the total length of the ranges.
func (c *Changes) Bytes() int64 {
	c.normalize()
	var n int64
	for _, r := range c.r {
		n += r.End - r.Off
	}
	return n
}

// Grain is the alignment of the ranges (512 unless coarsened).
func (c *Changes) Grain() int64 { return c.grain }

// normalize sorts and merges the ranges, and coarsens them while there
// are more than maxRanges.
func (c *Changes) normalize() {
	if c.pending == 0 {
		return
	}
	c.merge()
	if len(c.r) > maxRanges {
		c.coarsen(c.grain * 2)
	}
}

// merge sorts the ranges and joins those that overlap or touch.
func (c *Changes) merge() {
	c.pending = 0
	slices.SortFunc(c.r, func(a, b Range) int {
		switch {
		case a.Off < b.Off:
			return -1
		case a.Off > b.Off:
			return 1
		}
		return 0
	})
	out := c.r[:0]
	for _, r := range c.r {
		if k := len(out); k > 0 && r.Off <= out[k-1].End {
			out[k-1].End = max(out[k-1].End, r.End)
			continue
		}
		out = append(out, r)
	}
	c.r = out
}

// coarsen widens every range to grain g (doubling it further while more
// than maxRanges are left), merging those that then touch.
func (c *Changes) coarsen(g int64) {
	for {
		c.grain = g
		for i := range c.r {
			c.r[i] = Range{alignDown(c.r[i].Off, g), alignUp(c.r[i].End, g)}
		}
		c.merge()
		if len(c.r) <= maxRanges {
			return
		}
		g *= 2
	}
}

// Encode returns the set as a snapshot metadata value of at most
// changesBudget bytes: "v1." and the base64 of the deflated varints
// (grain's log2, then each range's gap from the previous one and its
// length, in grains). A set too large for the budget loses its smallest
// gaps first (the ranges around them are joined), as few as make it fit:
// that adds the fewest bytes to a restore, and only ever adds.
func (c *Changes) Encode() string {
	c.normalize()
	if s := c.encode(); len(s) <= changesBudget {
		return s
	}
	// The k-1 largest gaps are kept; the most ranges that fit are found
	// by bisection (fewer ranges never encode larger).
	gaps := make([]int64, 0, len(c.r))
	for i := 1; i < len(c.r); i++ {
		gaps = append(gaps, c.r[i].Off-c.r[i-1].End)
	}
	slices.Sort(gaps)
	joined := func(k int) *Changes {
		// Gaps at least min are kept, up to k-1 of them (ties: the first).
		keep := k - 1
		least := int64(1) << 62
		if keep > 0 {
			least = gaps[len(gaps)-keep]
		}
		above := 0 // gaps strictly above least, kept in any case
		for _, g := range gaps {
			if g > least {
				above++
			}
		}
		ties := keep - above
		out := &Changes{grain: c.grain, r: []Range{c.r[0]}}
		for _, r := range c.r[1:] {
			last := &out.r[len(out.r)-1]
			g := r.Off - last.End
			if g > least || (g == least && ties > 0) {
				if g == least {
					ties--
				}
				out.r = append(out.r, r)
				continue
			}
			last.End = r.End
		}
		return out
	}
	lo, hi := 1, len(c.r) // joined(lo) fits (one range), joined(hi) does not
	best := joined(1).encode()
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		if s := joined(mid).encode(); len(s) <= changesBudget {
			lo, best = mid, s
		} else {
			hi = mid
		}
	}
	return best
}

// encode is Encode at the set's own grain.
func (c *Changes) encode() string {
	var raw []byte
	raw = binary.AppendUvarint(raw, uint64(bits.TrailingZeros64(uint64(c.grain))))
	raw = binary.AppendUvarint(raw, uint64(len(c.r)))
	var prev int64
	for _, r := range c.r {
		raw = binary.AppendUvarint(raw, uint64((r.Off-prev)/c.grain))
		raw = binary.AppendUvarint(raw, uint64((r.End-r.Off)/c.grain))
		prev = r.End
	}
	var buf bytes.Buffer
	w, _ := flate.NewWriter(&buf, flate.BestCompression) // the level is valid
	_, _ = w.Write(raw)                                  // a bytes.Buffer does not fail
	_ = w.Close()
	return changesVersion + base64.RawStdEncoding.EncodeToString(buf.Bytes())
}

// errBadChanges: a vhdsync_changed value that does not decode.
var errBadChanges = errors.New("malformed change record")

// DecodeChanges reads what Encode wrote.
func DecodeChanges(s string) (*Changes, error) {
	body, ok := strings.CutPrefix(s, changesVersion)
	if !ok {
		return nil, fmt.Errorf("%w: %.20q is not of version %s", errBadChanges, s, changesVersion)
	}
	z, err := base64.RawStdEncoding.DecodeString(body)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errBadChanges, err)
	}
	// A record holds at most maxRanges ranges of two varints (10 bytes
	// each at most): a bound on what it inflates to keeps a hostile value
	// from taking the memory of every listing of the points.
	raw, err := io.ReadAll(io.LimitReader(flate.NewReader(bytes.NewReader(z)), 20*maxRanges+32))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errBadChanges, err)
	}
	r := bytes.NewReader(raw)
	next := func() (uint64, error) { return binary.ReadUvarint(r) }
	lg, err := next()
	if err != nil || lg < 9 || lg > 62 {
		return nil, fmt.Errorf("%w: grain", errBadChanges)
	}
	n, err := next()
	if err != nil || n > uint64(len(raw)) {
		return nil, fmt.Errorf("%w: count", errBadChanges)
	}
	c := &Changes{grain: 1 << lg}
	var prev int64
	for range n {
		gap, err1 := next()
		ln, err2 := next()
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%w: truncated", errBadChanges)
		}
		off := prev + int64(gap)*c.grain
		end := off + int64(ln)*c.grain
		if off < prev || end <= off {
			return nil, fmt.Errorf("%w: range out of order or overflowing", errBadChanges)
		}
		c.r = append(c.r, Range{off, end})
		prev = end
	}
	return c, nil
}

func alignDown(x, g int64) int64 { return x / g * g }
func alignUp(x, g int64) int64   { return (x + g - 1) / g * g }

// ErrNoRecord: the points between two points do not record everything
// that changed between them (a point's record is incomplete or unknown,
// or a point between them was deleted); only a full restore is exact.
var ErrNoRecord = errors.New("no complete record of the changes between the points")

// ChangesBetween returns every range written between the point from and
// the point to, the union of the records of the points after from, up to
// and including to, found by following to's PointMetaPrev back to from.
// pts is the blob's points (ListPoints); from need not be among them any
// more (retention may have deleted it), but every point after it must.
// Any gap in the chain is ErrNoRecord with the reason, never a smaller
// set.
func ChangesBetween(pts []Point, from, to string) (*Changes, error) {
	byID := make(map[string]Point, len(pts))
	for _, p := range pts {
		byID[p.ID] = p
	}
	out := NewChanges()
	seen := map[string]bool{}
	for cur := to; cur != from; {
		p, ok := byID[cur]
		switch {
		case !ok && cur == to:
			return nil, fmt.Errorf("%w: recovery point %s is not on the blob", ErrNoRecord, to)
		case !ok:
			return nil, fmt.Errorf("%w: recovery point %s, between %s and %s, was deleted (retention, --keep)", ErrNoRecord, cur, from, to)
		case seen[cur]:
			return nil, fmt.Errorf("%w: the points before %s name each other in a loop", ErrNoRecord, cur)
		case p.Changes == nil:
			return nil, fmt.Errorf("%w: recovery point %s (epoch %d) records what changed since the point before it as %s", ErrNoRecord, p.ID, p.Epoch, p.ChangesNote)
		case p.Prev == "":
			return nil, fmt.Errorf("%w: %s is not a point before %s", ErrNoRecord, from, to)
		}
		seen[cur] = true
		out.Union(p.Changes)
		cur = p.Prev
	}
	return out, nil
}

// Missing returns the parts of rs that the set does not hold: empty when
// every range in rs is recorded. rs need not be sorted.
func (c *Changes) Missing(rs []Range) []Range {
	c.normalize()
	var out []Range
	for _, r := range rs {
		off := r.Off
		// The first recorded range that ends after off.
		i, _ := slices.BinarySearchFunc(c.r, off, func(x Range, t int64) int {
			if x.End <= t {
				return -1
			}
			return 1
		})
		for ; off < r.End && i < len(c.r); i++ {
			if c.r[i].Off >= r.End {
				break
			}
			if c.r[i].Off > off {
				out = append(out, Range{off, c.r[i].Off})
			}
			off = max(off, c.r[i].End)
		}
		if off < r.End {
			out = append(out, Range{off, r.End})
		}
	}
	return out
}
