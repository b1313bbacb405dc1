// Package points keeps recovery points: snapshots of the page blob taken
// at epoch boundaries (the blob exactly the disk at a barrier), named by
// their metadata, pruned by a retention policy. Each point also records
// the disk ranges written since the point before it (Changes), from which
// an incremental restore learns what to rewrite (ChangesBetween). See
// docs/DESIGN.md, "Incremental restore".
package points

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vhdsync/vhdsync/remote"
)

// Metadata names that mark a blob snapshot as a vhdsync recovery point.
// A snapshot is a recovery point when it carries both, well formed; any
// other snapshot of the blob (taken by a user or another tool, even one
// that copied the base blob's vhdsync_disk_id) is foreign and never
// touched.
const (
	// PointMetaEpoch is the epoch e the point holds: the blob as of the
	// barrier that closed epoch e, its sequence number 2e.
	PointMetaEpoch = "vhdsync_epoch"
	// PointMetaTime is when vhdsync took the point (RFC 3339, UTC).
	PointMetaTime = "vhdsync_time"
	// PointMetaPrev is the id of the recovery point before this one, the
	// one PointMetaChanged counts from (absent on a blob's first point).
	PointMetaPrev = "vhdsync_prev"
	// PointMetaChanged records the disk ranges written to the blob between
	// the point PointMetaPrev and this one (Changes.Encode), or is
	// ChangesIncomplete when that is not known for certain. Points taken
	// by an older vhdsync have none. An incremental restore (download
	// --since) rewrites exactly the union of these records; see
	// docs/DESIGN.md, "Incremental restore".
	PointMetaChanged = "vhdsync_changed"
)

// ChangesIncomplete is the PointMetaChanged value of a point whose record
// may miss a range (the daemon restarted after the blob moved past the
// previous point): no incremental restore goes through it.
const ChangesIncomplete = "incomplete"

// Snapshotter is the part of a page blob that recovery points need.
// azure/pageblob.Client implements it.
type Snapshotter interface {
	// CreateSnapshot snapshots the blob with exactly these metadata and
	// returns the snapshot's id.
	CreateSnapshot(ctx context.Context, metadata map[string]string) (string, error)
	// ListSnapshots lists the blob's snapshots, oldest first.
	ListSnapshots(ctx context.Context) ([]remote.Snapshot, error)
	// DeleteSnapshot deletes one snapshot; leaseID is the base blob's
	// lease, sent only if the service asks for it ("" for none).
	DeleteSnapshot(ctx context.Context, id, leaseID string) error
}

// Point is a recovery point: a snapshot vhdsync took of the blob at an
// epoch boundary.
type Point struct {
	// ID is the snapshot id (its timestamp), what download --point takes.
	ID string `json:"id"`
	// Epoch is the epoch the point holds (metadata vhdsync_epoch).
	Epoch uint64 `json:"epoch"`
	// Time is when vhdsync took it (metadata vhdsync_time).
	Time time.Time `json:"time"`
	// Sequence is the blob sequence number the snapshot itself carries.
	Sequence int64 `json:"sequence"`
	// Consistent is true when Sequence is 2*Epoch: the snapshot was taken
	// with the batch that completed epoch Epoch fully applied and nothing
	// of a later one, so it is exactly the disk at that epoch's barrier.
	Consistent bool `json:"consistent"`
	// Prev is the point before this one that Changes counts from ("" for
	// none known).
	Prev string `json:"prev,omitempty"`
	// Record says whether the point records what changed since Prev, so
	// whether download --since can go through it: "recorded",
	// "incomplete", "none" (taken by an older vhdsync) or "damaged".
	Record string `json:"record"`
	// Changes is what was written between Prev and this point; nil when
	// not recorded (ChangesNote says why).
	Changes *Changes `json:"-"`
	// ChangesNote says why Changes is nil: "incomplete", "not recorded
	// (taken by an older vhdsync)" or the record's decoding error.
	ChangesNote string `json:"-"`
}

// PointFromSnapshot reads a snapshot as a recovery point; ok is false for
// a snapshot vhdsync did not take.
func PointFromSnapshot(s remote.Snapshot) (p Point, ok bool) {
	es, ts := s.Metadata[PointMetaEpoch], s.Metadata[PointMetaTime]
	if es == "" || ts == "" {
		return Point{}, false
	}
	e, err := strconv.ParseUint(es, 10, 63)
	if err != nil {
		return Point{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return Point{}, false
	}
	p = Point{ID: s.ID, Epoch: e, Time: t, Sequence: s.SequenceNumber, Consistent: remote.Sequence(s.SequenceNumber).IsComplete(e), Prev: s.Metadata[PointMetaPrev]}
	switch ch, has := s.Metadata[PointMetaChanged]; {
	case !has:
		p.Record, p.ChangesNote = "none", "not recorded (taken by an older vhdsync)"
	case ch == ChangesIncomplete:
		p.Record, p.ChangesNote = "incomplete", "incomplete (the first point, or the daemon restarted after the blob had moved past the point before)"
	default:
		p.Record = "recorded"
		if p.Changes, err = DecodeChanges(ch); err != nil {
			p.Record, p.ChangesNote = "damaged", err.Error()
		}
	}
	return p, true
}

// ListPoints lists the blob's recovery points, oldest first, and counts
// its other (foreign) snapshots.
func ListPoints(ctx context.Context, s Snapshotter) (points []Point, foreign int, err error) {
	snaps, err := s.ListSnapshots(ctx)
	if err != nil {
		return nil, 0, err
	}
	for _, sn := range snaps {
		if p, ok := PointFromSnapshot(sn); ok {
			points = append(points, p)
		} else {
			foreign++
		}
	}
	return points, foreign, nil
}

// RecoveryPointsOptions configure RecoveryPoints.
type RecoveryPointsOptions struct {
	// Interval is the least time between two points (required, > 0).
	Interval time.Duration
	// Keep is how many points to keep (required, >= 1): after each new
	// point, the oldest points beyond Keep are deleted.
	Keep int
	// LeaseID is the base blob's lease, sent with a delete only if the
	// service asks for it (Azure and Azurite do not).
	LeaseID string
	// Timeout bounds the requests of one AfterBatch call (default 1 min),
	// since the caller's next batch waits for them.
	Timeout time.Duration
	// Logger receives a line per point taken, deleted or failed.
	Logger *slog.Logger
	// Now is the clock (tests); nil means time.Now.
	Now func() time.Time
	// Carried is the record of changes the process before this one
	// handed over when it stopped (Carry), or nil.
	Carried *Carried
}

// Carried is the record of the ranges sent since the point Prev, handed
// from a stopping process to the next one (a mount keeps it in its state
// directory), so that a restart does not break the chain of records.
// The next process trusts it only if the blob is still where this
// process left it: the same newest point, and the sequence number
// Sequence when its first batch begins (see docs/DESIGN.md).
type Carried struct {
	Prev     string `json:"prev"`
	Sequence int64  `json:"sequence"`
	Changes  string `json:"changes"` // Changes.Encode
}

// RecoveryPointStats are RecoveryPoints' counters, for status.
type RecoveryPointStats struct {
	Interval time.Duration
	Keep     int
	// Count is the number of recovery points the blob held at the last
	// listing (after retention).
	Count int
	// Taken, Deleted and Failures count points created, points deleted by
	// retention, and failed attempts (snapshot, listing or delete).
	Taken, Deleted, Failures uint64
	// LastID, LastEpoch and LastTime describe the newest point taken (or,
	// before one is taken, the newest found on the blob).
	LastID    string
	LastEpoch uint64
	LastTime  time.Time
	// LastError is the last failure's text ("" once a point succeeds
	// again) and LastErrorTime when it happened.
	LastError     string
	LastErrorTime time.Time
}

// RecoveryPoints takes a blob snapshot at the first epoch boundary after
// each interval and keeps the newest Keep of them. It is driven by
// AfterBatch, which the flusher calls each time it completes a batch (and
// the staged-transfer apply worker each time it applies a segment).
type RecoveryPoints struct {
	s   Snapshotter
	o   RecoveryPointsOptions
	log *slog.Logger

	run      sync.Mutex // serialises AfterBatch; guards the fields up to st
	anchored bool       // the blob's existing points were looked at
	due      bool       // take a point at the next boundary (a failure, or none yet)
	last     time.Time  // when the newest point was taken
	// taken and takenEpoch: the epoch of the newest point this process took.
	taken      bool
	takenEpoch uint64
	// prev is the newest point (the next one's PointMetaPrev), and
	// complete says that changes holds every range sent since it.
	prev     string
	complete bool

	chMu     sync.Mutex      // guards the fields below: Sending runs on the sender's goroutine
	started  bool            // Sending was called: startSeq is known
	startSeq remote.Sequence // the blob's sequence number before this process's first batch
	changes  *Changes        // the ranges sent since prev (or since this process began)
	// lastDone is the sequence number the last batch completes at;
	// gap says a batch began at another even number since the newest
	// point: something else wrote the blob (a resize), so the record may
	// miss what it changed.
	lastDone remote.Sequence
	gap      bool

	mu sync.Mutex // guards st only: Stats never waits for a request
	st RecoveryPointStats
}

// NewRecoveryPoints validates o and returns a RecoveryPoints for the blob
// s. It sends no request.
func NewRecoveryPoints(s Snapshotter, o RecoveryPointsOptions) (*RecoveryPoints, error) {
	if o.Interval <= 0 {
		return nil, fmt.Errorf("recovery points: interval %v: must be positive", o.Interval)
	}
	if o.Keep < 1 {
		return nil, fmt.Errorf("recovery points: keep %d: must be at least 1", o.Keep)
	}
	if o.Timeout <= 0 {
		o.Timeout = time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &RecoveryPoints{s: s, o: o, log: o.Logger, changes: NewChanges(), st: RecoveryPointStats{Interval: o.Interval, Keep: o.Keep}}, nil
}

// Sending records the ranges of a batch of epochs up to last about to be
// sent to the blob, whose sequence number is seq as the batch begins. The sender calls it
// (replicate.SenderOptions.OnSend) before any request of the batch, so the
// next point's PointMetaChanged never misses a range that reached the
// blob, even one whose answer was lost.
func (p *RecoveryPoints) Sending(seq remote.Sequence, last uint64, rs []Range) {
	p.chMu.Lock()
	defer p.chMu.Unlock()
	if !p.started {
		p.started, p.startSeq = true, seq
	}
	// A batch begins where the last one completed, or at an odd mark of
	// this process's own (a preempted batch's superset). Any other even
	// number means the blob was changed by something that does not send
	// through this hook (a resize sets the size and footer itself).
	if p.lastDone != 0 && !seq.InProgress() && seq != p.lastDone {
		p.gap = true
		p.log.Info("recovery points: the blob moved between two batches without them (a resize?); the next point's record of changed ranges is incomplete",
			"expected_sequence", int64(p.lastDone), "sequence", int64(seq))
	}
	p.lastDone = remote.Complete(last)
	p.changes.Add(rs...)
}

// Carry returns the record of what was sent since the newest point, for
// the next process (RecoveryPointsOptions.Carried), with the blob's
// sequence number seq as this process leaves it; ok is false when there
// is no complete record to hand over. Call it once nothing is sent any
// more (after the flusher stopped).
func (p *RecoveryPoints) Carry(seq remote.Sequence) (c Carried, ok bool) {
	p.run.Lock()
	defer p.run.Unlock()
	_, started := p.startedAt()
	switch {
	case !p.anchored && !started && p.o.Carried != nil:
		// Nothing sent: the blob is where the process before left it.
		return *p.o.Carried, true
	case !p.anchored || !p.complete || p.prev == "":
		return c, false
	}
	p.chMu.Lock()
	defer p.chMu.Unlock()
	if p.gap {
		return c, false
	}
	return Carried{Prev: p.prev, Sequence: int64(seq), Changes: p.changes.Encode()}, true
}

// takeChanges returns the ranges recorded so far and starts a new record;
// putBack undoes it when the point they were for was not kept.
func (p *RecoveryPoints) takeChanges() (ch *Changes, gap bool) {
	p.chMu.Lock()
	defer p.chMu.Unlock()
	ch, gap = p.changes, p.gap
	p.changes, p.gap = NewChanges(), false
	return ch, gap
}

// putBack returns ranges taken for a point that failed to the record
// (and the gap they had).
func (p *RecoveryPoints) putBack(ch *Changes, gap bool) {
	p.chMu.Lock()
	defer p.chMu.Unlock()
	p.changes.Union(ch)
	p.gap = p.gap || gap
}

// startedAt is the blob's sequence number before this process's first
// batch (ok false before one).
func (p *RecoveryPoints) startedAt() (remote.Sequence, bool) {
	p.chMu.Lock()
	defer p.chMu.Unlock()
	return p.startSeq, p.started
}

// update changes the counters under their lock.
func (p *RecoveryPoints) update(f func(*RecoveryPointStats)) {
	p.mu.Lock()
	f(&p.st)
	p.mu.Unlock()
}

// Stats returns the counters; it never waits for a request in flight.
func (p *RecoveryPoints) Stats() RecoveryPointStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.st
}

// AfterBatch is called right after the blob reached an epoch boundary:
// every write up to the barrier that closed epoch epoch is on it, nothing
// later, and its sequence number is the even 2*epoch. The caller must not
// write to the blob until AfterBatch returns (the flusher calls it inside
// sendBatch, before the next batch starts), so a snapshot taken here is
// exactly the disk at that barrier.
//
// A point is taken when the interval has passed since the last one (or
// none exists, or the previous attempt failed), then points beyond Keep
// are deleted, oldest first. Failures never reach the caller: replication
// goes on; they are counted, logged, kept in Stats, and the point is
// attempted again at the next boundary.
func (p *RecoveryPoints) AfterBatch(ctx context.Context, epoch uint64) {
	p.run.Lock()
	defer p.run.Unlock()
	ctx, cancel := context.WithTimeout(ctx, p.o.Timeout)
	defer cancel()
	if !p.anchored {
		p.anchor(ctx)
	}
	now := p.o.Now()
	if !p.due && now.Sub(p.last) < p.o.Interval {
		return
	}
	if p.taken && epoch <= p.takenEpoch {
		// The blob has not moved on since this process's newest point.
		return
	}
	meta := map[string]string{
		PointMetaEpoch: strconv.FormatUint(epoch, 10),
		PointMetaTime:  now.UTC().Format(time.RFC3339Nano),
	}
	// The ranges sent since the newest point go into this one's metadata,
	// in the same request that takes it: there is no moment when the
	// point exists without its record.
	ch, gap := p.takeChanges()
	meta[PointMetaChanged] = ChangesIncomplete
	if p.prev != "" {
		meta[PointMetaPrev] = p.prev
		if p.complete && !gap {
			meta[PointMetaChanged] = ch.Encode()
		}
	}
	id, err := p.s.CreateSnapshot(ctx, meta)
	if err != nil {
		// The snapshot may exist anyway (its answer lost): the next point
		// names the same prev and records these ranges too, so a restore
		// through it is still exact.
		p.putBack(ch, gap)
		p.fail(ctx, fmt.Errorf("take recovery point of epoch %d: %w", epoch, err))
		return
	}
	p.due = false
	p.last = now
	p.taken, p.takenEpoch = true, epoch
	p.log.Info("recovery point taken", "point", id, "epoch", epoch, "sequence", remote.Complete(epoch))
	p.update(func(st *RecoveryPointStats) { st.LastError, st.LastErrorTime = "", time.Time{} })
	kept := p.retain(ctx, id, epoch)
	if kept {
		p.prev, p.complete = id, true
	} else {
		p.putBack(ch, gap)
	}
	// Taken last, so that whoever waits for it sees this point's
	// retention (Count, Deleted) done too.
	p.update(func(st *RecoveryPointStats) {
		st.Taken++
		if kept {
			st.LastID, st.LastEpoch, st.LastTime = id, epoch, now
		}
	})
}

// Final takes a point of the blob as it is at epoch, whatever the
// interval, unless the newest point already is that epoch: an unmount
// calls it once the journal is drained, so that the blob's state when
// this writer lets go of it is a point. Another writer that takes the blob
// over then records its changes from that point, and this state directory
// can later catch up with them by diff (`vhdsync resync`). The caller must
// not write to the blob meanwhile, as for AfterBatch.
func (p *RecoveryPoints) Final(ctx context.Context, epoch uint64) {
	p.run.Lock()
	if !p.anchored {
		actx, cancel := context.WithTimeout(ctx, p.o.Timeout)
		p.anchor(actx)
		cancel()
	}
	if st := p.Stats(); st.LastID != "" && st.LastEpoch == epoch {
		p.run.Unlock()
		return
	}
	p.due = true
	p.run.Unlock()
	p.AfterBatch(ctx, epoch)
}

// anchor reads the points the blob already has, so that a restart does
// not take a point before the interval since the newest one has passed.
// Without any (or if the listing fails) the next boundary takes one.
func (p *RecoveryPoints) anchor(ctx context.Context) {
	p.anchored = true // once: a listing that fails now will fail at retention too
	points, _, err := ListPoints(ctx, p.s)
	if err != nil {
		p.fail(ctx, fmt.Errorf("list recovery points: %w", err))
		return
	}
	if len(points) == 0 {
		p.due = true
		return
	}
	newest := points[len(points)-1]
	p.last = newest.Time
	// The ranges recorded since this process began are all that changed
	// since the newest point only if the blob was exactly that point when
	// the first batch began: its sequence number 2·epoch. A higher one
	// means batches completed after the point (by a process whose record
	// is lost, or by one that kept none); an odd one may hide such a
	// batch. An unfinished batch below that mark is not lost: its records
	// are still in the journal (or its segment still staged), and are
	// sent again, through Sending, before anything else. See
	// docs/DESIGN.md, "Incremental restore".
	p.prev = newest.ID
	start, ok := p.startedAt()
	p.complete = ok && newest.Consistent && start == remote.Complete(newest.Epoch)
	// The same holds from where the process before left the blob, with
	// the record it carried over: what it sent since the newest point.
	if c := p.o.Carried; ok && newest.Consistent && c != nil && c.Prev == newest.ID && start == remote.Sequence(c.Sequence) {
		if ch, err := DecodeChanges(c.Changes); err == nil {
			p.putBack(ch, false)
			p.complete = true
		}
	}
	if !p.complete {
		p.log.Info("recovery points: the next point's record of changed ranges is incomplete (the blob moved past the newest point before this process began); an incremental restore to it downloads in full",
			"newest_point", newest.ID, "epoch", newest.Epoch, "blob_sequence_at_start", int64(start))
	}
	p.update(func(st *RecoveryPointStats) {
		st.Count = len(points)
		st.LastID, st.LastEpoch, st.LastTime = newest.ID, newest.Epoch, newest.Time
	})
}

// retain checks the new point id of epoch in a fresh listing and deletes
// the oldest points beyond Keep. Only vhdsync's points are counted and
// deleted. kept is false when the new point proved inconsistent (and was
// deleted).
func (p *RecoveryPoints) retain(ctx context.Context, id string, epoch uint64) (kept bool) {
	points, _, err := ListPoints(ctx, p.s)
	if err != nil {
		p.fail(ctx, fmt.Errorf("list recovery points for retention: %w", err))
		return true
	}
	kept = true
	for i, pt := range points {
		if pt.ID != id {
			continue
		}
		if !pt.Consistent {
			// Someone else wrote to the blob: never keep a point that
			// claims an epoch it does not hold.
			err := fmt.Errorf("recovery point %s of epoch %d carries sequence number %d, not %d: the blob changed while it was taken; deleted it", id, epoch, pt.Sequence, remote.Complete(epoch))
			if derr := p.s.DeleteSnapshot(ctx, id, p.o.LeaseID); derr != nil {
				err = fmt.Errorf("%w (and deleting it failed: %w)", err, derr)
			} else {
				points = append(points[:i:i], points[i+1:]...)
			}
			kept = false
			p.fail(ctx, err)
		}
		break
	}
	var errs []error
	for len(points) > p.o.Keep {
		old := points[0]
		if err := p.s.DeleteSnapshot(ctx, old.ID, p.o.LeaseID); err != nil {
			errs = append(errs, fmt.Errorf("delete recovery point %s (epoch %d): %w", old.ID, old.Epoch, err))
			break
		}
		p.update(func(st *RecoveryPointStats) { st.Deleted++ })
		p.log.Info("recovery point deleted (retention)", "point", old.ID, "epoch", old.Epoch, "keep", p.o.Keep)
		points = points[1:]
	}
	p.update(func(st *RecoveryPointStats) { st.Count = len(points) })
	if err := errors.Join(errs...); err != nil {
		p.failRetention(ctx, err)
	}
	return kept
}

// fail records a failed point attempt: the next boundary tries again.
func (p *RecoveryPoints) fail(ctx context.Context, err error) {
	p.due = true
	p.failRetention(ctx, err)
}

// failRetention records a failure that does not need a new point (a
// delete that failed is retried after the next point).
func (p *RecoveryPoints) failRetention(ctx context.Context, err error) {
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		// Stopping (unmount): not a failure of the remote.
		p.log.Debug("recovery points: stopped", "err", err)
		return
	}
	msg, _, _ := strings.Cut(err.Error(), "\n")
	p.update(func(st *RecoveryPointStats) {
		st.Failures++
		st.LastError, st.LastErrorTime = msg, p.o.Now()
	})
	p.log.Warn("recovery point failed; replication goes on, retrying at the next epoch boundary", "err", msg)
}
