package pageblob

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
)

// ErrCopyFailed means the service ended a server-side copy without
// success (failed or aborted).
var ErrCopyFailed = errors.New("server-side copy did not succeed")

// CopyProgress is the state of a server-side copy onto a blob.
type CopyProgress struct {
	// ID is the copy's id (what Abort Copy Blob takes).
	ID string
	// Status is pending, success, failed or aborted.
	Status string
	// Copied and Total are the bytes copied so far and the source's size.
	Copied, Total int64
	// Description is the service's reason for a failed copy.
	Description string
}

// CopyOptions control CopyFrom.
type CopyOptions struct {
	// Metadata replaces the source's metadata on the copy (the service
	// copies the source's own metadata when it is empty).
	Metadata map[string]string
	// Overwrite replaces an existing destination; otherwise an existing
	// blob is refused (ErrBlobExists) and left untouched.
	Overwrite bool
	// Poll is the wait between two looks at a pending copy (default 1 s).
	Poll time.Duration
	// Progress, if set, is called after every look at the copy.
	Progress func(CopyProgress)
}

// copySourceURL is the URL the service reads src from: its blob URL, the
// snapshot it names, and its SAS when it has one (the service reads a
// source in the same account with the destination's credentials, one in
// another account only through a SAS or public access).
func (c *Client) copySourceURL(src *Client) (string, error) {
	q := url.Values{}
	if src.snapshot != "" {
		q.Set("snapshot", src.snapshot)
	}
	u := src.loc.URL()
	if enc := q.Encode(); enc != "" {
		u += "?" + enc
	}
	if src.sas != "" {
		sep := "?"
		if strings.Contains(u, "?") {
			sep = "&"
		}
		u += sep + src.sas
	}
	sameAccount := strings.EqualFold(src.loc.Host, c.loc.Host) && src.loc.Account == c.loc.Account
	if !sameAccount && src.sas == "" {
		return "", fmt.Errorf("%w: %s is in another storage account than %s, so the service can read it only through a SAS with read rights: append one to the source URL (?sv=...&sig=...)",
			ErrAuth, src.loc.URL(), c.loc.URL())
	}
	return u, nil
}

// CopyFrom makes this blob a server-side copy of src (a blob or, through
// AtSnapshot, one of its snapshots): Copy Blob, then a look at the copy's
// state every Poll until the service reports it done. The bytes never
// pass through this host. A copy that fails or is aborted is deleted; one
// interrupted by ctx is aborted and deleted, so no partial blob stays.
func (c *Client) CopyFrom(ctx context.Context, src *Client, o CopyOptions) (CopyProgress, error) {
	if c.snapshot != "" {
		return CopyProgress{}, fmt.Errorf("copy to %s: a snapshot cannot be written", c.DisplayURL())
	}
	source, err := c.copySourceURL(src)
	if err != nil {
		return CopyProgress{}, err
	}
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	opts := &blob.StartCopyFromURLOptions{}
	if len(o.Metadata) > 0 {
		opts.Metadata = map[string]*string{}
		for k, v := range o.Metadata {
			opts.Metadata[k] = to.Ptr(v)
		}
	}
	if !o.Overwrite {
		// Checked first for a clear answer; If-None-Match closes the race.
		if _, err := c.Properties(ctx); err == nil {
			return CopyProgress{}, fmt.Errorf("copy to %s: %w; it was left untouched. Pass --overwrite to replace it, or choose another name", c.loc.URL(), ErrBlobExists)
		} else if !errors.Is(err, ErrBlobNotFound) {
			return CopyProgress{}, err
		}
		etagAny := azcore.ETagAny
		opts.AccessConditions = &blob.AccessConditions{ModifiedAccessConditions: &blob.ModifiedAccessConditions{IfNoneMatch: &etagAny}}
	}
	r, err := c.pb.StartCopyFromURL(ctx, source, opts)
	if err != nil {
		return CopyProgress{}, c.classify(fmt.Sprintf("copy %s to", src.DisplayURL()), err)
	}
	p := CopyProgress{Status: string(blob.CopyStatusTypePending)}
	if r.CopyID != nil {
		p.ID = *r.CopyID
	}
	if r.CopyStatus != nil {
		p.Status = string(*r.CopyStatus)
	}
	for {
		if p.Status != string(blob.CopyStatusTypePending) {
			break
		}
		select {
		case <-ctx.Done():
			c.abandonCopy(ctx, p.ID)
			return p, fmt.Errorf("copy %s to %s: %w (the copy was aborted and the incomplete blob deleted)", src.DisplayURL(), c.loc.URL(), ctx.Err())
		case <-time.After(o.Poll):
		}
		if p, err = c.CopyState(ctx); err != nil {
			if ctx.Err() != nil {
				c.abandonCopy(ctx, p.ID)
			}
			return p, err
		}
		if o.Progress != nil {
			o.Progress(p)
		}
	}
	if p, err = c.CopyState(ctx); err != nil {
		return p, err
	}
	if o.Progress != nil {
		o.Progress(p)
	}
	if p.Status != string(blob.CopyStatusTypeSuccess) {
		_, _ = c.pb.Delete(context.WithoutCancel(ctx), nil)
		return p, fmt.Errorf("copy %s to %s: %w: %s (%s); the incomplete blob was deleted", src.DisplayURL(), c.loc.URL(), ErrCopyFailed, p.Status, p.Description)
	}
	return p, nil
}

// abandonCopy aborts the pending copy id and deletes the destination.
func (c *Client) abandonCopy(ctx context.Context, id string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if id != "" {
		_, _ = c.pb.AbortCopyFromURL(ctx, id, nil)
	}
	_, _ = c.pb.Delete(ctx, nil)
}

// CopyState reads the state of the last server-side copy onto the blob.
func (c *Client) CopyState(ctx context.Context) (CopyProgress, error) {
	r, err := c.pb.GetProperties(ctx, nil)
	if err != nil {
		return CopyProgress{}, c.classify("read the copy state of", err)
	}
	var p CopyProgress
	if r.CopyID != nil {
		p.ID = *r.CopyID
	}
	if r.CopyStatus != nil {
		p.Status = string(*r.CopyStatus)
	}
	if r.CopyStatusDescription != nil {
		p.Description = *r.CopyStatusDescription
	}
	if r.CopyProgress != nil {
		done, total, _ := strings.Cut(*r.CopyProgress, "/")
		p.Copied, _ = strconv.ParseInt(done, 10, 64)
		p.Total, _ = strconv.ParseInt(total, 10, 64)
	}
	if p.Status == "" && r.ContentLength != nil {
		// A blob never copied onto (or a service that completed the copy
		// without recording it): there is nothing pending.
		p.Status, p.Copied, p.Total = string(blob.CopyStatusTypeSuccess), *r.ContentLength, *r.ContentLength
	}
	return p, nil
}
