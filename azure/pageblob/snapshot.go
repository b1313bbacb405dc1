package pageblob

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/vhdsync/vhdsync/remote"
)

// ErrSnapshotNotFound means the blob has no snapshot with the given id.
var ErrSnapshotNotFound = errors.New("snapshot not found")

// Snapshot is a snapshot of the blob (remote.Snapshot).
type Snapshot = remote.Snapshot

// CreateSnapshot takes a snapshot of the blob with the given metadata and
// returns its id. With metadata, the snapshot carries exactly those
// metadata (the base blob's are not copied). Snapshot Blob needs no lease
// id on a leased blob; none is sent.
func (c *Client) CreateSnapshot(ctx context.Context, metadata map[string]string) (string, error) {
	if c.snapshot != "" {
		return "", fmt.Errorf("create snapshot: %s is itself a snapshot", c.loc.URL())
	}
	md := map[string]*string{}
	for k, v := range metadata {
		md[k] = to.Ptr(v)
	}
	r, err := c.pb.CreateSnapshot(ctx, &blob.CreateSnapshotOptions{Metadata: md})
	if err != nil {
		return "", c.wrapWrite("create snapshot", err)
	}
	if r.Snapshot == nil || *r.Snapshot == "" {
		return "", fmt.Errorf("create snapshot of %s: the service returned no snapshot id", c.loc.URL())
	}
	return *r.Snapshot, nil
}

// ListSnapshots lists the snapshots of this blob (not of other blobs whose
// names start with its name), with their metadata, oldest first. It lists
// the container, so a SAS needs the list right on the container.
func (c *Client) ListSnapshots(ctx context.Context) ([]Snapshot, error) {
	pager := c.cc.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{
		Prefix:  to.Ptr(c.loc.Blob),
		Include: container.ListBlobsInclude{Snapshots: true, Metadata: true},
	})
	var out []Snapshot
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, c.classify("list snapshots", err)
		}
		if page.Segment == nil {
			continue
		}
		for _, it := range page.Segment.BlobItems {
			if it == nil || it.Name == nil || *it.Name != c.loc.Blob || it.Snapshot == nil || *it.Snapshot == "" {
				continue
			}
			s := Snapshot{ID: *it.Snapshot, Metadata: map[string]string{}}
			s.Time, _ = ParseSnapshotID(s.ID)
			if p := it.Properties; p != nil {
				if p.BlobSequenceNumber != nil {
					s.SequenceNumber = *p.BlobSequenceNumber
				}
				if p.ContentLength != nil {
					s.Length = *p.ContentLength
				}
			}
			for k, v := range it.Metadata {
				if v != nil {
					s.Metadata[strings.ToLower(k)] = *v
				}
			}
			out = append(out, s)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if !out[i].Time.Equal(out[j].Time) {
			return out[i].Time.Before(out[j].Time)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// ParseSnapshotID parses a snapshot id (an RFC 3339 time in UTC with up to
// seven fractional digits).
func ParseSnapshotID(id string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339Nano, id)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is not a snapshot id (a time such as 2026-11-24T15:20:00.1234567Z)", id)
	}
	return t, nil
}

// DeleteSnapshot deletes the snapshot id of this blob (never the blob). A
// snapshot that is already gone is not an error. leaseID, if not empty, is
// sent only when the service asks for the base blob's lease.
func (c *Client) DeleteSnapshot(ctx context.Context, id, leaseID string) error {
	if id == "" {
		return fmt.Errorf("delete snapshot of %s: empty snapshot id", c.loc.URL())
	}
	sc, err := c.pb.WithSnapshot(id)
	if err != nil {
		return fmt.Errorf("delete snapshot %s of %s: %w", id, c.loc.URL(), err)
	}
	_, err = sc.Delete(ctx, nil)
	if code, _ := serviceCode(err); leaseID != "" && code == bloberror.LeaseIDMissing {
		_, err = sc.Delete(ctx, &blob.DeleteOptions{AccessConditions: &blob.AccessConditions{
			LeaseAccessConditions: &blob.LeaseAccessConditions{LeaseID: &leaseID}}})
	}
	if err != nil {
		if code, status := serviceCode(err); status == 404 || code == bloberror.BlobNotFound {
			return nil
		}
		return c.wrapWrite("delete snapshot "+id, err)
	}
	return nil
}

// AtSnapshot returns a read-only view of the snapshot id: Properties,
// ReadAt, ReadFooter, OpenVHD and PageRanges then read the snapshot. The
// snapshot's existence is not checked here; a missing one gives
// ErrSnapshotNotFound on the first read.
func (c *Client) AtSnapshot(id string) (*Client, error) {
	if _, err := ParseSnapshotID(id); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadURL, err)
	}
	pb, err := c.pb.WithSnapshot(id)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s of %s: %w", id, c.loc.URL(), err)
	}
	cp := *c
	cp.pb = pb
	cp.snapshot = id
	return &cp, nil
}

// SnapshotID is the snapshot this client reads ("" for the base blob).
func (c *Client) SnapshotID() string { return c.snapshot }

// DisplayURL is the blob's URL without any SAS, with ?snapshot=ID when the
// client reads a snapshot.
func (c *Client) DisplayURL() string {
	if c.snapshot == "" {
		return c.loc.URL()
	}
	return c.loc.URL() + "?snapshot=" + c.snapshot
}
