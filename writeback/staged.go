package writeback

import (
	"context"
	"fmt"

	"github.com/vhdsync/vhdsync/writeback/segfile"
)

// SegmentStore holds one disk's staged segments: in Azure, the disk's
// prefix of a staging container (package staging). Names are segfile
// names; ListSegments returns them sorted, which is the order a worker
// applies them in.
type SegmentStore interface {
	// PutSegment stores data under name durably (it returns once the
	// service has acknowledged the whole segment), replacing any segment
	// of that name.
	PutSegment(ctx context.Context, name string, data []byte) error
	// ListSegments returns the names of the stored segments, sorted.
	ListSegments(ctx context.Context) ([]string, error)
	// GetSegment reads a whole segment.
	GetSegment(ctx context.Context, name string) ([]byte, error)
	// DeleteSegment removes a segment; a missing one is not an error.
	DeleteSegment(ctx context.Context, name string) error
}

// MaxStagedEpoch returns the highest last epoch among the segments in s
// (0 if there are none), so a writer can put its next segment after all
// of them.
func MaxStagedEpoch(ctx context.Context, s SegmentStore) (uint64, error) {
	names, err := s.ListSegments(ctx)
	if err != nil {
		return 0, fmt.Errorf("list staged segments: %w", err)
	}
	var m uint64
	for _, n := range names {
		if _, last, ok := segfile.ParseName(n); ok {
			m = max(m, last)
		}
	}
	return m, nil
}

// stageBatch is sendBatch for the staged transfer: the coalesced batch is
// packed into one compressed segment and stored in the staging container;
// the apply worker turns it into Put Page and Clear Pages calls later.
//
// Ordering: the segment's PrevEpoch is the last epoch delivered before it
// (f.epoch: staged, or already on the blob), and the worker applies a
// segment only once the blob holds PrevEpoch (segfile's rule), so segments
// reach the blob in journal order even if a later one is stored first.
// After a crash between the store and the journal delete, the same epochs
// (perhaps with more) are staged again under the same PrevEpoch: the worker
// either skips the copy it already applied or applies the superset, which
// ends in the same state.
func (f *Flusher) stageBatch(ctx context.Context, recs []Record) error {
	first, last := recs[0].Epoch, recs[len(recs)-1].Epoch
	prev := f.epoch.Load()
	if last <= prev {
		// Only after a crash between storing a segment and deleting its
		// records: the store already holds these epochs (Open puts the
		// staged epoch above every stored segment and new epochs above it).
		f.log.Info("records already staged before a restart; dropping them from the journal", "epochs", fmt.Sprintf("%d-%d", first, last), "staged_epoch", prev)
		return f.commitBatch(recs, "already staged")
	}
	if err := f.j.Sync(); err != nil {
		return err
	}
	var c coalescer
	for i := range recs {
		c.add(&recs[i])
	}
	spans := c.spans(MaxPutPage)
	ranges := make([]segfile.Range, len(spans))
	for i, s := range spans {
		ranges[i] = segfile.Range{Off: s.off, Len: s.end - s.off, Zero: s.clear, Data: s.data}
	}
	if f.enc == nil {
		enc, err := segfile.NewEncoder()
		if err != nil {
			return fmt.Errorf("zstd encoder: %w", err)
		}
		f.enc = enc
	}
	h := segfile.Header{DiskID: f.o.DiskID, PrevEpoch: prev, FirstEpoch: first, LastEpoch: last,
		FirstSeq: recs[0].Seq, LastSeq: recs[len(recs)-1].Seq}
	seg, err := segfile.Encode(h, ranges, f.enc)
	if err != nil {
		return err
	}
	name := segfile.Name(prev, last)
	if err := f.retry(ctx, "stage segment "+name, func(ctx context.Context) error {
		return f.o.Staging.PutSegment(ctx, name, seg)
	}); err != nil {
		return err
	}
	f.segments.Add(1)
	f.sent.Add(uint64(len(seg)))
	for _, r := range ranges {
		if r.Zero {
			f.cleared.Add(uint64(r.Len))
		} else {
			f.stagedData.Add(uint64(r.Len))
		}
	}
	f.epoch.Store(last)
	return f.commitBatch(recs, fmt.Sprintf("segment %s, %d ranges, %d bytes", name, len(ranges), len(seg)))
}
