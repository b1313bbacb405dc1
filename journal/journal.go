package journal

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"iter"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	badger "github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"

	"github.com/vhdsync/vhdsync/journal/intentlog"
	"github.com/vhdsync/vhdsync/journal/internal/files"
)

// Journal keys: records under "r" + big-endian seq (so key order is seq
// order), metadata under "m/".
var (
	recPrefix  = []byte("r")
	keyDrained = []byte("m/drained") // last seq deleted after a complete batch
	keyEpoch   = []byte("m/epoch")   // last epoch the remote holds completely
)

func recKey(seq uint64) []byte {
	k := make([]byte, 9)
	k[0] = recPrefix[0]
	binary.BigEndian.PutUint64(k[1:], seq)
	return k
}

// Options tune a Journal.
type Options struct {
	// MaxPendingBytes caps the journal's pending bytes; Append blocks above
	// it. 0 means no cap.
	MaxPendingBytes int64
	// Logger receives badger's warnings and the GC loop's messages.
	Logger *slog.Logger
	// GCInterval is how often value-log GC runs; 0 means 10 s.
	GCInterval time.Duration
	// MaxEpochBytes closes the open epoch once it holds this many bytes,
	// as if the writer had issued a barrier, so that one epoch always fits
	// in a flusher batch (and in memory). 0 means 32 MiB.
	MaxEpochBytes int64
	// SegmentBytes is the size of the payload segment files (default
	// 64 MiB); a segment is deleted once all its records are drained.
	SegmentBytes int64
	// IntentLogSlots is the number of 128-byte slots an intent log file
	// holds (see package intentlog); 0 means 65,536 (8 MiB).
	IntentLogSlots int64
	// InlineMax is the largest payload the intent log carries (see
	// package intentlog): a barrier after writes no larger needs no segment
	// fdatasync. 0 means 32 KiB, negative none; it is capped so that an
	// entry fits a quarter of an intent log file.
	InlineMax int
	// BufferedIntents turns off direct intent log writes for writers that
	// fsync after every write (see directCadence): every entry then goes
	// through the page cache, and their barrier writes it back.
	BufferedIntents bool
	// DirectStreak is how many barriers in a row must each close an epoch
	// of exactly one append before direct intent log writes start (see
	// directStreak); 0: 8.
	DirectStreak int
	// ImageSyncEvery is the least time between two image syncs a writer
	// runs to bind rather than capture (bind.go); 0: 250 ms.
	ImageSyncEvery time.Duration
	// MaxBindRecords bounds the records from the oldest bound record on
	// (bind.go); 0: 1 Mi.
	MaxBindRecords uint64
}

// Journal is the durable, ordered log of writes not yet on the remote.
//
// Concurrency: Append may be called from many goroutines. Seq numbers and
// epochs are assigned under barrierMu held for reading; Barrier takes it
// for writing, so when Barrier has bumped the epoch every record of the
// closed epoch is in the intent log and queued for badger (reads wait for
// the queue, see package intentlog), and all its seqs are below every seq of the
// next epoch. The flusher reads closed epochs only, so it never sees a seq
// gap left by an Append still in flight.
type Journal struct {
	db   *badger.DB
	segs *segments
	dir  string
	log  *slog.Logger
	max  int64

	barrierMu sync.RWMutex
	applyMu   sync.RWMutex // held for reading from commit to applied, see appendApply
	nextSeq   atomic.Uint64
	epoch     uint64        // open epoch; guarded by barrierMu
	openEpoch atomic.Uint64 // epoch, readable without barrierMu (may lag it)
	epochUsed atomic.Bool   // the open epoch has records
	// epochStart is when the open epoch's first record was appended (unix
	// nanoseconds; 0: none yet).
	epochStart atomic.Int64
	closed     atomic.Uint64

	group groupCommit // see groupcommit.go
	ilog  *intentlog.Log
	idx   *indexer // see indexer.go
	// replayedIntents counts the intent log entries Open committed
	// to badger (tests).
	replayedIntents int

	// img is the local image, which holds the payloads of image-backed
	// records (imagerec.go, and legacy.go for those an older binary
	// left; legacyN counts those pending).
	img     *os.File
	legacyN atomic.Int64
	// imgs are the pending image-backed records (imagerec.go); imgLow is
	// the lowest epoch holding one whose bytes no image sync has covered
	// yet (0: none), which Sync then syncs the image for.
	imgs   imageRecs
	imgLow atomic.Uint64
	// syncCover is the highest epoch a sync has started to make durable
	// (the closed epoch when it began): a capture of a record of that
	// epoch or below must be durable before the write over it goes on
	// (imagerec.go).
	syncCover atomic.Uint64
	// Bound epochs (bind.go). claim is the highest epoch a planned batch
	// may hold (writes over its image-backed records capture them),
	// written under bindMu and read there to decide a bind. bindMu guards
	// boundRecs (the records bound writes went over, with their
	// imageRec.binding and boundTo), oldestBound and replayBound.
	bindMu      sync.Mutex
	claim       atomic.Uint64
	boundRecs   map[*imageRec]struct{}
	oldestBound uint64 // the lowest seq in boundRecs (0: none)
	replayBound []epochSpan
	// The image-synced mark (bind.go): as logged, as durable, when last
	// logged, and as read at open.
	imgSyncLogged   atomic.Uint64
	imgSynced       atomic.Uint64
	imgSyncedAt     atomic.Int64
	imgSyncedAtOpen uint64
	imageSyncEvery  time.Duration // Options.ImageSyncEvery
	maxBindRecords  uint64        // Options.MaxBindRecords
	inlineMax       int64         // see Options.InlineMax
	appending       atomic.Int64  // appends in flight (see inlineBusy)
	// See directCadence: appends since the last Barrier, whether the
	// epoch that Barrier closed held exactly one, and how many entries
	// went to the intent log with O_DIRECT.
	sinceBarrier  atomic.Int64
	singles       atomic.Int64 // barriers in a row that closed one append
	syncEach      atomic.Bool
	directIntents bool
	directStreak  int64 // Options.DirectStreak
	directEntries atomic.Uint64

	// syncMu is held by a barrier's sync (syncOnce) and while intent log
	// files are recycled, which may close a file the sync would fdatasync.
	syncMu sync.Mutex
	// filesMu is held while badger's logs are fsync'ed (syncFiles) and the
	// segments the indexer copied payloads to are (syncBeforeLogsGo), apart
	// from syncMu so that barriers do not wait for those fsyncs.
	filesMu sync.Mutex
	// syncState guards the coalescing of Sync calls: syncs started and
	// finished (numbered), whether one runs, and the last one's result.
	syncState                 sync.Mutex
	syncDone                  *sync.Cond
	syncStarted, syncFinished uint64
	syncRunning               bool
	syncErr                   error
	// dirNames are the names the directory held at its last fsync
	// (guarded by filesMu).
	dirNames map[string]bool

	mu             sync.Mutex // guards the pending accounting below
	space          *sync.Cond
	pendingBytes   int64
	pendingRecords int64
	blocked        int // writers waiting for space (or for a legacy record)
	// legacy are the pending image-backed records an older binary left,
	// by seq (see legacy.go).
	legacy map[uint64]*legacyRecord

	// The synced mark (see torn.go): the last epoch recorded, when, and
	// a lock that keeps marks in order; closing stops them.
	markedEpoch atomic.Uint64
	markedAt    atomic.Int64
	markMu      sync.Mutex
	marks       atomic.Uint64 // marks written (tests)
	closing     atomic.Bool

	// remoteMu guards onRemote and epochFirst: for the closed epochs
	// holding records the remote does not have yet, oldest first, when
	// each one's first record was appended (see OldestNotOnRemote).
	remoteMu   sync.Mutex
	onRemote   uint64
	epochFirst []epochTime

	epochsClosed  atomic.Uint64
	drainedEpoch  atomic.Uint64 // the last epoch Delete recorded as delivered
	epochBytes    atomic.Int64  // bytes in the open epoch
	maxEpochBytes int64
	stopGC        chan struct{}
	gcDone        chan struct{}
	// drainedSeq is keyDrained: every record with a seq up to it is
	// drained, whether or not its index entry is deleted yet (see trim.go).
	drainedSeq atomic.Uint64
	trim       trimmer
}

// badgerOptions are chosen for a small, write-heavy queue: records are
// written once, read once by the flusher and deleted soon after.
func badgerOptions(dir string, log *slog.Logger) badger.Options {
	o := badger.DefaultOptions(dir).
		// The journal syncs badger explicitly (see syncFiles); syncing
		// every Append would cost an fsync per write. Unsynced commits survive kill -9 (they are in the
		// page cache through mmap), only power loss needs the barrier.
		WithSyncWrites(false).
		// Badger holds only the index (53-byte entries; payloads are in
		// segment files, see segment.go): they stay in the LSM tree and
		// its WAL, and the value log stays empty.
		WithValueThreshold(valueThreshold).
		WithValueLogFileSize(16 << 20).
		// Small memtables: less memory, and records deleted soon rarely
		// reach L1 anyway.
		WithMemTableSize(8 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(8).
		WithBaseTableSize(2 << 20).
		// Keys and headers are tiny and payloads live in the value log:
		// compression would cost CPU for nothing. Without it, reads that
		// are sequential and once need no block cache either.
		WithCompression(options.None).
		WithBlockCacheSize(0).
		WithIndexCacheSize(0).
		WithNumCompactors(2).
		// Blind writes of unique keys never conflict.
		WithDetectConflicts(false).
		WithNumVersionsToKeep(1).
		WithCompactL0OnClose(true).
		WithLogger(badgerLogger{log})
	if testBadgerMemTable > 0 {
		o = o.WithMemTableSize(testBadgerMemTable).WithBaseTableSize(testBadgerMemTable).
			WithNumLevelZeroTables(1).WithNumLevelZeroTablesStall(4).WithBaseLevelSize(4 * testBadgerMemTable)
	}
	return o
}

// damagedAdvice follows every ErrJournalDamaged message.
const damagedAdvice = "vhdsync neither replays nor deletes a damaged journal: keep the state directory as it is (its disk.img holds the newest data) and compare it with the blob using `vhdsync verify`"

// Open opens (creating if needed) the journal in dir and recovers
// its counters: seq continues after the highest record, the open epoch
// after the highest epoch seen.
func Open(dir string, o Options) (*Journal, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// The directory's name must survive a power loss as its files do:
	// nothing else fsyncs the state directory after it is made (with the
	// staged transfer no lease id is saved there).
	if err := files.MkdirDurable(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create journal directory: %w", err)
	}
	if err := removeEmptyLogs(dir, log); err != nil {
		return nil, err
	}
	if err := repairIndex(dir, badgerOptions(dir, log), log); err != nil {
		return nil, err
	}
	db, err := badger.Open(badgerOptions(dir, log))
	if err != nil {
		if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) {
			return nil, fmt.Errorf("open journal %s: %w", dir, err)
		}
		return nil, fmt.Errorf("open journal %s: %w: %v; %s", dir, ErrJournalDamaged, err, damagedAdvice)
	}
	segs, err := openSegments(dir, o.SegmentBytes)
	if err != nil {
		db.Close()
		return nil, err
	}
	j := &Journal{db: db, segs: segs, dir: dir, log: log, max: o.MaxPendingBytes, stopGC: make(chan struct{}), gcDone: make(chan struct{})}
	j.space = sync.NewCond(&j.mu)
	j.syncDone = sync.NewCond(&j.syncState)
	j.group.init(db)
	j.legacy = map[uint64]*legacyRecord{}
	j.imgs.init()
	j.boundRecs = map[*imageRec]struct{}{}
	j.maxEpochBytes = o.MaxEpochBytes
	if j.maxEpochBytes <= 0 {
		j.maxEpochBytes = 32 << 20
	}
	j.inlineMax = inlineLimit(o.InlineMax, o.IntentLogSlots)
	j.directIntents = !o.BufferedIntents
	j.directStreak = int64(o.DirectStreak)
	if j.directStreak <= 0 {
		j.directStreak = directStreak
	}
	j.imageSyncEvery = o.ImageSyncEvery
	if j.imageSyncEvery <= 0 {
		j.imageSyncEvery = imageSyncEvery
	}
	j.maxBindRecords = o.MaxBindRecords
	if j.maxBindRecords == 0 {
		j.maxBindRecords = maxBindRecords
	}
	nextLog, gen, err := j.replayIntents()
	if err != nil {
		segs.close()
		db.Close()
		return nil, err
	}
	if err := j.recover(); err != nil {
		segs.close()
		db.Close()
		return nil, err
	}
	j.ilog = intentlog.New(dir, o.IntentLogSlots, nextLog, gen)
	j.idx = newIndexer(&j.group, j.indexed)
	interval := o.GCInterval
	if interval == 0 {
		interval = 10 * time.Second
	}
	go j.gcLoop(interval)
	j.trim.start(j)
	return j, nil
}

// inlineBusy is the number of appends in flight above which payloads go to
// their segment directly even when small. Inline payloads make a barrier
// cheaper (write+fsync 1.9x as fast, measured) but each costs a copy, a
// larger intent log write and a second write by the indexer: with many
// writers in flight (random 4 KiB at iodepth 32) inline-always ran at
// 0.8x the IOPS, and there a barrier's cost is shared by many writes.
const inlineBusy = 2

// A lone writer that issues a barrier after every write (a database's
// commit, ext4's commit block through a loop device, fio --fsync=1) gets
// its entry and inline payload written with O_DIRECT (Log.WriteDirect): the
// bytes reach the device inside the write, as they do for a local file
// opened with O_DIRECT, and the fsync that follows only flushes the
// device's cache instead of writing pages back first. The write then
// waits for the device, so only a writer whose last barrier closed an
// epoch of one append, and only for the first append after that barrier,
// pays it: a writer that never fsyncs, or writes several blocks per fsync
// (whose barrier writes them back in one go), keeps the page cache.
const directCadence = 1

// directStreak is how many barriers in a row must each have closed an
// epoch of directCadence appends before direct writes start; one epoch of
// any other count stops them. Several writers that each fsync after every
// write (a database's jobs through ext4 and a loop device) close epochs
// of one append now and then between epochs of several, and for them a
// direct write costs more than it saves: the other writers' buffered
// entries took 24-34 µs each beside direct writes, 13-17 µs without them
// (that ext4's inode lock, held while a direct write waits for the device,
// queues them is our reading, not traced). In the database job of
// bench/ab/db.sh the daemon's mean write answer was 48-68 µs with a
// streak of one barrier, 29-37 µs with this one. A lone writer closes
// nothing but one-append epochs and turns direct after this many barriers.
const directStreak = 8

// defaultInlineMax is the largest inline payload by default (see
// Options.InlineMax).
const defaultInlineMax = 32 << 10

// inlineLimit is the largest inline payload for Options.InlineMax and
// IntentLogSlots: at most what the intent log takes in files of that
// size.
func inlineLimit(max int, slots int64) int64 {
	if max < 0 {
		return -1
	}
	if max == 0 {
		max = defaultInlineMax
	}
	return min(int64(max), intentlog.MaxInline(slots))
}

func (j *Journal) recover() error {
	lastSeq, err := j.counter(keyDrained)
	if err != nil {
		return fmt.Errorf("recover journal %s: %w: %w; %s", j.dir, ErrJournalDamaged, err, damagedAdvice)
	}
	maxEpoch, err := j.counter(keyEpoch)
	if err != nil {
		return fmt.Errorf("recover journal %s: %w: %w; %s", j.dir, ErrJournalDamaged, err, damagedAdvice)
	}
	j.drainedEpoch.Store(maxEpoch)
	j.drainedSeq.Store(lastSeq)
	// Index entries up to lastSeq are drained records whose deletion the
	// trimmer had not reached (see trim.go): recovery starts after them.
	synced, err := j.counter(keySynced)
	if err != nil {
		return fmt.Errorf("recover journal %s: %w: %w; %s", j.dir, ErrJournalDamaged, err, damagedAdvice)
	}
	j.markedEpoch.Store(synced)
	imgSynced, err := j.counter(keyImageSynced)
	if err != nil {
		return fmt.Errorf("recover journal %s: %w: %w; %s", j.dir, ErrJournalDamaged, err, damagedAdvice)
	}
	j.imgSynced.Store(imgSynced)
	j.imgSyncLogged.Store(imgSynced)
	j.imgSyncedAtOpen = imgSynced
	var torn []uint64
	var reverted []Record
	var oldest time.Time // the oldest pending record's
	err = j.db.View(func(txn *badger.Txn) error {
		opts := badger.DefaultIteratorOptions
		opts.PrefetchValues = false
		opts.Prefix = recPrefix
		it := txn.NewIterator(opts)
		defer it.Close()
		first := true
		for it.Seek(recKey(lastSeq + 1)); it.Valid(); it.Next() {
			item := it.Item()
			seq := binary.BigEndian.Uint64(item.Key()[1:])
			var hdr Record
			err := item.Value(func(v []byte) error {
				r, err := decodeRecord(seq, v)
				hdr = r
				return err
			})
			if err != nil {
				return err
			}
			if isTorn, err := j.tornCheck(hdr, synced); err != nil {
				return err
			} else if isTorn && hdr.captured {
				// A capture whose sync did not finish: the write
				// that needed it never reached the image, which
				// still holds the record (imagerec.go).
				hdr.seg, hdr.segOff, hdr.captured = imageSeg, 0, false
				reverted = append(reverted, hdr)
			} else if isTorn {
				torn = append(torn, seq)
				continue
			}
			if hdr.ImageBacked() {
				j.imgs.add(&hdr)
			} else if hdr.InImage() {
				j.legacy[seq] = &legacyRecord{off: hdr.Offset, end: hdr.End()}
			} else if hdr.Kind == KindData {
				seg, err := j.segs.get(hdr.seg)
				if err != nil {
					return fmt.Errorf("journal record %d: %w", seq, err)
				}
				seg.keep(seq)
			}
			if first {
				oldest = hdr.Time
				first = false
			}
			j.pendingRecords++
			j.pendingBytes += hdr.payloadSize()
			if seq > lastSeq {
				lastSeq = seq
			}
			if hdr.Epoch > maxEpoch {
				maxEpoch = hdr.Epoch
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("recover journal %s: %w: %w; %s", j.dir, ErrJournalDamaged, err, damagedAdvice)
	}
	if len(reverted) > 0 {
		if err := j.revertCaptures(reverted); err != nil {
			return fmt.Errorf("recover journal %s: restore image-backed records whose capture a power loss took: %w", j.dir, err)
		}
	}
	if len(torn) > 0 {
		if err := j.dropTorn(torn, synced); err != nil {
			return fmt.Errorf("recover journal %s: drop records torn by a power loss: %w", j.dir, err)
		}
	}
	if err := j.recoverLegacy(); err != nil {
		return fmt.Errorf("recover journal %s: %w: %w; %s", j.dir, ErrJournalDamaged, err, damagedAdvice)
	}
	// Segments no pending record refers to (drained, or written by an
	// append that died before its index entry) are deleted.
	drained := lastSeq
	if j.pendingRecords > 0 {
		drained = 0
		if err := j.db.View(func(txn *badger.Txn) error {
			opts := badger.DefaultIteratorOptions
			opts.PrefetchValues = false
			opts.Prefix = recPrefix
			it := txn.NewIterator(opts)
			defer it.Close()
			it.Seek(recKey(j.drainedSeq.Load() + 1))
			if it.Valid() {
				drained = binary.BigEndian.Uint64(it.Item().Key()[1:]) - 1
			}
			return nil
		}); err != nil {
			return fmt.Errorf("recover journal %s: %w: %w; %s", j.dir, ErrJournalDamaged, err, damagedAdvice)
		}
	}
	if _, err := j.segs.reclaim(drained, nil); err != nil {
		return err
	}
	j.nextSeq.Store(lastSeq + 1)
	if j.pendingRecords > 0 {
		// The remote holds none of them as far as this process knows:
		// the replica is behind since the oldest.
		j.noteEpochFirst(maxEpoch, oldest.UnixNano())
	}
	// Records of the highest epoch may belong to an epoch that was open at
	// the crash: it counts as closed, new writes start a new epoch.
	j.closed.Store(maxEpoch)
	j.epoch = maxEpoch + 1
	j.openEpoch.Store(j.epoch)
	return nil
}

// counter reads an 8-byte counter key (0 if it is absent).
func (j *Journal) counter(k []byte) (uint64, error) {
	var v uint64
	err := j.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(k)
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		b, err := item.ValueCopy(nil)
		if err != nil {
			return err
		}
		if len(b) != 8 {
			return fmt.Errorf("journal key %s is %d bytes", k, len(b))
		}
		v = binary.BigEndian.Uint64(b)
		return nil
	})
	return v, err
}

// removeEmptyLogs deletes 0-byte .mem and .vlog files. A kill between
// badger creating such a file and sizing it leaves one behind, and badger
// (v4.9.6, dgraph-io/badger#2207) then refuses to open the directory
// ("Create a new file"). An empty log holds no entry, so removing it is the
// state just before the kill. Found by TestJournalKill9Compaction.
func removeEmptyLogs(dir string, log *slog.Logger) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read journal directory: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() || (!strings.HasSuffix(name, ".mem") && !strings.HasSuffix(name, ".vlog")) {
			continue
		}
		fi, err := e.Info()
		if err != nil || fi.Size() != 0 {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("remove the empty badger log %s left by a crash: %w", name, err)
		}
		log.Warn("removed an empty badger log left by a crash", "file", name)
	}
	return nil
}

// RaiseEpoch makes the open epoch at least e (used when the remote's
// sequence number shows a later epoch than the journal remembers).
func (j *Journal) RaiseEpoch(e uint64) {
	j.barrierMu.Lock()
	defer j.barrierMu.Unlock()
	if j.epoch < e {
		j.epoch = e
		j.openEpoch.Store(e)
		if j.closed.Load() < e-1 {
			j.closed.Store(e - 1)
		}
	}
}

// Append journals r, assigning its Seq and Epoch, and returns once it is
// in the intent log (it survives kill -9 from then on, and every read sees
// it; Barrier makes it survive power loss). It blocks while the pending
// bytes are above the cap, until the flusher drains or ctx ends; it never
// fails for lack of space in the cap.
func (j *Journal) Append(ctx context.Context, r *Record) error {
	return j.appendApply(ctx, r, nil)
}

// appendApply is Append, then apply (the caller's write of r to the local
// image), run before the record counts as applied: WaitApplied, which the
// flusher calls before it syncs the image and deletes drained records,
// waits for every record committed so far to be applied. Without it a
// batch could be sent, the image synced and the record deleted between the
// commit and the image write; a crash then, or a power loss before the
// next image sync, leaves the write on the blob and in neither the journal
// nor the image.
//
// With apply, r waits first for any image-backed record an older binary
// left over its range to drain (see legacy.go).
func (j *Journal) appendApply(ctx context.Context, r *Record, apply func() error) error {
	if err := r.check(); err != nil {
		return fmt.Errorf("append: %w", err)
	}
	if r.Kind == KindData && int64(len(r.Data)) != r.Length {
		return fmt.Errorf("append: %d data bytes for a %d-byte write", len(r.Data), r.Length)
	}
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	busy := j.appending.Add(1) > inlineBusy
	first := j.sinceBarrier.Add(1) == 1
	defer j.appending.Add(-1)
	if apply != nil && j.legacyN.Load() > 0 {
		if err := j.waitLegacy(ctx, r.Offset, r.End()); err != nil {
			return err
		}
	}
	size := r.payloadSize()
	if err := j.waitForSpace(ctx, size); err != nil {
		return err
	}
	var bound []*imageRec
	if apply != nil && j.imgs.uncaptured.Load() > 0 {
		// The image must not change under a pending image-backed
		// record before its capture is durable, or its epoch is bound
		// to this write's (imagerec.go, bind.go). After the wait for
		// space, not before: a bind not yet settled keeps the flusher
		// from sending the record's epoch (ClaimBatch), which is what
		// frees the space.
		var err error
		if bound, err = j.bindOrCapture(r.Offset, r.End()); err != nil {
			j.release(size)
			return fmt.Errorf("journal write %d+%d: %w", r.Offset, r.Length, err)
		}
	}
	// The payload goes to a segment file first, outside any lock; the
	// index entry, committed after it, is what makes the record exist.
	var seg *segment
	var inline *intentlog.Inline
	direct := false
	imageBacked := apply != nil && j.imageBacked(r)
	if imageBacked {
		// Written once: the apply function's image write is the only
		// copy of the payload (imagerec.go).
		r.seg, r.segOff, r.crc = imageSeg, 0, crc32c(r.Data)
	} else if r.Kind == KindData {
		var err error
		seg, r.segOff, err = j.segs.reserve(r.Length)
		if err != nil {
			j.bindDone(bound, 0, false)
			j.release(size)
			return err
		}
		r.seg, r.crc = seg.id, crc32c(r.Data)
		if r.Length <= j.inlineMax && !busy {
			// Small, and few writers: the intent log carries the
			// payload, the indexer writes it to the segment (see
			// package intentlog and inlineBusy).
			inline = &intentlog.Inline{Data: r.Data, CRC: r.crc}
			direct = j.directIntents && first && j.syncEach.Load()
		} else {
			if err := seg.writePayload(r.Data, r.segOff); err != nil {
				seg.inflight.Add(-1)
				j.bindDone(bound, 0, false)
				j.release(size)
				return fmt.Errorf("journal write %d+%d: %w", r.Offset, r.Length, err)
			}
			seg.dirty.Store(true)
		}
	}
	j.applyMu.RLock()
	j.barrierMu.RLock()
	r.Seq = j.nextSeq.Add(1) - 1
	r.Epoch = j.epoch
	// The entry goes to the intent log (one pwrite) and, in the
	// background, to badger (see package intentlog). It is written before
	// barrierMu is released, so Barrier's guarantee (every record of a
	// closed epoch is logged, and queued for badger) and the range lock's
	// seq order hold.
	err := j.logEntry(intentlog.Entry{Key: recKey(r.Seq), Val: r.encode(), Inline: inline}, seg, r.segOff, direct)
	full := false
	if err == nil {
		j.epochStart.CompareAndSwap(0, time.Now().UnixNano())
		j.epochUsed.Store(true)
		full = j.epochBytes.Add(size) >= j.maxEpochBytes
		if seg != nil {
			seg.keep(r.Seq)
		}
		if imageBacked {
			j.imgs.add(r)
			// Under barrierMu: an append of a later epoch cannot
			// set it first.
			j.imgLow.CompareAndSwap(0, r.Epoch)
		}
	}
	j.barrierMu.RUnlock()
	// Before the image write: until then the flusher counts these binds
	// as reaching past any epoch (ClaimBatch).
	j.bindDone(bound, r.Epoch, err == nil)
	if seg != nil {
		seg.inflight.Add(-1)
	}
	if err != nil {
		j.applyMu.RUnlock()
		j.release(size)
		return fmt.Errorf("journal write %d+%d: %w", r.Offset, r.Length, err)
	}
	if apply != nil {
		// The flusher syncs the image before it deletes the records
		// applied to it (WaitApplied).
		err = apply()
	}
	j.applyMu.RUnlock()
	if full {
		j.closeEpoch(r.Epoch)
	}
	return err
}

// WaitApplied waits until every record committed so far has been applied
// (see appendApply).
func (j *Journal) WaitApplied() {
	j.applyMu.Lock()
	j.applyMu.Unlock() //nolint:staticcheck // the empty critical section is the wait
}

// SyncApplied runs syncImage (the caller's sync of the image the records
// are applied to) once every record applied so far is durable, with no
// record applied meanwhile: the image never becomes durable with a write
// whose record is not. Otherwise a power loss could keep, in the image, a
// write the journal lost (it was appended after the journal's last sync,
// and made durable by an image sync for an earlier batch), which the blob
// then never gets: the image and the blob differed for good (found by
// TestE2EPowerCut: vhdsync verify after the last drain). Writers wait for
// the two syncs; barriers do not.
func (j *Journal) SyncApplied(syncImage func() error) error {
	j.applyMu.Lock()
	defer j.applyMu.Unlock()
	if err := j.syncLog(); err != nil {
		return err
	}
	if err := syncImage(); err != nil {
		return err
	}
	// No append is in flight: every image-backed record appended so far
	// is applied, and now durable.
	j.imgLow.Store(0)
	j.noteImageSynced(j.nextSeq.Load() - 1)
	return nil
}

// closeEpoch closes epoch e if it is still the open one. Closing an epoch
// early only adds a barrier the writer did not ask for, which makes the
// order stricter, never looser. It does not sync: the flusher syncs the
// journal before it sends anything.
func (j *Journal) closeEpoch(e uint64) {
	j.barrierMu.Lock()
	defer j.barrierMu.Unlock()
	if j.epoch == e && j.epochUsed.Load() {
		j.closeLocked()
	}
}

func (j *Journal) closeLocked() {
	if t := j.epochStart.Load(); t != 0 {
		j.noteEpochFirst(j.epoch, t)
	}
	j.closed.Store(j.epoch)
	j.epoch++
	j.openEpoch.Store(j.epoch)
	j.epochUsed.Store(false)
	j.epochStart.Store(0)
	j.epochBytes.Store(0)
	j.epochsClosed.Add(1)
}

// waitForSpace reserves size bytes of the cap, blocking while it is full.
// A record larger than the whole cap is admitted when nothing else is
// pending, so no write can wait forever.
func (j *Journal) waitForSpace(ctx context.Context, size int64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.max > 0 && j.pendingBytes > 0 && j.pendingBytes+size > j.max {
		stop := context.AfterFunc(ctx, func() {
			j.mu.Lock()
			j.space.Broadcast()
			j.mu.Unlock()
		})
		defer stop()
		j.blocked++
		for j.pendingBytes > 0 && j.pendingBytes+size > j.max {
			if err := ctx.Err(); err != nil {
				j.blocked--
				return fmt.Errorf("waiting for journal space: %w", err)
			}
			j.space.Wait()
		}
		j.blocked--
	}
	j.pendingBytes += size
	j.pendingRecords++
	return nil
}

func (j *Journal) release(size int64) {
	j.mu.Lock()
	j.pendingBytes -= size
	j.pendingRecords--
	j.space.Broadcast()
	j.mu.Unlock()
}

// CloseEpoch closes the open epoch without syncing (the flusher's own
// barrier when a writer has not issued one for a while).
func (j *Journal) CloseEpoch() {
	j.barrierMu.Lock()
	defer j.barrierMu.Unlock()
	if j.epochUsed.Load() {
		j.closeLocked()
	}
}

// Barrier closes the open epoch (if it has records) and makes every record
// appended before it durable. It returns the last closed epoch.
func (j *Journal) Barrier() (uint64, error) {
	if j.sinceBarrier.Swap(0) == directCadence {
		j.syncEach.Store(j.singles.Add(1) >= j.directStreak)
	} else {
		j.singles.Store(0)
		j.syncEach.Store(false)
	}
	j.barrierMu.Lock()
	if j.epochUsed.Load() {
		j.closeLocked()
	}
	closed := j.closed.Load()
	j.barrierMu.Unlock()
	// Sync after releasing the lock: writers continue in the new epoch
	// while the closed one reaches the disk.
	if err := j.Sync(); err != nil {
		return closed, err
	}
	return closed, nil
}

// DrainedEpoch is the last epoch whose records were all delivered and
// deleted (to the blob, or to the staging container).
func (j *Journal) DrainedEpoch() uint64 { return j.drainedEpoch.Load() }

// ClosedEpoch is the highest closed epoch.
func (j *Journal) ClosedEpoch() uint64 { return j.closed.Load() }

// epochTime is when the first record of the epochs up to epoch (after the
// previous entry's) was appended.
type epochTime struct {
	epoch uint64
	at    int64 // unix nanoseconds
}

// maxEpochFirst bounds epochFirst: a long outage under a barrier-heavy
// load closes thousands of epochs a second. Beyond it, neighbours merge
// into one entry that keeps the earlier time and the later epoch, so the
// lag it gives is never less than the truth.
const maxEpochFirst = 1 << 16

// noteEpochFirst records that epoch's first record was appended at at.
func (j *Journal) noteEpochFirst(epoch uint64, at int64) {
	j.remoteMu.Lock()
	defer j.remoteMu.Unlock()
	if epoch <= j.onRemote {
		return
	}
	if len(j.epochFirst) >= maxEpochFirst {
		half := j.epochFirst[:0]
		for i := 0; i+1 < len(j.epochFirst); i += 2 {
			half = append(half, epochTime{epoch: j.epochFirst[i+1].epoch, at: j.epochFirst[i].at})
		}
		j.epochFirst = half
	}
	j.epochFirst = append(j.epochFirst, epochTime{epoch: epoch, at: at})
}

// OnRemote records that the remote holds every epoch up to epoch (a batch
// completed on the blob, or delivered to the staging store): the replica's
// lag is then measured from the first write of a later epoch, while the
// journal may still hold the records until their commit deletes them.
func (j *Journal) OnRemote(epoch uint64) {
	j.remoteMu.Lock()
	defer j.remoteMu.Unlock()
	j.onRemote = max(j.onRemote, epoch)
	n := 0
	for n < len(j.epochFirst) && j.epochFirst[n].epoch <= j.onRemote {
		n++
	}
	j.epochFirst = append(j.epochFirst[:0], j.epochFirst[n:]...)
}

// OldestNotOnRemote is when the oldest write the remote does not hold yet
// was appended (zero when it holds every one): the replica's lag is the
// time since. Until OnRemote is first called, every pending record counts.
func (j *Journal) OldestNotOnRemote() time.Time {
	// barrierMu keeps the open epoch from closing in between (closeLocked
	// moves its start into epochFirst).
	j.barrierMu.RLock()
	defer j.barrierMu.RUnlock()
	j.remoteMu.Lock()
	if len(j.epochFirst) > 0 {
		at := j.epochFirst[0].at
		j.remoteMu.Unlock()
		return time.Unix(0, at)
	}
	j.remoteMu.Unlock()
	if t := j.epochStart.Load(); t != 0 {
		return time.Unix(0, t)
	}
	return time.Time{}
}

// OpenEpochHasRecords reports whether the open epoch holds records.
func (j *Journal) OpenEpochHasRecords() bool { return j.epochUsed.Load() }

// OpenEpochAge is how long ago the open epoch's first record was appended
// (0 when it holds none).
func (j *Journal) OpenEpochAge() time.Duration {
	t := j.epochStart.Load()
	if t == 0 {
		return 0
	}
	return time.Since(time.Unix(0, t))
}

// Sync makes every record appended before it durable: the segment files
// and intent log files written since the last sync, in parallel (syncLog),
// and, when an image-backed record of a closed epoch may not be durable
// in the local image yet, the image too (through SyncApplied, see
// imagerec.go). Badger's logs are not synced here: what a barrier
// promises is in the intent log; badger is synced before anything depends
// on it (syncIndex). Otherwise the image is left to the flusher, which
// syncs it before it deletes what was applied to it.
//
// Concurrent calls share the work: a call returns with the result of the
// first sync that started after it was made (waiting for one already
// running, which may have missed its records, if need be). So a barrier
// arriving while the flusher syncs costs at most one more sync, and N
// writers fsyncing at once cost about two, not N.
func (j *Journal) Sync() error {
	if err := j.syncLog(); err != nil {
		return err
	}
	if low := j.imgLow.Load(); low == 0 || low > j.closed.Load() {
		return nil
	}
	// An image-backed record of a closed epoch may have its bytes in the
	// image's page cache only: a barrier acknowledging it, or a batch
	// sending it to the blob, needs them durable (imagerec.go).
	return j.SyncApplied(func() error {
		if err := Datasync(j.img); err != nil {
			return fmt.Errorf("sync local image: %w", err)
		}
		return nil
	})
}

// syncLog is Sync without the image: the intent log and the segments.
// Concurrent calls share the work (see Sync).
func (j *Journal) syncLog() error {
	j.syncState.Lock()
	want := j.syncStarted + 1
	for j.syncFinished < want {
		if !j.syncRunning {
			j.syncRunning = true
			j.syncStarted++
			n := j.syncStarted
			j.syncState.Unlock()
			err := j.syncOnce()
			j.syncState.Lock()
			j.syncRunning = false
			j.syncFinished, j.syncErr = n, err
			j.syncDone.Broadcast()
			break
		}
		j.syncDone.Wait()
	}
	err := j.syncErr
	j.syncState.Unlock()
	return err
}

// syncOnce is one sync (Sync coalesces callers around it). The segments
// and the intent log are fdatasync'ed in parallel: a barrier waits for the
// slowest file, not for their sum (serial, two fdatasyncs each took
// 80-230 µs). Their relative order does not matter: the kernel writes
// dirty pages back in any order anyway, and the barrier only promises that
// all of them are durable when it returns.
//
// Once it succeeds, every record of an epoch closed before it started is
// durable, payload included: markSynced records that (see torn.go).
func (j *Journal) syncOnce() error {
	closed := j.closed.Load()
	imgMark := j.imgSyncLogged.Load()
	for {
		c := j.syncCover.Load()
		if c >= closed || j.syncCover.CompareAndSwap(c, closed) {
			break
		}
	}
	j.syncMu.Lock()
	var wg sync.WaitGroup
	var segErr error
	wg.Go(func() { segErr = j.segs.sync() })
	err := j.ilog.Sync()
	wg.Wait()
	j.syncMu.Unlock()
	if err = errors.Join(segErr, err); err == nil {
		j.markSynced(closed)
		if imgMark > j.imgSynced.Load() {
			j.imgSynced.Store(imgMark)
		}
	}
	return err
}

// syncFiles makes badger's committed entries durable: DB.Sync syncs the
// active memtable's log (under badger's lock, so that it cannot be rotated
// meanwhile), memtables rotated before it are waited for until badger has
// flushed them to tables (and deleted their logs), and the directory is
// fsynced if its names changed since its last fsync, which makes the new
// tables' names durable. Called with filesMu held, before drained segments
// or intent log files go (syncIndex, indexed) and at Close: not at every
// barrier.
//
// A rotated log is never fsynced here: badger truncates a flushed
// memtable's log before deleting it, and an fsync of it then made the
// truncation durable while the table built from it might have no durable
// name (badger fsyncs the table and its MANIFEST, and ristretto, which
// creates the file, means to fsync the directory but never does): after a
// power loss the memtable's entries were in neither (TestJournalPowerCut,
// "badger log synced after badger truncated it"). Unsynced, a rotated log
// survives a power loss as it was when last synced as the active one, and
// the intent log holds its later entries until this returns.
func (j *Journal) syncFiles() error {
	// An entry committed before this call is in the memtable active at
	// DB.Sync (synced) or in an older one, rotated before it: numbered
	// below the newest log listed after DB.Sync, so waited for. Listed
	// before DB.Sync, a rotation in between left the entry's memtable
	// neither synced nor waited for.
	if err := j.db.Sync(); err != nil {
		return fmt.Errorf("sync journal index: %w", err)
	}
	newest, err := j.newestLog()
	if err != nil {
		return err
	}
	names, err := j.waitFlushed(newest)
	if err != nil {
		return err
	}
	if maps.Equal(names, j.dirNames) {
		return nil
	}
	if err := files.SyncDir(j.dir); err != nil {
		return fmt.Errorf("sync journal directory: %w", err)
	}
	j.dirNames = names
	return nil
}

// flushWait bounds waitFlushed: badger flushes a memtable in milliseconds,
// unless level 0 is stalled behind compactions or its disk refuses writes.
const flushWait = 30 * time.Second

// newestLog is the number of the newest memtable log in the directory.
func (j *Journal) newestLog() (uint64, error) {
	names, err := j.listDir()
	if err != nil {
		return 0, err
	}
	newest := uint64(0)
	for name := range names {
		if ext, n, ok := badgerLog(name); ok && ext == ".mem" {
			newest = max(newest, n)
		}
	}
	return newest, nil
}

// waitFlushed waits until no memtable log numbered below newest is left
// (badger has flushed those memtables and deleted their logs) and returns
// the directory's names then.
func (j *Journal) waitFlushed(newest uint64) (map[string]bool, error) {
	deadline := time.Now().Add(flushWait)
	for {
		names, err := j.listDir()
		if err != nil {
			return nil, err
		}
		pending := false
		for name := range names {
			if ext, n, ok := badgerLog(name); ok && ext == ".mem" && n < newest {
				pending = true
				break
			}
		}
		if !pending {
			return names, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("sync journal index: badger has not flushed a memtable in %v (see its messages in the log)", flushWait)
		}
		time.Sleep(time.Millisecond)
	}
}

// listDir returns the names in the journal directory.
func (j *Journal) listDir() (map[string]bool, error) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, fmt.Errorf("sync journal files: %w", err)
	}
	names := make(map[string]bool, len(entries))
	for _, e := range entries {
		names[e.Name()] = true
	}
	return names, nil
}

// Datasync is fdatasync(2) on f, retried on EINTR: the data, and the
// metadata needed to read it back (a size change, an unwritten extent
// converted), but not the timestamps every write changes, whose journal
// commit doubled a barrier's latency. The image and badger's logs keep
// their sizes, segment files grow (their size is synced). The flusher
// syncs the local image with it.
func Datasync(f *os.File) error { return files.Datasync(f) }

// valueThreshold is badger's value threshold: every value the journal
// writes is smaller, so none goes to the value log.
const valueThreshold = 1 << 10

// badgerLog parses a badger log file name (00012.mem, 000003.vlog).
func badgerLog(name string) (ext string, n uint64, ok bool) {
	ext = filepath.Ext(name)
	if ext != ".mem" && ext != ".vlog" {
		return "", 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(name, ext), 10, 64)
	return ext, n, err == nil
}

// ReadBatch returns the records of whole closed epochs with seq >= from,
// in seq order: always the whole first epoch, then further whole epochs
// while their data fits in maxBytes or while the last epoch is below
// minLastEpoch (replay after a crash during a batch must resend at least
// that batch). It never returns part of an epoch.
func (j *Journal) ReadBatch(from uint64, maxBytes int64, minLastEpoch uint64) ([]Record, error) {
	closed := j.closed.Load()
	// Every record of a closed epoch is committed; once they are all in
	// the image too, the blob never gets a write the image lacks (see
	// appendApply).
	j.WaitApplied()
	var out []Record
	var size int64
	epochStart := 0 // index in out where the current epoch starts
	advised := uint64(0)
	err := j.scan(from, func(r Record) (bool, error) {
		if r.Epoch > closed {
			return true, nil
		}
		if r.seg != 0 && r.seg != advised {
			// Start the device reading this segment's payloads while
			// the scan goes on; loadAll reads them after it.
			j.segs.willNeed(r.seg, r.segOff, maxBytes)
			advised = r.seg
		}
		if len(out) > 0 && r.Epoch != out[len(out)-1].Epoch {
			// An epoch boundary: stop here if the batch is big enough.
			if size >= maxBytes && out[len(out)-1].Epoch >= minLastEpoch {
				return true, nil
			}
			epochStart = len(out)
		}
		out = append(out, r)
		size += r.payloadSize()
		if size > maxBytes && epochStart > 0 && out[epochStart-1].Epoch >= minLastEpoch {
			// This epoch does not fit: leave it whole for the next batch.
			out = out[:epochStart]
			return true, nil
		}
		return false, nil
	})
	if err == nil {
		err = j.loadAll(out)
	}
	if err != nil {
		return nil, fmt.Errorf("read journal from seq %d: %w", from, err)
	}
	if n := len(out); n > 0 && out[n-1].seg != 0 {
		// The next batch's payloads most likely follow this one's: read
		// them while this batch uploads.
		last := out[n-1]
		j.segs.willNeed(last.seg, last.segOff+last.Length, maxBytes)
		j.segs.willNeed(last.seg+1, 0, maxBytes)
	}
	return out, nil
}

// batchReaders is how many payloads ReadBatch reads at once. Large
// payloads are written around the page cache (see writePayload), so a
// batch's reads go to the device; one at a time, a 32 MiB batch of
// 256 KiB records took 26-277 ms between two batches' uploads.
const batchReaders = 4

// loadAll reads the payloads of recs, batchReaders at a time; after a
// failure the readers stop taking records.
func (j *Journal) loadAll(recs []Record) error {
	readers := min(batchReaders, len(recs))
	var next atomic.Int64
	var failed atomic.Bool
	errs := make([]error, readers)
	var wg sync.WaitGroup
	for w := range readers {
		wg.Go(func() {
			for !failed.Load() {
				i := int(next.Add(1) - 1)
				if i >= len(recs) {
					return
				}
				if err := j.load(&recs[i]); err != nil {
					errs[w] = err
					failed.Store(true)
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// AppendApply is Append with apply run once the record is committed and
// before it counts as applied (see appendApply): the disk writes the local
// image there.
func (j *Journal) AppendApply(ctx context.Context, r *Record, apply func() error) error {
	return j.appendApply(ctx, r, apply)
}

// Scan calls fn with the index entry (no payload) of every pending record
// with seq >= from, in seq order, until fn asks to stop or fails.
func (j *Journal) Scan(from uint64, fn func(Record) (stop bool, err error)) error {
	return j.scan(from, fn)
}

// Payload reads the payload of a data record: from its segment, or, for
// an image-backed record an older binary left, from the image with its
// pieces laid over (legacy.go).
func (j *Journal) Payload(r *Record) ([]byte, error) {
	c := *r
	if err := j.load(&c); err != nil {
		return nil, err
	}
	return c.Data, nil
}

// ReadAll returns every pending record in seq order (replay uses it).
func (j *Journal) ReadAll(fn func(Record) error) error {
	return j.scan(0, func(r Record) (bool, error) {
		if err := j.load(&r); err != nil {
			return true, err
		}
		return false, fn(r)
	})
}

// scan calls fn with the index entry (no payload) of every record with
// seq >= from, in seq order, until fn asks to stop or fails.
func (j *Journal) scan(from uint64, fn func(Record) (stop bool, err error)) error {
	if err := j.idx.flush(); err != nil {
		return err
	}
	// Entries up to drainedSeq may outlive their records (see trim.go).
	from = max(from, j.drainedSeq.Load()+1)
	return j.db.View(func(txn *badger.Txn) error {
		opts := badger.DefaultIteratorOptions
		opts.PrefetchValues = false
		opts.Prefix = recPrefix
		it := txn.NewIterator(opts)
		defer it.Close()
		for it.Seek(recKey(from)); it.Valid(); it.Next() {
			item := it.Item()
			seq := binary.BigEndian.Uint64(item.Key()[1:])
			var r Record
			if err := item.Value(func(v []byte) error {
				var err error
				r, err = decodeRecord(seq, v)
				return err
			}); err != nil {
				return err
			}
			stop, err := fn(r)
			if err != nil || stop {
				return err
			}
		}
		return nil
	})
}

// getRecord reads seq's index entry (no payload).
func (j *Journal) getRecord(seq uint64) (Record, error) {
	if err := j.idx.flush(); err != nil {
		return Record{}, fmt.Errorf("journal record %d: %w", seq, err)
	}
	if seq <= j.drainedSeq.Load() {
		return Record{}, fmt.Errorf("journal record %d: %w", seq, badger.ErrKeyNotFound)
	}
	return j.getRecordRaw(seq)
}

// getRecordRaw reads seq's index entry, drained or not.
func (j *Journal) getRecordRaw(seq uint64) (Record, error) {
	var r Record
	err := j.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(recKey(seq))
		if err != nil {
			return err
		}
		return item.Value(func(v []byte) error {
			r, err = decodeRecord(seq, v)
			return err
		})
	})
	if err != nil {
		return Record{}, fmt.Errorf("journal record %d: %w", seq, err)
	}
	return r, nil
}

// load reads a data record's payload from its segment (or, for an
// image-backed record an older binary left, from the image).
func (j *Journal) load(r *Record) error {
	if r.Kind != KindData {
		return nil
	}
	if r.seg == 0 {
		return j.loadImageBacked(r)
	}
	if r.seg == imageSeg {
		return j.loadImageRecord(r)
	}
	var err error
	r.Data, err = j.segs.read(r)
	return err
}

// Delete removes recs (drained, or already on the remote) and records
// lastEpoch as the remote's complete progress.
func (j *Journal) Delete(recs []Record, lastEpoch uint64) error {
	if len(recs) == 0 {
		return nil
	}
	legacy, pieceKeys := j.legacyKeys(recs)
	imgs := j.imgs.among(recs)
	var bytes int64
	for i := range recs {
		bytes += recs[i].payloadSize()
	}
	seqs := func(yield func(uint64) bool) {
		for i := range recs {
			if !yield(recs[i].Seq) {
				return
			}
		}
	}
	if err := j.deleteKeys(pieceKeys, seqs, recs[len(recs)-1].Seq, lastEpoch); err != nil {
		return err
	}
	return j.drained(recs[len(recs)-1].Seq, lastEpoch, int64(len(recs)), bytes, legacy, imgs)
}

// deleteKeys deletes, in one badger write batch, the index entries of the
// records with the given seqs and the pieces' keys, and records lastSeq
// and lastEpoch as drained.
func (j *Journal) deleteKeys(pieceKeys [][]byte, seqs iter.Seq[uint64], lastSeq, lastEpoch uint64) error {
	// Entries still queued for badger must land before these deletions,
	// or they would outlive them.
	if err := j.idx.flush(); err != nil {
		return fmt.Errorf("delete drained records: %w", err)
	}
	wb := j.db.NewWriteBatch()
	defer wb.Cancel()
	for _, k := range pieceKeys {
		if err := wb.Delete(k); err != nil {
			return fmt.Errorf("delete drained records: %w", err)
		}
	}
	if seqs != nil {
		for seq := range seqs {
			if err := wb.Delete(recKey(seq)); err != nil {
				return fmt.Errorf("delete drained records: %w", err)
			}
		}
	}
	var v [8]byte
	binary.BigEndian.PutUint64(v[:], lastSeq)
	if err := wb.Set(keyDrained, append([]byte(nil), v[:]...)); err != nil {
		return fmt.Errorf("delete drained records: %w", err)
	}
	binary.BigEndian.PutUint64(v[:], lastEpoch)
	if err := wb.Set(keyEpoch, append([]byte(nil), v[:]...)); err != nil {
		return fmt.Errorf("delete drained records: %w", err)
	}
	if err := wb.Flush(); err != nil {
		return fmt.Errorf("delete drained records: %w", err)
	}
	if lastSeq > j.drainedSeq.Load() {
		j.drainedSeq.Store(lastSeq)
		j.trim.kick()
	}
	return nil
}

// drained updates the journal after the deletion of drained records up to
// lastSeq (durable in badger, legacy among them): the drained epoch, the
// segments no pending record needs, and the pending counters.
func (j *Journal) drained(lastSeq, lastEpoch uint64, records, bytes int64, legacy []uint64, imgs []*imageRec) error {
	if legacy != nil || imgs != nil {
		// The writers waiting for these records go on, and writes over
		// image-backed ones stop capturing them, once their deletion is
		// durable (see legacy.go, imageRecs.drop).
		if err := j.syncIndex(); err != nil {
			return fmt.Errorf("delete drained records: %w", err)
		}
		j.imgs.drop(imgs)
		j.unbind(imgs)
	}
	j.drainedEpoch.Store(max(j.drainedEpoch.Load(), lastEpoch))
	// Whole segments whose records are all drained are deleted by the
	// trimmer, after the drained seq is durable (so no index entry it does
	// not cover can outlive its payload): deleting gigabytes of segment
	// files took seconds at the end of a drain (trim.go).
	j.trim.kick()
	j.log.Debug("journal: drained", "last_seq", lastSeq)
	j.mu.Lock()
	j.pendingBytes -= bytes
	j.pendingRecords -= records
	if j.pendingRecords < 0 || j.pendingBytes < 0 {
		j.pendingRecords, j.pendingBytes = max(j.pendingRecords, 0), max(j.pendingBytes, 0)
	}
	j.forgetLegacy(legacy)
	j.space.Broadcast()
	j.mu.Unlock()
	return nil
}

// Stats is a snapshot of the journal's counters.
type Stats struct {
	PendingRecords int64
	PendingBytes   int64
	MaxBytes       int64
	// OldestNotOnRemote: see Journal.OldestNotOnRemote.
	OldestNotOnRemote time.Time
	OpenEpoch         uint64
	ClosedEpoch       uint64
	EpochsClosed      uint64
	BlockedWriters    int
	DiskBytes         int64 // LSM + value log on disk
	// DirectEntries counts the entries written to the intent log with
	// O_DIRECT (see directCadence).
	DirectEntries uint64
	// ImageBacked counts the pending records whose payload only the local
	// image holds; Captures and CapturedBytes the copies made of such
	// records before a write changed the image over them (imagerec.go);
	// Binds the writes over such records that bound epochs instead of
	// copying (bind.go).
	ImageBacked   int64
	Captures      uint64
	CapturedBytes uint64
	Binds         uint64
}

// Stats returns the journal's counters.
func (j *Journal) Stats() Stats {
	j.mu.Lock()
	s := Stats{PendingRecords: j.pendingRecords, PendingBytes: j.pendingBytes, MaxBytes: j.max, BlockedWriters: j.blocked}
	j.mu.Unlock()
	j.barrierMu.RLock()
	s.OpenEpoch = j.epoch
	j.barrierMu.RUnlock()
	s.ClosedEpoch = j.closed.Load()
	s.EpochsClosed = j.epochsClosed.Load()
	s.OldestNotOnRemote = j.OldestNotOnRemote()
	s.DiskBytes = dirBytes(j.dir)
	s.DirectEntries = j.directEntries.Load()
	s.ImageBacked = j.imgs.uncaptured.Load()
	s.Captures = j.imgs.captures.Load()
	s.CapturedBytes = j.imgs.capturedBytes.Load()
	s.Binds = j.imgs.binds.Load()
	return s
}

// dirBytes is the disk space the journal's files take (allocated blocks,
// so sparse or preallocated files count for what they really use; badger's
// own Size is refreshed only once a minute).
func dirBytes(dir string) int64 {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var n int64
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			n += st.Blocks * 512
		} else {
			n += fi.Size()
		}
	}
	return n
}

// gcLoop reclaims value-log space: a queue writes once and deletes soon,
// so whole value-log files become garbage; RunValueLogGC rewrites at most
// one file per call, so it is repeated until it finds nothing.
func (j *Journal) gcLoop(every time.Duration) {
	defer close(j.gcDone)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-j.stopGC:
			return
		case <-t.C:
		}
		for i := 0; i < 16; i++ {
			if err := j.db.RunValueLogGC(0.5); err != nil {
				if !errors.Is(err, badger.ErrNoRewrite) && !errors.Is(err, badger.ErrRejected) {
					j.log.Warn("journal value-log GC", "err", err)
				}
				break
			}
		}
	}
}

// Close syncs and closes the journal. Stats stays usable afterwards.
func (j *Journal) Close() error {
	j.closing.Store(true)
	close(j.stopGC)
	<-j.gcDone
	j.trim.stop()
	j.idx.close()
	err := j.idx.failed()
	if err == nil {
		err = j.Sync()
	}
	if err == nil {
		// Drained segments the trimmer had not reached go now: a clean
		// stop gives their space back (their index entries may stay,
		// skipped). Otherwise the next Open deletes them.
		_, err = j.segs.reclaim(j.drainedSeq.Load(), j.syncIndex)
	}
	clean := false
	if err == nil {
		// Everything is in badger: once its logs are synced, the intent
		// logs can go, and a clean shutdown leaves none. Otherwise they
		// stay, and the next open replays them.
		j.filesMu.Lock()
		err = j.syncBeforeLogsGo()
		j.filesMu.Unlock()
		clean = err == nil
	}
	err = errors.Join(err, j.ilog.Close(clean))
	defer j.segs.close()
	if cerr := j.db.Close(); cerr != nil {
		return fmt.Errorf("close journal: %w", cerr)
	}
	return err
}

// badgerLogger routes badger's messages to slog; its Info and Debug chatter
// is dropped.
type badgerLogger struct{ l *slog.Logger }

// Errorf logs badger errors.
func (b badgerLogger) Errorf(f string, a ...any) {
	b.l.Error("badger: " + strings.TrimSpace(fmt.Sprintf(f, a...)))
}

// Warningf logs badger warnings.
func (b badgerLogger) Warningf(f string, a ...any) {
	b.l.Warn("badger: " + strings.TrimSpace(fmt.Sprintf(f, a...)))
}

// Infof drops badger chatter (tests may watch it, see testBadgerEvent).
func (b badgerLogger) Infof(f string, a ...any) {
	if testBadgerEvent != nil {
		testBadgerEvent(fmt.Sprintf(f, a...))
	}
}

// Debugf drops badger chatter (tests may watch it, see testBadgerEvent).
func (b badgerLogger) Debugf(f string, a ...any) {
	if testBadgerEvent != nil {
		testBadgerEvent(fmt.Sprintf(f, a...))
	}
}

// Test hooks, set only by the kill -9 child aimed at badger's background
// work (kill_compact_test.go): every info/debug message of badger, and
// memtables small enough that flushes and compactions happen every few
// hundred appends. Nil and zero in production.
var (
	testBadgerEvent    func(string)
	testBadgerMemTable int64
)
