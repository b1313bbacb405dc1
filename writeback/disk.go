package writeback

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"
)

// DiskOptions configure Open.
type DiskOptions struct {
	// ImagePath is the local image (virtual size bytes, sparse).
	ImagePath string
	// JournalDir is the badger directory.
	JournalDir string
	// VirtualSize is the disk's size in bytes.
	VirtualSize int64
	// Remote is the page blob.
	Remote Remote
	// LeaseID is the lease id remembered from an earlier run ("" for a new
	// one); SaveLeaseID is called when the id held differs from it.
	LeaseID     string
	SaveLeaseID func(string) error
	// BreakLease breaks another holder's lease instead of failing.
	BreakLease bool
	// Staging selects the staged transfer: batches go to this segment
	// store as compressed segments, and an apply worker (which holds the
	// blob's lease) writes the blob. Remote is then only read (its
	// sequence number). DiskID names the disk in every segment.
	Staging SegmentStore
	DiskID  string
	// WriteOnce keeps data payloads in the local image only (see
	// imageref.go) instead of writing them to a journal segment too.
	// Experimental, off by default: sequential writes go 1.4x faster, but
	// a write over data the blob does not hold yet copies the sectors it
	// overwrites first (random 4 KiB over pending sequential data with the
	// remote detached: 10.8-14.6 k IOPS against 26.8-29.1 k).
	WriteOnce bool
	Journal   JournalOptions
	Flusher   FlusherOptions
	Logger    *slog.Logger
}

// Disk is one virtual disk: the local image, the journal in front of it,
// and the flusher behind it. All methods are safe for concurrent use.
type Disk struct {
	o       DiskOptions
	img     *os.File
	j       *Journal
	f       *Flusher
	locks   *rangeLock
	lease   string
	log     *slog.Logger
	cancel  context.CancelFunc
	runDone chan struct{}
	runErr  error
	closeMu sync.Mutex
	closed  bool
	replay  ReplayStats
	alloc   imageAlloc
}

// ReplayStats says what Open found in the journal.
type ReplayStats struct {
	Records        int   // records re-applied to the image
	Bytes          int64 // their data bytes
	AlreadyRemote  int   // records the blob already held (dropped)
	RemoteSequence int64
}

// ErrStagingAhead: the staging store holds segments this state directory
// did not write and the blob does not hold yet.
var ErrStagingAhead = errors.New("the staging container is ahead of this state directory")

// ErrOutOfRange is returned for I/O beyond the disk's end.
var ErrOutOfRange = errors.New("beyond the end of the disk")

// Open opens the disk for writing: journal, lease, replay, flusher.
func Open(ctx context.Context, o DiskOptions) (*Disk, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o.Flusher.Logger = log
	o.Journal.Logger = log
	img, err := os.OpenFile(o.ImagePath, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open local image: %w", err)
	}
	st, err := img.Stat()
	if err != nil || st.Size() != o.VirtualSize {
		img.Close()
		return nil, fmt.Errorf("local image %s: size %d, want %d (%v)", o.ImagePath, st.Size(), o.VirtualSize, err)
	}
	d := &Disk{o: o, img: img, locks: newRangeLock(), log: log}
	d.alloc.init(o.VirtualSize)
	ok := false
	defer func() {
		if !ok {
			d.abort()
		}
	}()
	if d.j, err = OpenJournal(o.JournalDir, o.Journal); err != nil {
		return nil, err
	}
	d.j.AttachImage(img)
	if o.Staging == nil {
		if err := d.acquireLease(ctx); err != nil {
			return nil, err
		}
	}
	seq, err := o.Remote.Sequence(ctx)
	if err != nil {
		return nil, fmt.Errorf("read the blob's sequence number: %w", err)
	}
	if err := d.replayJournal(seq, o.Staging != nil); err != nil {
		return nil, err
	}
	// New epochs must be above anything the blob has seen.
	above := uint64(seq+1) / 2
	if o.Staging != nil {
		staged, err := MaxStagedEpoch(ctx, o.Staging)
		if err != nil {
			return nil, err
		}
		// Segments this journal did not write (its records of those
		// epochs would still be here, as they are deleted only once
		// stored): another state directory staged them, and they wait to
		// be applied. Segments from here would race them.
		if staged > d.j.ClosedEpoch() && staged > d.j.DrainedEpoch() && staged > uint64(seq/2) {
			return nil, fmt.Errorf("%w: the staging store holds segments up to epoch %d, beyond anything this state directory wrote (epoch %d) or the blob holds (epoch %d); apply them first (`vhdsync apply --once`), or mount the state directory that staged them", ErrStagingAhead, staged, max(d.j.ClosedEpoch(), d.j.DrainedEpoch()), seq/2)
		}
		// New epochs above every staged segment keep names unique; the
		// chain starts at the last epoch this journal deleted.
		above = max(above, staged)
		o.Flusher.Staging, o.Flusher.DiskID = o.Staging, o.DiskID
		o.Flusher.StagedEpoch = d.j.DrainedEpoch()
	}
	d.j.RaiseEpoch(above + 1)
	o.Flusher.SyncImage = func() error { return datasync(d.img) }
	d.f = NewFlusher(d.j, o.Remote, d.lease, seq, o.Flusher)
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d.cancel = cancel
	d.runDone = make(chan struct{})
	go func() {
		defer close(d.runDone)
		d.runErr = d.f.Run(runCtx)
	}()
	ok = true
	return d, nil
}

func (d *Disk) abort() {
	if d.j != nil {
		d.j.Close()
	}
	d.img.Close()
}

func (d *Disk) acquireLease(ctx context.Context) error {
	id := d.o.LeaseID
	if id == "" {
		id = uuid.NewString()
	}
	held, err := d.o.Remote.AcquireLease(ctx, id)
	if err != nil && d.o.BreakLease {
		d.log.Warn("breaking the blob's lease (--break-lease)")
		if berr := d.o.Remote.BreakLease(ctx); berr != nil {
			return fmt.Errorf("break lease: %w", berr)
		}
		held, err = d.o.Remote.AcquireLease(ctx, id)
	}
	if err != nil {
		return err
	}
	d.lease = held
	if held != d.o.LeaseID && d.o.SaveLeaseID != nil {
		if err := d.o.SaveLeaseID(held); err != nil {
			return fmt.Errorf("remember lease id: %w", err)
		}
	}
	return nil
}

// replayJournal re-applies the journal to the image (it may have lost
// unsynced writes in a power loss), makes the image durable, then drops the
// records the blob already holds completely: with an even sequence number
// 2e, every record of an epoch <= e. With an odd one a batch was cut short
// and nothing is dropped: the flusher sends that batch again. With the
// staged transfer (keepAll) nothing is dropped either: the blob's progress
// is the worker's and the records go through the staging container again.
func (d *Disk) replayJournal(seq int64, keepAll bool) error {
	d.replay.RemoteSequence = seq
	remoteEpoch := RemoteEpochFromSequence(seq)
	var recs, onRemote []Record
	err := d.j.scan(0, func(r Record) (bool, error) {
		recs = append(recs, r)
		if !keepAll && seq%2 == 0 && r.Epoch <= remoteEpoch {
			onRemote = append(onRemote, r)
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("replay journal: %w", err)
	}
	if len(recs) == 0 {
		return nil
	}
	d.replay.Records = len(recs)
	if d.replay.Bytes, err = d.reapply(recs); err != nil {
		return fmt.Errorf("replay journal: %w", err)
	}
	if err := d.img.Sync(); err != nil {
		return fmt.Errorf("replay journal: sync image: %w", err)
	}
	d.replay.AlreadyRemote = len(onRemote)
	if err := d.j.Delete(onRemote, remoteEpoch); err != nil {
		return fmt.Errorf("replay journal: %w", err)
	}
	d.log.Info("journal replayed", "records", d.replay.Records, "bytes", d.replay.Bytes, "already_on_blob", len(onRemote), "blob_sequence", seq)
	return nil
}

// reapply writes the journal's last word on every sector to the image and
// returns the data bytes it wrote. Records are coalesced first (the last
// record wins per sector) rather than re-applied one by one in seq order:
// the payload of an image-backed record is the image itself, so a zero
// record re-applied under it would destroy the only copy. Image-backed
// winners are left alone, zero winners punched again, and segment winners
// (older journals, or records captured before a later epoch overwrote
// part of them) written again: a captured record wins only on sectors
// nothing wrote since the capture, where the image holds the same bytes.
func (d *Disk) reapply(recs []Record) (int64, error) {
	var c coalescer
	for i := range recs {
		r := &recs[i]
		c.addExtent(extent{off: r.Offset, end: r.End(), zero: r.Kind != KindData, src: int32(i)})
	}
	c.resolve()
	var bytes int64
	cur, payload := int32(-1), []byte(nil)
	for _, e := range c.ext {
		r := &recs[e.src]
		switch {
		case e.zero:
			if err := punch(d.img, e.off, e.end-e.off); err != nil {
				return bytes, fmt.Errorf("zero local image %d+%d: %w", e.off, e.end-e.off, err)
			}
		case r.seg == 0:
			// Image-backed: the image holds it.
		default:
			if e.src != cur {
				var err error
				if payload, err = d.j.segs.read(r); err != nil {
					return bytes, err
				}
				cur = e.src
			}
			if _, err := d.img.WriteAt(payload[e.off-r.Offset:e.end-r.Offset], e.off); err != nil {
				return bytes, fmt.Errorf("write local image %d+%d: %w", e.off, e.end-e.off, err)
			}
			bytes += e.end - e.off
		}
	}
	return bytes, nil
}

// Replay returns what Open re-applied.
func (d *Disk) Replay() ReplayStats { return d.replay }

// punch makes [off, off+n) of f read as zeros and frees its space.
func punch(f *os.File, off, n int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) {
		err = writeZeros(f, off, n)
	}
	return err
}

// writeZeros writes n zero bytes at off, 1 MiB at a time: a discard of the
// whole disk (mkfs does one) must not allocate a buffer the size of the
// disk.
func writeZeros(f *os.File, off, n int64) error {
	zeros := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := f.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// Size is the virtual size.
func (d *Disk) Size() int64 { return d.o.VirtualSize }

// ReadAt reads the disk: the local image always holds the newest state.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > d.o.VirtualSize {
		return 0, ErrOutOfRange
	}
	if rem := d.o.VirtualSize - off; int64(len(p)) > rem {
		p = p[:rem]
	}
	return d.img.ReadAt(p, off)
}

func (d *Disk) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > d.o.VirtualSize {
		return fmt.Errorf("%w: %d+%d on a %d-byte disk", ErrOutOfRange, off, n, d.o.VirtualSize)
	}
	return nil
}

// WriteAt journals p at off and writes it to the local image; when it
// returns nil the write is acknowledged (invariant 1: it is in badger, and
// a later Flush makes it durable). Unaligned writes are widened to whole
// sectors with the edges read from the image under the range lock. p is
// not retained.
func (d *Disk) WriteAt(ctx context.Context, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	aoff := off &^ (SectorSize - 1)
	aend := (off + int64(len(p)) + SectorSize - 1) &^ (SectorSize - 1)
	h := d.locks.lock(aoff, aend)
	defer d.locks.unlock(h)
	buf := p
	if aoff != off || aend != off+int64(len(p)) {
		buf = make([]byte, aend-aoff)
		if _, err := d.img.ReadAt(buf[:SectorSize], aoff); err != nil {
			return fmt.Errorf("read sector at %d to widen a write: %w", aoff, err)
		}
		if aend-aoff > SectorSize {
			if _, err := d.img.ReadAt(buf[len(buf)-SectorSize:], aend-SectorSize); err != nil {
				return fmt.Errorf("read sector at %d to widen a write: %w", aend-SectorSize, err)
			}
		}
		copy(buf[off-aoff:], p)
	}
	// Allocate the image's blocks first: a write the image cannot take
	// (its filesystem full) must fail before it is journaled. Otherwise
	// the journal sends it to the blob while the image keeps the old data,
	// and the two differ for good.
	if err := d.alloc.ensure(d.img, aoff, aend); err != nil {
		return fmt.Errorf("allocate local image %d+%d: %w", aoff, aend-aoff, err)
	}
	// With WriteOnce the image holds the payload, the journal only the
	// record (see imageref.go).
	rec := Record{Offset: aoff, Length: aend - aoff, Kind: KindData, Data: buf}
	if err := d.j.appendApply(ctx, &rec, d.o.WriteOnce, func() error {
		if _, err := d.img.WriteAt(buf, aoff); err != nil {
			return fmt.Errorf("write local image %d+%d: %w", aoff, len(buf), err)
		}
		return nil
	}); err != nil {
		return err
	}
	d.f.Kick()
	return nil
}

// Zero makes [off, off+n) read as zeros and replicates it as Clear Pages.
// discard marks a discard (fstrim, PUNCH_HOLE), which is advisory: its
// partial sectors at the edges are left alone. A zero range (ZERO_RANGE)
// must be exact: its partial edge sectors are written as zeros.
func (d *Disk) Zero(ctx context.Context, off, n int64, discard bool) error {
	if n == 0 {
		return nil
	}
	if err := d.check(off, n); err != nil {
		return err
	}
	aoff := (off + SectorSize - 1) &^ (SectorSize - 1)
	aend := (off + n) &^ (SectorSize - 1)
	if !discard {
		if aoff > off {
			if err := d.WriteAt(ctx, make([]byte, min(aoff, off+n)-off), off); err != nil {
				return err
			}
		}
		if aend < off+n && aend >= aoff {
			if err := d.WriteAt(ctx, make([]byte, off+n-aend), aend); err != nil {
				return err
			}
		}
	}
	if aend <= aoff {
		return nil
	}
	h := d.locks.lock(aoff, aend)
	defer d.locks.unlock(h)
	kind := KindZero
	if discard {
		kind = KindDiscard
	}
	rec := Record{Offset: aoff, Length: aend - aoff, Kind: kind}
	if err := d.j.appendApply(ctx, &rec, false, func() error {
		if err := d.alloc.punch(d.img, aoff, aend); err != nil {
			return fmt.Errorf("zero local image %d+%d: %w", aoff, aend-aoff, err)
		}
		return nil
	}); err != nil {
		return err
	}
	d.f.Kick()
	return nil
}

// Flush is the barrier (fsync): it closes the epoch and makes every write
// acknowledged before it durable.
func (d *Disk) Flush() error {
	if _, err := d.j.Barrier(); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	d.f.Kick()
	return nil
}

// Drain waits until the blob holds everything written so far.
func (d *Disk) Drain(ctx context.Context) error {
	if err := d.Flush(); err != nil {
		return err
	}
	return d.f.Drain(ctx)
}

// Stats is everything status shows about the write-back path.
type Stats struct {
	Journal JournalStats
	Flusher FlusherStats
	LeaseID string
}

// Stats returns the current counters.
func (d *Disk) Stats() Stats {
	return Stats{Journal: d.j.Stats(), Flusher: d.f.Stats(), LeaseID: d.lease}
}

// FlusherErr returns the error that stopped the flusher, if it stopped.
func (d *Disk) FlusherErr() error {
	select {
	case <-d.runDone:
		return d.runErr
	default:
		return nil
	}
}

// Close stops the flusher and closes the journal and image. With drain,
// it first waits until the blob holds everything (bounded by ctx) and then
// releases the lease; without, or if the drain fails, the lease is kept so
// no other writer can get ahead of the journal's unsent records.
func (d *Disk) Close(ctx context.Context, drain bool) error {
	d.closeMu.Lock()
	defer d.closeMu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	drained := false
	if drain {
		if err := d.Drain(ctx); err != nil {
			errs = append(errs, err)
		} else {
			drained = true
		}
	}
	d.cancel()
	<-d.runDone
	if err := d.j.Close(); err != nil {
		errs = append(errs, err)
	}
	if err := d.img.Sync(); err != nil {
		errs = append(errs, fmt.Errorf("sync local image: %w", err))
	}
	if err := d.img.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close local image: %w", err))
	}
	if drained && d.lease != "" {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		// A few tries: a lost response must not leave the lease held (the
		// same state directory would take it back, but nobody else could).
		var rerr error
		for attempt := 0; attempt < 4; attempt++ {
			if rerr = d.o.Remote.ReleaseLease(rctx, d.lease); rerr == nil || !IsTransient(rerr) {
				break
			}
			select {
			case <-rctx.Done():
			case <-time.After(time.Duration(attempt+1) * 500 * time.Millisecond):
			}
		}
		if rerr != nil {
			errs = append(errs, fmt.Errorf("release lease: %w", rerr))
		}
	}
	return errors.Join(errs...)
}

// allocChunk is the unit in which imageAlloc allocates and remembers.
const allocChunk = 1 << 20

// imageAlloc remembers which 1 MiB chunks of the image are known to be
// allocated, so that a write needs a fallocate only where a chunk was never
// allocated or was punched since (a discard). Allocating before journaling
// makes a full state filesystem fail the write before it is journaled.
// Misses and punches are serialised by mu, so a punch never leaves a chunk
// marked allocated with a hole in it; hits only read the bitmap.
type imageAlloc struct {
	mu    sync.Mutex
	bits  []atomic.Uint64
	size  int64
	unsup atomic.Bool // the filesystem cannot fallocate: nothing to do
}

func (a *imageAlloc) init(size int64) {
	a.size = size
	a.bits = make([]atomic.Uint64, (size/allocChunk+64)/64)
}

func (a *imageAlloc) has(c int64) bool { return a.bits[c/64].Load()&(1<<(c%64)) != 0 }

// ensure allocates [off, end) of f, in whole chunks, unless known done.
func (a *imageAlloc) ensure(f *os.File, off, end int64) error {
	if a.unsup.Load() {
		return nil
	}
	first, last := off/allocChunk, (end-1)/allocChunk
	missing := false
	for c := first; c <= last; c++ {
		if !a.has(c) {
			missing = true
			break
		}
	}
	if !missing {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	start, stop := first*allocChunk, min((last+1)*allocChunk, a.size)
	if err := unix.Fallocate(int(f.Fd()), 0, start, stop-start); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
			a.unsup.Store(true)
			return nil
		}
		return err
	}
	for c := first; c <= last; c++ {
		a.bits[c/64].Or(1 << (c % 64))
	}
	return nil
}

// punch frees [off, end) of f and forgets the chunks it touches.
func (a *imageAlloc) punch(f *os.File, off, end int64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	err := punch(f, off, end-off)
	for c := off / allocChunk; c <= (end-1)/allocChunk; c++ {
		a.bits[c/64].And(^uint64(1 << (c % 64)))
	}
	return err
}
