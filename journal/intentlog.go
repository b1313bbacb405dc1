package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// The intent log makes an append's index entries survive kill -9 with one
// pwrite, instead of a badger commit on the write path.
//
// The index entry an append makes (its record) is written to the intent
// log as a fixed-size slot; the append is then complete. The indexer
// (indexer.go) commits the entries to badger in large transactions, in
// the background. A badger commit per
// write, even shared by a group of concurrent writes, cost 45 % of random
// 4 KiB IOPS through FUSE (27 k against 48 k with the commit skipped, same
// run), mostly in goroutine hand-offs and thread wake-ups rather than in
// badger's own work.
//
// Badger stays the ordered index that everything reads (the flusher,
// replay); reads wait for the indexer first, so they see every append
// that returned before them. A barrier fdatasyncs the intent log's dirty
// files instead of badger's WAL. Open replays every valid slot into
// badger before anything reads it, skipping records already drained.
//
// A file, ilog-<id>.dat, is a header block (magic, id, generation, a
// random incarnation, slot count, CRC) and fixed-size slots. It is written
// with zeros in full when made (and fdatasync'ed, its name too), so a slot
// write never changes its size or allocation: fdatasync then writes the
// data only, without a filesystem journal commit. A slot counts only with
// the right magic, CRC, the file's incarnation and its own index: a slot
// torn by a kill, never written, or left from the file's previous use, is
// ignored. Each slot stands alone, and slots are replayed in generation
// and slot order, which is the order their appends reserved them in. Once a file is full,
// every slot in it is in badger and badger's logs have been fsync'ed since,
// it is recycled: a new header (next generation, new incarnation) makes it
// the next file, with no fsync and no directory change. Making files (in
// the background, ahead of need) is the slow path: under heavy writes a
// directory fsync took long enough to stall writers (p99.9 52 ms).
//
// Inline payloads: a small record's payload (up to Options.InlineMax)
// travels in the intent log too, in the slots right after its entry's, in
// the same pwrite; its place in a segment is reserved at append but the
// indexer writes it there, before badger gets the entry (so every read,
// which waits for the indexer, finds it). A barrier then needs no segment
// fdatasync for small writes: segment files grow, and an fdatasync of a
// grown file commits the filesystem's journal (p50 346 µs for a barrier
// after one 4 KiB write), while the intent log's files never change size.
// The segments the indexer wrote to are fdatasync'ed before an intent log
// file is recycled or deleted, and replay writes the payloads again. The
// data slots are a length, a CRC-32C and the payload: a payload whose CRC
// does not check (a torn write) voids its entry.

const (
	slotSize         = 128
	ilogHeaderSize   = 4096
	defaultIlogSlots = 64 << 10   // 8 MiB of slots per file
	inlineHeader     = 8          // payload length and CRC-32C before an inline payload
	defaultInlineMax = 32 << 10   // largest inline payload by default
	ilogMagic        = 0x766c6f67 // "vlog"
	slotMagic        = 0x76736c74 // "vslt"
	slotKeyOff       = 32
	slotKeyMax       = 24
	slotValOff       = slotKeyOff + slotKeyMax
	slotValMax       = slotSize - slotValOff
)

// ilogFile is one intent log file.
type ilogFile struct {
	id, gen, inc uint64
	f            *os.File
	slots        int64
	// used and full are guarded by intentLog.mu: slots reserved, and
	// whether reservations have moved on to the next file.
	used int64
	full bool
	// resolved counts slots whose entries are in badger, or that will never
	// be (their write failed): when it reaches used in a full file, the
	// file can go.
	resolved atomic.Int64
	dirty    atomic.Bool
	// direct is f opened with O_DIRECT (nil where the filesystem refused
	// it), for the entries of writers that fsync after every write (see
	// writeDirect); directRefused once a direct write got EINVAL.
	direct        *os.File
	directRefused atomic.Bool
}

// inlinePayload is a record's payload carried in the intent log: the
// indexer writes data at off in seg (reserved by the append) before badger
// gets the record's entry. After write, data is the intent log's copy.
type inlinePayload struct {
	seg  *segment
	off  int64
	data []byte
	crc  uint32 // CRC-32C of data (the record's)
}

// inlineSlots is how many slots an n-byte inline payload takes.
func inlineSlots(n int) int64 { return int64(inlineHeader+n+slotSize-1) / slotSize }

// entrySlots is how many slots kv takes: its own and its payload's.
func entrySlots(kv keyValue) int64 {
	if kv.inline == nil {
		return 1
	}
	return 1 + inlineSlots(len(kv.inline.data))
}

// slotSpan is a run of reserved slots in one file.
type slotSpan struct {
	file     *ilogFile
	first, n int64
}

// intentLog manages the intent log files of a journal directory.
type intentLog struct {
	dir   string
	slots int64 // per new file
	mu    sync.Mutex
	cur   *ilogFile
	files map[uint64]*ilogFile // in use: cur, and full ones not yet in badger
	free  []*ilogFile          // recycled, ready to be the next
	next  uint64               // id of the next file made
	gen   uint64               // generation of the last file started
	// spare is the next file, made ahead in the background (spareErr if
	// that failed); spareBusy while one is being made.
	spare     *ilogFile
	spareErr  error
	spareBusy bool
	spareDone *sync.Cond
}

func ilogName(id uint64) string { return fmt.Sprintf("ilog-%016x.dat", id) }

// maxFreeLogs is how many recycled files are kept ready; more are deleted.
const maxFreeLogs = 2

func newIntentLog(dir string, slots int64, next, gen uint64) *intentLog {
	if slots <= 0 {
		slots = defaultIlogSlots
	}
	l := &intentLog{dir: dir, slots: slots, files: map[uint64]*ilogFile{}, next: next, gen: gen}
	l.spareDone = sync.NewCond(&l.mu)
	l.mu.Lock()
	l.prepareSpare()
	l.mu.Unlock()
	return l
}

// create makes file id: header, zeros for every slot, fdatasync, and an
// fsync of the directory so that its name survives a power loss.
func (l *intentLog) create(id uint64) (*ilogFile, error) {
	path := filepath.Join(l.dir, ilogName(id))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create intent log: %w", err)
	}
	// Generation and incarnation 0 until the file is started (see start):
	// as made, it holds nothing to replay.
	lf := &ilogFile{id: id, f: f, slots: l.slots}
	fail := func(err error) (*ilogFile, error) {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create intent log %s: %w", ilogName(id), err)
	}
	buf := make([]byte, 1<<20)
	size := ilogHeaderSize + l.slots*slotSize
	for off := int64(0); off < size; off += int64(len(buf)) {
		n := min(int64(len(buf)), size-off)
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return fail(err)
		}
	}
	if _, err := f.WriteAt(lf.header(), 0); err != nil {
		return fail(err)
	}
	if err := datasync(f); err != nil {
		return fail(err)
	}
	if err := syncDir(l.dir); err != nil {
		return fail(err)
	}
	// Best effort: without it every entry goes through the page cache.
	lf.direct, _ = os.OpenFile(path, os.O_WRONLY|unix.O_DIRECT, 0)
	return lf, nil
}

// closeFiles closes lf's descriptors.
func (lf *ilogFile) closeFiles() {
	if lf.direct != nil {
		lf.direct.Close()
	}
	lf.f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

const ilogHeaderUsed = 40

func (lf *ilogFile) header() []byte {
	h := make([]byte, ilogHeaderUsed)
	binary.LittleEndian.PutUint32(h[0:], ilogMagic)
	binary.LittleEndian.PutUint64(h[8:], lf.id)
	binary.LittleEndian.PutUint64(h[16:], lf.gen)
	binary.LittleEndian.PutUint64(h[24:], lf.inc)
	binary.LittleEndian.PutUint64(h[32:], uint64(lf.slots))
	binary.LittleEndian.PutUint32(h[4:], crc32c(h[8:]))
	return h
}

// start makes lf the next file: a new generation and incarnation in its
// header (one pwrite, synced with its first slots by the next Sync), which
// voids every slot of its previous use. Called with l.mu held.
func (l *intentLog) start(lf *ilogFile) error {
	l.gen++
	lf.gen, lf.inc = l.gen, rand.Uint64()|1
	lf.used, lf.full = 0, false
	lf.resolved.Store(0)
	if _, err := lf.f.WriteAt(lf.header(), 0); err != nil {
		return fmt.Errorf("start intent log %s: %w", ilogName(lf.id), err)
	}
	lf.dirty.Store(true)
	return nil
}

// prepareSpare makes the next file in the background, unless one is ready
// or being made. Called with l.mu held.
func (l *intentLog) prepareSpare() {
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
func (l *intentLog) rotate() error {
	var next *ilogFile
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

// write puts kvs into the log, one slot each and their inline payloads
// after them, and returns the spans they took. An entry and its payload
// are never split between files: the rest of a file too short for one is
// left unused. When it returns nil they survive kill -9 (they are in the
// page cache); Sync makes them survive power loss. Inline payloads then
// point at the log's copy, which stays valid: the indexer writes it to
// its segment.
func (l *intentLog) write(kvs []keyValue) ([]slotSpan, error) {
	for _, kv := range kvs {
		if len(kv.key) > slotKeyMax || len(kv.val) > slotValMax {
			return nil, fmt.Errorf("intent log: a %d-byte key or %d-byte value does not fit a slot", len(kv.key), len(kv.val))
		}
		if n := entrySlots(kv); kv.inline != nil && n > l.slots/4 {
			return nil, fmt.Errorf("intent log: a %d-byte inline payload does not fit a quarter of a %d-slot file", len(kv.inline.data), l.slots)
		}
	}
	var spans []slotSpan
	var ends []int // spans[k] holds kvs[ends[k-1]:ends[k]]
	l.mu.Lock()
	for i := 0; i < len(kvs); {
		if l.cur == nil || l.cur.slots-l.cur.used < entrySlots(kvs[i]) {
			if cur := l.cur; cur != nil && cur.used < cur.slots {
				// The tail that does not fit the entry stays unused.
				cur.resolved.Add(cur.slots - cur.used)
				cur.used = cur.slots
			}
			if err := l.rotate(); err != nil {
				l.mu.Unlock()
				l.abandon(spans)
				return nil, err
			}
			continue
		}
		sp := slotSpan{file: l.cur, first: l.cur.used}
		for i < len(kvs) && l.cur.slots-l.cur.used >= entrySlots(kvs[i]) {
			n := entrySlots(kvs[i])
			l.cur.used += n
			sp.n += n
			i++
		}
		spans = append(spans, sp)
		ends = append(ends, i)
	}
	l.mu.Unlock()
	i := 0
	var one [slotSize]byte
	for k, sp := range spans {
		var buf []byte
		if sp.n == 1 {
			buf = one[:]
		} else {
			buf = make([]byte, sp.n*slotSize)
		}
		for s := int64(0); i < ends[k]; i++ {
			kv := kvs[i]
			n := entrySlots(kv)
			encodeSlot(buf[s*slotSize:(s+1)*slotSize], sp.file.inc, uint64(sp.first+s), kv, n-1)
			if kv.inline != nil {
				putInline(buf[(s+1)*slotSize:(s+n)*slotSize], kv.inline)
			}
			s += n
		}
		if _, err := sp.file.f.WriteAt(buf, ilogHeaderSize+sp.first*slotSize); err != nil {
			// The append fails: none of its slots goes to badger. Those
			// already written may still be replayed after a crash, which
			// is harmless: the write was never acknowledged, and replay
			// makes the image and the blob agree on it.
			l.abandon(spans)
			return nil, fmt.Errorf("write intent log %s: %w", ilogName(sp.file.id), err)
		}
		sp.file.dirty.Store(true)
	}
	return spans, nil
}

// directSlots is one directAlign block of slots. An entry written with
// O_DIRECT starts and ends on a block boundary, so that no page it covers
// is shared with slots written through the page cache: the kernel writes
// back and invalidates cached pages in a direct write's range, and a
// buffered write racing that on a shared page could be lost from the
// cache's view.
const directSlots = directAlign / slotSize

// writeDirect writes one entry with its inline payload through the file's
// O_DIRECT descriptor, in whole blocks (the slots after the payload up to
// the block's end are zeros, which replay skips as invalid), so that the
// bytes are on the device when it returns. A barrier after it then only
// flushes the device's cache, as it does for a local file written with
// direct I/O, instead of writing pages back first: that writeback was most
// of the latency of an fsync after a 4 KiB write. ok is false, with
// nothing written, where the current file has no direct descriptor: the
// caller uses write. The padding is resolved with the span.
func (l *intentLog) writeDirect(kv keyValue) (spans []slotSpan, ok bool, err error) {
	if len(kv.key) > slotKeyMax || len(kv.val) > slotValMax || kv.inline == nil {
		return nil, false, nil
	}
	n := entrySlots(kv)
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
		spans = []slotSpan{{file: cur, first: cur.used, n: need}}
		cur.used += need
		break
	}
	l.mu.Unlock()
	sp := spans[0]
	buf := alignedBuf(int(need * slotSize))
	encodeSlot(buf[:slotSize], sp.file.inc, uint64(sp.first), kv, n-1)
	putInline(buf[slotSize:n*slotSize], kv.inline)
	off := ilogHeaderSize + sp.first*slotSize
	_, err = sp.file.direct.WriteAt(buf, off)
	if errors.Is(err, unix.EINVAL) {
		// This filesystem wants other alignments for direct I/O: the page
		// cache takes this entry and the file's later ones.
		sp.file.directRefused.Store(true)
		_, err = sp.file.f.WriteAt(buf, off)
	}
	if err != nil {
		l.abandon(spans)
		return nil, true, fmt.Errorf("write intent log %s: %w", ilogName(sp.file.id), err)
	}
	// The device may hold the bytes in its volatile cache: the barrier's
	// fdatasync flushes it.
	sp.file.dirty.Store(true)
	return spans, true, nil
}

// putInline writes in's length, CRC and payload into its slots p, and
// points in.data at that copy (the indexer writes it to the segment).
func putInline(p []byte, in *inlinePayload) {
	binary.LittleEndian.PutUint32(p[0:], uint32(len(in.data)))
	binary.LittleEndian.PutUint32(p[4:], in.crc)
	copy(p[inlineHeader:], in.data)
	in.data = p[inlineHeader : inlineHeader+len(in.data)]
}

// abandon resolves spans whose entries will never reach badger.
func (l *intentLog) abandon(spans []slotSpan) {
	for _, sp := range spans {
		sp.file.resolved.Add(sp.n)
	}
}

// encodeSlot fills slot b (index of a file of incarnation inc) with kv,
// followed by data payload slots.
func encodeSlot(b []byte, inc, index uint64, kv keyValue, data int64) {
	clear(b)
	binary.LittleEndian.PutUint32(b[0:], slotMagic)
	binary.LittleEndian.PutUint64(b[8:], inc)
	binary.LittleEndian.PutUint64(b[16:], index)
	if kv.del {
		b[24] = 1
	}
	b[25], b[26] = byte(len(kv.key)), byte(len(kv.val))
	if data > 0 {
		b[27] = 1
		binary.LittleEndian.PutUint32(b[28:], uint32(data))
	}
	copy(b[slotKeyOff:], kv.key)
	copy(b[slotValOff:], kv.val)
	binary.LittleEndian.PutUint32(b[4:], crc32c(b[8:]))
}

// decodeSlot returns the entry of slot index of a file of incarnation
// inc and how many payload slots follow it, or ok false if the slot does
// not hold one.
func decodeSlot(b []byte, inc, index uint64) (kv keyValue, data int64, ok bool) {
	if binary.LittleEndian.Uint32(b[0:]) != slotMagic || binary.LittleEndian.Uint32(b[4:]) != crc32c(b[8:slotSize]) ||
		binary.LittleEndian.Uint64(b[8:]) != inc || binary.LittleEndian.Uint64(b[16:]) != index ||
		b[24] > 1 || b[25] > slotKeyMax || b[26] > slotValMax || b[27] > 1 {
		return keyValue{}, 0, false
	}
	kv.del = b[24] == 1
	kv.key = append([]byte(nil), b[slotKeyOff:slotKeyOff+int(b[25])]...)
	if b[26] > 0 {
		kv.val = append([]byte(nil), b[slotValOff:slotValOff+int(b[26])]...)
	}
	if b[27] == 1 {
		data = int64(binary.LittleEndian.Uint32(b[28:]))
		if data == 0 {
			return keyValue{}, 0, false
		}
	}
	return kv, data, true
}

// decodeInline returns the payload in slots p (written by write), or ok
// false if its length or CRC does not check (a torn write).
func decodeInline(p []byte) ([]byte, uint32, bool) {
	n := int64(binary.LittleEndian.Uint32(p[0:]))
	if inlineSlots(int(n)) != int64(len(p))/slotSize {
		return nil, 0, false
	}
	data := p[inlineHeader : inlineHeader+n]
	crc := binary.LittleEndian.Uint32(p[4:])
	if crc32c(data) != crc {
		return nil, 0, false
	}
	return data, crc, true
}

// sync fdatasyncs every file written since its last sync, in parallel.
func (l *intentLog) sync() error {
	l.mu.Lock()
	var list []*ilogFile
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
			if err := datasync(lf.f); err != nil {
				lf.dirty.Store(true)
				errs[i] = fmt.Errorf("sync intent log %s: %w", ilogName(lf.id), err)
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

// done returns the files that are full and wholly in badger: they can be
// recycled once badger's logs and the segments their payloads went to are
// synced (syncBeforeLogsGo).
func (l *intentLog) done() []*ilogFile {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*ilogFile
	for _, lf := range l.files {
		if lf.full && lf.resolved.Load() == lf.used {
			out = append(out, lf)
		}
	}
	return out
}

// recycle takes files (done, and badger synced since) out of use, keeping
// up to maxFreeLogs for reuse and deleting the others.
func (l *intentLog) recycle(files []*ilogFile) error {
	var drop []*ilogFile
	l.mu.Lock()
	for _, lf := range files {
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
func (l *intentLog) remove(files []*ilogFile) error {
	var errs []error
	for _, lf := range files {
		lf.closeFiles()
		if err := os.Remove(filepath.Join(l.dir, ilogName(lf.id))); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("delete intent log: %w", err))
		}
	}
	return errors.Join(errs...)
}

// close closes the files. With clean (everything is in badger, synced),
// it deletes them all, so that a clean shutdown leaves none; otherwise
// the files in use stay for the next open to replay.
func (l *intentLog) close(clean bool) error {
	l.mu.Lock()
	for l.spareBusy {
		l.spareDone.Wait()
	}
	idle := l.free
	if l.spare != nil {
		idle = append(idle, l.spare)
	}
	l.spare, l.free = nil, nil
	var used []*ilogFile
	for _, lf := range l.files {
		used = append(used, lf)
	}
	l.files = map[uint64]*ilogFile{}
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

// listIntentLogs returns the ids of the intent log files in dir, sorted.
func listIntentLogs(dir string) ([]uint64, error) {
	ids, err := listNumbered(dir, "ilog-")
	if err != nil {
		return nil, fmt.Errorf("list intent logs: %w", err)
	}
	return ids, nil
}

// readIntentLog returns the generation of file id and its entries, in
// slot order. A file whose header does not check (a kill while it was
// being made), or never started (generation 0), holds none.
func readIntentLog(dir string, id uint64) (uint64, []keyValue, error) {
	b, err := os.ReadFile(filepath.Join(dir, ilogName(id)))
	if err != nil {
		return 0, nil, fmt.Errorf("read intent log: %w", err)
	}
	if len(b) < ilogHeaderSize || binary.LittleEndian.Uint32(b[0:]) != ilogMagic ||
		binary.LittleEndian.Uint32(b[4:]) != crc32c(b[8:ilogHeaderUsed]) || binary.LittleEndian.Uint64(b[8:]) != id {
		return 0, nil, nil
	}
	gen := binary.LittleEndian.Uint64(b[16:])
	inc := binary.LittleEndian.Uint64(b[24:])
	slots := int64(binary.LittleEndian.Uint64(b[32:]))
	slots = min(slots, int64(len(b)-ilogHeaderSize)/slotSize)
	if gen == 0 {
		return 0, nil, nil
	}
	var out []keyValue
	for i := int64(0); i < slots; i++ {
		off := ilogHeaderSize + i*slotSize
		kv, data, ok := decodeSlot(b[off:off+slotSize], inc, uint64(i))
		if !ok {
			continue
		}
		if data > 0 {
			// The payload's slots are skipped whether it checks or not:
			// they were written with the entry, in one pwrite.
			end := i + 1 + data
			if end > slots {
				break
			}
			payload, crc, ok := decodeInline(b[off+slotSize : ilogHeaderSize+end*slotSize])
			i = end - 1
			if !ok {
				continue
			}
			kv.inline = &inlinePayload{data: payload, crc: crc}
		}
		out = append(out, kv)
	}
	return gen, out, nil
}

// logEntries writes kvs to the intent log and queues them for badger:
// when it returns nil they survive kill -9 and every read sees them.
// With direct (one entry, with an inline payload), the entry goes to the
// device before it returns (writeDirect).
func (j *Journal) logEntries(kvs []keyValue, direct bool) error {
	if err := j.idx.failed(); err != nil {
		// Badger refuses entries: stop taking writes rather than pile up
		// intent logs nothing drains.
		return err
	}
	var spans []slotSpan
	done := false
	var err error
	if direct && len(kvs) == 1 {
		spans, done, err = j.ilog.writeDirect(kvs[0])
		if done && err == nil {
			j.directEntries.Add(1)
		}
	}
	if !done {
		spans, err = j.ilog.write(kvs)
	}
	if err != nil {
		return err
	}
	// Items badger can take in one transaction each; the last carries the
	// spans (the indexer commits in order, so when it is in, all are).
	for len(kvs) > maxGroupEntries/2 {
		j.idx.add(kvs[:maxGroupEntries/2], nil)
		kvs = kvs[maxGroupEntries/2:]
	}
	j.idx.add(kvs, spans)
	return nil
}

// indexed is the indexer's callback: spans are in badger. Intent log
// files wholly in badger are recycled once badger's logs, and the segments
// their inline payloads went to, are synced. A
// failure leaves them for the next commit (or the next open) to try again:
// they only hold entries badger has.
func (j *Journal) indexed(spans []slotSpan) {
	for _, sp := range spans {
		sp.file.resolved.Add(sp.n)
	}
	files := j.ilog.done()
	if len(files) == 0 {
		return
	}
	// The fsyncs run under filesMu only: barriers (syncOnce, under syncMu)
	// go on meanwhile. Holding syncMu here made every barrier that came
	// during a recycle wait for badger's logs and the segments' copied
	// payloads to be fsync'ed (fio write+fsync: p99.9 3.7 ms). syncMu is
	// taken for the recycle itself, which may close files a barrier would
	// otherwise be fdatasyncing.
	j.filesMu.Lock()
	err := j.syncBeforeLogsGo()
	if testDuringLogSync != nil {
		testDuringLogSync(j)
	}
	j.filesMu.Unlock()
	if err == nil {
		j.syncMu.Lock()
		if testBeforeRecycle != nil {
			testBeforeRecycle(j)
		}
		err = j.ilog.recycle(files)
		j.syncMu.Unlock()
	}
	if err != nil {
		j.log.Warn("intent log files stay until the next try", "err", err)
	}
}

// syncBeforeLogsGo makes durable what an intent log file's entries became:
// badger's logs, and the segments the indexer copied inline payloads to.
// Intent log files are recycled or deleted only after it. Called with
// filesMu held.
func (j *Journal) syncBeforeLogsGo() error {
	if err := j.syncFiles(); err != nil {
		return err
	}
	return j.segs.syncCopied()
}

// syncIndex makes badger's committed entries durable (see syncFiles).
func (j *Journal) syncIndex() error {
	j.filesMu.Lock()
	defer j.filesMu.Unlock()
	return j.syncFiles()
}

// entrySeq is the record seq a journal key belongs to: records, and the
// pieces of image-backed records an older binary may have left in its
// intent log (see legacy.go).
func entrySeq(key []byte) (uint64, bool) {
	switch {
	case len(key) == 9 && key[0] == recPrefix[0]:
		return binary.BigEndian.Uint64(key[1:]), true
	case len(key) == 17 && key[0] == pieceKeyPrefix[0]:
		return binary.BigEndian.Uint64(key[1:9]), true
	}
	return 0, false
}

// replayAdvice follows a replay that failed for a reason the user can fix.
const replayAdvice = "nothing is lost: the intent log files stay until a replay succeeds; free space or fix the state directory's filesystem (see the kernel log), then mount again"

// replayIntents commits the entries of the intent log files the last run
// left into badger, in order, skipping those of records already drained
// (deleted from badger since; their slots outlive them), makes badger
// durable and deletes the files. It returns the id for the next file.
func (j *Journal) replayIntents() (next, gen uint64, err error) {
	ids, err := listIntentLogs(j.dir)
	if err != nil || len(ids) == 0 {
		return 1, 0, err
	}
	damaged := func(err error) error {
		return fmt.Errorf("recover journal %s: %w: %w; %s", j.dir, ErrJournalDamaged, err, damagedAdvice)
	}
	drained, err := j.counter(keyDrained)
	if err != nil {
		return 0, 0, damaged(err)
	}
	type logFile struct {
		gen uint64
		kvs []keyValue
	}
	var logs []logFile
	for _, id := range ids {
		g, kvs, err := readIntentLog(j.dir, id)
		if err != nil {
			return 0, 0, damaged(err)
		}
		logs = append(logs, logFile{g, kvs})
		gen = max(gen, g)
	}
	sort.SliceStable(logs, func(a, b int) bool { return logs[a].gen < logs[b].gen })
	var entries []*groupEntry
	var kvs []keyValue
	count, payloads := 0, 0
	for _, lf := range logs {
		for _, kv := range lf.kvs {
			seq, ok := entrySeq(kv.key)
			if ok && seq <= drained {
				continue
			}
			if kv.inline != nil {
				// Its payload goes to its segment again: the indexer may
				// not have written it, or not synced it.
				r, err := decodeRecord(seq, kv.val)
				if err != nil || r.Kind != KindData || r.seg == 0 || r.crc != kv.inline.crc || r.Length != int64(len(kv.inline.data)) {
					return 0, 0, damaged(fmt.Errorf("intent log entry of record %d does not match its inline payload (%v)", seq, err))
				}
				if err := j.segs.writeAt(r.seg, r.segOff, kv.inline.data); err != nil {
					return 0, 0, fmt.Errorf("replay intent log: %w; %s", err, replayAdvice)
				}
				payloads++
			}
			kvs = append(kvs, kv)
			count++
			if len(kvs) == maxGroupEntries/2 {
				entries = append(entries, &groupEntry{kvs: kvs})
				kvs = nil
			}
		}
	}
	if len(kvs) > 0 {
		entries = append(entries, &groupEntry{kvs: kvs})
	}
	if err := j.segs.syncCopied(); err != nil {
		return 0, 0, fmt.Errorf("replay intent log: %w; %s", err, replayAdvice)
	}
	for done := 0; done < len(entries); {
		n := j.group.writeSome(entries[done:])
		if err := entries[done].err; err != nil {
			return 0, 0, damaged(fmt.Errorf("replay intent log: %w", err))
		}
		done += n
	}
	if err := j.syncIndex(); err != nil {
		return 0, 0, fmt.Errorf("replay intent log: %w; %s", err, replayAdvice)
	}
	for _, id := range ids {
		if err := os.Remove(filepath.Join(j.dir, ilogName(id))); err != nil && !errors.Is(err, os.ErrNotExist) {
			return 0, 0, fmt.Errorf("delete replayed intent log: %w; %s", err, replayAdvice)
		}
	}
	j.replayedIntents = count
	j.log.Info("intent log replayed", "files", len(ids), "entries", count, "inline_payloads", payloads)
	return ids[len(ids)-1] + 1, gen, nil
}

// testBeforeRecycle, if set (tests), runs before intent log files are
// recycled, with their entries in badger and everything synced.
var testBeforeRecycle func(*Journal)

// testDuringLogSync, if set (tests), runs in the indexer after the fsyncs
// that precede a recycle, with filesMu held.
var testDuringLogSync func(*Journal)
