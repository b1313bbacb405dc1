package pageblob

import (
	"context"
	"errors"
	"net/http"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
)

// ErrNoDiff: the service refuses Get Page Ranges with prevsnapshot (501
// Not Implemented).
var ErrNoDiff = errors.New("the service does not list page ranges changed since a snapshot (Get Page Ranges with prevsnapshot)")

// ChangedSince lists the page ranges that differ between the snapshot
// prev of the same blob and this blob (or snapshot, the newer of the
// two): written and cleared ones alike, as the service reports them.
// vhdsync uses it only to cross-check its own record of changes
// (download --since --cross-check): users of this call report diffs that
// miss changes, and the emulator ignores prevsnapshot and lists every
// valid page, so it is never the source of a restore.
func (c *Client) ChangedSince(ctx context.Context, prev string) ([]Range, error) {
	pager := c.pb.NewGetPageRangesDiffPager(&pageblob.GetPageRangesDiffOptions{PrevSnapshot: &prev})
	var out []Range
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			if code, status := serviceCode(err); status == http.StatusNotImplemented || code == "NotImplemented" {
				return nil, ErrNoDiff
			}
			return nil, c.classify("list page ranges changed since snapshot "+prev, err)
		}
		for _, r := range page.PageRange {
			if r.Start != nil && r.End != nil {
				out = append(out, Range{Off: *r.Start, Len: *r.End - *r.Start + 1})
			}
		}
		for _, r := range page.ClearRange {
			if r.Start != nil && r.End != nil {
				out = append(out, Range{Off: *r.Start, Len: *r.End - *r.Start + 1})
			}
		}
	}
	return out, nil
}
