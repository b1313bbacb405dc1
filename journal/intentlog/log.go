package intentlog

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/journal/internal/files"
)

// File is one intent log file, as Done hands it to Recycle.
type File struct {
	id, gen, inc uint64
	f            *os.File
	slots        int64
	// used and full are guarded by Log.mu: slots reserved, and whether
	// reservations have moved on to the next file.
	used int64
	full bool
	// resolved counts slots whose entries are in the index, or that will
	// never be (their write failed, or they were skipped): when it
	// reaches used in a full file, the file can go.
	resolved atomic.Int64
	dirty    atomic.Bool
	// direct is f opened with O_DIRECT (nil where the filesystem refused
	// it), for the entries of writers that fsync after every write (see
	// WriteDirect); directRefused once a direct write got EINVAL.
	direct        *os.File
	directRefused atomic.Bool
}

// Span is a run of slots that Write or WriteDirect reserved in one file:
// what Resolve takes once their entries are in the index.
type Span struct {
	file     *File
	first, n int64
}

// Log is the set of intent log files of a journal directory: the one
// being written, the full ones whose entries are not all in the index
// yet, recycled ones ready for reuse, and a spare made ahead of need.
type Log struct {
	dir   string
	slots int64 // per new file
	mu    sync.Mutex
	cur   *File
	files map[uint64]*File // in use: cur, and full ones not yet resolved
	free  []*File          // recycled, ready to be the next
	next  uint64           // id of the next file made
	gen   uint64           // generation of the last file started
	// spare is the next file, made ahead in the background (spareErr if
	// that failed); spareBusy while one is being made.
	spare     *File
	spareErr  error
	spareBusy bool
	spareDone *sync.Cond
}

// maxFreeLogs is how many recycled files are kept ready; more are deleted.
const maxFreeLogs = 2

// New returns the intent log of dir. New files get slots slots (0 means
// DefaultSlots), ids from next on and generations above gen: replay
// passes what it found, so that new files sort after the old. The first
// file is made in the background at once.
func New(dir string, slots int64, next, gen uint64) *Log {
	if slots <= 0 {
		slots = DefaultSlots
	}
	l := &Log{dir: dir, slots: slots, files: map[uint64]*File{}, next: next, gen: gen}
	l.spareDone = sync.NewCond(&l.mu)
	l.mu.Lock()
	l.prepareSpare()
	l.mu.Unlock()
	return l
}

// create makes file id: header, zeros for every slot, fdatasync, and an
// fsync of the directory so that its name survives a power loss.
func (l *Log) create(id uint64) (*File, error) {
	path := filepath.Join(l.dir, Name(id))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create intent log: %w", err)
	}
	// Generation and incarnation 0 until the file is started (see start):
	// as made, it holds nothing to replay.
	lf := &File{id: id, f: f, slots: l.slots}
	fail := func(err error) (*File, error) {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create intent log %s: %w", Name(id), err)
	}
	buf := make([]byte, 1<<20)
	size := HeaderSize + l.slots*SlotSize
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return fail(err)
		}
	}
	if _, err := f.WriteAt(lf.header(), 0); err != nil {
		return fail(err)
	}
	if err := files.Datasync(f); err != nil {
		return fail(err)
	}
	if err := files.SyncDir(l.dir); err != nil {
		return fail(err)
	}
	// Best effort: without it every entry goes through the page cache.
	lf.direct, _ = os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
	return lf, nil
}

// closeFiles closes lf's descriptors.
func (lf *File) closeFiles() {
	if lf.direct != nil {
		lf.direct.Close()
	}
	lf.f.Close()
}

// start makes lf the next file: a new generation and incarnation in its
// header (one pwrite, synced with its first slots by the next Sync), which
// voids every slot of its previous use. Called with l.mu held.
func (l *Log) start(lf *File) error {
	l.gen++
	lf.gen, lf.inc = l.gen, rand.Uint64()|1
	lf.used, lf.full = 0, false
	lf.resolved.Store(0)
	if _, err := lf.f.WriteAt(lf.header(), 0); err != nil {
		return fmt.Errorf("start intent log %s: %w", Name(lf.id), err)
	}
	lf.dirty.Store(true)
	return nil
}

// prepareSpare makes the next file in the background, unless one is ready
// or being made. Called with l.mu held.
func (l *Log) prepareSpare() {
	if l.spare != nil || l.spareBusy {
		return
	}
	l.spareBusy = true
	id := l.next
	l.next++
	go func() {
		lf, err := l.create(id)
		l.mu.Lock()
		l.spare, l.spareErr, l.spareBusy = lf, err, false
		l.spareDone.Broadcast()
		l.mu.Unlock()
	}()
}

// rotate starts the next file: a recycled one, else the spare (waiting
// for it if it is still being made). Called with l.mu held, which it
// releases while it waits: the caller checks l.cur again after it.
func (l *Log) rotate() error {
	var next *File
	if n := len(l.free); n > 0 {
		next, l.free = l.free[n-1], l.free[:n-1]
	} else if l.spare != nil {
		next, l.spare = l.spare, nil
	} else {
		if l.spareErr != nil {
			err := l.spareErr
			l.spareErr = nil
			return err
		}
		l.prepareSpare()
		l.spareDone.Wait()
		return nil
	}
	if err := l.start(next); err != nil {
		l.free = append(l.free, next)
		return err
	}
	if l.cur != nil {
		l.cur.full = true
	}
	l.cur = next
	l.files[next.id] = next
	if len(l.free) == 0 {
		l.prepareSpare()
	}
	return nil
}

// slotBufs holds one-slot write buffers for Write.
var slotBufs = sync.Pool{New: func() any { return new([SlotSize]byte) }}

// Write puts entries into the log, one slot each and their inline
// payloads after them, and returns the spans they took. An entry and its
// payload are never split between files: the rest of a file too short for
// one is left unused. When it returns nil they survive kill -9 (they are
// in the page cache); Sync makes them survive power loss. Inline payloads
// then point at the log's copy (see Inline).
func (l *Log) Write(entries []Entry) ([]Span, error) {
	for _, e := range entries {
		if len(e.Key) > slotKeyMax || len(e.Val) > slotValMax {
			return nil, fmt.Errorf("intent log: a %d-byte key or %d-byte value does not fit a slot", len(e.Key), len(e.Val))
		}
		if n := entrySlots(e); e.Inline != nil && n > l.slots/4 {
			return nil, fmt.Errorf("intent log: a %d-byte inline payload does not fit a quarter of a %d-slot file", len(e.Inline.Data), l.slots)
		}
	}
	var spans []Span
	var ends []int // spans[k] holds entries[ends[k-1]:ends[k]]
	l.mu.Lock()
	for i := 0; i < len(entries); {
		if l.cur == nil || l.cur.slots-l.cur.used < entrySlots(entries[i]) {
			if cur := l.cur; cur != nil && cur.used < cur.slots {
				// The tail that does not fit the entry stays unused.
				cur.resolved.Add(cur.slots - cur.used)
				cur.used = cur.slots
			}
			if err := l.rotate(); err != nil {
				l.mu.Unlock()
				l.Resolve(spans)
				return nil, err
			}
			continue
		}
		sp := Span{file: l.cur, first: l.cur.used}
		for i < len(entries) && l.cur.slots-l.cur.used >= entrySlots(entries[i]) {
			n := entrySlots(entries[i])
			l.cur.used += n
			sp.n += n
			i++
		}
		spans = append(spans, sp)
		ends = append(ends, i)
	}
	l.mu.Unlock()
	i := 0
	for k, sp := range spans {
		var buf []byte
		var one *[SlotSize]byte
		if sp.n == 1 {
			// The write path logs one slot per append: a pooled buffer
			// rather than an allocation each (it escapes into the write).
			one = slotBufs.Get().(*[SlotSize]byte)
			buf = one[:]
		} else {
			buf = make([]byte, sp.n*SlotSize)
		}
		for s := int64(0); i < ends[k]; i++ {
			e := entries[i]
			n := entrySlots(e)
			encodeSlot(buf[s*SlotSize:(s+1)*SlotSize], sp.file.inc, uint64(sp.first+s), e, n-1)
			if e.Inline != nil {
				putInline(buf[(s+1)*SlotSize:(s+n)*SlotSize], e.Inline)
			}
			s += n
		}
		_, err := sp.file.f.WriteAt(buf, HeaderSize+sp.first*SlotSize)
		if one != nil {
			slotBufs.Put(one)
		}
		if err != nil {
			// The append fails: none of its slots goes to the index.
			// Those already written may still be replayed after a crash,
			// which is harmless: the write was never acknowledged, and
			// replay makes the image and the blob agree on it.
			l.Resolve(spans)
			return nil, fmt.Errorf("write intent log %s: %w", Name(sp.file.id), err)
		}
		sp.file.dirty.Store(true)
	}
	return spans, nil
}

// directSlots is one files.DirectAlign block of slots. An entry written
// with O_DIRECT starts and ends on a block boundary, so that no page it
// covers is shared with slots written through the page cache: the kernel
// writes back and invalidates cached pages in a direct write's range, and
// a buffered write racing that on a shared page could be lost from the
// cache's view.
const directSlots = files.DirectAlign / SlotSize

// WriteDirect writes one entry with its inline payload through the file's
// O_DIRECT descriptor, in whole blocks (the slots after the payload up to
// the block's end are zeros, which replay skips as invalid), so that the
// bytes are on the device when it returns. A barrier after it then only
// flushes the device's cache, as it does for a local file written with
// direct I/O, instead of writing pages back first: that writeback was most
// of the latency of an fsync after a 4 KiB write. ok is false, with
// nothing written, where the current file has no direct descriptor or e
// no inline payload: the caller uses Write. The padding is resolved with
// the span.
func (l *Log) WriteDirect(e Entry) (spans []Span, ok bool, err error) {
	if len(e.Key) > slotKeyMax || len(e.Val) > slotValMax || e.Inline == nil {
		return nil, false, nil
	}
	n := entrySlots(e)
	need := (n + directSlots - 1) / directSlots * directSlots
	if need > l.slots/4 {
		return nil, false, nil
	}
	l.mu.Lock()
	for {
		cur := l.cur
		if cur != nil && (cur.direct == nil || cur.directRefused.Load()) {
			l.mu.Unlock()
			return nil, false, nil
		}
		var pad int64
		if cur != nil {
			pad = (directSlots - cur.used%directSlots) % directSlots
		}
		if cur == nil || cur.slots-cur.used < pad+need {
			if cur != nil && cur.used < cur.slots {
				cur.resolved.Add(cur.slots - cur.used)
				cur.used = cur.slots
			}
			if err := l.rotate(); err != nil {
				l.mu.Unlock()
				return nil, true, err
			}
			continue
		}
		// The slots skipped to reach a block boundary are never written.
		cur.resolved.Add(pad)
		cur.used += pad
		spans = []Span{{file: cur, first: cur.used, n: need}}
		cur.used += need
		break
	}
	l.mu.Unlock()
	sp := spans[0]
	buf := files.AlignedBuf(int(need * SlotSize))
	encodeSlot(buf[:SlotSize], sp.file.inc, uint64(sp.first), e, n-1)
	putInline(buf[SlotSize:n*SlotSize], e.Inline)
	off := HeaderSize + sp.first*SlotSize
	_, err = sp.file.direct.WriteAt(buf, off)
	if errors.Is(err, unix.EINVAL) {
		// This filesystem wants other alignments for direct I/O: the page
		// cache takes this entry and the file's later ones.
		sp.file.directRefused.Store(true)
		_, err = sp.file.f.WriteAt(buf, off)
	}
	if err != nil {
		l.Resolve(spans)
		return nil, true, fmt.Errorf("write intent log %s: %w", Name(sp.file.id), err)
	}
	// The device may hold the bytes in its volatile cache: the barrier's
	// fdatasync flushes it.
	sp.file.dirty.Store(true)
	return spans, true, nil
}

// Resolve records that the entries in spans are in the index, or never
// will be: a full file whose slots are all resolved is Done.
func (l *Log) Resolve(spans []Span) {
	for _, sp := range spans {
		sp.file.resolved.Add(sp.n)
	}
}

// Sync fdatasyncs every file written since its last sync, in parallel.
// It must not overlap Recycle (see the package comment).
func (l *Log) Sync() error {
	l.mu.Lock()
	var list []*File
	for _, lf := range l.files {
		if lf.dirty.Load() {
			list = append(list, lf)
		}
	}
	l.mu.Unlock()
	errs := make([]error, len(list))
	var wg sync.WaitGroup
	for i, lf := range list {
		do := func() {
			lf.dirty.Store(false)
			if err := files.Datasync(lf.f); err != nil {
				lf.dirty.Store(true)
				errs[i] = fmt.Errorf("sync intent log %s: %w", Name(lf.id), err)
			}
		}
		if i == len(list)-1 {
			do()
		} else {
			wg.Go(do)
		}
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Done returns the files that are full and wholly resolved: they can be
// recycled once what their entries became (the index, and the segments
// their payloads went to) is durable.
func (l *Log) Done() []*File {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*File
	for _, lf := range l.files {
		if lf.full && lf.resolved.Load() == lf.used {
			out = append(out, lf)
		}
	}
	return out
}

// Recycle takes done files (from Done, with what their entries became
// durable since) out of use, keeping up to maxFreeLogs for reuse and
// deleting the others. It must not overlap Sync (see the package comment).
func (l *Log) Recycle(done []*File) error {
	var drop []*File
	l.mu.Lock()
	for _, lf := range done {
		delete(l.files, lf.id)
		if l.cur == lf {
			l.cur = nil
		}
		if len(l.free) < maxFreeLogs && lf.slots == l.slots {
			l.free = append(l.free, lf)
		} else {
			drop = append(drop, lf)
		}
	}
	l.mu.Unlock()
	return l.remove(drop)
}

// remove closes and deletes files no longer in use.
func (l *Log) remove(list []*File) error {
	var errs []error
	for _, lf := range list {
		lf.closeFiles()
		if err := os.Remove(filepath.Join(l.dir, Name(lf.id))); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("delete intent log: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Close closes the files. With clean (every entry is in the index, and
// the index is durable) it deletes them all, so that a clean shutdown
// leaves none; otherwise the files in use stay for the next open to
// replay.
func (l *Log) Close(clean bool) error {
	l.mu.Lock()
	for l.spareBusy {
		l.spareDone.Wait()
	}
	idle := l.free
	if l.spare != nil {
		idle = append(idle, l.spare)
	}
	l.spare, l.free = nil, nil
	var used []*File
	for _, lf := range l.files {
		used = append(used, lf)
	}
	l.files = map[uint64]*File{}
	l.cur = nil
	l.mu.Unlock()
	err := l.remove(idle)
	if clean {
		return errors.Join(err, l.remove(used))
	}
	for _, lf := range used {
		lf.closeFiles()
	}
	return err
}
