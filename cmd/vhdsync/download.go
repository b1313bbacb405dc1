package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/points"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

type downloadFlags struct {
	blob        string
	raw         bool
	overwrite   bool
	allowLeased bool
	workers     int
	point       string
	since       string
	crossCheck  bool
	rawSet      bool
}

func newDownloadCmd(g *globals) *cobra.Command {
	var f downloadFlags
	cmd := &cobra.Command{
		Use:   "download --blob URL [--point ID [--since OLD]] FILE",
		Short: "Restore: download a page-blob VHD to a local sparse fixed VHD (or, with --raw, a raw image)",
		Long: `Download the page blob at URL, a fixed VHD, to FILE: a sparse local fixed VHD
(the disk followed by the blob's footer), or with --raw the data region alone,
a raw disk image for losetup or qemu-img -f raw.

Only the page ranges the blob reports are read, in parallel pieces of up to
4 MiB, and only their non-zero sectors are written: everything else stays a
hole in FILE. The data goes to FILE.part first and becomes FILE once complete;
the footer is read again at the end and must be the one the download began
with, and FILE's own footer is checked.

A blob leased by a writer (a vhdsync mount, an import or apply) is refused, since
it may change while it is read: unmount it first, or pass --allow-leased.
If the blob was written to during the download anyway, the file is kept but
the command fails (exit 1) saying so. An existing FILE is refused (exit 5)
unless --overwrite is given.

With --point ID, the recovery point ID (a snapshot id that ` + "`vhdsync points`" + `
lists) is restored instead of the live blob: the disk exactly as of the
epoch the point names. A snapshot never changes, so a point of a mounted
disk needs no --allow-leased. An ID that is not a snapshot of the blob
fails with exit 4 (not found); one that is not a snapshot id at all, exit 2.
FILE.vhdsync-point then records which point FILE holds.

With --point NEW --since OLD, FILE must be a copy of point OLD made by
download --point (its FILE.vhdsync-point says so, and FILE has not changed
since): only the ranges written between OLD and NEW, as the points record
them, are read and written (cleared ones become holes), and FILE becomes
exactly point NEW. A FILE that is not point OLD is refused (exit 12) with
the way forward. When the points do not record every change in between (a
point taken by an older vhdsync, one after a daemon restart, one deleted by
--keep, or the disk resized), point NEW is downloaded in full instead, and
the command says why. With --cross-check the service is also asked which
pages changed between the two points (Get Page Ranges with prevsnapshot);
a page it names that the points' records lack makes the command download
NEW in full. The service's answer only ever widens what is read, never
narrows it. Azurite ignores prevsnapshot and names every page, so there
the cross-check always downloads in full.`,
		Example: `  vhdsync download --blob https://acct.blob.core.windows.net/disks/data.vhd data-restored.vhd
  vhdsync download --raw --blob https://acct.blob.core.windows.net/disks/data.vhd data.img
  qemu-img compare -f vpc -F raw data-restored.vhd data.img
  vhdsync points --blob https://acct.blob.core.windows.net/disks/data.vhd
  vhdsync download --blob https://acct.blob.core.windows.net/disks/data.vhd --point 2026-11-24T15:20:00.1234567Z data-at-point.vhd
  vhdsync download --blob https://acct.blob.core.windows.net/disks/data.vhd --point 2026-11-24T16:20:00.7654321Z --since 2026-11-24T15:20:00.1234567Z data-at-point.vhd`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			f.rawSet = cmd.Flags().Changed("raw")
			return runDownload(cmd.Context(), g, f, args[0])
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.blob, "blob", "", "page blob URL to read (required); a SAS may be appended as ?sv=...&sig=...")
	fl.BoolVar(&f.raw, "raw", false, "write the data region only (a raw image, no footer)")
	fl.BoolVar(&f.overwrite, "overwrite", false, "replace FILE if it exists")
	fl.BoolVar(&f.allowLeased, "allow-leased", false, "read a blob that a writer holds leased (the copy may not be a consistent point)")
	fl.IntVar(&f.workers, "workers", 8, "parallel range reads")
	fl.StringVar(&f.point, "point", "", "restore the recovery point `ID` (a snapshot id that vhdsync points lists) instead of the live blob")
	fl.StringVar(&f.since, "since", "", "FILE is a copy of the recovery point `OLD` (made by download --point OLD): rewrite only what changed between OLD and --point")
	fl.BoolVar(&f.crossCheck, "cross-check", false, "with --since: also ask the service which pages changed between the points (Get Page Ranges with prevsnapshot) and download in full if it names one the points' records lack; skipped where the service refuses it")
	_ = cmd.MarkFlagRequired("blob")
	return cmd
}

func runDownload(ctx context.Context, g *globals, f downloadFlags, file string) error {
	if f.workers < 1 || f.workers > 64 {
		return usageError{fmt.Errorf("--workers %d: between 1 and 64", f.workers)}
	}
	if f.since != "" {
		return runDownloadSince(ctx, g, f, file)
	}
	if err := transfer.CheckOutput(file, f.overwrite); err != nil {
		return err
	}
	client, err := pageblob.Open(f.blob, &pageblob.Options{Env: g.env, TryTimeout: 2 * time.Minute, MaxRetries: 6})
	if err != nil {
		return err
	}
	base := client.Location().URL()
	var pt points.Point
	var isPoint bool
	if f.point != "" {
		if client, pt, isPoint, err = openPointInfo(ctx, g, client, f.point); err != nil {
			return interrupted(ctx, err)
		}
	}
	dl, err := transfer.PrepareDownload(ctx, client, transfer.DownloadOptions{
		Raw: f.raw, Overwrite: f.overwrite, Workers: f.workers, AllowLeased: f.allowLeased, Logger: g.logger(),
	})
	if err != nil {
		return interrupted(ctx, err)
	}
	res, err := runDownloadWithProgress(ctx, g, dl, file)
	if err != nil {
		return interrupted(ctx, err)
	}
	if isPoint {
		if err := transfer.WritePointRecord(file, transfer.PointRecord{Blob: base, Point: pt.ID, Epoch: pt.Epoch, Raw: f.raw}); err != nil {
			return err
		}
	}
	what := "fixed VHD (data + footer, footer checked)"
	if f.raw {
		what = "raw image (data region only)"
	}
	fmt.Fprintf(g.stdout, "downloaded %s to %s\n  %s of %s (%d bytes); read %s from %d page ranges in %d requests, wrote %s of non-zero data (the rest are holes); %s, %s\n",
		res.BlobURL, res.Path, what, vhdlayer.FormatSize(uint64(res.VirtualSize)), res.FileSize,
		humanBytes(res.Received), res.Ranges, res.Requests, humanBytes(res.Written), res.Duration.Round(time.Millisecond), rate(res.Received, res.Duration))
	return nil
}

// runDownloadWithProgress runs dl into path with a progress display.
func runDownloadWithProgress(ctx context.Context, g *globals, dl *transfer.Download, path string) (transfer.DownloadResult, error) {
	p := dl.Plan()
	fmt.Fprintf(g.stdout, "downloading %s (%s disk, %d page ranges holding %s) to %s\n",
		p.BlobURL, vhdlayer.FormatSize(uint64(p.VirtualSize)), p.Ranges, humanBytes(p.Bytes), path)
	bar := newTransferProgress(g.stdout, "download", p.Bytes)
	stop := watch(ctx, func() { s := dl.Stats(); bar.update(s.Received, "") })
	res, err := dl.Run(ctx, path)
	stop()
	bar.finish(err == nil)
	return res, err
}

// runDownloadSince brings FILE, a copy of the recovery point f.since, to
// the point f.point by rewriting the ranges the points between them record
// as written; when they do not record all of them, it downloads the point
// in full (saying why): never a file that is neither point.
func runDownloadSince(ctx context.Context, g *globals, f downloadFlags, file string) error {
	if f.point == "" {
		return usageError{fmt.Errorf("--since %s: give the point to restore with --point NEW (list them with vhdsync points --blob URL)", f.since)}
	}
	if _, err := pageblob.ParseSnapshotID(f.since); err != nil {
		return usageError{fmt.Errorf("--since: %w; it names the recovery point FILE holds (FILE.vhdsync-point records it)", err)}
	}
	client, err := pageblob.Open(f.blob, &pageblob.Options{Env: g.env, TryTimeout: 2 * time.Minute, MaxRetries: 6})
	if err != nil {
		return err
	}
	base := client.Location().URL()
	var raw *bool
	if f.rawSet {
		raw = &f.raw
	}
	rec, err := transfer.CheckPointRecord(file, base, f.since, f.point, raw)
	if err != nil {
		return err
	}
	f.raw = rec.Raw
	sc, pt, isPoint, err := openPointInfo(ctx, g, client, f.point)
	if err != nil {
		return interrupted(ctx, err)
	}
	if !isPoint {
		return usageError{fmt.Errorf("--point %s is not a vhdsync recovery point, so nothing records what changed since %s; download it in full: vhdsync download --blob %s --point %s --overwrite %s", f.point, f.since, base, f.point, file)}
	}
	pts, _, err := points.ListPoints(ctx, client)
	if err != nil {
		return interrupted(ctx, err)
	}
	changes, err := points.ChangesBetween(pts, f.since, f.point)
	if errors.Is(err, points.ErrNoRecord) {
		return downloadSinceInFull(ctx, g, f, file, sc, base, pt, err)
	}
	if err != nil {
		return err
	}
	if f.crossCheck {
		if miss := crossCheck(ctx, g, sc, f.since, changes); miss != nil {
			return downloadSinceInFull(ctx, g, f, file, sc, base, pt, miss)
		}
	}
	changed := blobRanges(changes)
	// Until the record says NEW, FILE is half-way: only this same restore
	// (or a full download) may touch it again.
	rec.UpdatingTo = f.point
	if err := transfer.WritePointRecord(file, rec); err != nil {
		return err
	}
	res, err := transfer.RunIncremental(ctx, sc, file, changed, transfer.IncrementalOptions{Raw: f.raw, Workers: f.workers})
	if errors.Is(err, transfer.ErrNotIncremental) {
		return downloadSinceInFull(ctx, g, f, file, sc, base, pt, err)
	}
	if err != nil {
		return interrupted(ctx, fmt.Errorf("%w; %s may hold neither point now (%s says so): run the same command again to finish it", err, file, transfer.PointRecordPath(file)))
	}
	if err := transfer.WritePointRecord(file, transfer.PointRecord{Blob: base, Point: pt.ID, Epoch: pt.Epoch, Raw: f.raw}); err != nil {
		return err
	}
	g.logger().Info("incremental restore", "file", file, "since", f.since, "point", f.point, "changed_bytes", res.Changed,
		"read_bytes", res.Received, "read_requests", res.Requests, "full_bytes", res.FullBytes)
	fmt.Fprintf(g.stdout, "updated %s from recovery point %s to %s (epoch %d)\n  %d changed range(s) holding %s recorded by the points in between; read %s (%d bytes) in %d requests; a full download reads %s (%d bytes): %s; wrote %s, made %s holes; %s\n",
		file, f.since, f.point, pt.Epoch, res.ChangedRanges, humanBytes(res.Changed), humanBytes(res.Received), res.Received, res.Requests,
		humanBytes(res.FullBytes), res.FullBytes, ratio(res.Received, res.FullBytes), humanBytes(res.Written), humanBytes(res.Punched), res.Duration.Round(time.Millisecond))
	return nil
}

// blobRanges is a record of changed ranges as the page blob client's.
func blobRanges(c *points.Changes) []pageblob.Range {
	var out []pageblob.Range
	for _, r := range c.Ranges() {
		out = append(out, pageblob.Range{Off: r.Off, Len: r.End - r.Off})
	}
	return out
}

// ratio says what share of full the incremental restore read.
func ratio(part, full int64) string {
	if full == 0 {
		return "nothing to compare with"
	}
	return fmt.Sprintf("%.2f%% of it", 100*float64(part)/float64(full))
}

// downloadSinceInFull downloads the point sc over FILE when the points
// cannot say what changed since f.since (why).
func downloadSinceInFull(ctx context.Context, g *globals, f downloadFlags, file string, sc *pageblob.Client, base string, pt points.Point, why error) error {
	fmt.Fprintf(g.stdout, "an incremental restore from %s is not possible: %v\ndownloading recovery point %s in full instead\n", f.since, why, f.point)
	dl, err := transfer.PrepareDownload(ctx, sc, transfer.DownloadOptions{Raw: f.raw, Overwrite: true, Workers: f.workers, Logger: g.logger()})
	if err != nil {
		return interrupted(ctx, err)
	}
	res, err := runDownloadWithProgress(ctx, g, dl, file)
	if err != nil {
		return interrupted(ctx, err)
	}
	if err := transfer.WritePointRecord(file, transfer.PointRecord{Blob: base, Point: pt.ID, Epoch: pt.Epoch, Raw: f.raw}); err != nil {
		return err
	}
	fmt.Fprintf(g.stdout, "downloaded %s to %s in full: read %s in %d requests, wrote %s of non-zero data; %s\n",
		res.BlobURL, res.Path, humanBytes(res.Received), res.Requests, humanBytes(res.Written), res.Duration.Round(time.Millisecond))
	return nil
}

// crossCheck asks the service which pages changed between the point sc
// and since, and returns an error naming what the points' records lack
// (nil when they hold it all, or when the service does not answer: the
// cross-check is then skipped, and says so).
func crossCheck(ctx context.Context, g *globals, sc *pageblob.Client, since string, changes *points.Changes) error {
	svc, err := sc.ChangedSince(ctx, since)
	if err != nil {
		// Not an error of the restore: the records stand on their own.
		fmt.Fprintf(g.stdout, "cross-check skipped: %v\n", err)
		return nil
	}
	rs := make([]points.Range, len(svc))
	for i, r := range svc {
		rs[i] = points.Range{Off: r.Off, End: r.Off + r.Len}
	}
	miss := changes.Missing(rs)
	if len(miss) == 0 {
		fmt.Fprintf(g.stdout, "cross-check: the %d range(s) the service reports changed are all in the points' records\n", len(svc))
		return nil
	}
	var n int64
	for _, m := range miss {
		n += m.End - m.Off
	}
	g.logger().Warn("cross-check: the service reports changes the recovery points' records lack", "since", since, "point", sc.SnapshotID(), "ranges", len(miss), "bytes", n, "first_offset", miss[0].Off)
	return fmt.Errorf("the service reports %d changed range(s), %d bytes, that the points' records lack (the first at byte %d): another writer changed the blob, or a record is wrong", len(miss), n, miss[0].Off)
}
