package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/points"
	"github.com/vhdsync/vhdsync/remote"
)

// errNoResyncPoint: the blob has no recovery point the resync can count
// from or to.
var errNoResyncPoint = errors.New("no recovery point to resync by")

func newResyncCmd(g *globals) *cobra.Command {
	var state string
	var bf blobFlags
	var workers int
	cmd := &cobra.Command{
		Use:   "resync --state DIR",
		Short: "Catch a state directory up with a blob another writer changed since, by diff",
		Long: `Bring the local image of DIR up to its blob after another writer wrote the
blob (it took the disk over with --break-lease, or from a state directory of
its own, and handed it back): mount refuses such a blob (exit 8), as the
image holds the older disk.

Only what changed is read: the image is the blob as this state directory
left it, which a mount with --recovery-points records as a point when it
unmounts; the other writer's points, taken with --recovery-points too,
record every range it wrote since. The changed ranges are read from the
newest point and written to the image, which then holds that point; the
blob must be at that point (the other writer unmounted, its last point
taken). DIR's journal must be empty (its writes would be lost), and DIR
unmounted. An interrupted resync is finished by running it again.

Where no point chain covers the gap, resync refuses (exit 4) and says so:
make a new state directory instead; with create --from-blob --thin it is
ready at once and fetches the data as it is used.`,
		Example: `  vhdsync resync --state /var/lib/vhdsync/data`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runResync(cmd.Context(), g, state, bf, workers)
		},
	}
	cmd.Flags().StringVar(&state, "state", "", "state directory (required)")
	cmd.Flags().IntVar(&workers, "workers", 8, "ranges read in parallel")
	bf.register(cmd.Flags())
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

func runResync(ctx context.Context, g *globals, state string, bf blobFlags, workers int) error {
	d, lock, err := openLocked(state, "resyncing")
	if err != nil {
		return err
	}
	defer lock.Unlock()
	if err := pendingResize(d); err != nil {
		return err
	}
	if err := refuseThin(d, "resync"); err != nil {
		return err
	}
	j, err := journal.Open(d.JournalPath(), journal.Options{})
	if err != nil {
		return err
	}
	js := j.Stats()
	wrote := max(j.ClosedEpoch(), j.DrainedEpoch())
	if err := j.Close(); err != nil {
		return err
	}
	if js.PendingRecords > 0 {
		return fmt.Errorf("%w: the journal of %s holds %d writes (%s) the blob lacks; a resync would lose them. Mount or `vhdsync replay` sends them, if the blob is still this disk's; if another writer took it over, choose whose disk to keep: to keep the blob's, move %s aside and %s",
			errNotDrained, d.Path, js.PendingRecords, humanBytes(js.PendingBytes), d.Path, newStateAdvice(d.State.BlobURL))
	}
	c, err := connect(g, d, bf, false)
	if err != nil {
		return err
	}
	if err := checkBlob(ctx, c, d); err != nil {
		return err
	}
	props, err := c.Properties(ctx)
	if err != nil {
		return interrupted(ctx, err)
	}
	seq := remote.Sequence(props.SequenceNumber)
	imgEpoch := wrote
	if d.State.BaseSequence != nil {
		imgEpoch = max(imgEpoch, remote.Sequence(*d.State.BaseSequence).Epoch())
	}
	if seq.InProgress() {
		return fmt.Errorf("%w: the blob's last batch was cut short (sequence number %d is odd); let its writer finish it (`vhdsync replay` on its state directory), then resync", errBlobMidBatch, seq)
	}
	if seq.Epoch() <= imgEpoch {
		fmt.Fprintf(g.stdout, "%s is up to date: the blob is at epoch %d, the image at %d; nothing to do\n", d.Path, seq.Epoch(), imgEpoch)
		return nil
	}
	if strings.EqualFold(props.LeaseState, "leased") {
		return fmt.Errorf("%w: %s is leased: the writer that moved it on is still at work; unmount it first (with --recovery-points on, so that it takes a point)", pageblob.ErrLeased, d.State.BlobURL)
	}
	pts, _, err := points.ListPoints(ctx, c)
	if err != nil {
		return interrupted(ctx, err)
	}
	var from, to *points.Point
	for i := range pts {
		p := &pts[i]
		if p.Consistent && p.Epoch == imgEpoch {
			from = p
		}
		if p.Consistent && remote.Complete(p.Epoch) == seq {
			to = p
		}
	}
	thinAdvice := newStateAdvice(d.State.BlobURL)
	switch {
	case from == nil:
		return fmt.Errorf("%w: the blob has no recovery point of epoch %d, the disk as %s last wrote it (a mount with --recovery-points takes one when it unmounts); %s", errNoResyncPoint, imgEpoch, d.Path, thinAdvice)
	case to == nil:
		return fmt.Errorf("%w: the blob (epoch %d) moved past its newest recovery point; let its writer unmount with --recovery-points on (it takes a point then), or %s", errNoResyncPoint, seq.Epoch(), thinAdvice)
	}
	changes, err := points.ChangesBetween(pts, from.ID, to.ID)
	if err != nil {
		return fmt.Errorf("%w: the points between %s (epoch %d) and %s (epoch %d) do not record every range written: %v; %s", errNoResyncPoint, from.ID, from.Epoch, to.ID, to.Epoch, err, thinAdvice)
	}
	sc, err := c.AtSnapshot(to.ID)
	if err != nil {
		return err
	}
	res, err := transfer.RunIncremental(ctx, sc, d.ImagePath(), blobRanges(changes), transfer.IncrementalOptions{Raw: true, Workers: workers})
	if errors.Is(err, transfer.ErrNotIncremental) {
		return fmt.Errorf("%w: %v; %s", errNoResyncPoint, err, thinAdvice)
	}
	if err != nil {
		return interrupted(ctx, fmt.Errorf("%w; the image is half-way between the two points: run the same resync again to finish it", err))
	}
	d.State.SetBase(int64(seq))
	if err := d.Save(); err != nil {
		return fmt.Errorf("record the resync: %w; run the same resync again", err)
	}
	g.logger().Info("resync", "from_point", from.ID, "to_point", to.ID, "changed_bytes", res.Changed, "read_bytes", res.Received, "full_bytes", res.FullBytes)
	fmt.Fprintf(g.stdout, "resynced %s from epoch %d to %d (recovery points %s to %s)\n  %d changed range(s) holding %s; read %s (%d bytes) in %d requests; a full download reads %s (%d bytes): %s; %s\n  mount it as usual\n",
		d.Path, from.Epoch, to.Epoch, from.ID, to.ID, res.ChangedRanges, humanBytes(res.Changed), humanBytes(res.Received), res.Received, res.Requests,
		humanBytes(res.FullBytes), res.FullBytes, ratio(res.Received, res.FullBytes), res.Duration.Round(time.Millisecond))
	return nil
}
