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

// stagedUpload is one segment being stored while the flusher goes on.
type stagedUpload struct {
	recs   []Record // payloads dropped once encoded
	last   uint64
	name   string
	size   int
	ranges []segfile.Range // Data dropped; for the counters
	done   chan struct{}
	err    error
}

// stageBatch is sendBatch for the staged transfer: the coalesced batch is
// packed into one compressed segment, whose upload to the staging store
// starts at once; up to StagedUploads segments upload in parallel, and
// they are committed (image synced, records deleted) strictly in order,
// each only once the service has acknowledged it.
//
// Ordering: a segment's PrevEpoch is the last epoch of the segment before
// it (or, for the first one of a run, the last epoch the journal deleted),
// and it holds every record of the journal in epochs (PrevEpoch,
// LastEpoch]. The worker applies a segment only once the blob holds
// PrevEpoch (segfile's rule), so segments reach the blob in journal order
// even when a later one is stored first. After a crash, the epochs not yet
// deleted are staged again from the same PrevEpoch (perhaps with more
// epochs): the worker either skips a copy it already applied or applies
// one that ends in the same state.
func (f *Flusher) stageBatch(ctx context.Context, recs []Record) error {
	first, last := recs[0].Epoch, recs[len(recs)-1].Epoch
	prev := f.stagePrev
	if last <= prev {
		return fmt.Errorf("stage epochs %d-%d: not after the staged epoch %d (a bug: please report it with the log)", first, last, prev)
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
		ranges[i] = segfile.Range{Off: s.off, Len: s.end - s.off, Zero: s.clear}
		if !s.clear {
			ranges[i].Data = s.data.flat()
		}
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
	// Only the segment is kept in memory while it uploads.
	for i := range recs {
		recs[i].Data = nil
	}
	for i := range ranges {
		ranges[i].Data = nil
	}
	u := &stagedUpload{recs: recs, last: last, name: segfile.Name(prev, last), size: len(seg), ranges: ranges, done: make(chan struct{})}
	f.uploads.Add(1)
	go func() {
		defer f.uploads.Done()
		u.err = f.retry(ctx, "stage segment "+u.name, func(ctx context.Context) error {
			return f.o.Staging.PutSegment(ctx, u.name, seg)
		})
		close(u.done)
	}()
	f.pending = append(f.pending, u)
	f.stagePrev = last
	f.next = recs[len(recs)-1].Seq + 1
	if err := f.commitStaged(ctx, false); err != nil {
		return err
	}
	for len(f.pending) >= f.o.StagedUploads {
		if err := f.commitOldest(ctx); err != nil {
			return err
		}
	}
	return nil
}

// commitStaged commits the stored segments at the head of the queue; with
// wait it waits for all of them.
func (f *Flusher) commitStaged(ctx context.Context, wait bool) error {
	for len(f.pending) > 0 {
		if !wait {
			select {
			case <-f.pending[0].done:
			default:
				return nil
			}
		}
		if err := f.commitOldest(ctx); err != nil {
			return err
		}
	}
	return nil
}

// commitOldest waits for the oldest upload and commits it.
func (f *Flusher) commitOldest(ctx context.Context) error {
	u := f.pending[0]
	select {
	case <-u.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if u.err != nil {
		return u.err
	}
	f.pending = f.pending[1:]
	f.segments.Add(1)
	f.sent.Add(uint64(u.size))
	for _, r := range u.ranges {
		if r.Zero {
			f.cleared.Add(uint64(r.Len))
		} else {
			f.stagedData.Add(uint64(r.Len))
		}
	}
	f.epoch.Store(u.last)
	f.minLast = 0
	return f.commitBatch(u.recs, fmt.Sprintf("segment %s, %d ranges, %d bytes", u.name, len(u.ranges), u.size))
}
