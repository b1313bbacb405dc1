package writeback

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/replicate"
)

// The flusher's fills (replicate/plan.go) read clean sectors from the
// local image. A sector is clean when no pending record covers it; the
// flusher knows the records it scanned, and a watch tells it about every
// write that finished after the scan began: the range lock records the
// range of each writer that releases it while watches are open, and
// ReadClean holds the range lock over what it reads, so a write is either
// finished and recorded, or not started, when the check and the read run.

// watchChunk is the granularity of a watch's record of written ranges: a
// fill touching a chunk written since the watch began is not sent. A page:
// writes of a busy disk land all over while a large batch is sent, and a
// coarser record refused most fills next to them (each refusal costs a
// request); a watch costs a map entry per page written while it is open.
const watchChunk = 4 << 10

// watch is one open watch (see replicate.Watch).
type watch struct {
	d     *Disk
	dirty map[int64]struct{} // chunks written since the watch began; under d.locks.mu
}

var _ replicate.Image = (*Disk)(nil)

// Watch implements replicate.Image.
func (d *Disk) Watch() replicate.Watch {
	w := &watch{d: d, dirty: map[int64]struct{}{}}
	d.locks.mu.Lock()
	d.locks.watches = append(d.locks.watches, w)
	d.locks.mu.Unlock()
	return w
}

// Stop implements replicate.Watch.
func (w *watch) Stop() {
	l := w.d.locks
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, x := range l.watches {
		if x == w {
			l.watches = append(l.watches[:i], l.watches[i+1:]...)
			return
		}
	}
}

// noteLocked records a released write range in every open watch; l.mu is
// held.
func (l *rangeLock) noteLocked(off, end int64) {
	for _, w := range l.watches {
		for c := off / watchChunk; c <= (end-1)/watchChunk; c++ {
			w.dirty[c] = struct{}{}
		}
	}
}

// ReadClean implements replicate.Watch.
func (w *watch) ReadClean(off int64, p []byte) ([]replicate.Range, bool, error) {
	d, end := w.d, off+int64(len(p))
	if len(p) == 0 {
		return nil, true, nil
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return nil, false, err
	}
	// A thin disk's chunk not yet local holds nothing to send: the blob
	// has its data, and the image zeros.
	if d.thin != nil && !d.thin.Present(off, end) {
		return nil, false, nil
	}
	// Never wait for a writer: one may hold its range while it waits for
	// journal space, which only this flusher frees. A range being written
	// is not clean anyway.
	h, ok := d.locks.tryLock(off, end)
	if !ok {
		return nil, false, nil
	}
	defer d.locks.release(h)
	d.locks.mu.Lock()
	for c := off / watchChunk; c <= (end-1)/watchChunk; c++ {
		if _, ok := w.dirty[c]; ok {
			d.locks.mu.Unlock()
			return nil, false, nil
		}
	}
	d.locks.mu.Unlock()
	holes, err := imageHoles(d, off, end)
	if err != nil {
		return nil, false, err
	}
	at := off
	for _, hl := range holes {
		if hl.Off > at {
			if _, err := d.img.ReadAt(p[at-off:hl.Off-off], at); err != nil {
				return nil, false, fmt.Errorf("read local image %d+%d: %w", at, hl.Off-at, err)
			}
		}
		at = hl.End
	}
	if at < end {
		if _, err := d.img.ReadAt(p[at-off:], at); err != nil {
			return nil, false, fmt.Errorf("read local image %d+%d: %w", at, end-at, err)
		}
	}
	return holes, true, nil
}

// imageHoles lists the holes of the image in [off, end) (SEEK_HOLE and
// SEEK_DATA), clipped to it and rounded outward to sectors.
func imageHoles(d *Disk, off, end int64) ([]replicate.Range, error) {
	fd := int(d.img.Fd())
	var holes []replicate.Range
	for at := off; at < end; {
		h, err := unix.Seek(fd, at, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("find holes in the local image at %d: %w", at, err)
		}
		if h >= end {
			break
		}
		dataAt, err := unix.Seek(fd, h, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			dataAt = end // a hole to the end of the file
		} else if err != nil {
			return nil, fmt.Errorf("find data in the local image at %d: %w", h, err)
		}
		hs := max(h&^511, off)
		he := min((dataAt+511)&^511, end)
		if hs < he {
			holes = append(holes, replicate.Range{Off: hs, End: he})
		}
		at = dataAt
	}
	return holes, nil
}
