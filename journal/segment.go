package journal

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/journal/internal/files"
)

// Payloads live in segment files, not in badger: badger keeps only the
// ordered index (seq -> epoch, range, kind, segment, offset, CRC). A queue
// whose entries are deleted soon after they are written is badger's worst
// case: its value log is reclaimed only from compaction statistics, which
// tiny, short-lived keys never produce, so a 1 GiB write left 1 GiB of
// value log behind after the drain (measured). A segment file is deleted as
// a whole once every record in it is drained, which bounds the journal's
// disk use by the pending bytes plus one segment per writer stream.

// defaultSegmentSize is the size at which the current segment is closed
// and a new one started.
const defaultSegmentSize = 64 << 20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc32c(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// segment is one append-only payload file.
type segment struct {
	id uint64
	f  *os.File
	// direct is the same file opened with O_DIRECT for large payloads
	// (see writePayload); nil where the filesystem refuses it, and for
	// segments of an earlier run, which are only read.
	direct *os.File
	// directRefused: a direct write got EINVAL; the segment's other
	// payloads go through the page cache without trying again.
	directRefused atomic.Bool
	size          int64 // bytes reserved so far (guarded by segments.mu)
	// lastSeq is the highest seq whose payload is in this segment; inflight
	// counts appends that reserved space but have not committed their index
	// entry yet. A segment may be deleted only when inflight is 0 and every
	// seq up to lastSeq is drained.
	lastSeq  atomic.Uint64
	inflight atomic.Int64
	dirty    atomic.Bool // written by an append since the last sync
	// copied: inline payloads were written to it (by the indexer or
	// replay) since its last sync; they are durable in the intent log, so
	// a barrier skips it, but the intent log files go only after it is
	// synced (syncCopied).
	copied atomic.Bool
	// writebackFrom is where the copied payloads whose writeback has not
	// been started begin (see startWriteback); only the indexer, one
	// goroutine, reads and writes it.
	writebackFrom int64
}

// writebackChunk is how many bytes of copied payloads startWriteback lets
// gather in a segment before it starts their writeback.
const writebackChunk = 1 << 20

// startWriteback starts writing the copied payloads in the segment up to
// end to the device, once a writebackChunk of them has gathered: the
// fdatasync before an intent log file is recycled then finds them written
// (or on their way) instead of writing 8 MiB at once, which barriers'
// fdatasyncs queued behind. In the database job (8 writers of 8 KiB, each
// followed by fdatasync, on ext4 on a loop device; bench/ab/db.sh, 6
// rounds) the fdatasync p99 fell to 0.54-0.91 of what it was, the writes/s
// unchanged (0.94-1.09). Starting it after every copy instead raised the
// p50. Best effort: an error here only means the writeback starts later;
// durability still comes from the fdatasync.
func (seg *segment) startWriteback(end int64) {
	from := min(seg.writebackFrom, end)
	if end-from < writebackChunk {
		return
	}
	_ = unix.SyncFileRange(int(seg.f.Fd()), from, end-from, unix.SYNC_FILE_RANGE_WRITE)
	seg.writebackFrom = end
}

// keep makes the segment outlive record seq (lastSeq only rises).
func (seg *segment) keep(seq uint64) {
	for {
		last := seg.lastSeq.Load()
		if last >= seq || seg.lastSeq.CompareAndSwap(last, seq) {
			return
		}
	}
}

// segments manages the segment files of a journal directory.
type segments struct {
	dir     string
	maxSize int64
	mu      sync.Mutex
	cur     *segment
	all     map[uint64]*segment
	next    uint64
	// created: a segment file was made since the last directory fsync,
	// whose name that fsync must make durable. dirMu is held from reading
	// it to the end of the fsync, so that a sync that finds it cleared
	// returns only after the fsync that cleared it: a barrier's sync and
	// the indexer's (syncCopied) run at the same time.
	created atomic.Bool
	dirMu   sync.Mutex
	// closeMu is held for reading by syncMarked while it fdatasyncs the
	// segments it listed, and for writing by reclaim while it closes
	// drained ones: a barrier's sync and the indexer's run under
	// different journal locks, neither of which reclaim takes.
	closeMu sync.RWMutex
	// barrierSyncs counts the fdatasyncs barriers made of segments (tests).
	barrierSyncs atomic.Uint64
}

func segName(id uint64) string { return fmt.Sprintf("seg-%016x.dat", id) }

// openSegments opens every segment file in dir for reading; new payloads
// go to a fresh segment.
func openSegments(dir string, maxSize int64) (*segments, error) {
	if maxSize <= 0 {
		maxSize = defaultSegmentSize
	}
	s := &segments{dir: dir, maxSize: maxSize, all: map[uint64]*segment{}, next: 1}
	ids, err := files.ListNumbered(dir, "seg-")
	if err != nil {
		return nil, fmt.Errorf("list journal segments: %w", err)
	}
	for _, id := range ids {
		name := segName(id)
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open journal segment %s: %w", name, err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("open journal segment %s: %w", name, err)
		}
		seg := &segment{id: id, f: f, size: st.Size()}
		s.all[id] = seg
		if id >= s.next {
			s.next = id + 1
		}
	}
	return s, nil
}

// reserve finds room for n payload bytes: the segment and offset to write
// them at. The caller writes them, commits the index entry, then calls
// committed. A payload writePayload will write with O_DIRECT gets an
// offset aligned for it.
func (s *segments) reserve(n int64) (*segment, int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	off := int64(0)
	if s.cur != nil {
		off = s.cur.size
		if s.cur.direct != nil && directSized(n) {
			off = (off + files.DirectAlign - 1) &^ (files.DirectAlign - 1)
		}
	}
	if s.cur == nil || (s.cur.size > 0 && off+n > s.maxSize) {
		id := s.next
		path := filepath.Join(s.dir, segName(id))
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
		if err != nil {
			return nil, 0, fmt.Errorf("create journal segment: %w", err)
		}
		s.next++
		s.created.Store(true)
		preallocate(f, s.maxSize)
		s.cur = &segment{id: id, f: f}
		// Not every filesystem takes O_DIRECT (tmpfs before Linux 6.6):
		// large payloads then go through the page cache too.
		s.cur.direct, _ = os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
		s.all[id] = s.cur
		off = 0
	}
	seg := s.cur
	seg.size = off + n
	seg.inflight.Add(1)
	return seg, off, nil
}

// preallocate allocates the whole of a new segment file: an O_DIRECT
// write past the end of a file extends it, and ext4 runs extending direct
// writes one at a time under the inode's exclusive lock (and its orphan
// list); inside the file's size they run in parallel. fio sequential
// 1 MiB writes at iodepth 8 went from 614-840 to 1,011-1,500 MiB/s,
// random 4 KiB from 28.8-38.8 k to 32.6-49.5 k IOPS. Best effort: a
// filesystem without fallocate takes the writes all the same, and one
// with less than preallocFree segments free is left alone, where a
// whole segment would take space the image and the journal's own
// pending writes may need (ext4 keeps what a failed fallocate got).
func preallocate(f *os.File, n int64) {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil || st.Bavail*uint64(st.Bsize) < preallocFree*uint64(n) {
		return
	}
	_ = unix.Fallocate(int(f.Fd()), 0, 0, n)
}

// preallocFree is how many segments' worth of free space a filesystem
// needs for preallocate to allocate one.
const preallocFree = 4

// Payloads of at least directMin bytes, in whole files.DirectAlign blocks, are
// written with O_DIRECT. Through the page cache, a streaming writer's
// segment writes cost most of the daemon's CPU: perf put 68 % of the
// samples of fio sequential 1 MiB writes (remote detached) in their
// pwrite, nearly all of it copying into freshly allocated page cache
// pages, which a journal written once and read once by the flusher gains
// nothing from. Small payloads stay buffered: a direct write waits for the
// device.
const directMin = 64 << 10

func directSized(n int64) bool { return n >= directMin && n%files.DirectAlign == 0 }

// directBufs holds directMax-byte buffers aligned for O_DIRECT.
var directBufs = sync.Pool{New: func() any {
	b := files.AlignedBuf(directMax)
	return &b
}}

// directMax is the size of a pooled direct buffer: the default largest
// FUSE write (fusefs.Options.MaxWrite).
const directMax = 256 << 10

// writePayload writes an append's payload p at off (from reserve). A
// directSized payload at an aligned offset goes through the O_DIRECT
// descriptor, copied to an aligned buffer unless p already is one; the
// rest, and everything where the filesystem refuses the direct write,
// through the page cache. Either way the bytes wait for the barrier's
// fdatasync to be durable (a direct write may sit in the device's cache).
func (seg *segment) writePayload(p []byte, off int64) error {
	n := int64(len(p))
	if seg.direct != nil && directSized(n) && off%files.DirectAlign == 0 && !seg.directRefused.Load() {
		buf := p
		var pooled *[]byte
		if !files.IsAligned(p) {
			if n <= directMax {
				pooled = directBufs.Get().(*[]byte)
				buf = (*pooled)[:n]
			} else {
				buf = files.AlignedBuf(int(n))
			}
			copy(buf, p)
		}
		_, err := seg.direct.WriteAt(buf, off)
		if pooled != nil {
			directBufs.Put(pooled)
		}
		if !errors.Is(err, unix.EINVAL) {
			return err
		}
		// EINVAL: this filesystem's direct I/O wants other alignments;
		// the page cache takes it, and the segment's later payloads.
		seg.directRefused.Store(true)
	}
	_, err := seg.f.WriteAt(p, off)
	return err
}

// writeAt writes an inline payload replayed from the intent log at off
// in segment id, making the file if a power loss took it.
func (s *segments) writeAt(id uint64, off int64, data []byte) error {
	s.mu.Lock()
	seg := s.all[id]
	if seg == nil {
		f, err := os.OpenFile(filepath.Join(s.dir, segName(id)), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			s.mu.Unlock()
			return fmt.Errorf("create journal segment %s: %w", segName(id), err)
		}
		s.created.Store(true)
		seg = &segment{id: id, f: f}
		s.all[id] = seg
		s.next = max(s.next, id+1)
	}
	seg.size = max(seg.size, off+int64(len(data)))
	s.mu.Unlock()
	if _, err := seg.f.WriteAt(data, off); err != nil {
		return fmt.Errorf("write journal segment %s at %d: %w", segName(id), off, err)
	}
	seg.copied.Store(true)
	return nil
}

// writeInline writes the inline payloads of items to their segments, in
// order, one pwritev per run of payloads that follow each other in a
// segment. It returns how many items are written and the first failure.
func writeInline(items []indexItem) (int, error) {
	var seg *segment
	var off, end int64
	var iov [][]byte
	first := 0 // item of iov[0]
	flush := func() error {
		if len(iov) == 0 {
			return nil
		}
		err := pwritev(seg.f, iov, off)
		iov = iov[:0]
		if err != nil {
			return fmt.Errorf("write inline payloads to journal segment %s at %d: %w", segName(seg.id), off, err)
		}
		seg.copied.Store(true)
		seg.startWriteback(end)
		return nil
	}
	for i, it := range items {
		if it.inline == nil {
			continue
		}
		if it.seg != seg || it.off != end || len(iov) == maxIOV {
			if err := flush(); err != nil {
				return first, err
			}
			seg, off, end, first = it.seg, it.off, it.off, i
		}
		iov = append(iov, it.inline)
		end += int64(len(it.inline))
	}
	if err := flush(); err != nil {
		return first, err
	}
	return len(items), nil
}

// syncCopied fdatasyncs every segment inline payloads were written to
// since its last sync (and the directory, if segments were made): before
// the intent log files holding those payloads go.
func (s *segments) syncCopied() error {
	return s.syncMarked(func(seg *segment) *atomic.Bool { return &seg.copied }, nil)
}

// get returns segment id for reading.
func (s *segments) get(id uint64) (*segment, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seg := s.all[id]
	if seg == nil {
		return nil, fmt.Errorf("journal segment %s is missing", segName(id))
	}
	return seg, nil
}

// willNeed asks the kernel to read n bytes of segment id from off into
// the page cache in the background (posix_fadvise WILLNEED). Large
// payloads are written around the page cache (writePayload), so the
// flusher's reads of them go to the device, between two batches'
// uploads: read one by one and without it, flushbench at 512 MiB drained
// at 0.69-0.85 of the raw uploader against 0.92-0.93 before. The pages it
// asks for are the kernel's to drop, not the daemon's memory. Best
// effort: a segment that is gone or a refused advice is ignored.
func (s *segments) willNeed(id uint64, off, n int64) {
	s.mu.Lock()
	seg := s.all[id]
	s.mu.Unlock()
	if seg == nil || n <= 0 {
		return
	}
	_ = unix.Fadvise(int(seg.f.Fd()), off, n, unix.FADV_WILLNEED)
}

// read returns r's payload, checked against its CRC.
func (s *segments) read(r *Record) ([]byte, error) {
	seg, err := s.get(r.seg)
	if err != nil {
		return nil, fmt.Errorf("journal record %d: %w", r.Seq, err)
	}
	buf := make([]byte, r.Length)
	if _, err := seg.f.ReadAt(buf, r.segOff); err != nil {
		return nil, fmt.Errorf("journal record %d: read %s at %d: %w", r.Seq, segName(r.seg), r.segOff, err)
	}
	if got := crc32c(buf); got != r.crc {
		return nil, fmt.Errorf("journal record %d: payload CRC-32C is 0x%08x, the index says 0x%08x (%s at %d)", r.Seq, got, r.crc, segName(r.seg), r.segOff)
	}
	return buf, nil
}

// sync makes every segment an append wrote to since the last sync
// durable, and the names of the segments made since (a barrier).
func (s *segments) sync() error {
	return s.syncMarked(func(seg *segment) *atomic.Bool { return &seg.dirty }, &s.barrierSyncs)
}

// syncMarked fdatasyncs the segments whose flag (mark) is set, clearing it
// (set again if the sync fails), then the directory if segments were made
// since its last fsync. count, if not nil, counts the fdatasyncs.
func (s *segments) syncMarked(mark func(*segment) *atomic.Bool, count *atomic.Uint64) error {
	if err := s.syncListed(mark, count); err != nil {
		return err
	}
	s.dirMu.Lock()
	defer s.dirMu.Unlock()
	if s.created.Swap(false) {
		if err := files.SyncDir(s.dir); err != nil {
			s.created.Store(true)
			return fmt.Errorf("sync journal directory: %w", err)
		}
	}
	return nil
}

// syncListed fdatasyncs the segments whose flag is set, holding closeMu
// for reading so that reclaim cannot close one meanwhile.
func (s *segments) syncListed(mark func(*segment) *atomic.Bool, count *atomic.Uint64) error {
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	s.mu.Lock()
	var list []*segment
	for _, seg := range s.all {
		if mark(seg).Load() {
			list = append(list, seg)
		}
	}
	s.mu.Unlock()
	for _, seg := range list {
		m := mark(seg)
		m.Store(false)
		if count != nil {
			count.Add(1)
		}
		if err := files.Datasync(seg.f); err != nil {
			m.Store(true)
			return fmt.Errorf("sync journal segment %s: %w", segName(seg.id), err)
		}
	}
	return nil
}

// reclaim deletes the segments whose records are all drained (the current
// one too, once it is fully drained: the next append starts a new one), i.e. every seq in them is <= drained. before, if not
// nil, runs first when there is anything to delete.
func (s *segments) reclaim(drained uint64, before func() error) (int, error) {
	s.mu.Lock()
	var victims []*segment
	for id, seg := range s.all {
		if seg.inflight.Load() != 0 || seg.lastSeq.Load() > drained {
			continue
		}
		if seg == s.cur {
			if seg.lastSeq.Load() == 0 {
				continue // fresh, nothing committed in it yet
			}
			s.cur = nil // the next append starts a new segment
		}
		victims = append(victims, seg)
		delete(s.all, id)
	}
	s.mu.Unlock()
	if len(victims) > 0 && before != nil {
		if err := before(); err != nil {
			s.mu.Lock()
			for _, seg := range victims {
				s.all[seg.id] = seg
			}
			s.mu.Unlock()
			return 0, err
		}
	}
	var errs []error
	s.closeMu.Lock()
	for _, seg := range victims {
		seg.close()
	}
	s.closeMu.Unlock()
	for _, seg := range victims {
		if err := os.Remove(filepath.Join(s.dir, segName(seg.id))); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("delete drained journal segment: %w", err))
		}
	}
	return len(victims), errors.Join(errs...)
}

// ids lists the segment ids, sorted (tests and recovery).
func (s *segments) ids() []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]uint64, 0, len(s.all))
	for id := range s.all {
		out = append(out, id)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func (s *segments) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, seg := range s.all {
		seg.close()
	}
}

func (seg *segment) close() {
	seg.f.Close()
	if seg.direct != nil {
		seg.direct.Close()
	}
}

// maxIOV is the most buffers one pwritev takes (Linux's IOV_MAX).
const maxIOV = 1024

// pwritev writes bufs back to back at off in f, in as few pwritev calls
// as it takes.
func pwritev(f *os.File, bufs [][]byte, off int64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var werr error
	if err := rc.Control(func(fd uintptr) {
		for len(bufs) > 0 {
			n, err := unix.Pwritev(int(fd), bufs, off)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				werr = err
				return
			}
			if n == 0 {
				werr = io.ErrShortWrite
				return
			}
			off += int64(n)
			for n > 0 {
				if n < len(bufs[0]) {
					bufs[0] = bufs[0][n:]
					break
				}
				n -= len(bufs[0])
				bufs = bufs[1:]
			}
		}
	}); err != nil {
		return err
	}
	return werr
}
