package writeback

import (
	"cmp"
	"fmt"
	"hash/crc32"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Write once: the payload of a data record written through Disk is not
// copied into a segment file. The local image holds it, and the record's
// index entry says so (segment 0). Writing every byte twice (journal and
// image) was 59-62 % of the daemon's CPU and capped sequential writes at
// half of what the local file takes.
//
// The image always holds the newest state, so an image-backed record reads
// back right as long as no later epoch has written its range: inside an
// epoch any subset of writes may land (last write wins per sector), but
// across a barrier the blob must get the record's own bytes. So before a
// write (data, zero or discard) of epoch E changes the image over a range,
// every pending image-backed record overlapping it from an epoch below E is
// captured: its bytes are read from the image and stored in a segment, and
// its index entry is rewritten to point there, committed before the image
// changes. Only overwrites across a barrier of data not yet drained pay
// the copy, which is what the segment path paid for every write.
//
// Synchronisation, per record (imageRef.mu): a capture, the flusher's read
// of the record from the image, and the record's deletion after it is
// drained all hold it. A capture therefore never resurrects a deleted
// record (Delete marks it deleted before badger deletes the key), and the
// flusher reads either the image before any later epoch touched the range
// or the captured copy.

// imageRef is a pending image-backed data record not captured yet: what
// a capture needs to find it and rewrite its index entry. Captured records
// leave the index (their entries in badger say where they went), so memory
// is bounded by maxImageRefs, not by the pending records.
type imageRef struct {
	seq, epoch uint64
	off, end   int64
	time       int64 // Record.Time in Unix nanoseconds
	// Guarded by mu: whether a capture or a delete got it first, and where
	// a capture put the payload.
	mu       sync.Mutex
	captured bool
	deleted  bool
	seg      uint64
	segOff   int64
	crc      uint32
}

// lockIfPending locks ref unless a capture or a delete has already taken
// it, and says whether it did.
func (ref *imageRef) lockIfPending() bool {
	ref.mu.Lock()
	if ref.captured || ref.deleted {
		ref.mu.Unlock()
		return false
	}
	return true
}

// record is the ref's index entry (payload in the image).
func (ref *imageRef) record() Record {
	return Record{Seq: ref.seq, Epoch: ref.epoch, Offset: ref.off, Length: ref.end - ref.off, Kind: KindData, Time: time.Unix(0, ref.time)}
}

// maxImageRefs is the default cap on the image-backed records not captured yet (about 100
// bytes of memory each). Above it new writes go to segments as before
// write-once, so a remote that is down for long costs the old data path,
// not memory: 64 Ki records is 256 MiB of pending 4 KiB writes or 32 GiB
// of 512 KiB ones.
const maxImageRefs = 64 << 10

// imageRefChunk is the granularity of the overlap index. A write looks at
// the records listed under the chunks it touches: at most 16 disjoint
// 4 KiB ones share a chunk, plus overlapping ones of the open epoch.
const imageRefChunk = 64 << 10

// imageRefs indexes the image-backed records not captured yet, by seq and
// by the chunks their ranges touch.
type imageRefs struct {
	mu      sync.Mutex
	bySeq   map[uint64]*imageRef
	byChunk map[int64][]*imageRef
	n       atomic.Int64 // len(bySeq), read without mu on the write path
}

func (x *imageRefs) init() {
	x.bySeq = map[uint64]*imageRef{}
	x.byChunk = map[int64][]*imageRef{}
}

func (x *imageRefs) add(r *Record) {
	ref := &imageRef{seq: r.Seq, epoch: r.Epoch, off: r.Offset, end: r.End(), time: r.Time.UnixNano()}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.bySeq[r.Seq] = ref
	for c := ref.off / imageRefChunk; c <= (ref.end-1)/imageRefChunk; c++ {
		x.byChunk[c] = append(x.byChunk[c], ref)
	}
	x.n.Store(int64(len(x.bySeq)))
}

func (x *imageRefs) get(seq uint64) *imageRef {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.bySeq[seq]
}

// remove drops seq from the index (captured or deleted).
func (x *imageRefs) remove(seq uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	ref := x.bySeq[seq]
	if ref == nil {
		return
	}
	delete(x.bySeq, seq)
	for c := ref.off / imageRefChunk; c <= (ref.end-1)/imageRefChunk; c++ {
		list := x.byChunk[c]
		for i, o := range list {
			if o == ref {
				list[i] = list[len(list)-1]
				list = list[:len(list)-1]
				break
			}
		}
		if len(list) == 0 {
			delete(x.byChunk, c)
		} else {
			x.byChunk[c] = list
		}
	}
	x.n.Store(int64(len(x.bySeq)))
}

// overlapping returns the indexed records of an epoch below epoch that
// overlap [off, end), in seq order (the order in which a capture locks
// them).
func (x *imageRefs) overlapping(off, end int64, epoch uint64) []*imageRef {
	if x.n.Load() == 0 {
		return nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []*imageRef
	hit := func(ref *imageRef) bool { return ref.epoch < epoch && ref.off < end && off < ref.end }
	first, last := off/imageRefChunk, (end-1)/imageRefChunk
	if last-first+1 > int64(len(x.bySeq)) {
		// A range wider than the index (a discard of the whole disk):
		// walk the records instead of the chunks.
		for _, ref := range x.bySeq {
			if hit(ref) {
				out = append(out, ref)
			}
		}
	} else {
		for c := first; c <= last; c++ {
			for _, ref := range x.byChunk[c] {
				// A record in several chunks is seen once: at the first
				// chunk it shares with [off, end).
				if hit(ref) && max(ref.off/imageRefChunk, first) == c {
					out = append(out, ref)
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b *imageRef) int { return cmp.Compare(a.seq, b.seq) })
	return out
}

// AttachImage makes f the local image that image-backed records live in
// (Disk does this before it writes or replays anything).
func (j *Journal) AttachImage(f *os.File) { j.img = f }

// pendingCapture is a capture whose index entry is not committed yet: its
// record stays locked until finishCaptures.
type pendingCapture struct {
	ref *imageRef
	r   Record // the record's index entry, pointing at seg
	seg *segment
}

// precopy copies, before the write takes barrierMu, every pending
// image-backed record overlapping [off, end) of an epoch already closed
// (below hint, the open epoch when the write started: epochs only grow).
// The copies are what prepareCaptures commits; done here, a capture's I/O
// does not hold barrierMu, where it would stall every writer behind a
// barrier waiting for it (a 1 MiB capture under a storm of 4 KiB writes
// did: p99 64 ms). The records are not locked in between: prepareCaptures
// checks them again.
func (j *Journal) precopy(off, end int64, hint uint64) ([]pendingCapture, error) {
	var out []pendingCapture
	for _, ref := range j.refs.overlapping(off, end, hint) {
		if !ref.lockIfPending() {
			continue
		}
		pc, err := j.copyRecord(ref)
		ref.mu.Unlock()
		if err != nil {
			releaseCopies(out)
			return nil, err
		}
		out = append(out, pc)
	}
	return out, nil
}

// releaseCopies gives up copies no index entry will point at (their bytes
// stay in the segment until it is reclaimed).
func releaseCopies(copies []pendingCapture) {
	for _, c := range copies {
		c.seg.inflight.Add(-1)
	}
}

// prepareCaptures captures every pending image-backed record of an epoch
// below epoch that overlaps [off, end), before a write of epoch changes
// that range of the image, and returns their new index entries to commit
// with the write's own. Called under barrierMu (read), so epoch is the
// epoch the write will get. A record precopy copied is not copied again
// (the image range cannot have changed for it: a later epoch's write
// captures first, and the record's own epoch is closed); one it missed
// (its epoch closed since) is copied now. The records are locked in seq
// order (two writes may share some), and stay locked until
// finishCaptures.
func (j *Journal) prepareCaptures(off, end int64, epoch uint64, pre []pendingCapture) ([]pendingCapture, []keyValue, error) {
	copies := make(map[*imageRef]pendingCapture, len(pre))
	for _, c := range pre {
		copies[c.ref] = c
	}
	defer func() {
		rest := make([]pendingCapture, 0, len(copies))
		for _, c := range copies {
			rest = append(rest, c)
		}
		releaseCopies(rest)
	}()
	var caps []pendingCapture
	var kvs []keyValue
	for _, ref := range j.refs.overlapping(off, end, epoch) {
		if !ref.lockIfPending() {
			continue
		}
		pc, ok := copies[ref]
		if ok {
			delete(copies, ref)
		} else {
			var err error
			if pc, err = j.copyRecord(ref); err != nil {
				ref.mu.Unlock()
				j.finishCaptures(caps, err)
				return nil, nil, err
			}
		}
		caps = append(caps, pc)
		kvs = append(kvs, keyValue{recKey(pc.r.Seq), pc.r.encode()})
	}
	return caps, kvs, nil
}

// copyRecord copies ref's bytes from the image into a segment and returns
// the index entry that points there (not committed). ref.mu is held.
func (j *Journal) copyRecord(ref *imageRef) (pendingCapture, error) {
	r := ref.record()
	seg, segOff, err := j.segs.reserve(r.Length)
	if err != nil {
		return pendingCapture{}, err
	}
	crc, err := j.copyFromImage(seg, segOff, r.Offset, r.Length)
	if err != nil {
		seg.inflight.Add(-1)
		return pendingCapture{}, fmt.Errorf("capture journal record %d (%d+%d): %w", r.Seq, r.Offset, r.Length, err)
	}
	seg.dirty.Store(true)
	r.seg, r.segOff, r.crc = seg.id, segOff, crc
	return pendingCapture{ref: ref, r: r, seg: seg}, nil
}

// captureBuf is the buffer a capture copies through: records are up to a
// FUSE write (1 MiB plus widening), and 32 writers capturing at once with a
// buffer per record would be 32 MiB of garbage at a time.
const captureBuf = 128 << 10

var capturePool = sync.Pool{New: func() any { b := make([]byte, captureBuf); return &b }}

// copyFromImage copies n bytes of the image at off to seg at segOff and
// returns their CRC-32C.
func (j *Journal) copyFromImage(seg *segment, segOff, off, n int64) (uint32, error) {
	bp := capturePool.Get().(*[]byte)
	defer capturePool.Put(bp)
	var crc uint32
	for done := int64(0); done < n; {
		b := (*bp)[:min(n-done, captureBuf)]
		if _, err := j.img.ReadAt(b, off+done); err != nil {
			return 0, fmt.Errorf("read the local image: %w", err)
		}
		crc = crc32.Update(crc, castagnoli, b)
		if _, err := seg.f.WriteAt(b, segOff+done); err != nil {
			return 0, fmt.Errorf("write %s: %w", segName(seg.id), err)
		}
		done += int64(len(b))
	}
	return crc, nil
}

// finishCaptures ends captures whose index entries were committed (err
// nil) or not, and unlocks their records.
func (j *Journal) finishCaptures(caps []pendingCapture, err error) {
	for _, c := range caps {
		// Even when the commit failed: the entry may have landed in an
		// earlier transaction, and its segment must then outlive it.
		for {
			last := c.seg.lastSeq.Load()
			if last >= c.r.Seq || c.seg.lastSeq.CompareAndSwap(last, c.r.Seq) {
				break
			}
		}
		if err == nil {
			c.ref.seg, c.ref.segOff, c.ref.crc, c.ref.captured = c.r.seg, c.r.segOff, c.r.crc, true
			j.refs.remove(c.r.Seq)
			j.captures.Add(1)
			j.capturedBytes.Add(c.r.Length)
		}
		c.seg.inflight.Add(-1)
		c.ref.mu.Unlock()
	}
}

// loadImageBacked reads the payload of image-backed record r: from the
// image, or from its segment if a later epoch's write captured it (r, read
// from badger before that, may not say so yet). The caller has waited for
// every committed record to reach the image.
func (j *Journal) loadImageBacked(r *Record) error {
	ref := j.refs.get(r.Seq)
	if ref == nil {
		// Captured since r was read: the index entry says where to.
		cr, err := j.getRecord(r.Seq)
		if err != nil {
			return err
		}
		if cr.seg == 0 {
			return fmt.Errorf("journal record %d: its payload is in the local image but the record is not indexed", r.Seq)
		}
		r.Data, err = j.segs.read(&cr)
		return err
	}
	ref.mu.Lock()
	defer ref.mu.Unlock()
	if ref.captured {
		cr := ref.record()
		cr.seg, cr.segOff, cr.crc = ref.seg, ref.segOff, ref.crc
		data, err := j.segs.read(&cr)
		r.Data = data
		return err
	}
	if j.img == nil {
		return fmt.Errorf("journal record %d: its payload is in the local image, which is not open", r.Seq)
	}
	buf := make([]byte, r.Length)
	if _, err := j.img.ReadAt(buf, r.Offset); err != nil {
		return fmt.Errorf("journal record %d: read %d+%d from the local image: %w", r.Seq, r.Offset, r.Length, err)
	}
	r.Data = buf
	return nil
}

// forget marks the image-backed records among recs deleted and drops them
// from the index, before their keys are deleted from badger.
func (j *Journal) forget(recs []Record) {
	if j.refs.n.Load() == 0 {
		return
	}
	for i := range recs {
		ref := j.refs.get(recs[i].Seq)
		if ref == nil {
			continue
		}
		ref.mu.Lock()
		ref.deleted = true
		ref.mu.Unlock()
		j.refs.remove(recs[i].Seq)
	}
}
