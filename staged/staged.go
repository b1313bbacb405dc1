// Package staged is the staged transfer: the flusher's batches become
// compressed segments in a staging container (Sink), and an apply worker
// (Applier) writes them to the page blob later, in order, through the same
// fenced sender as the direct transfer. See docs/DESIGN.md.
package staged

import (
	"context"
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/vhdsync/vhdsync/replicate"

	"github.com/vhdsync/vhdsync/staged/segfile"
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

// SinkOptions tune a Sink.
type SinkOptions struct {
	// DiskID names the disk in every segment.
	DiskID string
	// Epoch is the last epoch delivered before this run (the first
	// segment's PrevEpoch).
	Epoch uint64
	// Uploads is how many segments upload in parallel (default 2); each
	// holds its compressed batch in memory meanwhile.
	Uploads int
}

// Sink is the flusher's delivery in the staged transfer
// (replicate.FlusherOptions.Sink): each batch is packed into one
// compressed segment, whose upload to the staging store starts at once;
// up to Uploads segments upload in parallel, and they are reported
// delivered (so the flusher commits them: image synced, records deleted)
// strictly in order, each only once the service has acknowledged it.
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
type Sink struct {
	s       *replicate.Sender // for its retries
	store   SegmentStore
	o       SinkOptions
	enc     *zstd.Encoder
	prev    uint64    // last epoch handed to an upload
	pending []*upload // uploading, oldest first
	uploads sync.WaitGroup
}

var _ replicate.Sink = (*Sink)(nil)

// NewSink prepares a sink that stores segments in store, retrying through
// s's policy.
func NewSink(s *replicate.Sender, store SegmentStore, o SinkOptions) *Sink {
	if o.Uploads <= 0 {
		o.Uploads = 2
	}
	return &Sink{s: s, store: store, o: o, prev: o.Epoch}
}

// upload is one segment being stored while the flusher goes on.
type upload struct {
	d    replicate.Delivered
	name string
	done chan struct{}
	err  error
}

// Epoch implements replicate.Sink.
func (k *Sink) Epoch() uint64 { return k.o.Epoch }

// Pending implements replicate.Sink.
func (k *Sink) Pending() bool { return len(k.pending) > 0 }

// Deliver implements replicate.Sink: the batch becomes one segment whose
// upload starts now.
func (k *Sink) Deliver(ctx context.Context, b replicate.Batch) ([]replicate.Delivered, error) {
	prev := k.prev
	if b.Last <= prev {
		return nil, fmt.Errorf("stage epochs %d-%d: not after the staged epoch %d (a bug: please report it with the log)", b.First, b.Last, prev)
	}
	// Planned spans are read now: the segment is built in memory.
	var spans []replicate.Span
	for _, sp := range b.Spans {
		if sp.Load == nil {
			spans = append(spans, sp)
			continue
		}
		subs, _, err := sp.Load(ctx)
		if err != nil {
			return nil, fmt.Errorf("read the payload of %d+%d: %w", sp.Off, sp.End-sp.Off, err)
		}
		spans = append(spans, subs...)
	}
	ranges := make([]segfile.Range, len(spans))
	var data, cleared uint64
	for i, s := range spans {
		ranges[i] = segfile.Range{Off: s.Off, Len: s.End - s.Off, Zero: s.Clear}
		if s.Clear {
			cleared += uint64(s.End - s.Off)
		} else {
			ranges[i].Data = s.Data.Flat()
			data += uint64(s.End - s.Off)
		}
	}
	if k.enc == nil {
		enc, err := segfile.NewEncoder()
		if err != nil {
			return nil, fmt.Errorf("zstd encoder: %w", err)
		}
		k.enc = enc
	}
	h := segfile.Header{DiskID: k.o.DiskID, PrevEpoch: prev, FirstEpoch: b.First, LastEpoch: b.Last,
		FirstSeq: b.Drained.FirstSeq, LastSeq: b.Drained.LastSeq}
	seg, err := segfile.Encode(h, ranges, k.enc)
	if err != nil {
		return nil, err
	}
	name := segfile.Name(prev, b.Last)
	// Only the segment is kept in memory while it uploads.
	u := &upload{name: name, done: make(chan struct{}), d: replicate.Delivered{
		Drained: b.Drained, Last: b.Last, Segments: 1, BytesSent: uint64(len(seg)), DataBytes: data, BytesCleared: cleared,
		What: fmt.Sprintf("segment %s, %d ranges, %d bytes", name, len(ranges), len(seg)),
	}}
	k.uploads.Add(1)
	go func() {
		defer k.uploads.Done()
		u.err = k.s.Retry(ctx, "stage segment "+u.name, func(ctx context.Context) error {
			return k.store.PutSegment(ctx, u.name, seg)
		})
		close(u.done)
	}()
	k.pending = append(k.pending, u)
	k.prev = b.Last
	var out []replicate.Delivered
	// Report the uploads already done, then wait for the oldest while too
	// many are in flight.
	for len(k.pending) > 0 {
		select {
		case <-k.pending[0].done:
		default:
			if len(k.pending) < k.o.Uploads {
				return out, nil
			}
		}
		d, err := k.oldest(ctx)
		if err != nil {
			return out, err
		}
		out = append(out, d)
	}
	return out, nil
}

// Settle implements replicate.Sink.
func (k *Sink) Settle(ctx context.Context) ([]replicate.Delivered, error) {
	var out []replicate.Delivered
	for len(k.pending) > 0 {
		d, err := k.oldest(ctx)
		if err != nil {
			return out, err
		}
		out = append(out, d)
	}
	return out, nil
}

// Wait waits for the uploads still running (after their context ended),
// so none touches the store after the flusher stopped.
func (k *Sink) Wait() { k.uploads.Wait() }

// oldest waits for the oldest upload and returns it delivered.
func (k *Sink) oldest(ctx context.Context) (replicate.Delivered, error) {
	u := k.pending[0]
	select {
	case <-u.done:
	case <-ctx.Done():
		return replicate.Delivered{}, ctx.Err()
	}
	if u.err != nil {
		return replicate.Delivered{}, u.err
	}
	k.pending = k.pending[1:]
	return u.d, nil
}
