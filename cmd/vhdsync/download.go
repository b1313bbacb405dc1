package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

type downloadFlags struct {
	blob        string
	raw         bool
	overwrite   bool
	allowLeased bool
	workers     int
	point       string
}

func newDownloadCmd(g *globals) *cobra.Command {
	var f downloadFlags
	cmd := &cobra.Command{
		Use:   "download --blob URL [--point ID] FILE",
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
fails with exit 4 (not found); one that is not a snapshot id at all, exit 2.`,
		Example: `  vhdsync download --blob https://acct.blob.core.windows.net/disks/data.vhd data-restored.vhd
  vhdsync download --raw --blob https://acct.blob.core.windows.net/disks/data.vhd data.img
  qemu-img compare -f vpc -F raw data-restored.vhd data.img
  vhdsync points --blob https://acct.blob.core.windows.net/disks/data.vhd
  vhdsync download --blob https://acct.blob.core.windows.net/disks/data.vhd --point 2026-11-24T15:20:00.1234567Z data-at-point.vhd`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return runDownload(cmd.Context(), g, f, args[0]) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.blob, "blob", "", "page blob URL to read (required); a SAS may be appended as ?sv=...&sig=...")
	fl.BoolVar(&f.raw, "raw", false, "write the data region only (a raw image, no footer)")
	fl.BoolVar(&f.overwrite, "overwrite", false, "replace FILE if it exists")
	fl.BoolVar(&f.allowLeased, "allow-leased", false, "read a blob that a writer holds leased (the copy may not be a consistent point)")
	fl.IntVar(&f.workers, "workers", 8, "parallel range reads")
	fl.StringVar(&f.point, "point", "", "restore the recovery point `ID` (a snapshot id that vhdsync points lists) instead of the live blob")
	_ = cmd.MarkFlagRequired("blob")
	return cmd
}

func runDownload(ctx context.Context, g *globals, f downloadFlags, file string) error {
	if f.workers < 1 || f.workers > 64 {
		return usageError{fmt.Errorf("--workers %d: between 1 and 64", f.workers)}
	}
	if err := transfer.CheckOutput(file, f.overwrite); err != nil {
		return err
	}
	client, err := pageblob.Open(f.blob, &pageblob.Options{Env: g.env, TryTimeout: 2 * time.Minute, MaxRetries: 6})
	if err != nil {
		return err
	}
	if f.point != "" {
		if client, err = openPoint(ctx, g, client, f.point); err != nil {
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
