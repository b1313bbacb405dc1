package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/control"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/points"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
)

// pointsReport is what `vhdsync points --json` prints.
type pointsReport struct {
	Blob string `json:"blob"`
	// Points are the recovery points, oldest first (newest last).
	Points []points.Point `json:"points"`
	// ForeignSnapshots counts the blob's other snapshots (not vhdsync's).
	ForeignSnapshots int `json:"foreign_snapshots"`
}

func newPointsCmd(g *globals) *cobra.Command {
	var blobURL string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "points --blob URL",
		Short: "List the recovery points (blob snapshots at epoch boundaries) of a disk, newest last",
		Long: `List the recovery points of the page blob at URL: the snapshots that
` + "`vhdsync mount --recovery-points INTERVAL`" + ` took at epoch boundaries, oldest
first, newest last. Each line gives:

  ID          the snapshot's id (its timestamp): pass it to
              ` + "`vhdsync download --blob URL --point ID FILE`" + ` to restore the point
  EPOCH       the epoch the point holds: the disk exactly as of the fsync
              (barrier) that closed that epoch
  TAKEN       when vhdsync took it
  CONSISTENT  yes when the snapshot's own blob sequence number is 2*EPOCH,
              proving no batch was half applied when it was taken

Other snapshots of the blob (taken by a user or another tool) are counted but
not listed, and vhdsync never deletes them. Listing needs the right to list
the container (a SAS scoped to the blob alone cannot list).

` + "`vhdsync points promote --blob URL --point ID --to URL`" + ` copies a point (or the
live disk) to a new page blob and prints the az disk create that makes a
managed disk of it.`,
		Example: `  vhdsync points --blob https://acct.blob.core.windows.net/disks/data.vhd
  vhdsync points --blob https://acct.blob.core.windows.net/disks/data.vhd --json | jq -r '.points[-1].id'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runPoints(cmd.Context(), g, blobURL, asJSON) },
	}
	cmd.Flags().StringVar(&blobURL, "blob", "", "page blob URL (required); a SAS may be appended as ?sv=...&sig=...")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	_ = cmd.MarkFlagRequired("blob")
	cmd.AddCommand(newPromoteCmd(g))
	return cmd
}

func runPoints(ctx context.Context, g *globals, blobURL string, asJSON bool) error {
	c, err := pageblob.Open(blobURL, &pageblob.Options{Env: g.env, MaxRetries: 1, TryTimeout: 30 * time.Second})
	if err != nil {
		return err
	}
	// A listing of a missing blob is empty: say that it is missing instead.
	if _, err := c.Properties(ctx); err != nil {
		return interrupted(ctx, err)
	}
	pts, foreign, err := points.ListPoints(ctx, c)
	if err != nil {
		return interrupted(ctx, fmt.Errorf("list the recovery points of %s: %w", c.Location().URL(), err))
	}
	rep := pointsReport{Blob: c.Location().URL(), Points: pts, ForeignSnapshots: foreign}
	if rep.Points == nil {
		rep.Points = []points.Point{}
	}
	if asJSON {
		enc := json.NewEncoder(g.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	printPoints(g.stdout, rep)
	return nil
}

func printPoints(w io.Writer, r pointsReport) {
	others := ""
	if r.ForeignSnapshots > 0 {
		others = fmt.Sprintf("; %d other snapshot(s) of the blob, not taken by vhdsync, are not listed", r.ForeignSnapshots)
	}
	if len(r.Points) == 0 {
		fmt.Fprintf(w, "no recovery points on %s (mount with --recovery-points INTERVAL to take them)%s\n", r.Blob, others)
		return
	}
	fmt.Fprintf(w, "recovery points of %s, oldest first:\n", r.Blob)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tEPOCH\tTAKEN\tCONSISTENT")
	for _, p := range r.Points {
		ok := "yes"
		if !p.Consistent {
			ok = fmt.Sprintf("NO (sequence %d, not %d)", p.Sequence, remote.Complete(p.Epoch))
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", p.ID, p.Epoch, p.Time.UTC().Format(time.RFC3339), ok)
	}
	tw.Flush()
	fmt.Fprintf(w, "%d recovery point(s)%s; restore one with: vhdsync download --blob URL --point ID FILE\n", len(r.Points), others)
}

// checkPointFlags validates --recovery-points (interval) and --keep of
// mount and apply.
func checkPointFlags(cmd *cobra.Command, interval time.Duration, keep int) error {
	if interval == 0 {
		// --recovery-points 0 is "none" (for mount: and forget the
		// interval the state directory remembers).
		if cmd.Flags().Changed("keep") {
			return usageError{fmt.Errorf("--keep %d: only with --recovery-points INTERVAL", keep)}
		}
		return nil
	}
	if interval < time.Second {
		return usageError{fmt.Errorf("--recovery-points %v: the interval must be at least 1s", interval)}
	}
	if keep < 1 {
		return usageError{fmt.Errorf("--keep %d: keep at least 1 recovery point", keep)}
	}
	return nil
}

// registerPointFlags adds --recovery-points and --keep to a command whose
// process writes the blob (mount, apply).
func registerPointFlags(fl *pflag.FlagSet, points *time.Duration, keep *int) {
	fl.DurationVar(points, "recovery-points", 0, "take a recovery point (a blob snapshot) at the first epoch boundary after each `INTERVAL`, at least 1s, e.g. 5m; 0 for none (default: for mount, what the last mount of DIR used, which DIR remembers; else none); list them with vhdsync points")
	fl.IntVar(keep, "keep", 24, "recovery points to keep; older ones vhdsync took are deleted (with --recovery-points)")
}

// startRecoveryPoints returns the mount's RecoveryPoints (nil when
// --recovery-points is not given), on a client of its own: interactive
// retry settings, since a failed point is simply retried at the next
// epoch boundary.
func startRecoveryPoints(g *globals, d *statedir.Dir, f mountFlags, log *slog.Logger) (*points.RecoveryPoints, error) {
	if f.points == 0 {
		return nil, nil
	}
	// Checked before the staging lock is taken; a bad --transfer is
	// reported by setupTransfer.
	if mode, err := f.staged.mode(d); err == nil && mode == transferStaged {
		msg := "--recovery-points: with --transfer staged the apply worker writes the blob, so it takes the recovery points: pass --recovery-points and --keep to `vhdsync apply`"
		if !f.pointsSet {
			msg = fmt.Sprintf("%s remembers --recovery-points %s from an earlier mount, but with --transfer staged the apply worker writes the blob, so it takes the recovery points: mount with --recovery-points 0 (forgets them), and pass --recovery-points to `vhdsync apply`", d.Path, f.points)
		}
		return nil, usageError{errors.New(msg)}
	}
	c, err := connect(g, d, f.blob, false)
	if err != nil {
		return nil, err
	}
	rp, err := points.NewRecoveryPoints(c, points.RecoveryPointsOptions{Interval: f.points, Keep: f.keep, Logger: log, Carried: loadCarried(d.Path, log)})
	if err != nil {
		return nil, usageError{err}
	}
	log.Info("recovery points on", "interval", f.points.String(), "keep", f.keep)
	return rp, nil
}

// carriedFile, in the state directory, holds the record of changes a
// stopped mount hands to the next one (points.Carried).
const carriedFile = "points-carried.json"

// loadCarried reads and removes the record the last mount left (nil for
// none). A damaged or missing one only makes the next point's record
// incomplete: it is never needed for a correct restore.
func loadCarried(dir string, log *slog.Logger) *points.Carried {
	path := filepath.Join(dir, carriedFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	// Used once: the next stop writes a new one.
	_ = os.Remove(path)
	var c points.Carried
	if err := json.Unmarshal(b, &c); err != nil {
		log.Warn("recovery points: the record of changes the last mount left is damaged; the next point's record is incomplete", "file", path, "err", err)
		return nil
	}
	return &c
}

// saveCarried keeps rp's record of changes for the next mount, with the
// blob's sequence number seq as this one leaves it. Failing to write it
// costs the next point its record, never a wrong restore: it is logged.
func saveCarried(dir string, rp *points.RecoveryPoints, seq int64, log *slog.Logger) {
	if rp == nil {
		return
	}
	c, ok := rp.Carry(remote.Sequence(seq))
	if !ok {
		return
	}
	b, err := json.Marshal(c)
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, carriedFile), append(b, '\n'), 0o600)
	}
	if err != nil {
		log.Warn("recovery points: could not keep the record of changes for the next mount; its first point's record will be incomplete", "err", err)
	}
}

// rememberPoints settles a mount's recovery points against what DIR
// remembers: without --recovery-points, the interval and --keep of the
// last mount that gave it; with it, the flag, then remembered (0 forgets).
func rememberPoints(d *statedir.Dir, f *mountFlags) error {
	if !f.pointsSet {
		if d.State.RecoveryPoints == "" {
			return nil
		}
		iv, err := time.ParseDuration(d.State.RecoveryPoints)
		if err != nil || iv < time.Second {
			return fmt.Errorf("%w: %s records recovery_points %q, not an interval of at least 1s; mount with --recovery-points INTERVAL (or 0) to replace it", statedir.ErrNotState, d.Path, d.State.RecoveryPoints)
		}
		f.points = iv
		if d.State.Keep > 0 {
			f.keep = d.State.Keep
		}
		return nil
	}
	if mode, err := f.staged.mode(d); err == nil && mode == transferStaged && f.points > 0 {
		return nil // refused by startRecoveryPoints, and not remembered
	}
	want, keep := "", 0
	if f.points > 0 {
		want, keep = f.points.String(), f.keep
	}
	if d.State.RecoveryPoints == want && d.State.Keep == keep {
		return nil
	}
	d.State.RecoveryPoints, d.State.Keep = want, keep
	return d.Save()
}

// printPointsRemembered tells the user of `mount` the recovery points the
// state directory now remembers.
func printPointsRemembered(w io.Writer, f mountFlags) {
	d, err := statedir.Open(f.state)
	if err != nil || d.State.RecoveryPoints == "" {
		return
	}
	how := "remembered from the last mount of " + d.Path
	if f.pointsSet {
		how = "remembered: the next mounts of " + d.Path + " take them too"
	}
	fmt.Fprintf(w, "  recovery points every %s, keep %d (%s; --recovery-points 0 turns them off)\n", d.State.RecoveryPoints, d.State.Keep, how)
}

// newRecoveryPoints makes the RecoveryPoints of a process that writes the
// blob c (nil when interval is 0: off).
func newRecoveryPoints(c *pageblob.Client, interval time.Duration, keep int, log *slog.Logger) (*points.RecoveryPoints, error) {
	if interval == 0 {
		return nil, nil
	}
	rp, err := points.NewRecoveryPoints(c, points.RecoveryPointsOptions{Interval: interval, Keep: keep, Logger: log})
	if err != nil {
		return nil, usageError{err}
	}
	log.Info("recovery points on", "interval", interval.String(), "keep", keep)
	return rp, nil
}

// afterBatchHook is rp.AfterBatch, or nil when recovery points are off.
func afterBatchHook(rp *points.RecoveryPoints) func(context.Context, uint64) {
	if rp == nil {
		return nil
	}
	return rp.AfterBatch
}

// onSendHook feeds rp the ranges of every batch sent (nil when recovery
// points are off), from which each point records what changed since the
// one before.
func onSendHook(rp *points.RecoveryPoints) func(remote.Sequence, uint64, []replicate.Span) {
	if rp == nil {
		return nil
	}
	return func(seq remote.Sequence, last uint64, spans []replicate.Span) {
		rs := make([]points.Range, len(spans))
		for i, sp := range spans {
			rs[i] = points.Range{Off: sp.Off, End: sp.End}
		}
		rp.Sending(seq, last, rs)
	}
}

// recoveryStatus is the status section of a mount's recovery points.
func recoveryStatus(rp *points.RecoveryPoints) *control.RecoveryPoints {
	if rp == nil {
		return &control.RecoveryPoints{}
	}
	s := rp.Stats()
	return &control.RecoveryPoints{
		Enabled: true, Interval: s.Interval.String(), Keep: s.Keep, Count: s.Count,
		Taken: s.Taken, Deleted: s.Deleted, Failures: s.Failures,
		LastID: s.LastID, LastEpoch: s.LastEpoch, LastTime: s.LastTime,
		LastError: s.LastError, LastErrorTime: s.LastErrorTime,
	}
}

// pointsOnBlob is the status section of an unmounted disk: what the blob
// holds.
func pointsOnBlob(ctx context.Context, c *pageblob.Client) *control.RecoveryPoints {
	pts, _, err := points.ListPoints(ctx, c)
	if err != nil {
		return &control.RecoveryPoints{LastError: "list recovery pts: " + err.Error()}
	}
	r := &control.RecoveryPoints{Count: len(pts)}
	if n := len(pts); n > 0 {
		r.LastID, r.LastEpoch, r.LastTime = pts[n-1].ID, pts[n-1].Epoch, pts[n-1].Time
	}
	return r
}

// printRecoveryStatus adds the recovery-point lines to status.
func printRecoveryStatus(tw io.Writer, mounted bool, r *control.RecoveryPoints) {
	if r == nil {
		return
	}
	newest := ""
	if r.LastID != "" {
		newest = fmt.Sprintf(", newest %s (epoch %d, taken %s)", r.LastID, r.LastEpoch, r.LastTime.UTC().Format(time.RFC3339))
	}
	switch {
	case mounted && !r.Enabled:
		fmt.Fprintf(tw, "recovery points:\toff (mount with --recovery-points INTERVAL to take them)\n")
	case mounted:
		fmt.Fprintf(tw, "recovery points:\tevery %s, keep %d: %d on the blob%s; %d taken, %d deleted, %d failures\n",
			r.Interval, r.Keep, r.Count, newest, r.Taken, r.Deleted, r.Failures)
	case r.LastError == "":
		fmt.Fprintf(tw, "recovery points:\t%d on the blob%s\n", r.Count, newest)
	default:
		// Unmounted, and the blob's snapshots could not be listed (a SAS
		// without the container's list right, say).
		fmt.Fprintf(tw, "recovery points:\tunknown (%s)\n", r.LastError)
		return
	}
	if r.LastError != "" {
		when := ""
		if !r.LastErrorTime.IsZero() {
			when = " at " + r.LastErrorTime.UTC().Format(time.RFC3339) + "; retried at the next epoch boundary"
		}
		fmt.Fprintf(tw, "points error:\t%s%s\n", r.LastError, when)
	}
}

// openPoint returns a client reading the recovery point id of c's blob,
// after saying what it is: a vhdsync point and its epoch, or a snapshot
// vhdsync did not take.
func openPoint(ctx context.Context, g *globals, c *pageblob.Client, id string) (*pageblob.Client, error) {
	sc, _, _, err := openPointInfo(ctx, g, c, id)
	return sc, err
}

// openPointInfo is openPoint that also returns the point (ok false: the
// snapshot is not a vhdsync recovery point).
func openPointInfo(ctx context.Context, g *globals, c *pageblob.Client, id string) (sc *pageblob.Client, p points.Point, ok bool, err error) {
	if _, err := pageblob.ParseSnapshotID(id); err != nil {
		return nil, p, false, usageError{fmt.Errorf("--point: %w; list the recovery points with `vhdsync points --blob URL`", err)}
	}
	sc, err = c.AtSnapshot(id)
	if err != nil {
		return nil, p, false, err
	}
	props, err := sc.Properties(ctx)
	if err != nil {
		return nil, p, false, err
	}
	p, ok = points.PointFromSnapshot(pageblob.Snapshot{ID: id, SequenceNumber: props.SequenceNumber, Metadata: props.Metadata})
	switch {
	case !ok:
		fmt.Fprintf(g.stdout, "snapshot %s is not a vhdsync recovery point (no %s metadata): restoring it as it is\n", id, points.PointMetaEpoch)
	case !p.Consistent:
		fmt.Fprintf(g.stdout, "warning: recovery point %s names epoch %d but carries sequence number %d, not %d: it may not be a consistent disk\n", id, p.Epoch, p.Sequence, remote.Complete(p.Epoch))
	default:
		fmt.Fprintf(g.stdout, "recovery point %s: the disk as of epoch %d, taken %s (consistent: sequence number %d)\n", id, p.Epoch, p.Time.UTC().Format(time.RFC3339), p.Sequence)
	}
	return sc, p, ok, nil
}
