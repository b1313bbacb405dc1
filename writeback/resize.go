package writeback

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// ErrResizeRefused: a resize this disk does not do (a shrink without
// Shrink, the staged transfer, a remote that cannot change size).
var ErrResizeRefused = errors.New("resize refused")

// ResizeOptions describe one resize (Disk.Resize).
type ResizeOptions struct {
	// Size is the new virtual size in bytes; the caller has checked it
	// against Azure's rules (vhdlayer.ValidateVirtualSize).
	Size int64
	// Footer is the VHD footer of the disk at Size (the same disk id).
	Footer [vhdlayer.FooterSize]byte
	// Shrink allows a smaller size. The caller vouches that nothing on the
	// disk (a file system shrunk first) lies beyond the new end.
	Shrink bool
	// Begin records the resize durably before the blob or the image
	// changes (the state directory's intent), with the epoch it takes;
	// after a crash the next open finishes it with FinishResize.
	Begin func(epoch uint64) error
	// Finish records the new size once the blob and the image have it.
	Finish func() error
	// Resized is told the new size once the disk has it and writers are
	// let go (the FUSE views change their sizes).
	Resized func(size int64)
	// MaxHold bounds the drain with writers held (default 30 s): if the
	// blob does not take the last writes in that time (the remote went
	// away), the resize is given up before anything changed and the
	// writers go on.
	MaxHold time.Duration
}

// ResizeStats say what a resize did and how long writers waited.
type ResizeStats struct {
	From, To int64
	Epoch    uint64
	// Held is how long writers were held (the final drain and the blob's
	// steps); Total the whole call, the first drain included.
	Held, Total time.Duration
	// HeldDrain is the part of Held spent draining the last writes;
	// Changed the part spent changing the blob, the image and the state.
	HeldDrain, Changed time.Duration
}

// Resize changes the disk's size while it is open (mounted), as an ordered
// step in the journal's epoch sequence:
//
//  1. Catch up: the blob takes every epoch closed now while writers go on
//     (so that step 2 holds them for as little as possible).
//  2. Hold every writer (and reader), drain again: the journal is empty,
//     no batch is in flight, and the blob is even, Complete(e) for the
//     last epoch e it holds. The resize takes the next epoch R; the
//     journal's next writes go to epochs above R.
//  3. Record the intent (Begin), then change the blob (ResizeBlob): the
//     sequence number is raised to Started(R), odd, so no reader takes it
//     for a consistent disk while its end has no valid footer; it is
//     raised to Complete(R) once the new footer is in place and the old
//     footer's sector, now data, is cleared (it reads as zeros, as the
//     grown image does there).
//  4. Resize the local image and sync it, the disk's size, the allocation
//     map; record the new size (Finish); let the writers go; tell the
//     views (Resized).
//
// A failure after step 3 began stops the flusher (the blob may have no
// footer at its end, and must not be marked even by a later batch): the
// disk then refuses to drain, and the next open finishes the resize from
// the recorded intent before anything else reaches the blob.
func (d *Disk) Resize(ctx context.Context, o ResizeOptions) (ResizeStats, error) {
	start := time.Now()
	from := d.Size()
	st := ResizeStats{From: from, To: o.Size}
	switch {
	case o.Size == from:
		return st, nil
	case o.Size <= 0 || o.Size%vhdlayer.SectorSize != 0:
		return st, fmt.Errorf("%w: %d bytes is not a whole number of sectors", ErrResizeRefused, o.Size)
	case o.Size < from && !o.Shrink:
		return st, fmt.Errorf("%w: %d bytes is smaller than the disk (%d bytes); shrink the file system on it first, then pass --shrink", ErrResizeRefused, o.Size, from)
	case d.thin != nil && !d.thin.Complete():
		ts := d.thin.Stats()
		return st, fmt.Errorf("%w: the disk is thin (%d of %d bytes local): the blob's page ranges it was attached with would no longer fit; wait until `vhdsync status` shows every chunk local, then resize", ErrResizeRefused, ts.PresentBytes, ts.AllocatedBytes)
	case d.o.Staging != nil:
		return st, fmt.Errorf("%w: the disk is mounted with the staged transfer, whose apply worker owns the blob; mount it with the direct transfer to resize it", ErrResizeRefused)
	}
	rz, ok := d.o.Remote.(remote.Resizer)
	if !ok {
		return st, fmt.Errorf("%w: this remote cannot change a blob's size", ErrResizeRefused)
	}
	// A Close (unmount) waits for the resize, and a resize does not start
	// on a closing disk: its image and journal must stay open throughout.
	d.closeMu.Lock()
	defer d.closeMu.Unlock()
	if d.closed {
		return st, fmt.Errorf("%w: the disk is being closed (unmounted)", ErrResizeRefused)
	}
	if err := d.catchUp(ctx); err != nil {
		return st, fmt.Errorf("resize: catch up before holding writers: %w", err)
	}
	if err := d.resizeHeld(ctx, rz, o, &st); err != nil {
		return st, err
	}
	// The views change after the writers are let go: telling the kernel
	// must not wait for a request that waits for them.
	if o.Resized != nil {
		o.Resized(o.Size)
	}
	st.Total = time.Since(start)
	d.log.Info("disk resized", "from", from, "to", o.Size, "epoch", st.Epoch, "writers_held_seconds", st.Held.Seconds(),
		"held_drain_seconds", st.HeldDrain.Seconds(), "change_seconds", st.Changed.Seconds(), "seconds", st.Total.Seconds())
	return st, nil
}

// catchUp waits until the blob holds every epoch closed by a barrier now,
// while writers go on: under a steady load the journal is never empty, so
// a full drain could wait forever. It polls the flusher's counters rather
// than Flusher.WaitRemote, which waits for a batch to complete epoch e and
// would wait for ever if e holds no records that a batch could complete
// (an epoch closed by RaiseEpoch); an empty journal also ends the wait.
func (d *Disk) catchUp(ctx context.Context) error {
	e, err := d.j.Barrier()
	if err != nil {
		return err
	}
	d.f.Kick()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		st := d.Stats()
		if st.Flusher.RemoteEpoch >= e || d.j.DrainedEpoch() >= e || st.Journal.PendingRecords == 0 {
			return nil
		}
		if st.Flusher.State == replicate.StateFailed {
			return fmt.Errorf("the flusher stopped: %s", st.Flusher.LastError)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// resizeHeld is Resize's steps 2-4, with every writer held.
func (d *Disk) resizeHeld(ctx context.Context, rz remote.Resizer, o ResizeOptions, st *ResizeStats) error {
	d.resizing.Lock()
	defer d.resizing.Unlock()
	held := time.Now()
	defer func() { st.Held = time.Since(held) }()
	if o.MaxHold <= 0 {
		o.MaxHold = 30 * time.Second
	}
	dctx, cancel := context.WithTimeout(ctx, o.MaxHold)
	err := d.Drain(dctx)
	cancel()
	st.HeldDrain = time.Since(held)
	if err != nil {
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("resize given up, nothing changed: the blob did not take the last writes within %v with writers held (is the remote reachable? `vhdsync status` shows the flusher's state); run resize again once it catches up", o.MaxHold)
		}
		return fmt.Errorf("resize: drain with writers held: %w", err)
	}
	if err := d.FlusherErr(); err != nil {
		return fmt.Errorf("resize: the flusher stopped: %w", err)
	}
	seq := d.s.Sequence()
	epoch := max(d.j.ClosedEpoch(), seq.Target()) + 1
	st.Epoch = epoch
	// Every write after the resize belongs to a later epoch, so neither a
	// replay (which drops what the blob's mark says it holds) nor a batch
	// can mix it with the resize's own mark.
	d.j.RaiseEpoch(epoch + 1)
	if o.Begin != nil {
		if err := o.Begin(epoch); err != nil {
			return err
		}
	}
	// Once the intent is recorded the steps run to the end whatever ctx
	// does (a client that gives up): cut, they would leave the blob odd
	// until the next open. Transient failures are retried meanwhile.
	changing := time.Now()
	defer func() { st.Changed = time.Since(changing) }()
	if err := d.resizeSteps(context.WithoutCancel(ctx), rz, st.From, o, epoch); err != nil {
		// The blob may be odd with no footer at its end: nothing may mark
		// it even again before the resize is finished. The intent is on
		// disk, so the next open finishes it.
		d.cancel()
		<-d.runDone
		err = fmt.Errorf("resize cut short: %w; the resize is recorded and finishes when the disk is opened again: unmount it and mount it again (or run `vhdsync replay`)", err)
		d.s.SetState(replicate.StateFailed, err)
		return err
	}
	return nil
}

// resizeSteps changes the blob and the image, then records the new size.
func (d *Disk) resizeSteps(ctx context.Context, rz remote.Resizer, from int64, o ResizeOptions, epoch uint64) error {
	if err := ResizeBlob(ctx, d.o.Remote, rz, d.lease, from, o.Size, epoch, o.Footer, d.s.Retry); err != nil {
		return err
	}
	d.s.SetSequence(max(remote.Complete(epoch), d.s.Sequence()))
	// The journal's closed epoch is now the resize's own (no records): a
	// synchronous barrier without new writes names it and must not wait
	// for a batch that never comes.
	d.f.Advance(epoch)
	if o.Size < from {
		// Shrinking: nothing may read or write beyond the new end before
		// the image is cut (the resize lock keeps them out anyway).
		d.size.Store(o.Size)
	}
	if err := resizeImage(d.img, o.Size); err != nil {
		return err
	}
	d.alloc.resize(o.Size)
	d.size.Store(o.Size)
	if o.Finish != nil {
		if err := o.Finish(); err != nil {
			return err
		}
	}
	return nil
}

// resizeImage sets the local image's size and makes it durable. Grown, it
// reads as zeros beyond the old end (a hole), as the blob's added pages do.
func resizeImage(img *os.File, size int64) error {
	if err := img.Truncate(size); err != nil {
		return fmt.Errorf("resize the local image to %d bytes: %w", size, err)
	}
	if err := img.Sync(); err != nil {
		return fmt.Errorf("sync the resized local image: %w", err)
	}
	return nil
}

// ResizeBlob makes the blob the fixed VHD of to bytes, from a disk of from
// bytes, as the ordered step of epoch epoch; retry runs each request
// (replicate.Sender.Retry: retried while transient; nil runs it once). Every step may be repeated (the blob's
// sequence number only rises, the size and the footer are set to the same
// values, the cleared sector was cleared before), so a resize cut by a
// crash is finished by running it again with the same arguments, provided
// nothing was written to the blob since (the journal's records all belong
// to later epochs and are sent after it).
//
//	grow:   Started(epoch), size to+512, footer at to, clear [from, from+512), Complete(epoch)
//	shrink: Started(epoch), footer at to, size to+512, Complete(epoch)
//
// Between the two marks the blob's end may be no valid footer (grown, not
// yet written) and the old footer's sector lies inside the disk: the odd
// mark says it is no consistent disk then.
func ResizeBlob(ctx context.Context, r remote.Remote, rz remote.Resizer, lease string, from, to int64, epoch uint64, footer [vhdlayer.FooterSize]byte, retry func(ctx context.Context, what string, op func(context.Context) error) error) error {
	if retry == nil {
		retry = func(ctx context.Context, _ string, op func(context.Context) error) error { return op(ctx) }
	}
	cond := remote.Cond{LeaseID: lease}
	mark := func(s remote.Sequence, what string) error {
		return retry(ctx, what, func(ctx context.Context) error { return r.RaiseSequence(ctx, int64(s), lease) })
	}
	size := func() error {
		return retry(ctx, "resize blob", func(ctx context.Context) error { return rz.Resize(ctx, to+vhdlayer.FooterSize, lease) })
	}
	putFooter := func() error {
		return retry(ctx, "write the new footer", func(ctx context.Context) error {
			return r.PutPages(ctx, to, remote.Pages{footer[:]}, cond)
		})
	}
	if err := mark(remote.Started(epoch), "mark resize in progress"); err != nil {
		return err
	}
	if to >= from {
		if err := size(); err != nil {
			return err
		}
		if err := putFooter(); err != nil {
			return err
		}
		if to > from {
			if err := retry(ctx, "clear the old footer", func(ctx context.Context) error {
				return r.ClearPages(ctx, from, vhdlayer.FooterSize, cond)
			}); err != nil {
				return err
			}
		}
	} else {
		if err := putFooter(); err != nil {
			return err
		}
		if err := size(); err != nil {
			return err
		}
	}
	return mark(remote.Complete(epoch), "mark resize complete")
}

// FinishResize finishes a resize a crash cut short, before the disk is
// opened: the blob's steps again (ResizeBlob) under the lease, then the
// local image at imagePath. The caller then records the new size.
func FinishResize(ctx context.Context, r remote.Remote, lease string, from, to int64, epoch uint64, footer [vhdlayer.FooterSize]byte, imagePath string) error {
	rz, ok := r.(remote.Resizer)
	if !ok {
		return fmt.Errorf("%w: this remote cannot change a blob's size", ErrResizeRefused)
	}
	s := replicate.NewSender(r, lease, 0, replicate.SenderOptions{})
	if err := ResizeBlob(ctx, r, rz, lease, from, to, epoch, footer, s.Retry); err != nil {
		return fmt.Errorf("finish the recorded resize: %w", err)
	}
	img, err := os.OpenFile(imagePath, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("finish the recorded resize: %w", err)
	}
	defer img.Close()
	if err := resizeImage(img, to); err != nil {
		return fmt.Errorf("finish the recorded resize: %w", err)
	}
	return nil
}
