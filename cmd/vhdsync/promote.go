package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

type promoteFlags struct {
	blob, point, to string
	overwrite       bool
	wait            time.Duration
	// What the printed `az disk create` names.
	resourceGroup, diskName, accountID string
}

// promoteMetaSource names, on a promoted blob, the blob (and point) it
// was copied from; on the temporary snapshot of a live promote, it names
// the copy being made.
const promoteMetaSource = "vhdsync_promoted_from"

func newPromoteCmd(g *globals) *cobra.Command {
	var f promoteFlags
	cmd := &cobra.Command{
		Use:   "promote --blob URL [--point ID] --to URL",
		Short: "Copy a recovery point (or the live blob at an even mark) to a new page blob, ready for az disk create",
		Long: `Make a new page blob at --to that a managed disk can be created from: a
server-side copy (Copy Blob: the data never passes through this host) of
the recovery point ID of the blob at --blob, or, without --point, of the
live blob as of its last even mark (a crash-consistent disk, also while it
is mounted). The copy is waited for, then checked: a valid fixed VHD, the
source's footer, the source's size (a whole number of MiB + 512 bytes).

Then the commands that make a managed disk of the new blob are printed.
Azure retired unmanaged disks: a VM can no longer boot from or attach a VHD
page blob. ` + "`az disk create --source URL --source-storage-account-id ID`" + ` imports
the blob into a managed disk, in the storage account's region, and needs
the blob unleased: a promoted copy is never leased, so this works while
the disk stays mounted and replicating. The copy can be deleted once the
managed disk exists.

Without --point, a snapshot of the live blob is taken when its sequence
number is even (2*epoch: no merged batch half applied), copied, then
deleted; an odd number is waited out for up to --wait.

The copy goes within the storage account with the same credentials; a
--to in another account needs a SAS with read rights on --blob.`,
		Example: `  vhdsync points --blob https://acct.blob.core.windows.net/disks/data.vhd
  vhdsync points promote --blob https://acct.blob.core.windows.net/disks/data.vhd \
      --point 2026-11-24T15:20:00.1234567Z --to https://acct.blob.core.windows.net/disks/data-restore.vhd
  # the live disk, as of its last even mark, while it stays mounted:
  vhdsync points promote --blob https://acct.blob.core.windows.net/disks/data.vhd \
      --to https://acct.blob.core.windows.net/disks/data-failover.vhd --resource-group rg-dr`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runPromote(cmd.Context(), g, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.blob, "blob", "", "the disk's page blob URL (required); a SAS may be appended as ?sv=...&sig=...")
	fl.StringVar(&f.point, "point", "", "the recovery point `ID` to copy (from vhdsync points); default: the live blob at its last even mark")
	fl.StringVar(&f.to, "to", "", "the new page blob's URL (required); a SAS may be appended")
	fl.BoolVar(&f.overwrite, "overwrite", false, "replace an existing blob at --to (its data is lost)")
	fl.DurationVar(&f.wait, "wait", 2*time.Minute, "without --point: how long to wait for the live blob's sequence number to be even")
	fl.StringVar(&f.resourceGroup, "resource-group", "", "the resource group the printed az disk create names (default: a placeholder)")
	fl.StringVar(&f.diskName, "disk-name", "", "the managed disk's name in the printed az disk create (default: the --to blob's name without .vhd)")
	fl.StringVar(&f.accountID, "storage-account-id", "", "the storage account's resource id (/subscriptions/.../storageAccounts/NAME) for the printed az disk create (default: looked up by the printed az storage account show)")
	for _, req := range []string{"blob", "to"} {
		_ = cmd.MarkFlagRequired(req)
	}
	return cmd
}

func runPromote(ctx context.Context, g *globals, f promoteFlags) error {
	opts := &pageblob.Options{Env: g.env, MaxRetries: 3, TryTimeout: time.Minute}
	src, err := pageblob.Open(f.blob, opts)
	if err != nil {
		return err
	}
	dst, err := pageblob.Open(f.to, opts)
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	if dst.Location().URL() == src.Location().URL() {
		return usageError{fmt.Errorf("--to %s is the disk's own blob: give the URL of a new blob", dst.Location().URL())}
	}
	if !f.overwrite {
		// Before anything is snapshotted or copied; CopyFrom checks again.
		if _, err := dst.Properties(ctx); err == nil {
			return fmt.Errorf("--to %s: %w; it was left untouched. Pass --overwrite to replace it, or choose another name", dst.Location().URL(), pageblob.ErrBlobExists)
		} else if !errors.Is(err, pageblob.ErrBlobNotFound) {
			return interrupted(ctx, err)
		}
	}
	out := g.stdout
	var from *pageblob.Client
	var what, origin string
	if f.point != "" {
		if from, err = openPoint(ctx, g, src, f.point); err != nil {
			return interrupted(ctx, err)
		}
		what, origin = fmt.Sprintf("recovery point %s of %s", f.point, src.Location().URL()), from.DisplayURL()
	} else {
		snap, seq, err := snapshotAtEvenMark(ctx, src, dst.Location().URL(), f.wait)
		if err != nil {
			return interrupted(ctx, err)
		}
		defer func() {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if derr := src.DeleteSnapshot(dctx, snap.SnapshotID(), ""); derr != nil {
				fmt.Fprintf(g.stderr, "vhdsync: could not delete the temporary snapshot %s: %v; delete it by hand\n", snap.DisplayURL(), derr)
			}
		}()
		from = snap
		what = fmt.Sprintf("%s as of epoch %d (sequence number %d, even: a crash-consistent disk)", src.Location().URL(), remote.Sequence(seq).Epoch(), seq)
		origin = fmt.Sprintf("%s at sequence number %d", src.Location().URL(), seq)
	}
	srcProps, srcFooter, err := from.ReadFooter(ctx)
	if err != nil {
		return interrupted(ctx, err)
	}
	fmt.Fprintf(out, "copying %s to %s in the storage service\n", what, dst.Location().URL())
	lastLine := time.Now()
	_, err = dst.CopyFrom(ctx, from, pageblob.CopyOptions{
		Overwrite: f.overwrite,
		Metadata:  map[string]string{promoteMetaSource: origin},
		Progress: func(p pageblob.CopyProgress) {
			if p.Status == "pending" && time.Since(lastLine) >= 5*time.Second && p.Total > 0 {
				fmt.Fprintf(out, "  copying: %s of %s\n", humanBytes(p.Copied), humanBytes(p.Total))
				lastLine = time.Now()
			}
		},
	})
	if err != nil {
		return interrupted(ctx, err)
	}
	info, err := dst.OpenVHD(ctx)
	if err != nil {
		return fmt.Errorf("the copy is not a usable fixed VHD: %w", err)
	}
	if info.Props.Length != srcProps.Length || info.Raw != srcFooter {
		return fmt.Errorf("%w: the copy %s has %d bytes and disk id %s, but its source has %d bytes and another footer; delete the copy and promote again",
			errInvalidVHD, dst.Location().URL(), info.Props.Length, info.Footer.UniqueID, srcProps.Length)
	}
	fmt.Fprintf(out, "copied: a fixed VHD of %s (blob %d bytes = size + 512), footer checked (disk id %s)\n",
		vhdlayer.FormatSize(info.Footer.CurrentSize), info.Props.Length, info.Footer.UniqueID)
	printDiskCreate(out, dst.Location(), f)
	return nil
}

// snapshotAtEvenMark snapshots the live blob at a moment its sequence
// number is even, and returns a client reading that snapshot and the
// number. A snapshot taken while a merged batch was being applied (odd)
// is deleted and the mark waited for again, for up to wait.
func snapshotAtEvenMark(ctx context.Context, c *pageblob.Client, forURL string, wait time.Duration) (*pageblob.Client, int64, error) {
	deadline := time.Now().Add(wait)
	for {
		p, err := c.Properties(ctx)
		if err != nil {
			return nil, 0, err
		}
		if !remote.Sequence(p.SequenceNumber).InProgress() {
			id, err := c.CreateSnapshot(ctx, map[string]string{promoteMetaSource: "temporary, for " + forURL})
			if err != nil {
				return nil, 0, err
			}
			snap, err := c.AtSnapshot(id)
			if err != nil {
				return nil, 0, err
			}
			sp, err := snap.Properties(ctx)
			if err == nil && !remote.Sequence(sp.SequenceNumber).InProgress() {
				return snap, sp.SequenceNumber, nil
			}
			// Odd when it was taken (or unreadable): drop it, look again.
			_ = c.DeleteSnapshot(context.WithoutCancel(ctx), id, "")
			if err != nil {
				return nil, 0, err
			}
		}
		if time.Now().After(deadline) {
			return nil, 0, fmt.Errorf("the live blob %s kept an odd sequence number (%d: a merged batch is being applied, so it is not a consistent disk) for --wait %v; promote again, with a longer --wait, or promote a recovery point (--point ID)",
				c.Location().URL(), p.SequenceNumber, wait)
		}
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// printDiskCreate prints the az commands that make a managed disk of the
// blob at loc.
func printDiskCreate(w io.Writer, loc pageblob.Location, f promoteFlags) {
	rg := f.resourceGroup
	if rg == "" {
		rg = "RESOURCE_GROUP"
	}
	name := f.diskName
	if name == "" {
		name = strings.TrimSuffix(path.Base(loc.Blob), ".vhd")
	}
	fmt.Fprintf(w, "make a managed disk of it (az logged in to the storage account's subscription; the disk is made in the account's region):\n")
	id := `"$ACCOUNT_ID"`
	if f.accountID != "" {
		id = shellQuote(f.accountID)
	} else {
		fmt.Fprintf(w, "  ACCOUNT_ID=$(az storage account show --name %s --query id --output tsv)\n", loc.Account)
	}
	fmt.Fprintf(w, "  LOCATION=$(az storage account show --name %s --query primaryLocation --output tsv)\n", loc.Account)
	fmt.Fprintf(w, "  az disk create --resource-group %s --name %s --location \"$LOCATION\" --source %s --source-storage-account-id %s\n",
		shellQuote(rg), shellQuote(name), shellQuote(loc.URL()), id)
	if loc.IsEmulator() {
		fmt.Fprintf(w, "(%s is an emulator: Azure cannot import from it; the commands show the form a storage account's URL takes)\n", loc.Host)
	}
}

// shellQuote quotes s for a POSIX shell when it holds anything but safe
// characters.
func shellQuote(s string) string {
	safe := s != ""
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./:=@%+,", r)) {
			safe = false
			break
		}
	}
	if safe {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
