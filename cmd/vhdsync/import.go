package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

type importFlags struct {
	blob            string
	state           string
	name            string
	format          string
	zeroGap         string
	workers         int
	overwrite       bool
	createContainer bool
	breakLease      bool
}

func newImportCmd(g *globals) *cobra.Command {
	var f importFlags
	cmd := &cobra.Command{
		Use:   "import --blob URL --state DIR FILE",
		Short: "Initial sync: upload an existing fixed/dynamic VHD or raw image to a new page blob",
		Long: `Upload an existing disk FILE to a new page blob and make the state directory
DIR for it, ready for ` + "`vhdsync mount`" + ` (vhdsync.json and a sparse local copy of the
data in DIR/disk.img).

FILE is a fixed VHD, a dynamic VHD (read through its block allocation table
and sector bitmaps) or a raw disk image; --format raw forces the last. A
differencing VHD is refused: merge it into its parent first. The blob is a
fixed VHD: the disk followed by a new footer (a new disk id). Azure needs a
whole number of MiB (at least 20 MiB), so a disk of another size, as raw
images and qemu-made VHDs often are, is rounded up and the output says so;
the added bytes read as zeros.

Only allocated, non-zero data is sent: each 4 MiB window of the allocated
parts is read, its non-zero 512-byte sectors found, and the ranges holding
them sent as Put Page requests (at most 4 MiB, each with a CRC64), in
parallel. A zero run shorter than --zero-gap between two data runs is sent
with them (one request instead of two); zero sectors at the edges of a range
never are. The blob is leased while the import runs.

Interrupted (Ctrl-C, kill -9, a lost network), the same command continues:
the progress kept in DIR/import-progress.json is checked against the blob's
page ranges, and nothing the blob holds is sent again. A FILE changed since
(size, modification time or footer) is refused with exit status 12.

--zero-gap takes a size: bytes, or a number with a unit (512, 64KiB, 1MiB;
K, M and KiB, MiB are powers of 1024).`,
		Example: `  vhdsync import --blob https://acct.blob.core.windows.net/disks/data.vhd --state /var/lib/vhdsync/data data.vhd
  vhdsync import --blob http://127.0.0.1:10000/devstoreaccount1/disks/vm.vhd --state ./vm --create-container vm-disk.raw
  # after an interruption, the same command resumes:
  vhdsync import --blob https://acct.blob.core.windows.net/disks/data.vhd --state /var/lib/vhdsync/data data.vhd
  # send only non-zero sectors, whatever the request count:
  vhdsync import --zero-gap 512 --blob https://acct.blob.core.windows.net/disks/db.vhd --state ./db db.img`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return runImport(cmd.Context(), g, f, args[0]) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.blob, "blob", "", "page blob URL to create (required); a SAS may be appended as ?sv=...&sig=...")
	fl.StringVar(&f.state, "state", "", "state directory to create (required; new or empty, or the one an interrupted import left)")
	fl.StringVar(&f.name, "name", "", "name of the disk files in the mount (<name>.vhd, <name>.img); default: the blob name without .vhd")
	fl.StringVar(&f.format, "format", "auto", "what FILE is: auto (a VHD if it ends in a VHD footer, else raw), vhd or raw")
	fl.StringVar(&f.zeroGap, "zero-gap", "64KiB", "shortest zero run that splits a range into two requests (at least 512; shorter runs between data are sent)")
	fl.IntVar(&f.workers, "workers", 8, "parallel Put Page requests")
	fl.BoolVar(&f.overwrite, "overwrite", false, "replace an existing blob of that name (its data is lost)")
	fl.BoolVar(&f.createContainer, "create-container", false, "create the container if it does not exist")
	fl.BoolVar(&f.breakLease, "break-lease", false, "break another writer's lease on the blob (only if you are sure it is gone)")
	for _, req := range []string{"blob", "state"} {
		_ = cmd.MarkFlagRequired(req)
	}
	return cmd
}

func runImport(ctx context.Context, g *globals, f importFlags, file string) error {
	format, err := transfer.ParseFormat(f.format)
	if err != nil {
		return usageError{fmt.Errorf("--format: %w", err)}
	}
	gap, err := vhdlayer.ParseSize(f.zeroGap)
	if err != nil {
		return usageError{fmt.Errorf("--zero-gap: %w", err)}
	}
	if gap < vhdlayer.SectorSize || gap > transfer.WindowSize {
		return usageError{fmt.Errorf("--zero-gap %s: between 512 bytes and 4 MiB", f.zeroGap)}
	}
	if f.workers < 1 || f.workers > 64 {
		return usageError{fmt.Errorf("--workers %d: between 1 and 64", f.workers)}
	}
	client, err := pageblob.Open(f.blob, &pageblob.Options{Env: g.env, TryTimeout: 2 * time.Minute, MaxRetries: 6})
	if err != nil {
		return err
	}
	im, err := transfer.PrepareImport(ctx, transfer.ImportOptions{
		Source: file, Format: format, Client: client, StateDir: f.state, Name: f.name,
		Workers: f.workers, ZeroGap: int64(gap), Overwrite: f.overwrite, CreateContainer: f.createContainer,
		BreakLease: f.breakLease, Logger: g.logger(),
	})
	if err != nil {
		return interrupted(ctx, err)
	}
	defer im.Close()
	p := im.Plan()
	out := g.stdout
	fmt.Fprintf(out, "importing %s %s (%d bytes) to %s\n", p.Kind, p.SourcePath, p.DataSize, p.BlobURL)
	if p.Rounded() {
		fmt.Fprintf(out, "  note: the disk is rounded up from %d to %d bytes (%s): Azure needs a whole number of MiB, at least 20 MiB; the %d bytes added at the end read as zeros\n",
			p.DataSize, p.VirtualSize, vhdlayer.FormatSize(uint64(p.VirtualSize)), p.VirtualSize-p.DataSize)
	}
	if p.Resumed {
		fmt.Fprintf(out, "  resuming an interrupted import (run %d): %d of %d windows of 4 MiB left to check; the blob holds %s already, which is not sent again\n",
			p.Runs+1, p.WindowsLeft, p.WindowsTotal, humanBytes(p.BlobHeld))
	}
	if p.Reset != "" {
		fmt.Fprintf(out, "  note: %s\n", p.Reset)
	}
	if p.WindowsLeft > 0 {
		fmt.Fprintf(out, "  reading %s of allocated data in %d windows of up to 4 MiB\n", humanBytes(p.ScanBytes), p.WindowsLeft)
	}
	bar := newTransferProgress(out, "import", p.ScanBytes)
	stop := watch(ctx, func() {
		s := im.Stats()
		bar.update(s.Scanned, "sent "+humanBytes(s.Sent))
	})
	res, err := im.Run(ctx)
	stop()
	bar.finish(err == nil)
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, context.Canceled) {
			return fmt.Errorf("%w: stopped after %d of %d windows (progress saved in %s); rerun the same command to resume",
				errInterrupted, res.Windows, p.WindowsLeft, p.StateDir)
		}
		return err
	}
	if res.AlreadyDone {
		fmt.Fprintf(out, "the import had finished; state directory %s completed\n", p.StateDir)
	} else {
		fmt.Fprintf(out, "imported %s to %s\n", p.SourcePath, p.BlobURL)
	}
	fmt.Fprintf(out, "  virtual size %s (%d bytes), blob %d bytes, geometry %s, disk id %s\n",
		vhdlayer.FormatSize(uint64(p.VirtualSize)), p.VirtualSize, p.VirtualSize+vhdlayer.FooterSize, p.Footer.Geometry, p.Footer.UniqueID)
	fmt.Fprintf(out, "  non-zero data %s (%d bytes) in %s allocated; the blob holds %d bytes of Put Page ranges (%d of them zero gaps shorter than --zero-gap %s)\n",
		humanBytes(res.NonZeroTotal), res.NonZeroTotal, humanBytes(p.ScanTotal), res.BlobBytes, res.BlobBytes-res.NonZeroTotal, f.zeroGap)
	if !res.AlreadyDone {
		fmt.Fprintf(out, "  sent %d bytes in %d Put Page requests with CRC64 (%s, %s)", res.Sent, res.Puts, res.Duration.Round(time.Millisecond), rate(res.Sent, res.Duration))
		if p.Resumed {
			fmt.Fprintf(out, "; %d bytes found on the blob already, not sent again; all runs: %d bytes in %d requests acknowledged", res.Held, res.SentTotal, res.PutsTotal)
		}
		fmt.Fprintln(out)
	}
	fmt.Fprintf(out, "  state directory %s (mount with: vhdsync mount --state %s MOUNTPOINT)\n", p.StateDir, p.StateDir)
	return nil
}

// interrupted turns an error caused by ctx's end into errInterrupted.
func interrupted(ctx context.Context, err error) error {
	if ctx.Err() != nil && !errors.Is(err, errInterrupted) {
		return fmt.Errorf("%w: %v", errInterrupted, err)
	}
	return err
}
