package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/writeback"
)

func newReplayCmd(g *globals) *cobra.Command {
	var state string
	var breakLease bool
	var bf blobFlags
	cmd := &cobra.Command{
		Use:   "replay --state DIR",
		Short: "After a crash: re-apply the journal, send it to the blob, release the lease",
		Long: `Recover a disk whose daemon died, without mounting it: re-apply every
journaled write to the local image, send what the blob lacks, wait until the
blob holds everything, and release the lease. Mounting does the same by
itself; replay is for when the disk should stay unmounted.

If the dead mount is still attached, clean it up first: detach loop devices
on it (losetup -d) and run umount -l MOUNTPOINT.`,
		Example: `  vhdsync replay --state /var/lib/vhdsync/data`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runReplay(cmd.Context(), g, state, breakLease, bf)
		},
	}
	cmd.Flags().StringVar(&state, "state", "", "state directory (required)")
	cmd.Flags().BoolVar(&breakLease, "break-lease", false, "break another writer's lease (only if you are sure it is gone)")
	bf.register(cmd.Flags())
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

func runReplay(ctx context.Context, g *globals, state string, breakLease bool, bf blobFlags) error {
	d, lock, err := openLocked(state, "replaying")
	if err != nil {
		return err
	}
	defer lock.Unlock()
	c, err := connect(g, d, bf, true)
	if err != nil {
		return err
	}
	if err := finishPendingResize(ctx, g.logger(), d, c, breakLease); err != nil {
		return err
	}
	if err := checkBlob(ctx, c, d); err != nil {
		return err
	}
	// The transfer the last mount used: a staged disk replays into the
	// staging container, never around it.
	store, releaseStaging, err := setupTransfer(ctx, g, d, stagingFlags{}, breakLease, g.logger())
	if err != nil {
		return err
	}
	o := diskOptions(d, c, store, breakLease)
	o.Logger = g.logger()
	// A thin disk's fills must not read chunks that are not local; no
	// prefetch: replay only drains.
	if err := thinOptions(d, c, &o, g.logger()); err != nil {
		return err
	}
	o.NoPrefetch = true
	disk, err := writeback.Open(ctx, o)
	if err != nil {
		if o.Thin != nil {
			_ = o.Thin.Close()
		}
		return blobMovedAdvice(err, d)
	}
	rs := disk.Replay()
	pending := disk.Stats().Journal.PendingBytes
	prog := newDrainProgress(g.stderr, pending)
	rate := newRateMeter()
	done := make(chan error, 1)
	go func() { done <- disk.Close(ctx, true) }()
	var cerr error
	for waiting := true; waiting; {
		select {
		case cerr = <-done:
			waiting = false
		case <-ctx.Done():
			cerr = <-done
			waiting = false
		case <-tickAfter():
			s := disk.Stats()
			// The send rate of the last seconds, as unmount shows it.
			_, bps, _ := rate.rates(s.Flusher.PutCalls+s.Flusher.ClearCalls+s.Flusher.SequenceCalls, s.Flusher.BytesSent, s.Flusher.DrainedBytes)
			prog.update(s.Journal.PendingBytes, bps)
		}
	}
	prog.finish(cerr == nil)
	if cerr != nil {
		return fmt.Errorf("%w: %v; the journal is kept, run replay again", errNotDrained, cerr)
	}
	s := disk.Stats()
	if store != nil {
		releaseStaging()
		fmt.Fprintf(g.stdout, "replayed %d journal records (%s) into the staging container %s (%d segments, %s compressed); `vhdsync apply` brings the blob up to date\n",
			rs.Records, humanBytes(rs.Bytes), store.URL(), s.Flusher.Segments, humanBytes(int64(s.Flusher.BytesSent)))
		return nil
	}
	lease := "lease released"
	if s.Thin != nil && s.Thin.MissingChunks > 0 {
		lease = "lease kept: the disk is thin, and the blob holds the chunks not yet local"
	}
	fmt.Fprintf(g.stdout, "replayed %d journal records (%s); %d were already on the blob; sent %s in %d Put Page and %d Clear Pages; the blob holds every write, %s\n",
		rs.Records, humanBytes(rs.Bytes), rs.AlreadyRemote, humanBytes(int64(s.Flusher.BytesSent)), s.Flusher.PutCalls, s.Flusher.ClearCalls, lease)
	return nil
}
