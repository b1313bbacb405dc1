package transfer

import (
	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// WindowSize is the grid the importer works in: each window of the disk
// is read, scanned and sent by one worker, and is the unit of resume
// bookkeeping. It is the Put Page limit, so every request fits one window.
const WindowSize = pageblob.MaxPutPage

// window is one cell of the grid that holds data: the parts of it
// (disk offsets, 512-byte aligned, sorted, disjoint) that may hold data.
type window struct {
	idx   int64
	parts []span
}

func (w window) off() int64 { return w.idx * WindowSize }

// alignExtents widens extents to whole 512-byte sectors, clips them to
// size, and merges what then overlaps or touches.
func alignExtents(ext []vhdlayer.Extent, size int64) []span {
	var out []span
	for _, e := range ext {
		lo := e.Offset / sector * sector
		hi := min((e.End()+sector-1)/sector*sector, size)
		if lo >= hi {
			continue
		}
		if n := len(out); n > 0 && lo <= out[n-1].end {
			out[n-1].end = max(out[n-1].end, hi)
			continue
		}
		out = append(out, span{lo, hi})
	}
	return out
}

func spansBytes(s []span) int64 {
	var n int64
	for _, x := range s {
		n += x.len()
	}
	return n
}

// windowIter cuts aligned extents into windows, lazily: a fully allocated
// 8 TiB disk has two million of them.
type windowIter struct {
	ext []span
	i   int
	pos int64 // where the next window starts inside ext[i] (0: at its start)
}

func (it *windowIter) next() (window, bool) {
	if it.i >= len(it.ext) {
		return window{}, false
	}
	start := max(it.pos, it.ext[it.i].off)
	w := window{idx: start / WindowSize}
	wend := (w.idx + 1) * WindowSize
	for it.i < len(it.ext) && it.ext[it.i].off < wend {
		e := it.ext[it.i]
		lo := max(it.pos, e.off)
		if e.end <= wend {
			w.parts = append(w.parts, span{lo, e.end})
			it.i++
			it.pos = 0
			continue
		}
		w.parts = append(w.parts, span{lo, wend})
		it.pos = wend
		break
	}
	return w, true
}
