package staged

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/staged/segfile"
)

// ApplierOptions tune an Applier. Zero values take the defaults.
type ApplierOptions struct {
	// DiskID is the disk the blob holds (its footer's UUID); a segment
	// naming another disk stops the worker.
	DiskID string
	// DiskSize is the virtual size: no segment range may reach the
	// footer.
	DiskSize int64
	// Workers, RetryMin and RetryMax are as in replicate.SenderOptions.
	Workers            int
	RetryMin, RetryMax time.Duration
	// Poll is how long the worker waits before listing again when there
	// is nothing to apply (default 2 s).
	Poll time.Duration
	// Once makes Run return when nothing is left to apply instead of
	// polling.
	Once bool
	// AfterApply runs after each segment is complete on the blob (its
	// sequence number even, 2*epoch), e.g. to take a recovery point.
	AfterApply func(ctx context.Context, epoch uint64)
	// OnSend is replicate.SenderOptions.OnSend: recovery points record
	// from it what each segment writes.
	OnSend func(seq remote.Sequence, last uint64, spans []replicate.Span)
	Logger *slog.Logger
}

// ApplierStats is a snapshot of an Applier's counters.
type ApplierStats struct {
	State          replicate.State
	LastError      string
	AppliedEpoch   uint64 // the last epoch the blob holds completely
	RemoteSequence int64
	Segments       uint64 // applied
	Stale          uint64 // deleted without applying: the blob already held them
	Waiting        int    // listed segments that wait for an earlier one
	SegmentBytes   uint64 // compressed bytes read from staging
	PutCalls       uint64
	ClearCalls     uint64
	BytesSent      uint64
	BytesCleared   uint64
	Retries        uint64
}

// Applier is the apply worker of the staged transfer: it turns staged
// segments into Put Page and Clear Pages calls on the blob, strictly in
// order, and deletes each once the blob holds it.
//
// Ordering and crash safety rest on the blob's sequence number, exactly as
// in the direct transfer (see replicate.Sender.SendEpochs): before a segment covering
// epochs up to L is applied the sequence is raised to 2L-1 (odd: in
// progress), every Put/Clear carries the condition "sequence == 2L-1" and
// the lease, and at the end it is raised to 2L (even: the blob is the disk
// as of epoch L). The applied epoch is therefore always sequence/2, read
// back from the blob at start, so a worker killed at any point resumes
// with the segment it was applying (PrevEpoch <= A < LastEpoch holds for
// it again) and never applies an older segment over a newer one: a
// segment with LastEpoch <= A is deleted unapplied.
//
// One case where an odd sequence number does not name the epoch completed
// next: after the daemon restarts with segments of its previous run still
// staged, it restages from its journal's drained epoch, and that superset
// sorts first. A worker killed while applying an old segment (mark 2L-1)
// is followed by one that applies the superset (mark 2L'-1, L' > L). The
// blob is then between the two complete states, which the odd number says,
// and the superset ends it at the disk as of L' (TestStagedOrderProperty).
type Applier struct {
	r     remote.Remote
	s     SegmentStore
	lease string
	o     ApplierOptions
	log   *slog.Logger
	f     *replicate.Sender // the fenced sender, its retries and counters
	dec   *zstd.Decoder

	mu                   sync.Mutex
	waiting              int
	segments, stale, seg atomic.Uint64
}

// NewApplier prepares a worker for the blob r (whose lease it holds as
// lease) and the segment store s.
func NewApplier(r remote.Remote, s SegmentStore, lease string, o ApplierOptions) (*Applier, error) {
	if o.Poll <= 0 {
		o.Poll = 2 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	dec, err := segfile.NewDecoder()
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	f := replicate.NewSender(r, lease, 0, replicate.SenderOptions{Workers: o.Workers, RetryMin: o.RetryMin, RetryMax: o.RetryMax, Logger: o.Logger, OnSend: o.OnSend})
	return &Applier{r: r, s: s, lease: lease, o: o, log: o.Logger, f: f, dec: dec}, nil
}

// Stats returns the worker's counters.
func (a *Applier) Stats() ApplierStats {
	fs := a.f.Stats()
	a.mu.Lock()
	w := a.waiting
	a.mu.Unlock()
	return ApplierStats{State: fs.State, LastError: fs.LastError, AppliedEpoch: remote.Sequence(fs.RemoteSequence).Epoch(), RemoteSequence: fs.RemoteSequence,
		Segments: a.segments.Load(), Stale: a.stale.Load(), Waiting: w, SegmentBytes: a.seg.Load(),
		PutCalls: fs.PutCalls, ClearCalls: fs.ClearCalls, BytesSent: fs.BytesSent, BytesCleared: fs.BytesCleared, Retries: fs.Retries}
}

// ErrBadSegment wraps the error of a segment the worker refuses (corrupt,
// another disk's, or misnamed); nothing after it is applied.
var ErrBadSegment = errors.New("refused a staged segment")

// Run applies segments until ctx ends, or, with Once, until none is left
// that can be applied. A transient failure is retried forever; a bad
// segment or a lost lease stops it with an error.
func (a *Applier) Run(ctx context.Context) error {
	err := a.run(ctx)
	switch {
	case err == nil || ctx.Err() != nil:
		a.f.SetState(replicate.StateStopped, nil)
		return nil
	default:
		a.f.SetState(replicate.StateFailed, err)
		return err
	}
}

func (a *Applier) run(ctx context.Context) error {
	for {
		var seq int64
		if err := a.f.Retry(ctx, "read the blob's sequence number", func(ctx context.Context) error {
			var err error
			seq, err = a.r.Sequence(ctx)
			return err
		}); err != nil {
			return err
		}
		a.f.SetSequence(remote.Sequence(seq))
		var names []string
		if err := a.f.Retry(ctx, "list staged segments", func(ctx context.Context) error {
			var err error
			names, err = a.s.ListSegments(ctx)
			return err
		}); err != nil {
			return err
		}
		progressed, waiting := false, 0
		for i, name := range names {
			prev, last, ok := segfile.ParseName(name)
			if !ok {
				continue // not a segment (a lock blob, a stranger's file)
			}
			applied := a.f.Sequence().Epoch()
			if last <= applied {
				if err := a.delete(ctx, name); err != nil {
					return err
				}
				a.stale.Add(1)
				a.log.Info("deleted a segment the blob already holds", "segment", name, "applied_epoch", applied)
				continue
			}
			if prev > applied {
				// An earlier segment is not stored yet (uploads may finish
				// out of order): wait for it.
				waiting = len(names) - i
				break
			}
			if err := a.apply(ctx, name, prev, last); err != nil {
				return err
			}
			progressed = true
		}
		a.mu.Lock()
		a.waiting = waiting
		a.mu.Unlock()
		if progressed {
			continue
		}
		a.f.SetState(replicate.StateIdle, nil)
		if a.o.Once {
			if waiting > 0 {
				a.log.Warn("segments left that wait for an earlier one", "waiting", waiting, "applied_epoch", a.f.Sequence().Epoch())
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(a.o.Poll):
		}
	}
}

func (a *Applier) delete(ctx context.Context, name string) error {
	return a.f.Retry(ctx, "delete staged segment "+name, func(ctx context.Context) error {
		return a.s.DeleteSegment(ctx, name)
	})
}

// apply applies one segment (see the Applier's doc for the ordering).
func (a *Applier) apply(ctx context.Context, name string, prev, last uint64) error {
	a.f.SetState(replicate.StateDraining, nil)
	var data []byte
	if err := a.f.Retry(ctx, "read staged segment "+name, func(ctx context.Context) error {
		var err error
		data, err = a.s.GetSegment(ctx, name)
		return err
	}); err != nil {
		return err
	}
	a.seg.Add(uint64(len(data)))
	h, ranges, err := segfile.Decode(data, a.dec, a.o.DiskID, a.o.DiskSize)
	if err == nil && (h.PrevEpoch != prev || h.LastEpoch != last) {
		err = fmt.Errorf("%w: its header covers epochs %d-%d, its name %d-%d", segfile.ErrCorrupt, h.PrevEpoch, h.LastEpoch, prev, last)
	}
	if err != nil {
		return fmt.Errorf("%w %s: %w; the worker stopped and applied nothing after it (the blob is the disk as of epoch %d). Check where the segment came from; deleting it loses its writes, and the local state directory still holds the disk: `vhdsync verify` shows what differs", ErrBadSegment, name, err, a.f.Sequence().Epoch())
	}
	spans := make([]replicate.Span, len(ranges))
	for i, r := range ranges {
		spans[i] = replicate.Span{Off: r.Off, End: r.Off + r.Len, Clear: r.Zero}
		if !r.Zero {
			spans[i].Data = remote.Pages{r.Data}
		}
	}
	// The same fenced send as the direct transfer, always marked in
	// progress: see the Applier's doc.
	if err := a.f.SendEpochs(ctx, h.FirstEpoch, last, spans, true, nil); err != nil {
		return err
	}
	a.segments.Add(1)
	a.log.Info("segment applied", "segment", name, "ranges", len(ranges), "data_bytes", h.DataBytes, "zero_bytes", h.ZeroBytes, "sequence", a.f.Sequence())
	if a.o.AfterApply != nil {
		a.o.AfterApply(ctx, last)
	}
	return a.delete(ctx, name)
}
