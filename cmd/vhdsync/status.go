package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/internal/control"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
)

type statusReport struct {
	Mounted bool `json:"mounted"`
	control.Status
	LeaseState string `json:"blob_lease_state,omitempty"`
}

func newStatusCmd(g *globals) *cobra.Command {
	var state string
	var asJSON bool
	var bf blobFlags
	cmd := &cobra.Command{
		Use:   "status --state DIR",
		Short: "Show the journal, the replica's lag and the flusher of a disk",
		Long: `Show the state of a disk: mounted or not, journal records and bytes, the
age of the oldest write not yet on the blob (how far the replica lags: the
live recovery point), epochs, the blob's sequence number (even: the blob is
crash-consistent; odd: a batch merging several epochs is being applied),
the lease,
bytes and calls sent, retries, the flusher's state and throughput.

For a mounted disk the daemon answers; otherwise the journal is read
directly and the blob is asked for its sequence number and lease.`,
		Example: `  vhdsync status --state /var/lib/vhdsync/data
  vhdsync status --state /var/lib/vhdsync/data --json | jq .lag_seconds`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rep, err := collectStatus(cmd.Context(), g, state, bf)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(g.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(rep)
			}
			printStatus(g.stdout, rep)
			return nil
		},
	}
	cmd.Flags().StringVar(&state, "state", "", "state directory (required)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	bf.register(cmd.Flags())
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

func collectStatus(ctx context.Context, g *globals, state string, bf blobFlags) (statusReport, error) {
	d, err := statedir.Open(state)
	if err != nil {
		return statusReport{}, err
	}
	if s, err := control.Get(ctx, d.Path); err == nil {
		return statusReport{Mounted: true, Status: s}, nil
	} else if !errors.Is(err, control.ErrNotRunning) {
		return statusReport{}, err
	}
	rep := statusReport{Status: control.Status{StateDir: d.Path, BlobURL: d.State.BlobURL, Phase: "not mounted", LeaseID: d.State.LeaseID}}
	lock, err := d.TryLock("reading status")
	if err != nil {
		return statusReport{}, err
	}
	defer lock.Unlock()
	j, err := journal.Open(d.JournalPath(), journal.Options{})
	if err != nil {
		return statusReport{}, err
	}
	js := j.Stats()
	if err := j.Close(); err != nil {
		return statusReport{}, err
	}
	rep.JournalRecords, rep.JournalBytes, rep.JournalDisk = js.PendingRecords, js.PendingBytes, js.DiskBytes
	if !js.Oldest.IsZero() {
		rep.OldestPending = js.Oldest
		rep.LagSeconds = time.Since(js.Oldest).Seconds()
		rep.Note = "the journal holds writes the blob lacks: mount, or run `vhdsync replay`"
	}
	c, err := connect(g, d, bf, false)
	if err != nil {
		return statusReport{}, err
	}
	p, err := c.Properties(ctx)
	if err != nil {
		rep.LastError = err.Error()
		return rep, nil
	}
	rep.RemoteSequence = p.SequenceNumber
	rep.RemoteEpoch = remote.Sequence(p.SequenceNumber).Epoch()
	rep.LeaseState = p.LeaseState
	rep.RecoveryPoints = pointsOnBlob(ctx, c)
	return rep, nil
}

func printStatus(w io.Writer, r statusReport) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if r.Mounted {
		fmt.Fprintf(tw, "mounted:\t%s (daemon pid %d, since %s)\n", r.Mountpoint, r.PID, r.Started.Format(time.RFC3339))
		fmt.Fprintf(tw, "phase:\t%s\n", r.Phase)
	} else {
		fmt.Fprintf(tw, "mounted:\tno\n")
	}
	if r.Note != "" {
		fmt.Fprintf(tw, "note:\t%s\n", r.Note)
	}
	fmt.Fprintf(tw, "blob:\t%s\n", r.BlobURL)
	fmt.Fprintf(tw, "journal:\t%d records, %s pending", r.JournalRecords, humanBytes(r.JournalBytes))
	if r.JournalCapBytes > 0 {
		fmt.Fprintf(tw, " (cap %s)", humanBytes(r.JournalCapBytes))
	}
	fmt.Fprintf(tw, ", %s on disk\n", humanBytes(r.JournalDisk))
	if !r.OldestPending.IsZero() {
		fmt.Fprintf(tw, "replica lag:\t%.1f s (oldest write not on the blob: %s)\n", r.LagSeconds, r.OldestPending.Format(time.RFC3339Nano))
	} else {
		fmt.Fprintf(tw, "replica lag:\t0 (the blob holds every write)\n")
	}
	if r.BlockedWriters > 0 {
		fmt.Fprintf(tw, "blocked writers:\t%d (the journal is at its cap; they resume as the flusher drains)\n", r.BlockedWriters)
	}
	parity := "even: crash-consistent"
	if remote.Sequence(r.RemoteSequence).InProgress() {
		parity = "odd: a merged batch is being applied"
	}
	if !r.Mounted && r.LastError != "" {
		// The blob could not be asked: its sequence number is not known.
		fmt.Fprintf(tw, "blob sequence:\tunknown (the blob could not be read, see last error)\n")
	} else {
		fmt.Fprintf(tw, "blob sequence:\t%d (%s; epoch %d complete)\n", r.RemoteSequence, parity, r.RemoteEpoch)
	}
	if r.Transfer == transferStaged {
		fmt.Fprintf(tw, "transfer:\tstaged via %s\n", r.StagingURL)
		fmt.Fprintf(tw, "staged:\tepoch %d (%d segments, %s of data as %s compressed)\n", r.StagedEpoch, r.Segments, humanBytes(int64(r.StagedDataBytes)), humanBytes(int64(r.BytesSent)))
		if r.AppliedError != "" {
			fmt.Fprintf(tw, "applied:\tunknown (%s)\n", r.AppliedError)
		} else {
			fmt.Fprintf(tw, "applied:\tepoch %d by the apply worker (%d epochs behind the staging container)\n", r.AppliedEpoch, max(int64(r.StagedEpoch)-int64(r.AppliedEpoch), 0))
		}
	}
	if r.Mounted {
		fmt.Fprintf(tw, "epochs:\t%d closed, open epoch %d\n", r.EpochsClosed, r.OpenEpoch)
		fmt.Fprintf(tw, "lease:\t%s\n", r.LeaseID)
		fmt.Fprintf(tw, "flusher:\t%s, %.1f MiB/s, %.0f requests/s%s\n", r.FlusherState, r.SendRate/(1<<20), r.RequestRate, catchUp(r.CatchUpSeconds))
		if r.Throttled > 0 {
			fmt.Fprintf(tw, "throttled:\t%d answers (503 ServerBusy or 500 OperationTimedOut, each sent again); %d requests in flight allowed now\n", r.Throttled, r.InFlightLimit)
		}
		fmt.Fprintf(tw, "sent:\t%s in %d Put Page (%s of it clean sectors joining ranges), %s cleared in %d Clear Pages, %d sequence updates, %d batches, %d retries\n",
			humanBytes(int64(r.BytesSent)), r.PutCalls, humanBytes(int64(r.FilledBytes)), humanBytes(int64(r.BytesCleared)), r.ClearCalls, r.SequenceCalls, r.Batches, r.Retries)
		fmt.Fprintf(tw, "fuse:\t%d writes (%s), %d reads, %d fsyncs, %d discards, %d refused\n",
			r.FuseWrites, humanBytes(int64(r.FuseBytesWritten)), r.FuseReads, r.FuseFsyncs, r.FuseDiscards, r.FuseRefused)
	} else if r.LeaseState != "" {
		fmt.Fprintf(tw, "blob lease:\t%s\n", r.LeaseState)
	}
	printRecoveryStatus(tw, r.Mounted, r.RecoveryPoints)
	if r.LastError != "" {
		fmt.Fprintf(tw, "last error:\t%s\n", r.LastError)
	}
	tw.Flush()
}

// catchUp formats the catch-up estimate for the flusher line.
func catchUp(sec float64) string {
	if sec <= 0 {
		return ""
	}
	return fmt.Sprintf(", caught up in about %s at this rate", (time.Duration(sec) * time.Second).Round(time.Second))
}
