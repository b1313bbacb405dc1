package powercut

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"golang.org/x/sys/unix"
)

// pageSize is the unit in which unsynced data is held: a write changes
// whole pages of the overlay (the untouched part of a page is read from
// the backing file first), as the kernel's page cache does.
const pageSize = 4096

// fileData is a regular file's contents: the durable bytes in its backing
// file, and the changes since its last fsync in memory (the overlay).
//
// The file as a reader sees it is: the backing file's bytes below valid,
// zeros from valid on, the overlay's pages over both, all cut at size.
// valid is where a shrinking truncate cut the file since the last fsync
// (the backing file still holds the bytes beyond, which a power cut
// brings back); it is never above size, and no overlay page lies wholly
// at or beyond size, so growing the file again shows zeros there.
//
// fsync (flush) writes the overlay into the backing file and makes its
// size the file's; drop forgets the overlay and the size, which is what a
// power cut does to a file.
type fileData struct {
	f     *os.File // the backing file: exactly the durable contents
	size  int64    // the size readers see
	dsize int64    // the backing file's size: the durable size
	valid int64    // backing bytes at or beyond it read as zeros
	// pages maps a page index to its contents; a nil slice is a page of
	// zeros (a punched or zeroed range, or an all-zero write).
	pages map[int64][]byte
}

// newFileData wraps a backing file whose whole contents are durable.
func newFileData(f *os.File) (*fileData, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	return &fileData{f: f, size: st.Size(), dsize: st.Size(), valid: st.Size(), pages: map[int64][]byte{}}, nil
}

// dirty reports whether the file differs from its durable contents.
func (d *fileData) dirty() bool {
	return len(d.pages) > 0 || d.size != d.dsize || d.valid != d.dsize
}

// unsynced is how many bytes of the overlay's pages a cut would drop.
func (d *fileData) unsynced() int64 { return int64(len(d.pages)) * pageSize }

// readBacking fills p with the durable file's bytes at off as the live
// file shows them: zeros at and beyond valid.
func (d *fileData) readBacking(p []byte, off int64) error {
	clear(p)
	if off < d.valid {
		n := min(int64(len(p)), d.valid-off)
		if _, err := d.f.ReadAt(p[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	return nil
}

// page returns page i for writing: the overlay's copy, made from the
// backing file (or zeros) if there is none.
func (d *fileData) page(i int64, whole bool) ([]byte, error) {
	p, ok := d.pages[i]
	if ok && p != nil {
		return p, nil
	}
	p = make([]byte, pageSize)
	if !ok && !whole {
		if err := d.readBacking(p, i*pageSize); err != nil {
			return nil, err
		}
	}
	d.pages[i] = p
	return p, nil
}

var zeroPage [pageSize]byte

// write applies a write of b at off.
func (d *fileData) write(b []byte, off int64) error {
	end := off + int64(len(b))
	for pos := off; pos < end; {
		i := pos / pageSize
		in := pos - i*pageSize
		n := min(pageSize-in, end-pos)
		src := b[pos-off : pos-off+n]
		if n == pageSize && string(src) == string(zeroPage[:]) {
			d.pages[i] = nil
		} else {
			p, err := d.page(i, n == pageSize)
			if err != nil {
				return err
			}
			copy(p[in:], src)
		}
		pos += n
	}
	d.size = max(d.size, end)
	return nil
}

// read fills p from off (cut at size) and returns how many bytes it
// filled.
func (d *fileData) read(p []byte, off int64) (int, error) {
	if off >= d.size {
		return 0, nil
	}
	p = p[:min(int64(len(p)), d.size-off)]
	if err := d.readBacking(p, off); err != nil {
		return 0, err
	}
	end := off + int64(len(p))
	for i := off / pageSize; i*pageSize < end; i++ {
		pg, ok := d.pages[i]
		if !ok {
			continue
		}
		lo, hi := max(off, i*pageSize), min(end, (i+1)*pageSize)
		if pg == nil {
			clear(p[lo-off : hi-off])
		} else {
			copy(p[lo-off:hi-off], pg[lo-i*pageSize:hi-i*pageSize])
		}
	}
	return len(p), nil
}

// zero makes [off, end) read as zeros (a punched hole, a zeroed range),
// within the file's size.
func (d *fileData) zero(off, end int64) error {
	end = min(end, d.size)
	for pos := off; pos < end; {
		i := pos / pageSize
		in := pos - i*pageSize
		n := min(pageSize-in, end-pos)
		switch {
		case n == pageSize:
			// A whole page: zeros, unless nothing could show through it
			// anyway (beyond valid, no overlay page).
			if _, ok := d.pages[i]; ok || i*pageSize < d.valid {
				d.pages[i] = nil
			}
		default:
			if pg, ok := d.pages[i]; ok && pg == nil {
				break // already zeros
			}
			p, err := d.page(i, false)
			if err != nil {
				return err
			}
			clear(p[in : in+n])
		}
		pos += n
	}
	return nil
}

// truncate sets the size: a shrink forgets the overlay beyond it and
// hides the backing bytes beyond it; a growth shows zeros.
func (d *fileData) truncate(size int64) {
	if size < d.size {
		for i := range d.pages {
			if i*pageSize >= size {
				delete(d.pages, i)
			}
		}
		if in := size % pageSize; in != 0 {
			if p := d.pages[size/pageSize]; p != nil {
				clear(p[in:])
			}
		}
		d.valid = min(d.valid, size)
	}
	d.size = size
}

// flush makes the live contents durable: the backing file cut where a
// truncate hid its bytes, the overlay written over it (zero pages as
// holes), and its size set.
func (d *fileData) flush() error {
	if !d.dirty() {
		return nil
	}
	if d.valid < d.dsize {
		if err := d.f.Truncate(d.valid); err != nil {
			return fmt.Errorf("truncate backing file: %w", err)
		}
		d.dsize = d.valid
	}
	idx := make([]int64, 0, len(d.pages))
	for i := range d.pages {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	var run [][]byte
	var runOff int64
	writeRun := func() error {
		if len(run) == 0 {
			return nil
		}
		n := 0
		for len(run) > 0 {
			w, err := unix.Pwritev(int(d.f.Fd()), run, runOff)
			if err != nil {
				return fmt.Errorf("write backing file at %d: %w", runOff, err)
			}
			n += w
			runOff += int64(w)
			for len(run) > 0 && w >= len(run[0]) {
				w -= len(run[0])
				run = run[1:]
			}
			if len(run) > 0 && w > 0 {
				run[0] = run[0][w:]
			}
		}
		_ = n
		run = run[:0]
		return nil
	}
	for _, i := range idx {
		p := d.pages[i]
		off := i * pageSize
		if p == nil {
			if err := writeRun(); err != nil {
				return err
			}
			// Zeros over durable bytes: punch them; beyond the durable
			// size the file reads zeros anyway.
			if off < d.dsize {
				n := min(pageSize, d.dsize-off)
				if err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
					if _, err := d.f.WriteAt(zeroPage[:n], off); err != nil {
						return fmt.Errorf("zero backing file at %d: %w", off, err)
					}
				}
			}
			continue
		}
		if len(run) > 0 && (runOff+int64(len(run))*pageSize != off || len(run) == 1024) {
			if err := writeRun(); err != nil {
				return err
			}
		}
		if len(run) == 0 {
			runOff = off
		}
		run = append(run, p)
	}
	if err := writeRun(); err != nil {
		return err
	}
	// Whole pages were written; the size cuts the last one.
	if err := d.f.Truncate(d.size); err != nil {
		return fmt.Errorf("size backing file: %w", err)
	}
	d.dsize, d.valid = d.size, d.size
	clear(d.pages)
	return nil
}

// drop forgets every change since the last flush: what a power cut does.
func (d *fileData) drop() {
	clear(d.pages)
	d.size, d.valid = d.dsize, d.dsize
}
