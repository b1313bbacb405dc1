package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// registerFromBlob adds `create --from-blob URL`: one of --blob and
// --from-blob is needed, and --from-blob excludes the flags that only make
// sense for a new blob.
func registerFromBlob(cmd *cobra.Command, f *createFlags) {
	cmd.Flags().StringVar(&f.fromBlob, "from-blob", "", "make the state directory for this existing page-blob VHD instead of a new blob, downloading its data into the local image")
	cmd.MarkFlagsOneRequired("blob", "from-blob")
	for _, other := range []string{"blob", "size", "overwrite", "create-container"} {
		cmd.MarkFlagsMutuallyExclusive("from-blob", other)
	}
}

// runCreateFromBlob builds a state directory for an existing blob.
func runCreateFromBlob(ctx context.Context, g *globals, f createFlags) error {
	// Check the state directory before reaching Azure.
	if err := statedir.CheckNew(f.state); err != nil {
		return err
	}
	client, err := pageblob.Open(f.fromBlob, &pageblob.Options{Env: g.env, TryTimeout: 2 * time.Minute, MaxRetries: 6})
	if err != nil {
		return err
	}
	dl, err := transfer.PrepareDownload(ctx, client, transfer.DownloadOptions{Workers: 8, Logger: g.logger()})
	if err != nil {
		return interrupted(ctx, err)
	}
	p := dl.Plan()
	fmt.Fprintf(g.stdout, "making state directory %s for %s (%s disk, %d page ranges holding %s)\n",
		f.state, p.BlobURL, vhdlayer.FormatSize(uint64(p.VirtualSize)), p.Ranges, humanBytes(p.Bytes))
	bar := newTransferProgress(g.stdout, "download", p.Bytes)
	stop := watch(ctx, func() { s := dl.Stats(); bar.update(s.Received, "") })
	d, res, err := transfer.CreateStateFromBlob(ctx, dl, f.state, transfer.FromBlobOptions{Name: f.name})
	stop()
	bar.finish(err == nil)
	if err != nil {
		return interrupted(ctx, err)
	}
	fmt.Fprintf(g.stdout, "created state directory %s for %s\n  virtual size %s (%d bytes), geometry %s, disk id %s; read %s, local image holds %s of non-zero data; %s\n  mount with: vhdsync mount --state %s MOUNTPOINT\n",
		d.Path, p.BlobURL, vhdlayer.FormatSize(d.State.VirtualSize), d.State.VirtualSize, d.State.Geometry, d.State.DiskID,
		humanBytes(res.Received), humanBytes(res.Written), res.Duration.Round(time.Millisecond), d.Path)
	return nil
}
