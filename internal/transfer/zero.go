package transfer

import (
	"bytes"

	"github.com/vhdsync/vhdsync/vhdlayer"
)

const sector = vhdlayer.SectorSize

var zeroSector [sector]byte

// span is a byte range [off, end) of a buffer or of the disk.
type span struct{ off, end int64 }

func (s span) len() int64 { return s.end - s.off }

// scanZeros returns the runs of non-zero 512-byte sectors of buf[lo:hi]
// (lo and hi multiples of 512), sorted and maximal, and how many bytes they
// hold.
func scanZeros(buf []byte, lo, hi int64) (runs []span, nonZero int64) {
	for s := lo; s < hi; s += sector {
		if bytes.Equal(buf[s:s+sector], zeroSector[:]) {
			continue
		}
		nonZero += sector
		if n := len(runs); n > 0 && runs[n-1].end == s {
			runs[n-1].end = s + sector
			continue
		}
		runs = append(runs, span{s, s + sector})
	}
	return runs, nonZero
}

// mergeRuns merges sorted, disjoint runs whose gap is shorter than gap
// bytes. Zero sectors at the edges of a run never join it: only the gaps
// between two runs do.
func mergeRuns(runs []span, gap int64) []span {
	var out []span
	for _, r := range runs {
		if n := len(out); n > 0 && r.off-out[n-1].end < gap {
			out[n-1].end = r.end
			continue
		}
		out = append(out, r)
	}
	return out
}
