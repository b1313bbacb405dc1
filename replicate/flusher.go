// Package replicate drains the journal to the page blob in order: the
// flusher plans batches of whole epochs from the journal's index
// (coalesced, filled, merged while catching up), the Sender writes them
// under the ordering protocol (odd/even marks, fenced requests), and the
// committer deletes what the blob holds once the image is durable. It
// keeps invariants 3 (order) and 4 (image before delete) of
// docs/DESIGN.md; the staged transfer plugs in as a Sink.
package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
)

// FlusherOptions tune a Flusher. Zero values take the defaults.
type FlusherOptions struct {
	// MaxBatchBytes bounds the journal bytes of one batch while the
	// flusher keeps up: several small epochs are merged up to this size
	// (default 64 MiB). When the journal holds more (a backlog), batches
	// are bounded by MaxBatchDistinct instead.
	MaxBatchBytes int64
	// MaxBatchDistinct bounds the distinct bytes (after the last write
	// wins) one batch sends while the flusher catches up (default 1 GiB):
	// how long the blob stays odd (not a consistent disk) while a backlog
	// drains, at the blob's byte rate. Payloads are read when sent, so it
	// costs no memory.
	MaxBatchDistinct int64
	// MaxBatchExtents bounds the distinct ranges of a batch: its memory
	// (about 100 bytes each; default 1 Mi).
	MaxBatchExtents int
	// RequestCost is what one request costs in bytes of Put Page payload,
	// the cost model for joining ranges (fills) and clearing zero runs
	// (default: a standard page blob's 60 MiB/s over 500 requests/s).
	RequestCost int64
	// Image, when set, lets Put Pages carry clean sectors read from the
	// local image between pending ranges (fills, see plan.go).
	Image Image
	// MergeWait is how long a request-bound batch (its requests cost
	// more than its bytes, in the cost model: small writes scattered over
	// the disk) may wait for more epochs while writers are busy, so that
	// later writes join it and its ranges merge into fewer, fuller Put
	// Pages (default 1 s; negative: never wait). It adds at most this much
	// to the lag of such writes, which the blob could not take one request
	// each anyway.
	MergeWait time.Duration
	// PreemptAfter is how many spans a batch must still have to send for
	// it to be stopped for a larger one once the writers stop (see
	// preempt; default 64; negative: never).
	PreemptAfter int
	// FillAhead bounds the memory of the fills read when a batch is
	// planned rather than when its spans are sent (see batch.readAhead;
	// default 32 MiB, about what a batch of small random writes over a hot
	// region fills; negative: none).
	FillAhead int64
	// Linger is how long the flusher lets an open epoch collect writes
	// before it closes it itself (default 250 ms). It bounds how far the
	// blob falls behind a writer that never issues fsync.
	Linger time.Duration
	// SyncImage makes the local image durable; it runs before drained
	// records are deleted, so a power loss never leaves data in neither.
	SyncImage func() error
	// Logger receives progress messages.
	Logger *slog.Logger
	// Sink, when set, selects the staged transfer: batches are delivered
	// to it (staged.Sink packs them into segments) instead of being sent
	// to the blob.
	Sink Sink
	// AfterBatch, when set, is called each time a batch is complete on
	// the blob (its sequence number raised to remote.Complete(epoch)),
	// before the next batch starts: the blob is then exactly the disk at
	// the barrier that closed epoch. RecoveryPoints.AfterBatch fits here.
	// It must not fail the flusher: it reports its own errors. Direct
	// transfer only: with a Sink the flusher never writes the blob (the
	// apply worker calls RecoveryPoints.AfterBatch after each segment).
	AfterBatch func(ctx context.Context, epoch uint64)
}

// Batch is one batch of whole epochs First..Last, read from the journal
// and coalesced: what a Sink delivers.
type Batch struct {
	First, Last uint64
	// Drained is the batch's records, which the commit deletes.
	Drained journal.Drained
	// Spans are the coalesced requests, disjoint; planned ones are read
	// by Span.Load, which must be called before Deliver returns.
	Spans []Span
}

// Delivered is a batch a Sink has delivered: the flusher commits it.
type Delivered struct {
	Drained journal.Drained
	Last    uint64
	// What describes the delivery for the log.
	What string
	// Counters: segments stored, bytes uploaded, data and cleared bytes
	// they carry.
	Segments, BytesSent, DataBytes, BytesCleared uint64
}

// Sink delivers batches somewhere other than the blob: the staged
// transfer. The flusher reads, coalesces and commits; the sink delivers,
// and reports deliveries strictly in order.
type Sink interface {
	// Epoch is the last epoch delivered before this run.
	Epoch() uint64
	// Deliver hands one batch over. It may return before the batch is
	// delivered; it returns the batches delivered since the last call,
	// oldest first, waiting for the oldest while too many are in flight.
	Deliver(ctx context.Context, b Batch) ([]Delivered, error)
	// Settle waits until every batch handed over is delivered and
	// returns them, oldest first.
	Settle(ctx context.Context) ([]Delivered, error)
	// Pending reports whether batches handed over are not settled yet.
	Pending() bool
	// Wait waits for deliveries still running after Deliver's or
	// Settle's context ended, so none touches the remote after the
	// flusher stopped.
	Wait()
}

// FlusherStats is a snapshot of the flusher's counters.
type FlusherStats struct {
	SenderStats
	RemoteEpoch uint64 // last epoch the blob holds completely
	Batches     uint64
	// DrainedBytes is the journal bytes (JournalBytes) of every record
	// the remote holds and the journal deleted: the drain rate in the
	// journal's own unit, for the catch-up estimate.
	DrainedBytes uint64
	// HeldBatches counts the plans that waited for more epochs (MergeWait);
	// PreemptedBatches the batches stopped for a larger one.
	HeldBatches, PreemptedBatches uint64
	// Staged transfer: segments stored and the data bytes they carry
	// (BytesSent is then the compressed bytes uploaded).
	Segments        uint64
	StagedDataBytes uint64
}

// Flusher drains the journal to the remote in order, through a Sender
// (which keeps the ordering rule) or a Sink (the staged transfer).
type Flusher struct {
	j   *journal.Journal
	s   *Sender
	o   FlusherOptions
	log *slog.Logger

	next    uint64 // next seq to read
	minLast uint64 // the first batch must reach this epoch (crash mid-batch)
	epoch   atomic.Uint64

	kick   chan struct{}
	urgent atomic.Bool
	mu     sync.Mutex
	done   chan struct{} // closed and replaced after every batch
	// onRemote is closed and replaced (under mu) each time the remote
	// epoch advances, and when Run stops; remoteWaiters counts the
	// WaitRemote calls waiting (synchronous barriers), which batches
	// must not keep waiting (no merge wait, no hold).
	onRemote      chan struct{}
	remoteWaiters atomic.Int32
	stopped       atomic.Bool
	// landed is the last epoch whose writes the blob holds, its even
	// mark possibly not yet set (see Sender.OnLanded): enough for
	// WaitRemote.
	landed atomic.Uint64

	batches, segments, stagedData, stagedSent, stagedCleared atomic.Uint64
	drainedBytes, held, preempted                            atomic.Uint64
	committer                                                *committer // commits in the background
}

// NewFlusher prepares a flusher for journal j that sends through s (whose
// sequence number is the blob's now).
func NewFlusher(j *journal.Journal, s *Sender, o FlusherOptions) *Flusher {
	if o.MaxBatchBytes <= 0 {
		o.MaxBatchBytes = 64 << 20
	}
	if o.MaxBatchDistinct <= 0 {
		o.MaxBatchDistinct = 1 << 30
	}
	if o.MaxBatchExtents <= 0 {
		o.MaxBatchExtents = 1 << 20
	}
	if o.RequestCost <= 0 {
		o.RequestCost = requestCost
	}
	if o.PreemptAfter == 0 {
		o.PreemptAfter = 64
	}
	if o.MergeWait == 0 {
		o.MergeWait = time.Second
	}
	if o.FillAhead == 0 {
		o.FillAhead = 32 << 20
	}
	if o.Linger <= 0 {
		o.Linger = 250 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	f := &Flusher{j: j, s: s, o: o, log: o.Logger, kick: make(chan struct{}, 1), done: make(chan struct{}), onRemote: make(chan struct{})}
	seq := s.Sequence()
	f.epoch.Store(seq.Epoch())
	if o.Sink != nil {
		// Progress is what was staged; the apply worker owns the blob's
		// sequence number.
		f.epoch.Store(o.Sink.Epoch())
	} else if seq.InProgress() {
		// A batch ending at epoch seq.Target() was in progress when the
		// last writer stopped: the first batch must cover it again.
		f.minLast = seq.Target()
	}
	j.OnRemote(f.epoch.Load())
	if o.Sink == nil {
		s.OnLanded(func(last uint64) {
			if last > f.landed.Load() {
				f.landed.Store(last)
				f.signalRemote()
			}
		})
	}
	return f
}

// Kick wakes the flusher (a write arrived).
func (f *Flusher) Kick() {
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// Stats returns the flusher's counters.
func (f *Flusher) Stats() FlusherStats {
	s := FlusherStats{SenderStats: f.s.Stats()}
	s.RemoteEpoch = f.epoch.Load()
	s.Batches = f.batches.Load()
	s.DrainedBytes = f.drainedBytes.Load()
	s.HeldBatches = f.held.Load()
	s.PreemptedBatches = f.preempted.Load()
	s.Segments = f.segments.Load()
	s.StagedDataBytes = f.stagedData.Load()
	s.BytesSent += f.stagedSent.Load()
	s.BytesCleared += f.stagedCleared.Load()
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
	defer func() {
		// Synchronous barriers waiting for the remote learn that it will
		// not come from this run.
		f.stopped.Store(true)
		f.signalRemote()
		cancel()
		if f.o.Sink != nil {
			f.o.Sink.Wait()
		}
		f.stopCommitter()
	}()
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	lingering := false
	// holdUntil: a request-bound batch waits for more epochs (MergeWait);
	// no new plan before then unless a drain is asked for.
	var holdUntil time.Time
	hold := time.NewTimer(time.Hour)
	hold.Stop()
	// emptyAt is the closed epoch at the last scan that found nothing.
	// Appends only ever go to the open epoch, so until another epoch
	// closes a new scan would find nothing either: every write kicks the
	// flusher, and skipping the scan keeps badger off the write path.
	emptyAt, scanned := uint64(0), false
	for {
		if ctx.Err() != nil {
			f.s.SetState(StateStopped, nil)
			return nil
		}
		if err := f.commitErr(); err != nil {
			return f.stop(ctx, err)
		}
		var b *batch
		planStart := time.Now()
		holding := time.Now().Before(holdUntil) && !f.urgent.Load() && f.remoteWaiters.Load() == 0
		if closed := f.j.ClosedEpoch(); !holding && (!scanned || closed != emptyAt) {
			var err error
			if b, err = f.plan(); err != nil {
				f.s.SetState(StateFailed, err)
				return err
			}
			scanned, emptyAt = b == nil, closed
		}
		if b != nil {
			spans := b.spans(f.j, remote.MaxPutPage, f.o.RequestCost)
			f.log.Debug("batch planned", "epochs", fmt.Sprintf("%d-%d", b.first, b.last), "records", b.drained.Records,
				"spans", len(spans), "later_ranges", len(b.later), "seconds", time.Since(planStart).Seconds())
			if wait := f.mergeWait(b, spans); wait > 0 {
				b.done()
				holdUntil = time.Now().Add(wait)
				hold.Reset(wait)
				f.held.Add(1)
			} else {
				lingering = false
				f.s.SetState(StateDraining, nil)
				err := f.sendBatch(ctx, b, spans)
				b.done()
				if err != nil {
					return f.stop(ctx, err)
				}
				continue
			}
		}
		if f.o.Sink != nil && f.o.Sink.Pending() {
			// Nothing more to read: commit the segments still uploading
			// (Drain waits for an empty journal).
			ds, err := f.o.Sink.Settle(ctx)
			if err == nil {
				err = f.commitDelivered(ds)
			}
			if err != nil {
				return f.stop(ctx, err)
			}
			continue
		}
		if f.j.OpenEpochHasRecords() {
			age := f.j.OpenEpochAge()
			if f.urgent.Load() || age >= f.o.Linger {
				// Its first write has waited a linger already (while a
				// batch was sent): closing it now, not a linger from
				// now, saved a quarter of a second per batch under a
				// steady load.
				f.j.CloseEpoch()
				continue
			}
			if !lingering {
				lingering = true
				linger.Reset(f.o.Linger - age)
			}
		} else {
			f.s.SetState(StateIdle, nil)
		}
		select {
		case <-ctx.Done():
		case <-f.kick:
		case <-linger.C:
			lingering = false
			f.j.CloseEpoch()
		case <-hold.C:
		}
	}
}

// stop ends Run after err: a cancelled ctx is a normal stop, anything else
// a failure that stays visible in Stats.
func (f *Flusher) stop(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		f.s.SetState(StateStopped, nil)
		return nil
	}
	f.s.SetState(StateFailed, err)
	f.log.Error("flusher stopped", "err", err)
	return err
}

// advance records that the remote holds every epoch up to epoch and
// wakes the synchronous barriers waiting for it.
func (f *Flusher) advance(epoch uint64) {
	f.epoch.Store(epoch)
	f.j.OnRemote(epoch)
	f.signalRemote()
}

// Advance records that the remote holds every epoch up to epoch through a
// step taken outside the flusher while it had nothing to send (a resize,
// writeback.Disk.Resize, which has an epoch of its own): a synchronous
// barrier that names that epoch then returns, and status shows it.
func (f *Flusher) Advance(epoch uint64) {
	if epoch > f.epoch.Load() {
		f.advance(epoch)
	}
}

func (f *Flusher) signalRemote() {
	f.mu.Lock()
	close(f.onRemote)
	f.onRemote = make(chan struct{})
	f.mu.Unlock()
}

// RemoteEpoch is the last epoch the remote holds completely (the blob, or
// the staging store with a Sink).
func (f *Flusher) RemoteEpoch() uint64 { return f.epoch.Load() }

// WaitRemote waits until the remote holds every epoch up to epoch: a
// synchronous barrier (mount --sync). The blob holds them once their batch
// is complete, or, for a batch of one epoch, once its writes have landed
// (Sender.OnLanded), a round trip earlier. While it waits, batches are sent as
// soon as they are planned (no merge wait), so that barriers arriving
// together share the next batch's round trips (group commit). It returns
// ctx's error when ctx ends first, and ErrFlusherStopped (with the
// flusher's error, if it failed) when the flusher stops.
func (f *Flusher) WaitRemote(ctx context.Context, epoch uint64) error {
	f.remoteWaiters.Add(1)
	defer f.remoteWaiters.Add(-1)
	f.Kick()
	for {
		f.mu.Lock()
		ch := f.onRemote
		f.mu.Unlock()
		if max(f.epoch.Load(), f.landed.Load()) >= epoch {
			return nil
		}
		if state, err := f.s.stateErr(); state == StateFailed {
			return fmt.Errorf("%w: %w", ErrFlusherStopped, err)
		}
		if f.stopped.Load() {
			return ErrFlusherStopped
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// Drain asks the flusher to send everything journaled so far without
// lingering and waits until the journal is empty (or ctx ends, or the
// flusher fails).
func (f *Flusher) Drain(ctx context.Context) error {
	f.urgent.Store(true)
	defer f.urgent.Store(false)
	for {
		f.mu.Lock()
		done := f.done
		f.mu.Unlock()
		state, lastErr := f.s.stateErr()
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

// sendBatch delivers one batch: whole epochs first..last, coalesced, sent
// through the Sender (which keeps the order, see Sender.SendEpochs) or
// handed to the Sink.
func (f *Flusher) sendBatch(ctx context.Context, b *batch, spans []Span) error {
	first, last := b.first, b.last
	if err := b.readAhead(f.o.FillAhead); err != nil {
		return err
	}
	// The records must be durable locally before the blob (or the staging
	// store) has them: otherwise a power loss could leave the blob ahead of
	// the image.
	if err := f.j.Sync(); err != nil {
		return err
	}
	f.next = b.drained.LastSeq + 1
	if f.o.Sink != nil {
		ds, err := f.o.Sink.Deliver(ctx, Batch{First: first, Last: last, Drained: b.drained, Spans: spans})
		if err != nil {
			return err
		}
		f.minLast = 0
		return f.commitDelivered(ds)
	}
	before := f.s.Stats()
	start := time.Now()
	// A batch that may be preempted is always marked in progress: a
	// reader of the blob then sees, from the odd mark that does not name
	// the batch that completes it, that a superset took over.
	preemptable := f.o.PreemptAfter >= 0 && len(spans) >= f.o.PreemptAfter
	marked := preemptable || first != last || f.s.Sequence().InProgress()
	var preempt func([]Span) bool
	if marked {
		// Only a batch under an odd mark may be preempted: an unmarked one
		// would leave the blob changed under an even number.
		preempt = f.preempt(b)
	}
	err := f.s.SendEpochs(ctx, first, last, spans, preemptable, preempt)
	if errors.Is(err, ErrPreempted) {
		// The next batch starts where this one did and reaches further
		// (see preempt).
		f.next, f.minLast = b.drained.FirstSeq, b.last
		f.preempted.Add(1)
		f.log.Info("batch preempted by a larger one", "epochs", fmt.Sprintf("%d-%d", first, last), "spans", len(spans))
		return nil
	}
	if err != nil {
		return err
	}
	if f.log.Enabled(ctx, slog.LevelDebug) {
		after := f.s.Stats()
		var fill int64
		for _, sp := range spans {
			fill += sp.Fill
		}
		f.log.Debug("batch sent", "epochs", fmt.Sprintf("%d-%d", first, last), "records", b.drained.Records,
			"journal_bytes", b.drained.Bytes, "distinct", b.distinct, "planned_spans", len(spans), "planned_fill", fill,
			"puts", after.PutCalls-before.PutCalls, "clears", after.ClearCalls-before.ClearCalls,
			"filled", after.FilledBytes-before.FilledBytes, "unfilled", after.UnfilledBytes-before.UnfilledBytes,
			"seconds", time.Since(start).Seconds())
	}
	f.advance(last)
	if f.o.AfterBatch != nil {
		f.o.AfterBatch(ctx, last)
	}
	// The blob holds the batch: the next batch may go out while this one
	// is committed locally (image sync, journal delete) in the background.
	f.minLast = 0
	return f.queueCommit(ctx, b.drained, fmt.Sprintf("%d spans, sequence %d", len(spans), f.s.Sequence()))
}

// preempt decides whether batch b, being sent, should stop for a larger
// one: when the writers have stopped (nothing appended for two lingers, or
// a drain is asked for) and later epochs wait, while many of b's spans
// are still to go, or while the later epochs hold more bytes than b has
// left to send. A batch planned while writers were busy is often the worst
// possible one: its gaps could not be filled (later records covered them,
// or writes landed there while it was sent), so it is thousands of small
// requests. Its superset, planned now, fills them: after a burst of
// random writes it is a few whole Put Pages per 4 MiB of the region
// instead of one request per write.
//
// Why this is safe: the superset (the same first epoch, a later last one)
// is marked in progress with remote.Started(last'), above b's fence, so
// every request of b still in the network is refused (412); every sector
// b may have written is written again by the superset, whose last writer
// per sector is at least as new; the blob is no consistent disk until the
// superset completes, which its odd mark says.
func (f *Flusher) preempt(b *batch) func(rest []Span) bool {
	if f.o.PreemptAfter < 0 || b.cut {
		// A batch cut at its size bound has no larger superset: the next
		// plan would end at the same place.
		return nil
	}
	seen, since := f.j.Appended(), time.Now()
	return func(rest []Span) bool {
		if !f.urgent.Load() {
			// The writers are idle when nothing was appended for two
			// lingers; the run loop, busy with b, cannot close their last
			// epoch, so this does (as the linger would).
			if n := f.j.Appended(); n != seen {
				seen, since = n, time.Now()
				return false
			}
			if time.Since(since) < 2*f.o.Linger {
				return false
			}
		}
		f.j.CloseEpoch()
		if f.j.ClosedEpoch() <= b.last {
			return false
		}
		if len(rest) >= f.o.PreemptAfter {
			return true
		}
		// Few requests left, but large ones: worth it when the later
		// epochs hold at least as many bytes as are left to send, as when
		// the writers kept rewriting the same region while b was sent
		// (the superset sends that region once instead of twice).
		var left int64
		for _, sp := range rest {
			left += sp.End - sp.Off
		}
		return f.j.PendingBytes()-b.drained.Bytes >= left
	}
}

// mergeWait is how long batch b should wait for more epochs before it is
// sent (0: send it now): only a request-bound batch (its requests cost
// more than its bytes) while writers are busy, until its oldest record is
// MergeWait old. Never when a drain is asked for, nor for the batch that
// must finish one cut short by a crash.
func (f *Flusher) mergeWait(b *batch, spans []Span) time.Duration {
	if f.o.MergeWait <= 0 || f.urgent.Load() || f.remoteWaiters.Load() > 0 || f.minLast > 0 || !f.j.OpenEpochHasRecords() {
		return 0
	}
	var bytes int64
	for _, sp := range spans {
		if !sp.Clear {
			bytes += sp.End - sp.Off
		}
	}
	// Spans fill their gaps until requests and bytes cost about the same
	// (fillThreshold): a batch whose requests still cost more than twice
	// its bytes could not fill them, and more epochs may.
	if int64(len(spans))*f.o.RequestCost <= 2*bytes {
		return 0
	}
	return f.o.MergeWait - time.Since(b.oldest)
}

// commitDelivered commits, in order, the batches a Sink delivered.
func (f *Flusher) commitDelivered(ds []Delivered) error {
	for _, d := range ds {
		f.segments.Add(d.Segments)
		f.stagedSent.Add(d.BytesSent)
		f.stagedData.Add(d.DataBytes)
		f.stagedCleared.Add(d.BytesCleared)
		f.advance(d.Last)
		if err := f.commitBatch(d.Drained, d.What); err != nil {
			return err
		}
	}
	return nil
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
	d    journal.Drained
	what string
}

func (f *Flusher) startCommitter() {
	c := &committer{jobs: make(chan commitJob, 1), done: make(chan struct{})}
	f.committer = c
	go func() {
		defer close(c.done)
		for job := range c.jobs {
			if err := f.commitBatch(job.d, job.what); err != nil {
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

func (f *Flusher) queueCommit(ctx context.Context, d journal.Drained, what string) error {
	if err := f.commitErr(); err != nil {
		return err
	}
	select {
	case f.committer.jobs <- commitJob{d: d, what: what}:
		return nil
	case <-f.committer.done:
		return f.committer.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// commitBatch ends a batch the remote (blob or staging) holds: the image
// is made durable, then the batch's records are deleted from the journal.
func (f *Flusher) commitBatch(d journal.Drained, what string) error {
	// Every record of the batch must be in the image before the image is
	// synced and the records deleted (see Journal.appendApply).
	start := time.Now()
	f.j.WaitApplied()
	if f.o.SyncImage != nil {
		if err := f.o.SyncImage(); err != nil {
			return fmt.Errorf("sync local image: %w", err)
		}
	}
	synced := time.Now()
	if err := f.j.DeleteRange(d); err != nil {
		return err
	}
	f.drainedBytes.Add(uint64(d.Bytes))
	f.batches.Add(1)
	f.log.Debug("batch committed", "seqs", fmt.Sprintf("%d-%d", d.FirstSeq, d.LastSeq), "last_epoch", d.LastEpoch, "records", d.Records, "delivered", what,
		"sync_seconds", synced.Sub(start).Seconds(), "delete_seconds", time.Since(synced).Seconds())
	f.mu.Lock()
	close(f.done)
	f.done = make(chan struct{})
	f.mu.Unlock()
	return nil
}

// ErrFlusherStopped is returned by Drain when the flusher is not running.
var ErrFlusherStopped = errors.New("flusher stopped")
