package transfer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// IncrementalOptions configure RunIncremental.
type IncrementalOptions struct {
	// Raw: the file is a raw image (no footer), else a fixed VHD.
	Raw bool
	// Workers is the number of ranges read in parallel (default 8).
	Workers int
}

// IncrementalResult is the outcome of an incremental restore.
type IncrementalResult struct {
	DownloadStats
	// BlobURL, VirtualSize: the point restored.
	BlobURL     string
	VirtualSize int64
	// Changed is the bytes the record of changes names (within the
	// disk), ChangedRanges their count; Punched the bytes of them made
	// holes (cleared or zero in the point).
	Changed       int64
	ChangedRanges int
	Punched       int64
	// Lists is the Get Page Ranges requests made; FullBytes is what a
	// full download of the point reads (its valid pages), for the ratio.
	Lists     int64
	FullBytes int64
	Duration  time.Duration
}

// RunIncremental brings file, a copy of an earlier state of the blob c
// reads (a recovery point), to c's state by rewriting only the ranges
// changed (the union of the points' records, sorted and disjoint): within
// them, c's valid pages are read and written (their zero sectors punched
// as holes), and everything else is punched. Outside them file is left as
// it is, which is exact because nothing else was written to the blob in
// between. The caller checks that file holds the earlier point
// (CheckPointRecord). A disk whose size changed is ErrNotIncremental.
func RunIncremental(ctx context.Context, c *pageblob.Client, file string, changed []pageblob.Range, o IncrementalOptions) (IncrementalResult, error) {
	start := time.Now()
	if o.Workers <= 0 {
		o.Workers = 8
	}
	res := IncrementalResult{BlobURL: c.DisplayURL()}
	info, err := c.OpenVHD(ctx)
	if err != nil {
		return res, err
	}
	size := int64(info.Footer.CurrentSize)
	res.VirtualSize = size
	fileSize := size
	if !o.Raw {
		fileSize += vhdlayer.FooterSize
	}
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		return res, fmt.Errorf("open %s: %w", file, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return res, fmt.Errorf("stat %s: %w", file, err)
	}
	if fi.Size() != fileSize {
		return res, fmt.Errorf("%w: %s is %d bytes, the point's disk makes %d (the disk was resized in between)", ErrNotIncremental, file, fi.Size(), fileSize)
	}
	valid, err := c.PageRanges(ctx, 0, size)
	if err != nil {
		return res, err
	}
	res.Lists++
	for _, v := range valid {
		res.FullBytes += min(v.Off+v.Len, size) - v.Off
	}
	reads, holes := splitChanged(changed, valid, size)
	for _, r := range changed {
		if r.Off < size {
			res.Changed += min(r.Off+r.Len, size) - r.Off
			res.ChangedRanges++
		}
	}
	var punched, received, written, requests atomic.Int64
	for _, h := range holes {
		if err := punch(f, h.off, h.len()); err != nil {
			return res, err
		}
		punched.Add(h.len())
	}
	if err := readInto(ctx, c, f, reads, o.Workers, &received, &written, &punched, &requests); err != nil {
		return res, err
	}
	if !o.Raw {
		if _, err := f.WriteAt(info.Raw[:], size); err != nil {
			return res, fmt.Errorf("write footer to %s: %w", file, err)
		}
	}
	if err := f.Sync(); err != nil {
		return res, fmt.Errorf("sync %s: %w", file, err)
	}
	if !o.Raw {
		if err := checkFileFooter(f, fileSize); err != nil {
			return res, err
		}
	}
	if err := f.Close(); err != nil {
		return res, fmt.Errorf("close %s: %w", file, err)
	}
	res.DownloadStats = DownloadStats{Received: received.Load(), Written: written.Load(), Requests: requests.Load()}
	res.Punched = punched.Load()
	res.Duration = time.Since(start)
	return res, nil
}

// splitChanged cuts the changed ranges (sorted, disjoint) by the point's
// valid page ranges (sorted, disjoint) into what must be read (changed
// and valid) and what must become a hole (changed, cleared or never
// written in the point), within [0, size).
func splitChanged(changed, valid []pageblob.Range, size int64) (reads, holes []span) {
	vi := 0
	for _, c := range changed {
		off, end := c.Off, min(c.Off+c.Len, size)
		for off < end {
			for vi < len(valid) && valid[vi].Off+valid[vi].Len <= off {
				vi++
			}
			if vi == len(valid) || valid[vi].Off >= end {
				holes = append(holes, span{off, end})
				break
			}
			v := valid[vi]
			if v.Off > off {
				holes = append(holes, span{off, v.Off})
				off = v.Off
			}
			e := min(v.Off+v.Len, end)
			reads = append(reads, span{off, e})
			off = e
		}
	}
	return reads, holes
}

// readInto reads the spans from c in pieces on the 4 MiB grid, in
// parallel, and writes each piece's non-zero sectors to f, punching the
// rest: the file held other data there.
func readInto(ctx context.Context, c *pageblob.Client, f *os.File, reads []span, workers int, received, written, punched, requests *atomic.Int64) error {
	return readGrid(ctx, c, reads, workers, requests, received, func(buf []byte, off int64) error {
		n := int64(len(buf))
		runs, _ := scanZeros(buf, 0, n)
		at := int64(0)
		for _, r := range append(mergeRuns(runs, imageGap), span{n, n}) {
			if r.off > at {
				if err := punch(f, off+at, r.off-at); err != nil {
					return err
				}
				punched.Add(r.off - at)
			}
			if r.end > r.off {
				if _, err := f.WriteAt(buf[r.off:r.end], off+r.off); err != nil {
					return fmt.Errorf("write %s at %d: %w", f.Name(), off+r.off, err)
				}
				written.Add(r.len())
			}
			at = r.end
		}
		return nil
	})
}

// readGrid reads the spans from c in pieces on the 4 MiB grid (so that a
// range splits the same way whatever its neighbours), workers at a time,
// counting requests and bytes received, and hands each piece to write with
// its offset; the first error stops every worker and is returned.
func readGrid(ctx context.Context, c *pageblob.Client, spans []span, workers int, requests, received *atomic.Int64, write func(buf []byte, off int64) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	work := make(chan span)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, pageblob.MaxPutPage)
			for s := range work {
				n := s.len()
				if err := c.ReadAt(ctx, buf[:n], s.off); err != nil {
					cancel(err)
					return
				}
				requests.Add(1)
				received.Add(n)
				if err := write(buf[:n], s.off); err != nil {
					cancel(err)
					return
				}
			}
		}()
	}
feed:
	for _, r := range spans {
		for off := r.off; off < r.end; {
			next := min((off/pageblob.MaxPutPage+1)*pageblob.MaxPutPage, r.end)
			select {
			case work <- span{off, next}:
			case <-ctx.Done():
				break feed
			}
			off = next
		}
	}
	close(work)
	wg.Wait()
	return context.Cause(ctx)
}

// punch makes [off, off+n) of f read as zeros, as a hole where the file
// system can (the size stays); else it writes zeros.
func punch(f *os.File, off, n int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("punch a hole in %s at %d+%d: %w", f.Name(), off, n, err)
	}
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if _, err := f.WriteAt(zero[:k], off); err != nil {
			return fmt.Errorf("zero %s at %d+%d: %w", f.Name(), off, k, err)
		}
		off, n = off+k, n-k
	}
	return nil
}
