package transfer

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/durable"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// DownloadOptions configure a download.
type DownloadOptions struct {
	// Raw writes the data region only (no footer): a raw disk image.
	Raw bool
	// Overwrite replaces an existing output file.
	Overwrite bool
	// Workers is the number of ranges read in parallel (default 8).
	Workers int
	// AllowLeased downloads a blob that a writer holds leased (its
	// contents may move while they are read); without it such a blob is
	// refused with pageblob.ErrLeased.
	AllowLeased bool
	Logger      *slog.Logger
}

// DownloadPlan is what a download will read, known before data moves.
type DownloadPlan struct {
	BlobURL     string
	VirtualSize int64
	Footer      vhdlayer.Footer
	// Ranges and Bytes: the page ranges the blob reports in its data
	// region, which is all that is read.
	Ranges int
	Bytes  int64
	Leased bool
}

// DownloadStats are a download's counters, read while it runs.
type DownloadStats struct {
	Received int64 // data bytes read from the blob
	Written  int64 // non-zero bytes written to the file (the rest stays holes)
	Requests int64 // range reads
}

// DownloadResult is the outcome of a finished download.
type DownloadResult struct {
	DownloadPlan
	DownloadStats
	Path     string
	FileSize int64
	Duration time.Duration
}

// Download copies a page blob holding a fixed VHD to a local sparse file.
type Download struct {
	o      DownloadOptions
	c      *pageblob.Client
	info   pageblob.VHDInfo
	ranges []pageblob.Range
	plan   DownloadPlan

	received, written, requests atomic.Int64
}

// PrepareDownload checks the blob (a page blob ending in a valid fixed-VHD
// footer) and lists its page ranges.
func PrepareDownload(ctx context.Context, c *pageblob.Client, o DownloadOptions) (*Download, error) {
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	info, err := c.OpenVHD(ctx)
	if err != nil {
		return nil, err
	}
	d := &Download{o: o, c: c, info: info}
	size := int64(info.Footer.CurrentSize)
	// A snapshot never changes, whatever the lease on its base blob.
	leased := c.SnapshotID() == "" && strings.EqualFold(info.Props.LeaseState, "leased")
	if leased && !o.AllowLeased {
		return nil, fmt.Errorf("%w: %s is leased (a vhdsync mount, import or apply worker holds it), so it may change while it is read; unmount it (vhdsync unmount) or stop that writer first, or pass --allow-leased to read it anyway",
			pageblob.ErrLeased, c.Location().URL())
	}
	ranges, err := c.PageRanges(ctx, 0, size)
	if err != nil {
		return nil, err
	}
	d.ranges = ranges
	d.plan = DownloadPlan{BlobURL: c.DisplayURL(), VirtualSize: size, Footer: info.Footer, Ranges: len(ranges), Leased: leased}
	for _, r := range ranges {
		d.plan.Bytes += r.Len
	}
	return d, nil
}

// Plan returns what the download will read.
func (d *Download) Plan() DownloadPlan { return d.plan }

// Stats returns the counters so far.
func (d *Download) Stats() DownloadStats {
	return DownloadStats{Received: d.received.Load(), Written: d.written.Load(), Requests: d.requests.Load()}
}

// CheckOutput refuses an existing path unless overwrite: a download never
// replaces a file it was not told to. Callers check before they start, so
// that nothing is read or announced for a download that cannot happen.
func CheckOutput(path string, overwrite bool) error {
	if _, err := os.Lstat(path); err == nil && !overwrite {
		return fmt.Errorf("%w: %s; pass --overwrite to replace it, or choose another name", ErrFileExists, path)
	}
	return nil
}

// Run writes the blob to path: into path.part first, renamed to path once
// complete and checked (the footer re-read from the blob must be the one
// the download began with, and the file's own footer must be valid).
func (d *Download) Run(ctx context.Context, path string) (DownloadResult, error) {
	start := time.Now()
	res := DownloadResult{DownloadPlan: d.plan, Path: path}
	if err := CheckOutput(path, d.o.Overwrite); err != nil {
		return res, err
	}
	tmp := path + ".part"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return res, fmt.Errorf("create %s: %w", tmp, err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	size := d.plan.VirtualSize
	fileSize := size
	if !d.o.Raw {
		fileSize += vhdlayer.FooterSize
	}
	if err := f.Truncate(fileSize); err != nil {
		return res, fmt.Errorf("size %s to %d bytes: %w", tmp, fileSize, err)
	}
	if err := d.fill(ctx, f); err != nil {
		return res, err
	}
	// The footer at the end: the blob's must not have changed.
	props, raw, err := d.c.ReadFooter(ctx)
	if err != nil {
		return res, err
	}
	if raw != d.info.Raw {
		return res, fmt.Errorf("%w: the footer of %s changed during the download (the blob was replaced); download it again", ErrBlobChanged, d.plan.BlobURL)
	}
	if !d.o.Raw {
		if _, err := f.WriteAt(raw[:], size); err != nil {
			return res, fmt.Errorf("write footer to %s: %w", tmp, err)
		}
	}
	if err := f.Sync(); err != nil {
		return res, fmt.Errorf("sync %s: %w", tmp, err)
	}
	if !d.o.Raw {
		if err := checkFileFooter(f, fileSize); err != nil {
			return res, err
		}
	}
	if err := f.Close(); err != nil {
		return res, fmt.Errorf("close %s: %w", tmp, err)
	}
	// A record of the recovery point the old file held would now lie
	// (download --since trusts it): gone before the file is replaced.
	if err := RemovePointRecord(path); err != nil {
		return res, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return res, fmt.Errorf("rename %s to %s: %w", tmp, path, err)
	}
	ok = true
	if err := durable.SyncDir(filepath.Dir(path)); err != nil {
		return res, fmt.Errorf("the download is in %s, but its name may not survive a power loss: %w", path, err)
	}
	res.DownloadStats = d.Stats()
	res.FileSize = fileSize
	res.Duration = time.Since(start)
	if props.ETag != d.info.Props.ETag {
		return res, fmt.Errorf("%w: %s was written to while it was downloaded (its ETag changed), so %s may mix old and new data; stop the writer and download again",
			ErrBlobChanged, d.plan.BlobURL, path)
	}
	return res, nil
}

// fill reads every page range, in pieces of at most 4 MiB, in parallel,
// and writes their non-zero sectors to f.
func (d *Download) fill(ctx context.Context, f *os.File) error {
	spans := make([]span, 0, len(d.ranges))
	for _, r := range d.ranges {
		if end := min(r.Off+r.Len, d.plan.VirtualSize); end > r.Off {
			spans = append(spans, span{r.Off, end})
		}
	}
	return readGrid(ctx, d.c, spans, d.o.Workers, &d.requests, &d.received, func(buf []byte, off int64) error {
		runs, _ := scanZeros(buf, 0, int64(len(buf)))
		for _, r := range mergeRuns(runs, imageGap) {
			if _, err := f.WriteAt(buf[r.off:r.end], off+r.off); err != nil {
				return fmt.Errorf("write %s at %d: %w", f.Name(), off+r.off, err)
			}
			d.written.Add(r.len())
		}
		return nil
	})
}

// checkFileFooter reads back the footer of a written fixed VHD and checks
// it.
func checkFileFooter(f *os.File, size int64) error {
	var b [vhdlayer.FooterSize]byte
	if _, err := f.ReadAt(b[:], size-vhdlayer.FooterSize); err != nil {
		return fmt.Errorf("read back the footer of %s: %w", f.Name(), err)
	}
	ft, err := vhdlayer.DecodeFooter(b[:])
	if err == nil {
		err = vhdlayer.Validate(ft, size)
	}
	if err != nil {
		return fmt.Errorf("the downloaded file %s: %w", f.Name(), err)
	}
	return nil
}
