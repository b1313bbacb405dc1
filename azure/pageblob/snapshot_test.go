package pageblob

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// TestSnapshotsAgainstAzurite checks what recovery points rely on, on a
// leased blob as a mount holds it: a snapshot needs no lease id, carries
// exactly the metadata given and the sequence number of the moment it was
// taken; a listing shows this blob's snapshots only (not those of a blob
// whose name starts with its name); a snapshot reads back its own content
// and page ranges while the base blob moves on; deleting one needs no
// lease id and leaves the base blob and the other snapshots alone.
func TestSnapshotsAgainstAzurite(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	size := 20 * vhdlayer.MiB
	footer := vhdlayer.NewFixedFooter(size, time.Now()).Encode()
	c := newBlob(t, s, "snap.vhd", noEnv)
	if err := c.Create(ctx, size, footer, CreateOptions{CreateContainer: true, Metadata: map[string]string{"vhdsync_disk_id": "x"}}); err != nil {
		t.Fatal(err)
	}
	other := newBlob(t, s, "snap.vhd.other", noEnv)
	if err := other.Create(ctx, size, footer, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := other.CreateSnapshot(ctx, nil); err != nil {
		t.Fatal(err)
	}
	lease, err := c.AcquireLease(ctx, "7c1b5e54-5d47-4d1c-9a55-1d2c8f1f0a11")
	if err != nil {
		t.Fatal(err)
	}
	one := bytes.Repeat([]byte{1}, 4096)
	if err := c.PutPagesCond(ctx, 0, one, lease, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.RaiseSequence(ctx, 4, lease); err != nil {
		t.Fatal(err)
	}
	id1, err := c.CreateSnapshot(ctx, map[string]string{"vhdsync_epoch": "2"})
	if err != nil {
		t.Fatalf("snapshot of a leased blob without the lease id: %v", err)
	}
	foreign, err := c.CreateSnapshot(ctx, nil) // copies the base blob's metadata
	if err != nil {
		t.Fatal(err)
	}
	two := bytes.Repeat([]byte{2}, 8192)
	if err := c.PutPagesCond(ctx, 1<<20, two, lease, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.ClearPages(ctx, 0, 4096, lease, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.RaiseSequence(ctx, 6, lease); err != nil {
		t.Fatal(err)
	}
	id2, err := c.CreateSnapshot(ctx, map[string]string{"vhdsync_epoch": "3"})
	if err != nil {
		t.Fatal(err)
	}

	snaps, err := c.ListSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 3 || snaps[0].ID != id1 || snaps[1].ID != foreign || snaps[2].ID != id2 {
		t.Fatalf("listing: %+v, want %s, %s, %s", snaps, id1, foreign, id2)
	}
	t.Logf("snapshot ids: %s %s %s", id1, foreign, id2)
	if snaps[0].SequenceNumber != 4 || snaps[2].SequenceNumber != 6 {
		t.Errorf("snapshot sequence numbers %d and %d, want 4 and 6", snaps[0].SequenceNumber, snaps[2].SequenceNumber)
	}
	if snaps[0].Metadata["vhdsync_epoch"] != "2" || snaps[0].Metadata["vhdsync_disk_id"] != "" {
		t.Errorf("snapshot metadata %v: want exactly the metadata given", snaps[0].Metadata)
	}
	if snaps[1].Metadata["vhdsync_disk_id"] != "x" || snaps[1].Metadata["vhdsync_epoch"] != "" {
		t.Errorf("a snapshot taken without metadata has %v, want the base blob's", snaps[1].Metadata)
	}
	if snaps[0].Time.IsZero() || snaps[0].Length != int64(size)+512 {
		t.Errorf("snapshot time %v, length %d", snaps[0].Time, snaps[0].Length)
	}

	// The first snapshot still holds the state it was taken at.
	v1, err := c.AtSnapshot(id1)
	if err != nil {
		t.Fatal(err)
	}
	info, err := v1.OpenVHD(ctx)
	if err != nil {
		t.Fatalf("open snapshot as VHD: %v", err)
	}
	if info.Props.SequenceNumber != 4 || info.Props.Metadata["vhdsync_epoch"] != "2" || info.Raw != footer {
		t.Errorf("snapshot properties: sequence %d, metadata %v", info.Props.SequenceNumber, info.Props.Metadata)
	}
	ranges, err := v1.PageRanges(ctx, 0, int64(size))
	if err != nil {
		t.Fatal(err)
	}
	if len(ranges) != 1 || ranges[0] != (Range{0, 4096}) {
		t.Errorf("snapshot page ranges %v, want [{0 4096}]", ranges)
	}
	got := make([]byte, 4096)
	if err := v1.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, one) {
		t.Errorf("snapshot content changed (%v)", err)
	}
	if _, err := v1.CreateSnapshot(ctx, nil); err == nil {
		t.Error("a snapshot of a snapshot was not refused")
	}

	// Deleting: no lease id needed; the rest stays.
	if err := c.DeleteSnapshot(ctx, id1, ""); err != nil {
		t.Fatalf("delete a snapshot of a leased blob without the lease id: %v", err)
	}
	if err := c.DeleteSnapshot(ctx, id1, ""); err != nil {
		t.Fatalf("deleting a deleted snapshot: %v", err)
	}
	snaps, err = c.ListSnapshots(ctx)
	if err != nil || len(snaps) != 2 || snaps[0].ID != foreign || snaps[1].ID != id2 {
		t.Fatalf("after delete: %+v %v", snaps, err)
	}
	if _, err := v1.Properties(ctx); !errors.Is(err, ErrSnapshotNotFound) {
		t.Errorf("reading a deleted snapshot: %v, want ErrSnapshotNotFound", err)
	}
	if _, err := c.AtSnapshot("yesterday"); !errors.Is(err, ErrBadURL) {
		t.Errorf("a malformed snapshot id: %v", err)
	}
	if p, err := c.Properties(ctx); err != nil || p.SequenceNumber != 6 || p.LeaseState != "leased" {
		t.Errorf("base blob after the snapshot calls: %+v %v", p, err)
	}
}
