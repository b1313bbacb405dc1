package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/google/uuid"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// registerFromBlob adds `create --from-blob URL`: one of --blob and
// --from-blob is needed, and --from-blob excludes the flags that only make
// sense for a new blob.
func registerFromBlob(cmd *cobra.Command, f *createFlags) {
	cmd.Flags().StringVar(&f.fromBlob, "from-blob", "", "make the state directory for this existing page-blob VHD instead of a new blob, downloading its data into the local image")
	cmd.Flags().BoolVar(&f.thin, "thin", false, "with --from-blob: download nothing now; the mount fetches each 4 MiB chunk from the blob when first read or written, and the rest in the background (mount --prefetch); the blob stays leased until every chunk is local")
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
	if f.thin {
		return createThin(ctx, g, f, client)
	}
	seq, err := client.Sequence(ctx)
	if err != nil {
		return interrupted(ctx, err)
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
	d, res, err := transfer.CreateStateFromBlob(ctx, dl, f.state, transfer.FromBlobOptions{Name: f.name, Sequence: seq})
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

// thinLeaseSpace is the UUID namespace of thin attach's lease ids.
var thinLeaseSpace = uuid.MustParse("5b0c4f7e-9a53-4d1e-8f0a-6d2c1b7e4a90")

// errBlobMidBatch: the blob's sequence number says a batch was cut short.
var errBlobMidBatch = errors.New("the blob is in the middle of a batch")

// createThin makes a thin state directory for the blob behind client: the
// lease first (nothing may change the blob's page ranges while they are
// listed, nor later, while the blob holds the only copy of chunks not yet
// local), then the ranges, the blob's sequence number and an empty image.
func createThin(ctx context.Context, g *globals, f createFlags, client *pageblob.Client) (err error) {
	start := time.Now()
	if _, err := client.OpenVHD(ctx); err != nil {
		return interrupted(ctx, err)
	}
	// The lease id follows from the blob and the state directory: a rerun
	// of the same command after a crash between the lease and the state
	// file (whose lease id it would not know) takes the same lease back.
	abs, err := filepath.Abs(f.state)
	if err != nil {
		return err
	}
	proposed := uuid.NewSHA1(thinLeaseSpace, []byte(client.Location().URL()+"\x00"+abs)).String()
	lease, err := client.AcquireLease(ctx, proposed)
	if err != nil {
		return interrupted(ctx, err)
	}
	defer func() {
		if err != nil {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if rerr := client.ReleaseLease(rctx, lease); rerr != nil {
				err = errors.Join(err, fmt.Errorf("release the lease taken for the thin attach: %w", rerr))
			}
		}
	}()
	seq, err := client.Sequence(ctx)
	if err != nil {
		return interrupted(ctx, err)
	}
	if remote.Sequence(seq).InProgress() {
		return fmt.Errorf("%w: its last batch of writes was cut short (sequence number %d is odd), so it is not a consistent disk to attach; let the writer that made it finish it (`vhdsync replay --state DIR` on its state directory), then attach", errBlobMidBatch, seq)
	}
	dl, err := transfer.PrepareDownload(ctx, client, transfer.DownloadOptions{AllowLeased: true, Logger: g.logger()})
	if err != nil {
		return interrupted(ctx, err)
	}
	p := dl.Plan()
	d, _, err := transfer.CreateStateFromBlob(ctx, dl, f.state, transfer.FromBlobOptions{Name: f.name, Thin: true, Sequence: seq, LeaseID: lease})
	if err != nil {
		return interrupted(ctx, err)
	}
	fmt.Fprintf(g.stdout, "created thin state directory %s for %s\n  virtual size %s (%d bytes), geometry %s, disk id %s; %d page ranges holding %s stay on the blob until read, written or prefetched; %s\n  the blob stays leased by this state directory until every chunk is local\n  mount with: vhdsync mount --state %s MOUNTPOINT\n",
		d.Path, p.BlobURL, vhdlayer.FormatSize(d.State.VirtualSize), d.State.VirtualSize, d.State.Geometry, d.State.DiskID,
		p.Ranges, humanBytes(p.Bytes), time.Since(start).Round(time.Millisecond), d.Path)
	return nil
}
