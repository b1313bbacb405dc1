// Package crashcheck is a test-only crash-state checker.
//
// A Recorder sits between the FUSE files and the disk (it implements the
// fusefs.Disk interface around the real writeback.Disk) and logs every
// write, zero range, discard and fsync that reaches the disk, with its
// payload and two ticks of one logical clock: when the operation arrived
// and when it was answered. It knows nothing of the journal, the epochs or
// the flusher.
//
// After the workload, Stream turns the log into, for every 512-byte sector,
// the list of values it was given. Stream.Check then judges a copy of the
// remote blob (invariant 3): the copy is legal if there is one fsync k
// such that every sector holds either its value as of the moment fsync k
// started (every write acknowledged before it) or a value written after
// that, by a write that started before the next fsync returned. Stream
// also rebuilds the disk image as of the start of any fsync, for e2fsck.
package crashcheck

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vhdsync/vhdsync/fusefs"
)

// SectorSize is the unit the checker models (and vhdsync replicates).
const SectorSize = 512

// Disk is what the recorder forwards to: what the FUSE files are views of
// (*writeback.Disk implements it).
type Disk = fusefs.Disk

// Barrier is one fsync as the recorder saw it: the tick at which it
// reached the disk and the tick at which it returned.
type Barrier struct{ Start, Done uint64 }

// op is one acknowledged write (data == nil: a zero range or a discard,
// already narrowed to the sectors it zeroes).
type op struct {
	start, ack uint64
	off, n     int64
	data       []byte
}

// Recorder logs the operations that reach a Disk and forwards them. All
// methods are safe for concurrent use.
type Recorder struct {
	d     Disk
	clock atomic.Uint64
	mu    sync.Mutex
	ops   []op
	syncs []Barrier
	errs  []error
	bytes int64
}

// firstTick is the clock's first value: tick 0 is the initial state's
// write and tick 1 the start of the virtual barrier 0 (the state before
// any fsync).
const firstTick = 2

// NewRecorder returns a recorder in front of d, whose content must be all
// zeros (a new disk).
func NewRecorder(d Disk) *Recorder {
	r := &Recorder{d: d}
	r.clock.Store(firstTick)
	return r
}

var _ Disk = (*Recorder)(nil)

// Now returns a new tick of the recorder's clock: everything recorded
// before this call has a smaller tick, everything after a larger one.
func (r *Recorder) Now() uint64 { return r.clock.Add(1) }

// Size is the disk's size.
func (r *Recorder) Size() int64 { return r.d.Size() }

// ReadAt reads the disk (not recorded).
func (r *Recorder) ReadAt(p []byte, off int64) (int, error) { return r.d.ReadAt(p, off) }

func (r *Recorder) fail(err error) {
	r.mu.Lock()
	r.errs = append(r.errs, err)
	r.mu.Unlock()
}

// WriteAt forwards a write and records it when acknowledged. The checker
// models whole sectors: an unaligned write is forwarded but recorded as an
// error (Err), since its effect on the sectors at its edges depends on
// their content at the time.
func (r *Recorder) WriteAt(ctx context.Context, p []byte, off int64) error {
	start := r.Now()
	err := r.d.WriteAt(ctx, p, off)
	ack := r.Now()
	if err != nil {
		r.fail(fmt.Errorf("write %d+%d failed: %w", off, len(p), err))
		return err
	}
	if off%SectorSize != 0 || len(p)%SectorSize != 0 {
		r.fail(fmt.Errorf("write %d+%d is not sector-aligned: the checker cannot model it", off, len(p)))
		return nil
	}
	data := append([]byte(nil), p...) // the caller reuses p once we return
	r.mu.Lock()
	r.ops = append(r.ops, op{start: start, ack: ack, off: off, n: int64(len(p)), data: data})
	r.bytes += int64(len(p))
	r.mu.Unlock()
	return nil
}

// Zero forwards a zero range or discard and records the sectors it zeroes:
// a discard zeroes the whole sectors inside the range (its partial edges
// are left alone, as writeback.Disk does); a zero range must be aligned.
func (r *Recorder) Zero(ctx context.Context, off, n int64, discard bool) error {
	start := r.Now()
	err := r.d.Zero(ctx, off, n, discard)
	ack := r.Now()
	if err != nil {
		r.fail(fmt.Errorf("zero %d+%d (discard %v) failed: %w", off, n, discard, err))
		return err
	}
	aoff := (off + SectorSize - 1) &^ (SectorSize - 1)
	aend := (off + n) &^ (SectorSize - 1)
	if !discard && (aoff != off || aend != off+n) {
		r.fail(fmt.Errorf("zero range %d+%d is not sector-aligned: the checker cannot model it", off, n))
		return nil
	}
	if aend <= aoff {
		return nil
	}
	r.mu.Lock()
	r.ops = append(r.ops, op{start: start, ack: ack, off: aoff, n: aend - aoff})
	r.mu.Unlock()
	return nil
}

// Flush forwards an fsync (the barrier) and records when it started and
// returned.
func (r *Recorder) Flush() error {
	start := r.Now()
	err := r.d.Flush()
	done := r.Now()
	if err != nil {
		r.fail(fmt.Errorf("fsync failed: %w", err))
		return err
	}
	r.mu.Lock()
	r.syncs = append(r.syncs, Barrier{Start: start, Done: done})
	r.mu.Unlock()
	return nil
}

// Err returns what the recorder could not record faithfully: failed
// operations (the workload must not see any) and unaligned ones.
func (r *Recorder) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.errs) > 10 {
		return fmt.Errorf("%w (and %d more)", errors.Join(r.errs[:10]...), len(r.errs)-10)
	}
	return errors.Join(r.errs...)
}

// Counts returns how many writes (data, and zero ranges or discards),
// data bytes and fsyncs have been recorded.
func (r *Recorder) Counts() (writes, zeros int, dataBytes int64, fsyncs int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, o := range r.ops {
		if o.data == nil {
			zeros++
		} else {
			writes++
		}
	}
	return writes, zeros, r.bytes, len(r.syncs)
}
