package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/internal/control"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/thin"
)

type statusReport struct {
	Mounted bool `json:"mounted"`
	control.Status
	LeaseState string `json:"blob_lease_state,omitempty"`
	// DeadMount is the mountpoint of this disk's mount whose daemon died
	// (the mount is still listed in /proc/mounts).
	DeadMount string `json:"dead_mount,omitempty"`
	// Problem says why status exits non-zero ("" when it exits 0).
	Problem string `json:"problem,omitempty"`
	// blobErr is why the blob could not be read (unmounted disk), which
	// decides the exit code.
	blobErr error
	// ResizePending says a resize was cut short (unmounted disk): mount or
	// replay finishes it.
	ResizePending string `json:"resize_pending,omitempty"`
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
directly and the blob is asked for its sequence number and lease.

The exit status is for monitors (the report is printed either way, and
--json keeps every field):
  0   healthy: mounted and replicating, or unmounted with nothing pending
  11  not mounted, and the journal holds writes the blob lacks (a crash
      left them): mount again or run vhdsync replay
  15  not healthy: the flusher is retrying or failed (the replica falls
      behind), or the daemon died and left its mount (umount -l)
  3, 4, 6, 14, 1  the blob could not be read (unmounted disk): the class
      of the error, as in every command (14: the endpoint is unreachable)
  8, 10  the state directory is damaged, or busy (nothing is printed)`,
		Example: `  vhdsync status --state /var/lib/vhdsync/data
  vhdsync status --state /var/lib/vhdsync/data --json | jq .lag_seconds`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rep, err := collectStatus(cmd.Context(), g, state, bf)
			if err != nil {
				return err
			}
			verdict := statusVerdict(&rep)
			if asJSON {
				enc := json.NewEncoder(g.stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				printStatus(g.stdout, rep)
			}
			return verdict
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
	rep := statusReport{Status: control.Status{StateDir: d.Path, BlobURL: d.State.BlobURL, Phase: "not mounted"}}
	if mp, dead := deadMountOf(d.Path); mp != "" {
		rep.DeadMount = mp
		if dead {
			rep.Note = fmt.Sprintf("the daemon died but its mount is still listed at %s: detach loop devices on it (losetup -d), run `umount -l %s`, then mount again or run `vhdsync replay --state %s`", mp, mp, d.Path)
		} else {
			rep.Note = fmt.Sprintf("%s is mounted, but its daemon does not answer on %s", mp, filepath.Join(d.Path, control.SocketName))
		}
	}
	lock, err := d.TryLock("reading status")
	if err != nil {
		return statusReport{}, err
	}
	defer lock.Unlock()
	if err := pendingResize(d); err != nil {
		rep.ResizePending = err.Error()
	}
	if d.State.Thin {
		m, err := thin.Open(d.Path, int64(d.State.VirtualSize))
		if err != nil {
			return statusReport{}, err
		}
		ts := m.Stats()
		rep.Thin = &control.Thin{AllocatedBytes: ts.AllocatedBytes, PresentBytes: ts.PresentBytes, MissingChunks: ts.MissingChunks}
		if err := m.Close(); err != nil {
			return statusReport{}, err
		}
	}
	j, err := journal.Open(d.JournalPath(), journal.Options{})
	if err != nil {
		return statusReport{}, err
	}
	js := j.Stats()
	if err := j.Close(); err != nil {
		return statusReport{}, err
	}
	rep.JournalRecords, rep.JournalBytes, rep.JournalDisk = js.PendingRecords, js.PendingBytes, js.DiskBytes
	if !js.OldestNotOnRemote.IsZero() {
		rep.OldestPending = js.OldestNotOnRemote
		rep.LagSeconds = time.Since(js.OldestNotOnRemote).Seconds()
		if rep.Note == "" {
			rep.Note = "the journal holds writes the blob lacks: mount, or run `vhdsync replay`"
		}
	}
	c, err := connect(g, d, bf, false)
	if err != nil {
		return statusReport{}, err
	}
	p, err := c.Properties(ctx)
	if err != nil {
		rep.LastError = err.Error()
		rep.blobErr = err
		return rep, nil
	}
	rep.RemoteSequence = p.SequenceNumber
	rep.RemoteEpoch = remote.Sequence(p.SequenceNumber).Epoch()
	rep.LeaseState = p.LeaseState
	if p.LeaseState == "leased" {
		// Held, by this state directory's lease if no other writer took
		// it since (a daemon that died keeps it; the next mount takes it
		// back). A released lease is no lease at all.
		rep.LeaseID = d.State.LeaseID
	}
	rep.RecoveryPoints = pointsOnBlob(ctx, c)
	return rep, nil
}

// deadMountOf finds a vhdsync mount of the state directory dir whose
// daemon did not answer: its mountpoint, and whether the mount is dead
// (ENOTCONN: the daemon is gone) rather than merely not answering.
func deadMountOf(dir string) (mp string, dead bool) {
	mounts, err := vhdsyncMounts()
	if err != nil {
		return "", false
	}
	for _, m := range mounts {
		if m.StateDir == dir {
			_, serr := os.Stat(m.Mountpoint)
			return m.Mountpoint, errors.Is(serr, syscall.ENOTCONN)
		}
	}
	return "", false
}

// statusVerdict decides status's exit code (README, "Exit codes"): nil
// when the disk is healthy, else an error carrying the code, its text
// also recorded in rep.Problem.
func statusVerdict(rep *statusReport) error {
	var code int
	switch {
	case rep.DeadMount != "":
		code, rep.Problem = ExitUnhealthy, rep.Note
		if rep.Problem == "" {
			rep.Problem = fmt.Sprintf("%s is still mounted but its daemon does not answer", rep.DeadMount)
		}
	case rep.Mounted && (rep.FlusherState == string(replicate.StateRetrying) || rep.FlusherState == string(replicate.StateFailed)):
		code, rep.Problem = ExitUnhealthy, fmt.Sprintf("the flusher is %s, the replica falls behind (lag %.1f s): %s", rep.FlusherState, rep.LagSeconds, rep.LastError)
	case rep.Mounted && rep.SyncDegraded:
		code, rep.Problem = ExitUnhealthy, fmt.Sprintf("synchronous replication is degraded: fsync returns without the blob until it has caught up (lag %.1f s, %d barriers timed out)", rep.LagSeconds, rep.SyncTimeouts)
	case rep.Mounted && rep.Thin != nil && rep.Thin.Error != "":
		code, rep.Problem = ExitUnhealthy, "the thin disk's prefetch stopped (reads and writes still fetch what they need): "+rep.Thin.Error
	case rep.Mounted && rep.AppliedError != "":
		code, rep.Problem = ExitUnhealthy, "the blob could not be read: "+rep.AppliedError
	case rep.blobErr != nil:
		code, rep.Problem = exitCode(rep.blobErr), "the blob could not be read: "+rep.LastError
	case !rep.Mounted && rep.ResizePending != "":
		code, rep.Problem = ExitNotDrained, rep.ResizePending
	case !rep.Mounted && rep.JournalRecords > 0:
		code, rep.Problem = ExitNotDrained, fmt.Sprintf("not mounted, and the journal holds %d writes (%s) the blob lacks: mount again, or run `vhdsync replay --state %s`", rep.JournalRecords, humanBytes(rep.JournalBytes), rep.StateDir)
	default:
		return nil
	}
	return exitError{code: code, msg: rep.Problem}
}

func printStatus(w io.Writer, r statusReport) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if r.Mounted {
		fmt.Fprintf(tw, "mounted:\t%s (daemon pid %d, since %s)\n", r.Mountpoint, r.PID, r.Started.Format(time.RFC3339))
		fmt.Fprintf(tw, "phase:\t%s\n", r.Phase)
	} else if r.DeadMount != "" {
		fmt.Fprintf(tw, "mounted:\tno: a dead mount is left at %s\n", r.DeadMount)
	} else {
		fmt.Fprintf(tw, "mounted:\tno\n")
	}
	if r.ResizePending != "" {
		fmt.Fprintf(tw, "resize:\t%s\n", r.ResizePending)
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
	if r.ImageBacked > 0 || r.Captures > 0 || r.Binds > 0 {
		fmt.Fprintf(tw, "written once:\t%d pending large writes held by the image only; %d writes over them sent with them, %d copied to the journal first (%s)\n",
			r.ImageBacked, r.Binds, r.Captures, humanBytes(int64(r.CapturedBytes)))
	}
	if !r.OldestPending.IsZero() {
		fmt.Fprintf(tw, "replica lag:\t%.1f s (oldest write not on the blob: %s)\n", r.LagSeconds, r.OldestPending.Format(time.RFC3339Nano))
	} else {
		fmt.Fprintf(tw, "replica lag:\t0 (the blob holds every write)\n")
	}
	if r.Sync {
		switch {
		case r.SyncDegraded:
			fmt.Fprintf(tw, "replication:	synchronous, DEGRADED: fsync returns without the blob until it has caught up (%d barriers timed out)\n", r.SyncTimeouts)
		case r.SyncTimeouts > 0:
			fmt.Fprintf(tw, "replication:	synchronous: fsync returns once the blob holds the writes (%d barriers timed out earlier)\n", r.SyncTimeouts)
		default:
			fmt.Fprintf(tw, "replication:	synchronous: fsync returns once the blob holds the writes\n")
		}
	}
	if t := r.Thin; t != nil {
		fmt.Fprintf(tw, "thin disk:\t%s of %s local (%.1f%%), %d chunks of 4 MiB to fetch", humanBytes(t.PresentBytes), humanBytes(t.AllocatedBytes),
			100*float64(t.PresentBytes)/float64(max(t.AllocatedBytes, 1)), t.MissingChunks)
		if r.Mounted {
			fmt.Fprintf(tw, "; prefetch %s, fetched %s at %.1f MiB/s (%d chunks for reads and writes, %d ahead of them)%s",
				t.Prefetch, humanBytes(t.FetchedBytes), t.FetchBytesPerSec/(1<<20), t.DemandChunks, t.PrefetchChunks, catchUpThin(t.CompleteInSeconds))
		} else {
			fmt.Fprintf(tw, "; mount it to fetch the rest (the blob stays leased until then)")
		}
		fmt.Fprintln(tw)
		if t.Error != "" {
			fmt.Fprintf(tw, "prefetch error:\t%s\n", t.Error)
		}
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

// catchUpThin formats a thin disk's estimate of its completion.
func catchUpThin(sec float64) string {
	if sec <= 0 {
		return ""
	}
	return fmt.Sprintf(", complete in about %s", (time.Duration(sec) * time.Second).Round(time.Second))
}

// catchUp formats the catch-up estimate for the flusher line.
func catchUp(sec float64) string {
	if sec <= 0 {
		return ""
	}
	return fmt.Sprintf(", caught up in about %s at this rate", (time.Duration(sec) * time.Second).Round(time.Second))
}
