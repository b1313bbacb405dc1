package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
)

func newSetBlobCmd(g *globals) *cobra.Command {
	var state, blobURL string
	cmd := &cobra.Command{
		Use:   "set-blob --state DIR --blob URL",
		Short: "Point a state directory at a new URL of its blob (a moved endpoint, a new emulator port)",
		Long: `Record URL as the blob of the state directory DIR, when the same blob is
reached at another address: the storage account moved behind a private
endpoint or a custom domain, or the emulator restarted on another port.
Nothing is copied; the journal, the image and the lease stay as they are.

The blob at URL must be the very disk DIR describes: the same VHD footer
(disk id, or unique id, and size), else it is refused with exit 8 and
nothing changes. A blob that holds an older epoch than DIR already sent to
its blob (a copy made earlier, a restored point) is refused too: the
journal no longer holds what such a copy lacks. The disk must not be
mounted (exit 10). A SAS in URL is used for the check, never stored.`,
		Example: `  vhdsync set-blob --state /var/lib/vhdsync/demo --blob http://127.0.0.1:10001/devstoreaccount1/demo/demo.vhd
  vhdsync set-blob --state /var/lib/vhdsync/data --blob https://acct.privatelink.blob.core.windows.net/disks/data.vhd`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runSetBlob(cmd.Context(), g, state, blobURL) },
	}
	cmd.Flags().StringVar(&state, "state", "", "state directory (required)")
	cmd.Flags().StringVar(&blobURL, "blob", "", "the blob's new URL (required); a SAS may be appended as ?sv=...&sig=...")
	for _, req := range []string{"state", "blob"} {
		_ = cmd.MarkFlagRequired(req)
	}
	return cmd
}

func runSetBlob(ctx context.Context, g *globals, state, blobURL string) error {
	d, lock, err := openLocked(state, "changing the blob URL")
	if err != nil {
		return err
	}
	defer lock.Unlock()
	if err := pendingResize(d); err != nil {
		return err
	}
	c, err := pageblob.Open(blobURL, &pageblob.Options{Env: g.env, MaxRetries: 1, TryTimeout: 30 * time.Second})
	if err != nil {
		return err
	}
	newURL, old := c.Location().URL(), d.State.BlobURL
	info, err := c.OpenVHD(ctx)
	if err != nil {
		return interrupted(ctx, err)
	}
	if info.Raw != d.FooterBytes() {
		return fmt.Errorf("%w: the blob at %s has disk id %s and %d bytes, but %s records disk id %s and %d bytes: it is another disk, and set-blob only follows the same blob to a new address; nothing was changed",
			errWrongBlob, newURL, info.Footer.UniqueID, info.Footer.CurrentSize, d.Path, d.State.DiskID, d.State.VirtualSize)
	}
	j, err := journal.Open(d.JournalPath(), journal.Options{})
	if err != nil {
		return err
	}
	drained := j.DrainedEpoch()
	if err := j.Close(); err != nil {
		return err
	}
	seq := remote.Sequence(info.Props.SequenceNumber)
	if seq.Epoch() < drained {
		return fmt.Errorf("%w: the blob at %s holds epoch %d (sequence number %d), but %s already sent epoch %d to its blob and dropped it from the journal: it is an older copy of the disk, not its blob; nothing was changed",
			errWrongBlob, newURL, seq.Epoch(), int64(seq), d.Path, drained)
	}
	if newURL == old {
		fmt.Fprintf(g.stdout, "%s already records %s; nothing to change\n", d.Path, newURL)
		return nil
	}
	d.State.BlobURL = newURL
	if err := d.Save(); err != nil {
		return err
	}
	fmt.Fprintf(g.stdout, "%s now replicates to %s (was %s): the same disk (disk id %s, blob sequence number %d)\n",
		d.Path, newURL, old, info.Footer.UniqueID, int64(seq))
	return nil
}
