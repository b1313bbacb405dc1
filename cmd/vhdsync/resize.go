package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/fusefs"
	"github.com/vhdsync/vhdsync/internal/control"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/vhdlayer"
	"github.com/vhdsync/vhdsync/writeback"
)

type resizeFlags struct {
	state      string
	size       string
	shrink     bool
	breakLease bool
	bf         blobFlags
}

func newResizeCmd(g *globals) *cobra.Command {
	var f resizeFlags
	cmd := &cobra.Command{
		Use:   "resize --state DIR --size SIZE",
		Short: "Grow (or, with --shrink, shrink) the disk: blob, footer, local image and the mounted files",
		Long: `Change the disk's virtual size. The blob is resized and its footer
rewritten at the new end, the local image resized, and, while the disk is
mounted, the .img and .vhd files change size in place (the kernel is told),
so that afterwards ` + "`losetup -c LOOPDEV`" + ` and ` + "`resize2fs LOOPDEV`" + ` grow a
mounted ext4 online.

The resize is an ordered step of the journal: the blob first takes every
write made before it, writers wait (for milliseconds, once the blob has
caught up) while the blob changes size, and the blob's sequence number is
odd (no consistent disk) until its new footer is in place. Recovery points
taken before keep their own size.

SIZE follows create's rules: a whole number of MiB, 20 MiB to 8 TiB - 1 MiB.
A smaller size is refused unless --shrink is given: shrink the file system
on the disk first (resize2fs LOOPDEV SIZE), since everything beyond the new
end is lost. Not offered for a disk mounted with --transfer staged.

` + vhdlayer.SizeHelp,
		Example: `  vhdsync resize --state /var/lib/vhdsync/data --size 3GiB
  losetup -c /dev/loop0 && resize2fs /dev/loop0`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runResize(cmd.Context(), g, f)
		},
	}
	cmd.Flags().StringVar(&f.state, "state", "", "state directory (required)")
	cmd.Flags().StringVar(&f.size, "size", "", "new virtual size (required): 3GiB, 512MiB, or bytes")
	cmd.Flags().BoolVar(&f.shrink, "shrink", false, "allow a smaller size (shrink the file system on the disk first: what lies beyond the new end is lost)")
	cmd.Flags().BoolVar(&f.breakLease, "break-lease", false, "unmounted disk: break another writer's lease (only if you are sure it is gone)")
	f.bf.register(cmd.Flags())
	_ = cmd.MarkFlagRequired("state")
	_ = cmd.MarkFlagRequired("size")
	return cmd
}

// resizeSize parses and checks the new size.
func resizeSize(s string) (uint64, error) {
	size, err := vhdlayer.ParseSize(s)
	if err != nil {
		return 0, fmt.Errorf("--size: %w", err)
	}
	if err := vhdlayer.ValidateVirtualSize(size); err != nil {
		return 0, fmt.Errorf("--size %s: %w", s, err)
	}
	return size, nil
}

// checkShrink refuses a smaller size without --shrink (a usage error).
func checkShrink(from, to uint64, shrink bool) error {
	if to < from && !shrink {
		return usageError{fmt.Errorf("--size %s is smaller than the disk (%s): shrink the file system on it first (resize2fs LOOPDEV %s), then run resize again with --shrink; what lies beyond the new end is lost",
			vhdlayer.FormatSize(to), vhdlayer.FormatSize(from), vhdlayer.FormatSize(to))}
	}
	return nil
}

func runResize(ctx context.Context, g *globals, f resizeFlags) error {
	size, err := resizeSize(f.size)
	if err != nil {
		return err
	}
	d, err := statedir.Open(f.state)
	if err != nil {
		return err
	}
	if d.State.Resize == nil {
		if err := checkShrink(d.State.VirtualSize, size, f.shrink); err != nil {
			return err
		}
	}
	if d.State.Transfer == "staged" {
		return usageError{fmt.Errorf("%s was last mounted with --transfer staged; resize is offered for the direct transfer only: mount it without --transfer staged (after `vhdsync apply` has caught up), then resize", d.Path)}
	}
	if err := refuseThin(d, "resize"); err != nil {
		return err
	}
	if st, err := control.Get(ctx, d.Path); err == nil {
		return resizeMounted(ctx, g, d, st, size, f.shrink)
	}
	return resizeUnmounted(ctx, g, d, size, f)
}

// resizeMounted asks the daemon serving d to resize its disk.
func resizeMounted(ctx context.Context, g *globals, d *statedir.Dir, st control.Status, size uint64, shrink bool) error {
	res, err := control.Resize(ctx, d.Path, control.ResizeRequest{Size: size, Shrink: shrink})
	if err != nil {
		return err
	}
	if res.Error != "" {
		return exitError{code: max(res.Code, ExitFailure), msg: res.Error}
	}
	if res.From == res.To {
		fmt.Fprintf(g.stdout, "%s is already %s; nothing to do\n", d.Path, vhdlayer.FormatSize(res.To))
		return nil
	}
	fmt.Fprintf(g.stdout, "resized the disk at %s from %s to %s (writers held %.0f ms, %.1f s in all)\n",
		st.Mountpoint, vhdlayer.FormatSize(res.From), vhdlayer.FormatSize(res.To), res.HeldSeconds*1000, res.Seconds)
	loops := loopDevicesOn(st.Mountpoint)
	if len(loops) == 0 {
		return nil
	}
	dev, _, _ := strings.Cut(loops[0], " ")
	if res.To > res.From {
		fmt.Fprintf(g.stdout, "the loop device sees the new size after `losetup -c %s`; then grow the file system: resize2fs %s\n", dev, dev)
	} else {
		fmt.Fprintf(g.stdout, "the loop device sees the new size after `losetup -c %s`\n", dev)
	}
	return nil
}

// resizeUnmounted opens the disk as replay does (the journal re-applied and
// sent first), resizes it and closes it drained.
func resizeUnmounted(ctx context.Context, g *globals, d *statedir.Dir, size uint64, f resizeFlags) error {
	if err := d.CheckWritable(); err != nil {
		return err
	}
	lock, err := d.TryLock("resizing")
	if err != nil {
		return err
	}
	defer lock.Unlock()
	c, err := connect(g, d, f.bf, true)
	if err != nil {
		return err
	}
	if err := finishPendingResize(ctx, g.logger(), d, c, f.breakLease); err != nil {
		return err
	}
	if err := checkShrink(d.State.VirtualSize, size, f.shrink); err != nil {
		return err
	}
	if err := checkBlob(ctx, c, d); err != nil {
		return err
	}
	o := diskOptions(d, c, nil, f.breakLease)
	o.Logger = g.logger()
	disk, err := writeback.Open(ctx, o)
	if err != nil {
		return err
	}
	res, rerr := resizeDisk(ctx, d, disk, size, f.shrink, nil)
	cerr := disk.Close(ctx, true)
	if rerr != nil {
		return errors.Join(rerr, cerr)
	}
	if cerr != nil {
		return fmt.Errorf("%w: resized, but closing the disk: %v; run `vhdsync replay --state %s`", errNotDrained, cerr, d.Path)
	}
	if res.From == res.To {
		fmt.Fprintf(g.stdout, "%s is already %s; nothing to do\n", d.Path, vhdlayer.FormatSize(res.To))
		return nil
	}
	fmt.Fprintf(g.stdout, "resized %s from %s to %s; the blob holds every write, lease released\n", d.Path, vhdlayer.FormatSize(res.From), vhdlayer.FormatSize(res.To))
	return nil
}

// resizeDisk resizes an open disk, recording the intent and the new size in
// d; views (nil when unmounted) are the mounted files.
func resizeDisk(ctx context.Context, d *statedir.Dir, disk *writeback.Disk, size uint64, shrink bool, views *fusefs.Views) (control.ResizeResult, error) {
	res := control.ResizeResult{From: uint64(disk.Size()), To: size}
	if err := checkShrink(res.From, size, shrink); err != nil {
		return res, err
	}
	footer, err := vhdlayer.DecodeFooter(d.State.Footer)
	if err != nil {
		return res, fmt.Errorf("%w: the footer recorded in %s: %w", statedir.ErrNotState, d.Path, err)
	}
	raw := footer.Resized(size).Encode()
	var viewErr error
	st, err := disk.Resize(ctx, writeback.ResizeOptions{
		Size: int64(size), Footer: raw, Shrink: shrink,
		Begin: func(epoch uint64) error {
			return d.BeginResize(statedir.ResizeIntent{From: res.From, To: size, Epoch: epoch, Footer: raw[:]})
		},
		Finish: d.FinishResize,
		Resized: func(n int64) {
			if views != nil {
				viewErr = views.Resize(n, raw)
			}
		},
	})
	res.Epoch, res.HeldSeconds, res.Seconds = st.Epoch, st.Held.Seconds(), st.Total.Seconds()
	if err != nil {
		return res, err
	}
	if viewErr != nil {
		return res, fmt.Errorf("the disk, the blob and the local image are resized, but the mounted files: %w; unmount and mount again to see the new size", viewErr)
	}
	return res, nil
}

// resizeHandler is the daemon's POST /resize: one resize at a time.
func resizeHandler(d *statedir.Dir, disk *writeback.Disk, views *fusefs.Views, log *slog.Logger) func(context.Context, control.ResizeRequest) (control.ResizeResult, error) {
	var mu sync.Mutex
	return func(ctx context.Context, req control.ResizeRequest) (control.ResizeResult, error) {
		if !mu.TryLock() {
			err := busyf("another resize of this disk is running")
			return control.ResizeResult{Error: err.Error(), Code: exitCode(err)}, err
		}
		defer mu.Unlock()
		if err := vhdlayer.ValidateVirtualSize(req.Size); err != nil {
			return control.ResizeResult{Error: err.Error(), Code: exitCode(err)}, err
		}
		log.Info("resize asked", "from", disk.Size(), "to", req.Size, "shrink", req.Shrink)
		start := time.Now()
		res, err := resizeDisk(ctx, d, disk, req.Size, req.Shrink, views)
		if err != nil {
			log.Error("resize failed", "err", err, "seconds", time.Since(start).Seconds())
			res.Error, res.Code = err.Error(), exitCode(err)
		}
		return res, err
	}
}

// finishPendingResize finishes a resize a crash cut short (the state
// directory's intent) before the disk is opened: the blob is made the
// fixed VHD of the new size under the lease, the image resized, and the
// new size recorded.
func finishPendingResize(ctx context.Context, log *slog.Logger, d *statedir.Dir, c *pageblob.Client, breakLease bool) error {
	r := d.State.Resize
	if r == nil {
		return nil
	}
	log.Warn("finishing a resize that was cut short", "from", r.From, "to", r.To, "epoch", r.Epoch)
	p, err := c.Properties(ctx)
	if err != nil {
		return err
	}
	if n := uint64(p.Length); n != r.From+vhdlayer.FooterSize && n != r.To+vhdlayer.FooterSize {
		return fmt.Errorf("%w: a resize of %s from %d to %d bytes was cut short, but the blob %s is %d bytes long; use the state directory made for this blob",
			errWrongBlob, d.Path, r.From, r.To, c.Location().URL(), n)
	}
	rem := pageblob.Remote{C: c}
	id := d.State.LeaseID
	if id == "" {
		id = uuid.NewString()
	}
	lease, err := rem.AcquireLease(ctx, id)
	if err != nil && breakLease {
		if berr := rem.BreakLease(ctx); berr != nil {
			return fmt.Errorf("break lease: %w", berr)
		}
		lease, err = rem.AcquireLease(ctx, id)
	}
	if err != nil {
		return err
	}
	if lease != d.State.LeaseID {
		d.State.LeaseID = lease
		if err := d.Save(); err != nil {
			return err
		}
	}
	var footer [vhdlayer.FooterSize]byte
	copy(footer[:], r.Footer)
	if err := writeback.FinishResize(ctx, rem, lease, int64(r.From), int64(r.To), r.Epoch, footer, d.ImagePath()); err != nil {
		return err
	}
	if err := d.FinishResize(); err != nil {
		return err
	}
	log.Info("the cut resize is finished", "size", r.To)
	return nil
}

// errResizePending: a resize was cut short and is not finished yet.
var errResizePending = errors.New("resize not finished")

// pendingResize refuses to work on a disk whose resize a crash cut short
// (the blob may have no footer at its end) until mount or replay has
// finished it.
func pendingResize(d *statedir.Dir) error {
	r := d.State.Resize
	if r == nil {
		return nil
	}
	return fmt.Errorf("%w: a resize of %s from %s to %s was cut short, and the blob may be between the two sizes; run `vhdsync replay --state %s` (or mount it) to finish it first",
		errResizePending, d.Path, vhdlayer.FormatSize(r.From), vhdlayer.FormatSize(r.To), d.Path)
}
