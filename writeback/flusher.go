package writeback

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
)

// MaxPutPage is the largest Put Page Azure accepts.
const MaxPutPage = 4 << 20

// FlusherOptions tune a Flusher. Zero values take the defaults.
type FlusherOptions struct {
	// Workers is how many requests of one batch are in flight (default 8).
	Workers int
	// MaxBatchBytes bounds the journal bytes read into one batch: several
	// small epochs are merged up to this size (default 64 MiB).
	MaxBatchBytes int64
	// Linger is how long the flusher lets an open epoch collect writes
	// before it closes it itself (default 250 ms). It bounds how far the
	// blob falls behind a writer that never issues fsync.
	Linger time.Duration
	// RetryMin and RetryMax bound the backoff between retries of a
	// transient failure (default 100 ms and 5 s). Retries go on forever.
	// The cap is how late the flusher may notice that the remote is back:
	// with 30 s, the blob stayed up to 28 s behind after a one-minute
	// outage had ended (RELIABILITY.md); at 5 s, the 8 workers of an outage
	// that lasts an hour send about 6,000 requests, nothing to a service
	// that takes 500 a second per blob.
	RetryMin, RetryMax time.Duration
	// SyncImage makes the local image durable; it runs before drained
	// records are deleted, so a power loss never leaves data in neither.
	SyncImage func() error
	// Logger receives progress and retry messages.
	Logger *slog.Logger
	// Staging, when set, selects the staged transfer: batches become
	// compressed segments in this store instead of Put Page calls (see
	// stageBatch). DiskID names the disk in every segment, and
	// StagedEpoch is the last epoch delivered before this run (the first
	// segment's PrevEpoch).
	Staging     SegmentStore
	DiskID      string
	StagedEpoch uint64
	// StagedUploads is how many segments upload in parallel (default 2);
	// each holds its compressed batch in memory meanwhile.
	StagedUploads int
	// AfterBatch, when set, is called each time a batch is complete on
	// the blob (its sequence number raised to the even 2*epoch), before
	// the next batch starts: the blob is then exactly the disk at the
	// barrier that closed epoch. RecoveryPoints.AfterBatch fits here. It
	// must not fail the flusher: it reports its own errors. Direct
	// transfer only: with Staging the flusher never writes the blob (the
	// apply worker calls RecoveryPoints.AfterBatch after each segment).
	AfterBatch func(ctx context.Context, epoch uint64)
}

// FlusherState is what the flusher is doing.
type FlusherState string

// Flusher states, as status shows them.
const (
	StateIdle     FlusherState = "idle"
	StateDraining FlusherState = "draining"
	StateRetrying FlusherState = "retrying"
	StateFailed   FlusherState = "failed"
	StateStopped  FlusherState = "stopped"
)

// FlusherStats is a snapshot of the flusher's counters.
type FlusherStats struct {
	State          FlusherState
	LastError      string
	RemoteEpoch    uint64 // last epoch the blob holds completely
	RemoteSequence int64
	Batches        uint64
	PutCalls       uint64
	ClearCalls     uint64
	SequenceCalls  uint64
	BytesSent      uint64
	BytesCleared   uint64
	Retries        uint64
	// Staged transfer: segments stored and the data bytes they carry
	// (BytesSent is then the compressed bytes uploaded).
	Segments        uint64
	StagedDataBytes uint64
}

// Flusher drains the journal to the remote in order. See sendBatch for the
// ordering argument.
type Flusher struct {
	j     *Journal
	r     Remote
	lease string
	o     FlusherOptions
	log   *slog.Logger

	next    uint64 // next seq to read
	minLast uint64 // the first batch must reach this epoch (crash mid-batch)
	seq     atomic.Int64
	epoch   atomic.Uint64

	kick    chan struct{}
	urgent  atomic.Bool
	mu      sync.Mutex
	state   FlusherState
	lastErr error
	done    chan struct{} // closed and replaced after every batch

	batches, puts, clears, seqCalls, sent, cleared, retries atomic.Uint64
	segments, stagedData                                    atomic.Uint64
	committer                                               *committer // direct transfer: commits in the background
	// Staged transfer only: the encoder, the segments uploading (oldest
	// first), the last epoch handed to an upload, and the uploads' goroutines.
	enc       *zstd.Encoder
	pending   []*stagedUpload
	stagePrev uint64
	uploads   sync.WaitGroup
}

// NewFlusher prepares a flusher for journal j and remote r, whose sequence
// number is remoteSeq now. lease is the lease id every write carries.
func NewFlusher(j *Journal, r Remote, lease string, remoteSeq int64, o FlusherOptions) *Flusher {
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.MaxBatchBytes <= 0 {
		o.MaxBatchBytes = 64 << 20
	}
	if o.Linger <= 0 {
		o.Linger = 250 * time.Millisecond
	}
	if o.RetryMin <= 0 {
		o.RetryMin = 100 * time.Millisecond
	}
	if o.RetryMax <= 0 {
		o.RetryMax = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	f := &Flusher{j: j, r: r, lease: lease, o: o, log: o.Logger, kick: make(chan struct{}, 1), state: StateIdle, done: make(chan struct{})}
	f.seq.Store(remoteSeq)
	f.epoch.Store(uint64(remoteSeq / 2))
	if o.StagedUploads <= 0 {
		o.StagedUploads = 2
		f.o.StagedUploads = 2
	}
	if o.Staging != nil {
		// Progress is what was staged; the worker owns the blob's
		// sequence number.
		f.epoch.Store(o.StagedEpoch)
		f.stagePrev = o.StagedEpoch
	} else if remoteSeq%2 == 1 {
		// A batch ending at epoch (remoteSeq+1)/2 was in progress when the
		// last writer stopped: the first batch must cover it again.
		f.minLast = uint64(remoteSeq+1) / 2
	}
	return f
}

// RemoteEpochFromSequence is the last epoch a blob with sequence number
// seq holds completely.
func RemoteEpochFromSequence(seq int64) uint64 { return uint64(seq / 2) }

// Kick wakes the flusher (a write arrived).
func (f *Flusher) Kick() {
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

func (f *Flusher) setState(s FlusherState, err error) {
	f.mu.Lock()
	f.state = s
	if err != nil {
		f.lastErr = err
	} else if s != StateRetrying {
		f.lastErr = nil
	}
	f.mu.Unlock()
}

// Stats returns the flusher's counters.
func (f *Flusher) Stats() FlusherStats {
	f.mu.Lock()
	s := FlusherStats{State: f.state}
	if f.lastErr != nil {
		// The first line only: the SDK's error text repeats the request.
		s.LastError, _, _ = strings.Cut(f.lastErr.Error(), "\n")
	}
	f.mu.Unlock()
	s.RemoteEpoch = f.epoch.Load()
	s.RemoteSequence = f.seq.Load()
	s.Batches = f.batches.Load()
	s.PutCalls = f.puts.Load()
	s.ClearCalls = f.clears.Load()
	s.SequenceCalls = f.seqCalls.Load()
	s.BytesSent = f.sent.Load()
	s.BytesCleared = f.cleared.Load()
	s.Retries = f.retries.Load()
	s.Segments = f.segments.Load()
	s.StagedDataBytes = f.stagedData.Load()
	return s
}

// Run drains the journal until ctx ends or a permanent error (lease lost,
// authentication, a fence that fired) stops it; that error is returned and
// stays visible in Stats. Transient errors are retried forever.
func (f *Flusher) Run(ctx context.Context) error {
	// Uploads still running when Run returns end with ctx; wait for them
	// so none touches the store after the flusher stopped.
	ctx, cancel := context.WithCancel(ctx)
	f.startCommitter()
	defer func() { cancel(); f.uploads.Wait(); f.stopCommitter() }()
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	lingering := false
	// emptyAt is the closed epoch at the last scan that found nothing.
	// Appends only ever go to the open epoch, so until another epoch
	// closes a new scan would find nothing either: every write kicks the
	// flusher, and skipping the scan keeps badger off the write path.
	emptyAt, scanned := uint64(0), false
	for {
		if ctx.Err() != nil {
			f.setState(StateStopped, nil)
			return nil
		}
		if err := f.commitErr(); err != nil {
			return f.stop(ctx, err)
		}
		var recs []Record
		if closed := f.j.ClosedEpoch(); !scanned || closed != emptyAt {
			var err error
			recs, err = f.j.ReadBatch(f.next, f.o.MaxBatchBytes, f.minLast)
			if err != nil {
				f.setState(StateFailed, err)
				return err
			}
			scanned, emptyAt = len(recs) == 0, closed
		}
		if len(recs) > 0 {
			lingering = false
			f.setState(StateDraining, nil)
			send := f.sendBatch
			if f.o.Staging != nil {
				send = f.stageBatch
			}
			if err := send(ctx, recs); err != nil {
				return f.stop(ctx, err)
			}
			continue
		}
		if len(f.pending) > 0 {
			// Nothing more to read: commit the segments still uploading
			// (Drain waits for an empty journal).
			if err := f.commitStaged(ctx, true); err != nil {
				return f.stop(ctx, err)
			}
			continue
		}
		if f.j.OpenEpochHasRecords() {
			if f.urgent.Load() {
				f.j.CloseEpoch()
				continue
			}
			if !lingering {
				lingering = true
				linger.Reset(f.o.Linger)
			}
		} else {
			f.setState(StateIdle, nil)
		}
		select {
		case <-ctx.Done():
		case <-f.kick:
		case <-linger.C:
			lingering = false
			f.j.CloseEpoch()
		}
	}
}

// stop ends Run after err: a cancelled ctx is a normal stop, anything else
// a failure that stays visible in Stats.
func (f *Flusher) stop(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		f.setState(StateStopped, nil)
		return nil
	}
	f.setState(StateFailed, err)
	f.log.Error("flusher stopped", "err", err)
	return err
}

// Drain asks the flusher to send everything journaled so far without
// lingering and waits until the journal is empty (or ctx ends, or the
// flusher fails).
func (f *Flusher) Drain(ctx context.Context) error {
	f.urgent.Store(true)
	defer f.urgent.Store(false)
	for {
		f.mu.Lock()
		done, state, lastErr := f.done, f.state, f.lastErr
		f.mu.Unlock()
		if state == StateFailed {
			return fmt.Errorf("drain: the flusher stopped: %w", lastErr)
		}
		if f.j.Stats().PendingRecords == 0 {
			return nil
		}
		f.Kick()
		select {
		case <-ctx.Done():
			return fmt.Errorf("drain: %w", ctx.Err())
		case <-done:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// sendBatch sends one batch: whole epochs first..last, coalesced.
//
// Ordering (invariant 3), and why a request that may or may not have
// landed can never overwrite newer data:
//   - Batches are sent one at a time; the next starts only when every
//     request of this one has been acknowledged. Within a batch the spans
//     are disjoint, so their order does not matter, and each sector gets the
//     last value the batch wrote to it.
//   - A batch of several epochs is marked in progress first: the blob's
//     sequence number is raised to 2*last-1 (odd). When all spans are in,
//     it is raised to 2*last (even): the blob is exactly the disk at the
//     barrier that closed epoch last. A single-epoch batch needs no mark:
//     any subset of one epoch is a state the disk itself may show.
//   - Every Put Page and Clear Pages carries the lease and the condition
//     "sequence number == the value at the start of the batch" (2*last-1,
//     or the previous even value). Every batch moves the sequence number
//     past that value when it completes, and it only ever rises (max), so a
//     request of this batch delayed in the network is refused by the
//     service (412) once the batch is over: it can never land on top of a
//     later batch. Retries within the batch resend the same bytes to the
//     same disjoint span, which is idempotent.
func (f *Flusher) sendBatch(ctx context.Context, recs []Record) error {
	first, last := recs[0].Epoch, recs[len(recs)-1].Epoch
	// The records must be durable locally before the blob has them:
	// otherwise a power loss could leave the blob ahead of the image.
	if err := f.j.Sync(); err != nil {
		return err
	}
	fence := f.seq.Load()
	if first != last || fence%2 == 1 {
		fence = int64(2*last - 1)
		if err := f.retry(ctx, "mark batch in progress", func(ctx context.Context) error {
			return f.r.RaiseSequence(ctx, fence, f.lease)
		}); err != nil {
			return err
		}
		f.seqCalls.Add(1)
		if f.seq.Load() < fence {
			f.seq.Store(fence)
		}
		fence = max(fence, f.seq.Load())
	}
	var c coalescer
	for i := range recs {
		c.add(&recs[i])
	}
	spans := c.spans(MaxPutPage)
	// The spans reference the payloads they send from: a payload none of
	// them references (overwritten by a later record of the batch, or
	// cleared whole) is freed now rather than held while the batch is
	// retried for as long as the remote is down; the commit needs none.
	for i := range recs {
		recs[i].Data = nil
	}
	if err := f.sendSpans(ctx, spans, Cond{LeaseID: f.lease, IfSequenceEq: &fence}); err != nil {
		return err
	}
	done := int64(2 * last)
	if err := f.retry(ctx, "mark batch complete", func(ctx context.Context) error {
		return f.r.RaiseSequence(ctx, done, f.lease)
	}); err != nil {
		return err
	}
	f.seqCalls.Add(1)
	f.seq.Store(max(done, f.seq.Load()))
	f.epoch.Store(last)
	if f.o.AfterBatch != nil {
		f.o.AfterBatch(ctx, last)
	}
	// The blob holds the batch: the next batch may go out while this one
	// is committed locally (image sync, journal delete) in the background;
	// the commit needs no payload (dropped above).
	f.next = recs[len(recs)-1].Seq + 1
	f.minLast = 0
	return f.queueCommit(ctx, recs, fmt.Sprintf("%d spans, sequence %d", len(spans), done))
}

// committer commits batches the blob already holds, one at a time and in
// order, so the image sync and the journal delete of batch n overlap the
// upload of batch n+1. Nothing it does touches the remote: the order of
// the blob's contents is kept by sendBatch alone.
type committer struct {
	jobs chan commitJob
	done chan struct{}
	err  error // set before done is closed
}

type commitJob struct {
	recs []Record
	what string
}

func (f *Flusher) startCommitter() {
	c := &committer{jobs: make(chan commitJob, 1), done: make(chan struct{})}
	f.committer = c
	go func() {
		defer close(c.done)
		for job := range c.jobs {
			if err := f.commitBatch(job.recs, job.what); err != nil {
				c.err = err
				// Later jobs are not committed: their records stay in the
				// journal and are sent again by the next flusher.
				for range c.jobs {
				}
				return
			}
		}
	}()
}

// stopCommitter lets the committer finish the batches queued (the blob
// holds them) and waits for it.
func (f *Flusher) stopCommitter() {
	close(f.committer.jobs)
	<-f.committer.done
}

// commitErr returns the error that stopped the committer, if it stopped.
func (f *Flusher) commitErr() error {
	select {
	case <-f.committer.done:
		return f.committer.err
	default:
		return nil
	}
}

func (f *Flusher) queueCommit(ctx context.Context, recs []Record, what string) error {
	if err := f.commitErr(); err != nil {
		return err
	}
	select {
	case f.committer.jobs <- commitJob{recs: recs, what: what}:
		return nil
	case <-f.committer.done:
		return f.committer.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// commitBatch ends a batch the remote (blob or staging) holds: the image
// is made durable, then the batch's records are deleted from the journal.
func (f *Flusher) commitBatch(recs []Record, what string) error {
	first, last := recs[0].Epoch, recs[len(recs)-1].Epoch
	// Every record of the batch must be in the image before the image is
	// synced and the records deleted (see Journal.appendApply).
	f.j.waitApplied()
	if f.o.SyncImage != nil {
		if err := f.o.SyncImage(); err != nil {
			return fmt.Errorf("sync local image: %w", err)
		}
	}
	if err := f.j.Delete(recs, last); err != nil {
		return err
	}
	f.batches.Add(1)
	f.log.Debug("batch committed", "epochs", fmt.Sprintf("%d-%d", first, last), "records", len(recs), "delivered", what)
	f.mu.Lock()
	close(f.done)
	f.done = make(chan struct{})
	f.mu.Unlock()
	return nil
}

// sendSpans sends the disjoint spans of one batch with the configured
// number of workers and returns when all are acknowledged, or on the first
// permanent error.
func (f *Flusher) sendSpans(ctx context.Context, spans []span, c Cond) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan span)
	errc := make(chan error, f.o.Workers)
	var wg sync.WaitGroup
	for w := 0; w < min(f.o.Workers, len(spans)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range work {
				var err error
				if s.clear {
					err = f.retry(ctx, "clear pages", func(ctx context.Context) error {
						return f.r.ClearPages(ctx, s.off, s.end-s.off, c)
					})
					if err == nil {
						f.clears.Add(1)
						f.cleared.Add(uint64(s.end - s.off))
					}
				} else {
					err = f.retry(ctx, "put page", func(ctx context.Context) error {
						return f.r.PutPages(ctx, s.off, s.data, c)
					})
					if err == nil {
						f.puts.Add(1)
						f.sent.Add(uint64(s.end - s.off))
					}
				}
				if err != nil {
					errc <- err
					cancel()
					return
				}
			}
		}()
	}
feed:
	for _, s := range spans {
		select {
		case work <- s:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
	}
	return ctx.Err()
}

// retry runs op until it succeeds, fails permanently, or ctx ends.
// Transient failures back off exponentially from RetryMin to RetryMax, with
// jitter, and are counted and shown in the state.
func (f *Flusher) retry(ctx context.Context, what string, op func(context.Context) error) error {
	wait := f.o.RetryMin
	for attempt := 1; ; attempt++ {
		err := op(ctx)
		if err == nil {
			if attempt > 1 {
				f.setState(StateDraining, nil)
				f.log.Info("remote answers again", "op", what, "attempts", attempt)
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !IsTransient(err) {
			return fmt.Errorf("%s: %w", what, err)
		}
		f.retries.Add(1)
		f.setState(StateRetrying, err)
		if attempt == 1 || attempt%10 == 0 {
			f.log.Warn("remote request failed, retrying", "op", what, "attempt", attempt, "err", err)
		}
		d := wait/2 + rand.N(wait/2+1)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
		wait = min(wait*2, f.o.RetryMax)
	}
}

// ErrFlusherStopped is returned by Drain when the flusher is not running.
var ErrFlusherStopped = errors.New("flusher stopped")
