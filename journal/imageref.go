package journal

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Write once (DiskOptions.WriteOnce): the payload of a data record written
// through Disk is not copied into a segment file. The local image holds
// it, and the record's index entry says so (segment 0). Writing every byte
// twice (journal and image) was 59-62 % of the daemon's CPU and capped
// sequential writes at half of what the local file takes.
//
// The image always holds the newest state, so an image-backed record reads
// back right as long as no later epoch has written its range: inside an
// epoch any subset of writes may land (last write wins per sector), but
// across a barrier the blob must get the record's own bytes. So before a
// write (data, zero or discard) of epoch E changes the image over a range,
// the sectors it changes of every pending image-backed record from an
// epoch below E are captured: read from the image and stored in a segment
// as a piece of the record (its own index entry, logged with the write's,
// before the image changes). Reading the record lays its pieces
// over the image. Only the sectors overwritten are copied: copying whole
// records made 4 KiB random writes over pending 256 KiB ones copy 64x what
// they wrote (1.7-4.9 k IOPS against 24 k). A record with maxPieces pieces
// is captured whole at the next overwrite (its index entry then points at
// a segment), which bounds memory and reads.
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
	// pieces are the parts of the record a later write overwrote, copied
	// aside (partial captures, sorted and disjoint); ver counts changes to
	// them, so a copy made before the write took barrierMu is known to
	// still fit.
	pieces []capPiece
	ver    uint64
}

// capPiece (a piece) is part of an image-backed record whose bytes a later write
// overwrote: they were copied to a segment first. Reading the record
// lays the pieces over what the image holds. Its index entry is
// pieceKey(seq, off), deleted with the record.
type capPiece struct {
	off, end int64
	seg      uint64
	segOff   int64
	crc      uint32
}

// Piece keys: "c" + big-endian seq + big-endian offset; the value is
// end, segment, segment offset (8 bytes each) and the CRC-32C (4).
var pieceKeyPrefix = []byte("c")

const pieceValueSize = 8 + 8 + 8 + 4

func pieceKey(seq uint64, off int64) []byte {
	k := make([]byte, 17)
	k[0] = pieceKeyPrefix[0]
	binary.BigEndian.PutUint64(k[1:], seq)
	binary.BigEndian.PutUint64(k[9:], uint64(off))
	return k
}

func (p capPiece) encode() []byte {
	b := make([]byte, pieceValueSize)
	be := binary.BigEndian
	be.PutUint64(b[0:], uint64(p.end))
	be.PutUint64(b[8:], p.seg)
	be.PutUint64(b[16:], uint64(p.segOff))
	be.PutUint32(b[24:], p.crc)
	return b
}

func decodePiece(k, v []byte) (seq uint64, p capPiece, err error) {
	if len(k) != 17 || len(v) != pieceValueSize {
		return 0, capPiece{}, fmt.Errorf("journal capPiece entry of %d+%d bytes, want 17+%d", len(k), len(v), pieceValueSize)
	}
	be := binary.BigEndian
	seq = be.Uint64(k[1:])
	p = capPiece{off: int64(be.Uint64(k[9:])), end: int64(be.Uint64(v[0:])), seg: be.Uint64(v[8:]), segOff: int64(be.Uint64(v[16:])), crc: be.Uint32(v[24:])}
	if p.off < 0 || p.end <= p.off || p.off%SectorSize != 0 || p.end%SectorSize != 0 || p.seg == 0 {
		return 0, capPiece{}, fmt.Errorf("journal capPiece %d at %d: bad range or segment (%d-%d in segment %d)", seq, p.off, p.off, p.end, p.seg)
	}
	return seq, p, nil
}

// maxPieces is how many pieces a record collects before a capture copies
// all of it instead (bounding memory and the work of reading it back).
const maxPieces = 16

// gaps returns the parts of [off, end) no capPiece covers. ref.mu is held.
func (ref *imageRef) gaps(off, end int64) [][2]int64 {
	var out [][2]int64
	at := off
	for _, p := range ref.pieces {
		if p.end <= at || p.off >= end {
			continue
		}
		if p.off > at {
			out = append(out, [2]int64{at, p.off})
		}
		at = max(at, p.end)
	}
	if at < end {
		out = append(out, [2]int64{at, end})
	}
	return out
}

// addPiece inserts p (disjoint from the others). ref.mu is held.
func (ref *imageRef) addPiece(p capPiece) {
	i, _ := slices.BinarySearchFunc(ref.pieces, p.off, func(q capPiece, off int64) int { return cmp.Compare(q.off, off) })
	ref.pieces = slices.Insert(ref.pieces, i, p)
	ref.ver++
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

// pendingCapture is the capture of one record, not committed yet: the
// pieces copied aside, or (whole) the record's new index entry. Under
// prepareCaptures the record stays locked until finishCaptures.
type pendingCapture struct {
	ref    *imageRef
	ver    uint64 // ref.ver when copied
	pieces []capPiece
	whole  bool
	r      Record // whole: the record's index entry, pointing at a segment
	segs   []*segment
}

// kvs are the index changes the capture commits.
func (c *pendingCapture) kvs() []keyValue {
	if c.whole {
		out := []keyValue{{key: recKey(c.r.Seq), val: c.r.encode()}}
		for _, p := range c.ref.pieces {
			out = append(out, keyValue{key: pieceKey(c.r.Seq, p.off), del: true})
		}
		return out
	}
	out := make([]keyValue, 0, len(c.pieces))
	for _, p := range c.pieces {
		out = append(out, keyValue{key: pieceKey(c.ref.seq, p.off), val: p.encode()})
	}
	return out
}

// precopy copies, before the write takes barrierMu, the parts of every
// pending image-backed record overlapping [off, end) of an epoch already
// closed (below hint, the open epoch when the write started: epochs only
// grow). The copies are what prepareCaptures commits; done here, a
// capture's I/O does not hold barrierMu, where it would stall every writer
// behind a barrier waiting for it (a 1 MiB capture under a storm of 4 KiB
// writes did: p99 64 ms). The records are not locked in between:
// prepareCaptures checks them again.
func (j *Journal) precopy(off, end int64, hint uint64) ([]pendingCapture, error) {
	var out []pendingCapture
	for _, ref := range j.refs.overlapping(off, end, hint) {
		if !ref.lockIfPending() {
			continue
		}
		pc, err := j.copyParts(ref, off, end)
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
		for _, seg := range c.segs {
			seg.inflight.Add(-1)
		}
	}
}

// prepareCaptures captures, before a write of epoch changes [off, end) of
// the image, the overlapped parts of every pending image-backed record of
// an earlier epoch (only the sectors the write changes, and only those not
// captured before: the copy is the size of what the write overwrites, not
// of the record), and returns the index changes to commit with the write's
// own. Called under barrierMu (read), so epoch is the epoch the write will
// get. A copy precopy made is used if the record's pieces did not change
// since (its image range cannot have changed either: a later epoch's write
// captures first, and the record's own epoch is closed); otherwise, or for
// a record precopy missed (its epoch closed since), the copy is made now.
// The records are locked in seq order (two writes may share some), and
// stay locked until finishCaptures.
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
			if pc.ver != ref.ver {
				releaseCopies([]pendingCapture{pc})
				ok = false
			}
		}
		if !ok {
			var err error
			if pc, err = j.copyParts(ref, off, end); err != nil {
				ref.mu.Unlock()
				j.finishCaptures(caps, err)
				return nil, nil, err
			}
		}
		caps = append(caps, pc)
		kvs = append(kvs, pc.kvs()...)
	}
	return caps, kvs, nil
}

// copyParts copies the parts of ref that [off, end) overlaps and no capPiece
// covers into segments, or, when that would leave the record with more
// than maxPieces pieces, the whole record as the image and its pieces make
// it. ref.mu is held.
func (j *Journal) copyParts(ref *imageRef, off, end int64) (pendingCapture, error) {
	gaps := ref.gaps(max(off, ref.off), min(end, ref.end))
	pc := pendingCapture{ref: ref, ver: ref.ver}
	if len(ref.pieces)+len(gaps) > maxPieces {
		return j.copyWhole(ref)
	}
	for _, g := range gaps {
		seg, segOff, err := j.segs.reserve(g[1] - g[0])
		if err != nil {
			releaseCopies([]pendingCapture{pc})
			return pendingCapture{}, err
		}
		pc.segs = append(pc.segs, seg)
		crc, err := j.copyFromImage(seg, segOff, g[0], g[1]-g[0])
		if err != nil {
			releaseCopies([]pendingCapture{pc})
			return pendingCapture{}, fmt.Errorf("capture journal record %d (%d+%d): %w", ref.seq, g[0], g[1]-g[0], err)
		}
		seg.dirty.Store(true)
		pc.pieces = append(pc.pieces, capPiece{off: g[0], end: g[1], seg: seg.id, segOff: segOff, crc: crc})
	}
	return pc, nil
}

// copyWhole copies the record's bytes (the image with its pieces laid
// over) into a segment and returns the index entry that points there.
// ref.mu is held.
func (j *Journal) copyWhole(ref *imageRef) (pendingCapture, error) {
	r := ref.record()
	buf, err := j.readRef(ref)
	if err != nil {
		return pendingCapture{}, err
	}
	seg, segOff, err := j.segs.reserve(r.Length)
	if err != nil {
		return pendingCapture{}, err
	}
	if err := seg.writePayload(buf, segOff); err != nil {
		seg.inflight.Add(-1)
		return pendingCapture{}, fmt.Errorf("capture journal record %d: write %s: %w", r.Seq, segName(seg.id), err)
	}
	seg.dirty.Store(true)
	r.seg, r.segOff, r.crc = seg.id, segOff, crc32c(buf)
	return pendingCapture{ref: ref, ver: ref.ver, whole: true, r: r, segs: []*segment{seg}}, nil
}

// readRef reads an uncaptured record's bytes: the image, with its pieces
// laid over. ref.mu is held.
func (j *Journal) readRef(ref *imageRef) ([]byte, error) {
	if j.img == nil {
		return nil, fmt.Errorf("journal record %d: its payload is in the local image, which is not open", ref.seq)
	}
	buf := make([]byte, ref.end-ref.off)
	if _, err := j.img.ReadAt(buf, ref.off); err != nil {
		return nil, fmt.Errorf("journal record %d: read %d+%d from the local image: %w", ref.seq, ref.off, len(buf), err)
	}
	for _, p := range ref.pieces {
		pr := Record{Seq: ref.seq, Offset: p.off, Length: p.end - p.off, seg: p.seg, segOff: p.segOff, crc: p.crc}
		data, err := j.segs.read(&pr)
		if err != nil {
			return nil, err
		}
		copy(buf[p.off-ref.off:], data)
	}
	return buf, nil
}

// captureBuf is the buffer a capture copies through: records are up to a
// FUSE write (1 MiB plus widening), and 32 writers capturing at once with a
// buffer per record would be 32 MiB of garbage at a time.
const captureBuf = 128 << 10

// Aligned, so that a large capture goes to its segment with O_DIRECT
// without another copy (see writePayload).
var capturePool = sync.Pool{New: func() any { b := alignedBuf(captureBuf); return &b }}

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
		if err := seg.writePayload(b, segOff+done); err != nil {
			return 0, fmt.Errorf("write %s: %w", segName(seg.id), err)
		}
		done += int64(len(b))
	}
	return crc, nil
}

// finishCaptures ends captures whose index changes were logged (err nil)
// or not, and unlocks their records.
func (j *Journal) finishCaptures(caps []pendingCapture, err error) {
	for _, c := range caps {
		// Even when logging failed: some entries may be in the intent log,
		// which a restart replays, and their segments must outlive them.
		for _, seg := range c.segs {
			seg.keep(c.ref.seq)
		}
		if err == nil {
			if c.whole {
				c.ref.seg, c.ref.segOff, c.ref.crc, c.ref.captured = c.r.seg, c.r.segOff, c.r.crc, true
				c.ref.pieces = nil
				c.ref.ver++
				j.refs.remove(c.ref.seq)
				j.captures.Add(1)
				j.capturedBytes.Add(c.r.Length)
			}
			for _, p := range c.pieces {
				c.ref.addPiece(p)
				j.captures.Add(1)
				j.capturedBytes.Add(p.end - p.off)
			}
		}
		releaseCopies([]pendingCapture{c})
		c.ref.mu.Unlock()
	}
}

// loadImageBacked reads the payload of image-backed record r: from the
// image with its pieces laid over, or from its segment if a later epoch's
// write captured it whole (r, read from badger before that, may not say so
// yet). The caller has waited for every committed record to reach the
// image.
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
	data, err := j.readRef(ref)
	r.Data = data
	return err
}

// forget marks the image-backed records among recs deleted and drops them
// from the index, before their keys are deleted from badger, and returns
// the keys of their pieces, to be deleted with them.
func (j *Journal) forget(recs []Record) [][]byte {
	if j.refs.n.Load() == 0 {
		return nil
	}
	var keys [][]byte
	for i := range recs {
		ref := j.refs.get(recs[i].Seq)
		if ref == nil {
			continue
		}
		ref.mu.Lock()
		ref.deleted = true
		for _, p := range ref.pieces {
			keys = append(keys, pieceKey(ref.seq, p.off))
		}
		ref.mu.Unlock()
		j.refs.remove(recs[i].Seq)
	}
	return keys
}
