package writeback

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/staged"
	"github.com/vhdsync/vhdsync/thin"
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
	Remote remote.Remote
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
	Staging staged.SegmentStore
	DiskID  string
	// NoFills keeps Put Pages to pending ranges only: no clean sectors
	// read from the image join them (see fill.go). For comparisons.
	NoFills bool
	// StagedUploads is how many segments upload in parallel (default 2).
	StagedUploads int
	// Sync makes a barrier (Flush) return only once the blob holds every
	// write before it (mount --sync): losing the whole machine then loses
	// nothing a barrier acknowledged. Direct transfer only.
	Sync bool
	// SyncTimeout bounds how long a synchronous barrier waits for the blob
	// (0: for ever). Past it the barrier returns as in write-back mode and
	// the disk is degraded (Degraded) until the blob has caught up.
	SyncTimeout time.Duration
	// Thin, for a thin-attached disk (create --from-blob --thin), records
	// which chunks of the image hold the blob's data; the others are
	// fetched from ThinSource before a read or write touches them, and in
	// the background (Prefetch, unless NoPrefetch). OnThinComplete runs
	// once every chunk is local (the state then stops being thin). Until
	// then Close keeps the blob's lease: the blob is the only copy of the
	// chunks not yet fetched, and no other writer may change them.
	// BaseSequence is the blob's sequence number when the state directory
	// last took the blob as its own (nil: not recorded): a blob beyond it
	// and beyond everything the journal wrote is refused (ErrBlobMoved).
	BaseSequence   *int64
	Thin           *thin.Map
	ThinSource     thin.Source
	Prefetch       thin.PrefetchOptions
	NoPrefetch     bool
	OnThinComplete func() error
	Journal        journal.Options
	Sender         replicate.SenderOptions
	Flusher        replicate.FlusherOptions
	Logger         *slog.Logger
}

// Disk is one virtual disk: the local image, the journal in front of it,
// and the flusher behind it. All methods are safe for concurrent use.
type Disk struct {
	o       DiskOptions
	img     *os.File
	j       *journal.Journal
	f       *replicate.Flusher
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
	runCtx  context.Context
	// Synchronous mode (DiskOptions.Sync): degradedTo is the last epoch
	// a barrier acknowledged without the blob (0: not degraded), under
	// syncMu; syncTimeouts counts those barriers.
	syncMu       sync.Mutex
	degradedTo   uint64
	syncTimeouts atomic.Uint64
	s            *replicate.Sender
	// size is the virtual size now (Resize changes it).
	size atomic.Int64
	// resizing is held for reading by every write, zero range and read of
	// the disk, and for writing by Resize while the disk changes size: the
	// resize is then an ordered step between two epochs (see Resize).
	resizing sync.RWMutex
	// thin is DiskOptions.Thin (nil: every chunk is local); thinDone is
	// closed when its prefetch and completion have ended.
	thin     *thin.Map
	thinDone chan struct{}
	thinErr  atomic.Pointer[error]
}

// ReplayStats says what Open found in the journal.
type ReplayStats struct {
	Records        int   // records re-applied to the image
	Bytes          int64 // their data bytes
	AlreadyRemote  int   // records the blob already held (dropped)
	RemoteSequence int64
	// ImageBacked records (payload in the image only) were captured to
	// the journal's segments; Torn of them had lost (part of) their bytes
	// to a power loss and took what the image held instead; Overwritten
	// of them had later writes bound over them (journal/bind.go) and took
	// the image's newer bytes.
	ImageBacked int
	Torn        int
	Overwritten int
}

// ErrStagingAhead: the staging store holds segments this state directory
// did not write and the blob does not hold yet.
var ErrStagingAhead = errors.New("the staging container is ahead of this state directory")

// ErrOutOfRange is returned for I/O beyond the disk's end.
var ErrOutOfRange = errors.New("beyond the end of the disk")

// ErrSyncStaged: synchronous mode needs the direct transfer.
var ErrSyncStaged = errors.New("synchronous replication (--sync) needs the direct transfer: with --transfer staged the apply worker writes the blob, long after a barrier; mount with --transfer direct, or without --sync")

// ErrThinStaged, ErrThinBreakLease, ErrThinBlobMoved: what a thin disk
// refuses, as the blob is the only copy of the chunks not yet local.
var (
	ErrThinStaged     = errors.New("a thin disk needs the direct transfer: the blob is the only copy of the chunks not yet local, and the staged transfer's worker holds its lease; mount with --transfer direct until `vhdsync status` shows the disk complete")
	ErrThinBreakLease = errors.New("a thin disk cannot break the blob's lease: the blob is the only copy of the chunks not yet local, and another writer may have changed them; find the holder and stop it (its lease then lapses or is released), or make a new state directory (`vhdsync create --from-blob`)")
)

// ErrBlobMoved: the blob holds epochs beyond both the sequence number this
// state directory last took it at (DiskOptions.BaseSequence) and
// everything its journal wrote: another writer wrote it since (after a
// --break-lease, or while this one was unmounted). Mounting would serve
// the image's older data, and the writes that follow would mix two disks
// on the blob.
var ErrBlobMoved = errors.New("the blob was written by another writer since this state directory last wrote it")

// Open opens the disk for writing: journal, lease, replay, flusher.
func Open(ctx context.Context, o DiskOptions) (*Disk, error) {
	if o.Sync && o.Staging != nil {
		return nil, ErrSyncStaged
	}
	if o.Thin != nil && !o.Thin.Complete() {
		switch {
		case o.Staging != nil:
			return nil, ErrThinStaged
		case o.BreakLease:
			return nil, ErrThinBreakLease
		case o.ThinSource == nil:
			return nil, errors.New("thin disk: no blob to fetch from")
		}
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o.Flusher.Logger = log
	o.Sender.Logger = log
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
	d := &Disk{o: o, img: img, locks: newRangeLock(), log: log, thin: o.Thin}
	d.size.Store(o.VirtualSize)
	d.alloc.init(o.VirtualSize)
	ok := false
	defer func() {
		if !ok {
			d.abort()
		}
	}()
	if d.j, err = journal.Open(o.JournalDir, o.Journal); err != nil {
		return nil, err
	}
	d.j.AttachImage(img)
	if o.Staging == nil {
		if err := d.acquireLease(ctx); err != nil {
			return nil, err
		}
	}
	n, err := o.Remote.Sequence(ctx)
	seq := remote.Sequence(n)
	if err != nil {
		return nil, fmt.Errorf("read the blob's sequence number: %w", err)
	}
	if err := d.replayJournal(seq, o.Staging != nil); err != nil {
		return nil, err
	}
	if err := d.checkBlobNotMoved(seq); err != nil {
		// This state directory will not write the blob: the lease just
		// taken goes back, so that the resync (or the other writer) can
		// go on.
		if d.lease != "" {
			if rerr := o.Remote.ReleaseLease(ctx, d.lease); rerr != nil {
				err = errors.Join(err, fmt.Errorf("release the lease: %w", rerr))
			}
		}
		return nil, err
	}
	// New epochs must be above anything the blob has seen.
	above := seq.Target()
	var sink *staged.Sink
	sender := replicate.NewSender(o.Remote, d.lease, seq, o.Sender)
	d.s = sender
	if o.Staging != nil {
		top, err := staged.MaxStagedEpoch(ctx, o.Staging)
		if err != nil {
			return nil, err
		}
		// Segments this journal did not write (its records of those
		// epochs would still be here, as they are deleted only once
		// stored): another state directory staged them, and they wait to
		// be applied. Segments from here would race them.
		if top > d.j.ClosedEpoch() && top > d.j.DrainedEpoch() && top > seq.Epoch() {
			return nil, fmt.Errorf("%w: the staging store holds segments up to epoch %d, beyond anything this state directory wrote (epoch %d) or the blob holds (epoch %d); apply them first (`vhdsync apply --once`), or mount the state directory that staged them", ErrStagingAhead, top, max(d.j.ClosedEpoch(), d.j.DrainedEpoch()), seq.Epoch())
		}
		// New epochs above every staged segment keep names unique; the
		// chain starts at the last epoch this journal deleted.
		above = max(above, top)
		sink = staging(sender, o, d.j.DrainedEpoch())
		o.Flusher.Sink = sink
	}
	d.j.RaiseEpoch(above + 1)
	// The image is synced only with every record applied to it durable
	// (see Journal.SyncApplied), which holds writers off the image while
	// it runs. Not an fdatasync before it to shorten that: it would make
	// durable writes whose records are not (TestE2EPowerCut, a cut right
	// after the image's fsync, found the blob differing from the image).
	o.Flusher.SyncImage = func() error {
		return d.j.SyncApplied(func() error { return journal.Datasync(d.img) })
	}
	if !o.NoFills {
		o.Flusher.Image = d
	}
	d.f = replicate.NewFlusher(d.j, sender, o.Flusher)
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	d.cancel = cancel
	d.runCtx = runCtx
	d.runDone = make(chan struct{})
	go func() {
		defer close(d.runDone)
		d.runErr = d.f.Run(runCtx)
	}()
	if d.thin != nil {
		d.thin.Bind(o.ThinSource, img, o.Flusher.SyncImage)
		d.thinDone = make(chan struct{})
		go d.runThin(runCtx)
	}
	ok = true
	return d, nil
}

// runThin prefetches the thin disk's chunks (unless NoPrefetch) and, once
// every chunk is local, runs OnThinComplete. An error is kept for status
// (ThinErr): reads and writes still fetch what they need.
func (d *Disk) runThin(ctx context.Context) {
	defer close(d.thinDone)
	setErr := func(err error) { d.thinErr.Store(&err) }
	if !d.o.NoPrefetch && !d.thin.Complete() {
		d.log.Info("thin disk: prefetching the chunks not yet local", "missing_chunks", d.thin.Stats().MissingChunks, "bytes_per_second", d.o.Prefetch.BytesPerSecond)
		if err := d.thin.Prefetch(ctx, d.o.Prefetch); err != nil {
			if ctx.Err() == nil {
				d.log.Error("thin disk: prefetch stopped; reads and writes still fetch what they need", "err", err)
				setErr(err)
			}
			return
		}
	}
	select {
	case <-d.thin.Done():
	case <-ctx.Done():
	}
	// Complete even if the disk is closing meanwhile: the record of it
	// must not wait for the next mount.
	if !d.thin.Complete() {
		return
	}
	if d.o.OnThinComplete != nil {
		if err := d.o.OnThinComplete(); err != nil {
			d.log.Error("thin disk: every chunk is local, but recording it failed", "err", err)
			setErr(err)
			return
		}
	}
	d.log.Info("thin disk: every chunk is local")
}

// ThinErr is the error that stopped the thin disk's prefetch or its
// completion, if one did.
func (d *Disk) ThinErr() error {
	if p := d.thinErr.Load(); p != nil {
		return *p
	}
	return nil
}

// ensureLocal makes the thin disk's chunks under [off, end) local.
func (d *Disk) ensureLocal(off, end int64) error {
	if d.thin == nil {
		return nil
	}
	if err := d.thin.Ensure(d.runCtx, off, end); err != nil {
		return fmt.Errorf("thin disk: fetch %d+%d from the blob: %w", off, end-off, err)
	}
	return nil
}

// checkBlobNotMoved refuses a blob another writer wrote since this state
// directory last did (ErrBlobMoved). Every epoch this state directory
// sent is at most the journal's closed or drained epoch (both durable with
// the records, or with their deletion), or the base it last took the blob
// at (its creation, an import, a resize, a resync). Without a base (a
// state directory made before it was recorded) nothing is checked.
func (d *Disk) checkBlobNotMoved(seq remote.Sequence) error {
	base, ok := int64(0), false
	if d.o.BaseSequence != nil {
		base, ok = *d.o.BaseSequence, true
	}
	if d.thin != nil && !d.thin.Complete() {
		base, ok = max(base, d.thin.BaseSequence()), true
	}
	if !ok {
		return nil
	}
	wrote := max(d.j.ClosedEpoch(), d.j.DrainedEpoch())
	if b := remote.Sequence(base).Epoch(); seq.Epoch() > max(wrote, b) {
		return fmt.Errorf("%w: the blob is at epoch %d, this state directory took it at epoch %d and wrote up to epoch %d", ErrBlobMoved, seq.Epoch(), b, wrote)
	}
	return nil
}

// staging is the staged transfer's sink: segments chained from the last
// epoch this journal deleted.
func staging(s *replicate.Sender, o DiskOptions, drained uint64) *staged.Sink {
	return staged.NewSink(s, o.Staging, staged.SinkOptions{DiskID: o.DiskID, Epoch: drained, Uploads: o.StagedUploads})
}

func (d *Disk) abort() {
	if d.j != nil {
		d.j.Close()
	}
	d.img.Close()
	if d.thin != nil {
		d.thin.Close()
	}
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
func (d *Disk) replayJournal(seq remote.Sequence, keepAll bool) error {
	d.replay.RemoteSequence = int64(seq)
	remoteEpoch := seq.Epoch()
	var recs, onRemote []journal.Record
	err := d.j.Scan(0, func(r journal.Record) (bool, error) {
		recs = append(recs, r)
		if !keepAll && !seq.InProgress() && r.Epoch <= remoteEpoch {
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
	if err := d.replayImageBacked(recs); err != nil {
		return fmt.Errorf("replay journal: %w", err)
	}
	if err := d.img.Sync(); err != nil {
		return fmt.Errorf("replay journal: sync image: %w", err)
	}
	d.replay.AlreadyRemote = len(onRemote)
	if err := d.j.Delete(onRemote, remoteEpoch); err != nil {
		return fmt.Errorf("replay journal: %w", err)
	}
	d.log.Info("journal replayed", "records", d.replay.Records, "bytes", d.replay.Bytes, "already_on_blob", len(onRemote), "blob_sequence", seq,
		"image_backed", d.replay.ImageBacked, "torn_image_backed", d.replay.Torn)
	return nil
}

// replayImageBacked re-applies recs to the image (reapply), capturing
// every image-backed record among them to the journal's segments first
// (journal/imagerec.go), and makes the captures durable.
//
// A record whose bytes the image holds (its CRC matches) is captured
// before anything writes the image. One whose CRC does not match is one of
// two (journal/bind.go):
//   - at or below the image-synced mark, its bytes were durable in the
//     image and only a bound write over it changed them: it stays the
//     winner of its range in the re-application (no older record goes
//     over it), is captured afterwards with what the image then holds,
//     and bound again (BindReplay) to every record a bound write could
//     be, since its copy holds the later writes' bytes;
//   - above it, a power loss took its bytes and it was never acknowledged
//     (a barrier syncs the image before it returns): it takes no part in
//     the re-application, and is captured afterwards with what the image
//     then holds over its range, its own bytes or the older ones per
//     sector. Re-applying an older record over it is what restores the
//     older ones where the image lost those too; leaving it the winner
//     would keep bytes older still.
func (d *Disk) replayImageBacked(recs []journal.Record) error {
	var torn, overwritten []int
	imgSynced := d.j.ImageSyncedSeq()
	// A record captured before the crash may have been copied after a
	// bound write went over it, so its copy may hold that later write's
	// bytes; the binding that kept a batch from ending between them is
	// gone with the process. Which captures did is not recorded, so each
	// is bound again to every record a binding could have reached
	// (found by TestCrashRecovery with batches cut at 3 ranges).
	var bindAgain []int
	for i := range recs {
		if recs[i].Captured() {
			bindAgain = append(bindAgain, i)
		}
		if !recs[i].ImageBacked() {
			continue
		}
		d.replay.ImageBacked++
		rec, held, err := d.j.Capture(recs[i], true)
		switch {
		case err != nil:
			return err
		case held:
			recs[i] = rec
		case recs[i].Seq <= imgSynced:
			overwritten = append(overwritten, i)
		default:
			torn = append(torn, i)
		}
	}
	apply := recs
	if len(torn) > 0 {
		apply = make([]journal.Record, 0, len(recs)-len(torn))
		for i, t := 0, 0; i < len(recs); i++ {
			if t < len(torn) && torn[t] == i {
				t++
				continue
			}
			apply = append(apply, recs[i])
		}
	}
	var err error
	if d.replay.Bytes, err = d.reapply(apply); err != nil {
		return err
	}
	for _, i := range torn {
		if recs[i], _, err = d.j.Capture(recs[i], false); err != nil {
			return err
		}
	}
	if len(overwritten) > 0 {
		for _, i := range overwritten {
			if recs[i], _, err = d.j.Capture(recs[i], false); err != nil {
				return err
			}
		}
		bindAgain = append(bindAgain, overwritten...)
		d.log.Info("journal replay: image-backed records that later writes went over without a copy take what the image holds",
			"records", len(overwritten), "first_seq", recs[overwritten[0]].Seq)
	}
	// A bound write lies within MaxBindRecords seqs after the record.
	span := d.j.MaxBindRecords()
	for _, i := range bindAgain {
		reach := recs[i].Seq + span
		k, _ := slices.BinarySearchFunc(recs, reach, func(r journal.Record, seq uint64) int { return cmp.Compare(r.Seq, seq) })
		if k == len(recs) || recs[k].Seq > reach {
			k--
		}
		if to := recs[k].Epoch; to > recs[i].Epoch {
			d.j.BindReplay(recs[i].Epoch, to)
		}
	}
	d.replay.Torn = len(torn)
	d.replay.Overwritten = len(overwritten)
	if len(torn) > 0 {
		d.log.Warn("journal replay: image-backed records lost (part of) their bytes in a power loss; they were written after the last barrier, and take what the image holds", "records", len(torn), "first_seq", recs[torn[0]].Seq)
	}
	if d.replay.ImageBacked > 0 {
		if err := d.j.Sync(); err != nil {
			return err
		}
	}
	return nil
}

// reapply writes the journal's last word on every sector to the image and
// returns the data bytes it wrote. Records are coalesced first (the last
// record wins per sector) rather than re-applied one by one in seq order:
// each sector is written once, and the payload of an image-backed record
// (left by an older binary's write-once mode, see journal/legacy.go) is
// the image itself, so a zero record re-applied under it would destroy the
// only copy. Image-backed winners are left alone, zero winners punched
// again, and segment winners written again.
func (d *Disk) reapply(recs []journal.Record) (int64, error) {
	var bytes int64
	cur, payload := -1, []byte(nil)
	for _, e := range replicate.Resolve(recs) {
		r := &recs[e.Src]
		switch {
		case e.Zero:
			if err := punch(d.img, e.Off, e.End-e.Off); err != nil {
				return bytes, fmt.Errorf("zero local image %d+%d: %w", e.Off, e.End-e.Off, err)
			}
		case r.InImage() || r.ImageBacked():
			// Image-backed: the image holds it (or, overwritten
			// by a bound write, something newer).
		default:
			if e.Src != cur {
				var err error
				if payload, err = d.j.Payload(r); err != nil {
					return bytes, err
				}
				cur = e.Src
			}
			if _, err := d.img.WriteAt(payload[e.Off-r.Offset:e.End-r.Offset], e.Off); err != nil {
				return bytes, fmt.Errorf("write local image %d+%d: %w", e.Off, e.End-e.Off, err)
			}
			bytes += e.End - e.Off
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
func (d *Disk) Size() int64 { return d.size.Load() }

// ReadAt reads the disk: the local image always holds the newest state.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	d.resizing.RLock()
	defer d.resizing.RUnlock()
	size := d.size.Load()
	if off < 0 || off > size {
		return 0, ErrOutOfRange
	}
	if rem := size - off; int64(len(p)) > rem {
		p = p[:rem]
	}
	if d.thin != nil {
		// A first read inside a chunk not yet local is served from the
		// blob while the chunk is fetched behind it.
		if ok, err := d.thin.ReadThrough(d.runCtx, p, off); ok {
			if err != nil {
				return 0, fmt.Errorf("thin disk: %w", err)
			}
			return len(p), nil
		}
	}
	if err := d.ensureLocal(off, off+int64(len(p))); err != nil {
		return 0, err
	}
	return d.img.ReadAt(p, off)
}

func (d *Disk) check(off, n int64) error {
	if size := d.size.Load(); off < 0 || n < 0 || off+n > size {
		return fmt.Errorf("%w: %d+%d on a %d-byte disk", ErrOutOfRange, off, n, size)
	}
	return nil
}

// WriteAt journals p at off and writes it to the local image; when it
// returns nil the write is acknowledged (invariant 1: it is in the
// journal's intent log and, for a large payload, a segment file; a later
// Flush makes it durable). Unaligned writes are widened to whole
// sectors with the edges read from the image under the range lock. p is
// not retained.
func (d *Disk) WriteAt(ctx context.Context, p []byte, off int64) error {
	d.resizing.RLock()
	defer d.resizing.RUnlock()
	return d.writeAt(ctx, p, off)
}

// writeAt is WriteAt with the resize lock held.
func (d *Disk) writeAt(ctx context.Context, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	aoff := off &^ (journal.SectorSize - 1)
	aend := (off + int64(len(p)) + journal.SectorSize - 1) &^ (journal.SectorSize - 1)
	// A write may touch a thin disk's chunk only once the chunk is
	// durably local: the fetch would otherwise overwrite it (see thin).
	if err := d.ensureLocal(aoff, aend); err != nil {
		return err
	}
	h := d.locks.lock(aoff, aend)
	defer d.locks.unlock(h)
	buf := p
	if aoff != off || aend != off+int64(len(p)) {
		buf = make([]byte, aend-aoff)
		if _, err := d.img.ReadAt(buf[:journal.SectorSize], aoff); err != nil {
			return fmt.Errorf("read sector at %d to widen a write: %w", aoff, err)
		}
		if aend-aoff > journal.SectorSize {
			if _, err := d.img.ReadAt(buf[len(buf)-journal.SectorSize:], aend-journal.SectorSize); err != nil {
				return fmt.Errorf("read sector at %d to widen a write: %w", aend-journal.SectorSize, err)
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
	rec := journal.Record{Offset: aoff, Length: aend - aoff, Kind: journal.KindData, Data: buf}
	if err := d.j.AppendApply(ctx, &rec, func() error {
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
	d.resizing.RLock()
	defer d.resizing.RUnlock()
	if n == 0 {
		return nil
	}
	if err := d.check(off, n); err != nil {
		return err
	}
	if err := d.ensureLocal(off, off+n); err != nil {
		return err
	}
	aoff := (off + journal.SectorSize - 1) &^ (journal.SectorSize - 1)
	aend := (off + n) &^ (journal.SectorSize - 1)
	if !discard {
		if aoff > off {
			if err := d.writeAt(ctx, make([]byte, min(aoff, off+n)-off), off); err != nil {
				return err
			}
		}
		if aend < off+n && aend >= aoff {
			if err := d.writeAt(ctx, make([]byte, off+n-aend), aend); err != nil {
				return err
			}
		}
	}
	if aend <= aoff {
		return nil
	}
	h := d.locks.lock(aoff, aend)
	defer d.locks.unlock(h)
	kind := journal.KindZero
	if discard {
		kind = journal.KindDiscard
	}
	rec := journal.Record{Offset: aoff, Length: aend - aoff, Kind: kind}
	if err := d.j.AppendApply(ctx, &rec, func() error {
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
// acknowledged before it durable; in synchronous mode (DiskOptions.Sync)
// it returns once the blob holds them too.
func (d *Disk) Flush() error {
	e, err := d.j.Barrier()
	if err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	d.f.Kick()
	if !d.o.Sync || d.degraded(e) {
		return nil
	}
	ctx := d.runCtx
	if d.o.SyncTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d.o.SyncTimeout)
		defer cancel()
	}
	err = d.f.WaitRemote(ctx, e)
	if errors.Is(err, context.DeadlineExceeded) {
		d.syncMu.Lock()
		was := d.degradedTo
		d.degradedTo = max(d.degradedTo, e)
		d.syncMu.Unlock()
		d.syncTimeouts.Add(1)
		if was == 0 {
			d.log.Warn("synchronous replication degraded: the blob did not take a barrier's writes within --sync-timeout; barriers return without it until it has caught up",
				"sync_timeout", d.o.SyncTimeout, "epoch", e, "remote_epoch", d.f.RemoteEpoch())
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("flush: synchronous replication: the blob does not hold the writes: %w", err)
	}
	return nil
}

// degraded reports whether synchronous barriers return without the blob
// (a barrier timed out, and the blob does not hold everything up to the
// last such barrier yet); a barrier for epoch e while degraded moves that
// mark to e. Once the blob has caught up, barriers are synchronous again.
func (d *Disk) degraded(e uint64) bool {
	d.syncMu.Lock()
	defer d.syncMu.Unlock()
	if d.degradedTo == 0 {
		return false
	}
	if d.f.RemoteEpoch() >= d.degradedTo {
		d.degradedTo = 0
		d.log.Info("synchronous replication restored: the blob has caught up")
		return false
	}
	d.degradedTo = max(d.degradedTo, e)
	return true
}

// SyncState is what status shows of synchronous mode: whether it is on,
// whether it is degraded (barriers return without the blob until it has
// caught up), and how many barriers timed out.
type SyncState struct {
	On       bool
	Degraded bool
	Timeouts uint64
}

// Sync returns the state of synchronous mode.
func (d *Disk) Sync() SyncState {
	st := SyncState{On: d.o.Sync, Timeouts: d.syncTimeouts.Load()}
	if d.o.Sync {
		d.syncMu.Lock()
		st.Degraded = d.degradedTo != 0 && d.f.RemoteEpoch() < d.degradedTo
		d.syncMu.Unlock()
	}
	return st
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
	// Thin is the thin disk's progress (nil: not thin).
	Thin    *thin.Stats
	Sync    SyncState
	Journal journal.Stats
	Flusher replicate.FlusherStats
	LeaseID string
}

// Stats returns the current counters.
func (d *Disk) Stats() Stats {
	st := Stats{Sync: d.Sync(), Journal: d.j.Stats(), Flusher: d.f.Stats(), LeaseID: d.lease}
	if d.thin != nil {
		ts := d.thin.Stats()
		st.Thin = &ts
	}
	return st
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
	if d.thinDone != nil {
		<-d.thinDone
		d.thin.Wait() // the fetches first reads started write the image
	}
	if err := d.j.Close(); err != nil {
		errs = append(errs, err)
	}
	if err := d.img.Sync(); err != nil {
		errs = append(errs, fmt.Errorf("sync local image: %w", err))
	}
	if err := d.img.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close local image: %w", err))
	}
	if d.thin != nil {
		if err := d.thin.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close the thin record: %w", err))
		}
	}
	if drained && d.lease != "" && d.thin != nil && !d.thin.Complete() {
		d.log.Info("thin disk: the blob's lease is kept until every chunk is local (the blob is their only copy)")
	} else if drained && d.lease != "" {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		// A few tries: a lost response must not leave the lease held (the
		// same state directory would take it back, but nobody else could).
		var rerr error
		for attempt := 0; attempt < 4; attempt++ {
			if rerr = d.o.Remote.ReleaseLease(rctx, d.lease); rerr == nil || !remote.IsTransient(rerr) {
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

// resize follows the image to size bytes. No write may run meanwhile (the
// caller holds Disk.resizing for writing): hits read bits without mu.
func (a *imageAlloc) resize(size int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	old, oldSize := a.bits, a.size
	a.init(size)
	// Only chunks wholly inside both sizes are remembered: the one that
	// held the old end was allocated only up to it, and those cut off by
	// a shrink are gone from the image.
	for c := range min(oldSize, size) / allocChunk {
		if old[c/64].Load()&(1<<(c%64)) != 0 {
			a.bits[c/64].Or(1 << (c % 64))
		}
	}
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
