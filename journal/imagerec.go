package journal

import (
	"cmp"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhdsync/vhdsync/journal/intentlog"
)

// Image-backed records: a large write is written once.
//
// A data record of at least ImageMin bytes appended with an apply function
// (Disk's writes) keeps its payload in the local image only: its index
// entry goes to the intent log as any other (segment imageSeg, and the
// payload's CRC-32C), its bytes go to the image by the apply function, and
// no segment holds them. Writing every byte twice (segment and image) held
// sequential writes to a third of what a local file takes.
//
// The image holds the newest state, so an image-backed record reads back
// as written only as long as nothing has written over it. Before any
// append with an apply function (data, zero or discard, of any epoch)
// changes the image over a pending image-backed record, the record is
// bound to the write (bind.go: their epochs go to the remote in one
// batch, and no copy is made) if no batch has claimed its epoch and its
// bytes are durably in the image; otherwise it is captured: its
// bytes are copied from the image to a segment and its index entry is
// logged again, under its own key, pointing there (and flagged captured);
// then, if a sync has begun to make the record's epoch durable (so a
// barrier may acknowledge it, or the flusher send it), the journal is
// synced; only then does the write go on. A record no sync covers yet may
// be lost to a power loss anyway: replay then finds it torn (below), and
// a sync that starts later carries the capture. So:
//
//   - the flusher, which reads an image-backed record from the image under
//     the record's lock (as a capture copies it), gets either the image
//     before any later write touched the range, or the captured copy;
//   - the image never holds a write over an acknowledged image-backed
//     record whose capture could still be lost: a power loss keeps both
//     or the capture alone, never the overwrite without the capture;
//   - nothing overwrites an uncaptured image-backed record's range
//     unless it is bound, so the CRC of one not bound, checked against the
//     image, says whether the image holds it (recovery relies on that,
//     see below and bind.go).
//
// A barrier (and the flusher's sync before it sends) makes the image
// durable too when an image-backed record of a closed epoch may not be:
// Sync runs SyncApplied, the journal's sync then the image's fdatasync
// with no record being applied, so the image never becomes durable with a
// write whose record is not. Hence an image-backed record that a barrier
// acknowledged, or that the blob holds, has its bytes durable in the
// image; one whose bytes the image lacks after a power loss (its CRC does
// not match) was never acknowledged.
//
// Recovery (writeback's replay) captures every pending image-backed record
// before anything else writes the image: one whose CRC matches the image
// is copied as it is; one whose CRC does not is overwritten (at or below
// the image-synced mark, see bind.go) or torn by a power loss (above
// it); a torn one is left out of the re-application, and captured afterwards with what the
// image then holds over its range: per sector either its own bytes or
// the older ones, both states a power cut may leave of an unacknowledged
// write. A captured entry whose segment payload a power loss took is
// turned back into the image-backed record it was: its capture was never
// synced, so either the write that needed it never reached the image, or
// no sync covered the record's epoch either (nothing acknowledged it) and
// replay finds it torn.
//
// Memory is bounded: at most maxImageRecords image-backed records are
// pending (about 150 bytes each, captured ones included until drained);
// above that, large writes go to segments as small ones do.

// ImageMin is the smallest data record kept in the image only.
const ImageMin = 64 << 10

// imageSeg is the segment number in the index entry of an image-backed
// record. Segment 0 marks the image-backed records of the removed
// mount --write-once (legacy.go).
const imageSeg = math.MaxUint64

// maxImageRecords bounds the pending image-backed records (see above).
const maxImageRecords = 64 << 10

// imageChunk is the granularity of the overlap index: a write looks at the
// records listed under the chunks it touches.
const imageChunk = 1 << 20

// imageRec is a pending image-backed record.
type imageRec struct {
	seq, epoch uint64
	off, end   int64
	crc        uint32
	time       int64 // Record.Time, Unix nanoseconds

	// mu is held by a capture, by the flusher's read of the record and
	// by its deletion; it guards the rest.
	mu       sync.Mutex
	captured bool
	deleted  bool
	seg      uint64 // captured: where the copy is
	segOff   int64
	// overwritten: a bound write went over it (bind.go), so the image
	// holds newer bytes in some of its range and its CRC says nothing.
	overwritten bool

	// Guarded by Journal.bindMu (bind.go): binds whose write is not
	// appended yet, the newest epoch of a write bound to it, and whether
	// it is in Journal.boundRecs.
	binding int
	boundTo uint64
	inBound bool

	listed bool // in imageRecs.byChunk; guarded by imageRecs.mu
}

// record is the record's index entry (image-backed, or, once captured,
// pointing at its copy). mu is held.
func (v *imageRec) record() Record {
	r := Record{Seq: v.seq, Epoch: v.epoch, Offset: v.off, Length: v.end - v.off, Kind: KindData, Time: time.Unix(0, v.time), seg: imageSeg, crc: v.crc}
	if v.captured {
		r.seg, r.segOff, r.captured = v.seg, v.segOff, true
	}
	return r
}

// imageRecs indexes the pending image-backed records: all of them by seq,
// the uncaptured ones by the chunks their ranges touch.
type imageRecs struct {
	mu      sync.Mutex
	bySeq   map[uint64]*imageRec
	byChunk map[int64][]*imageRec
	// uncaptured is how many are listed in byChunk (read without mu on
	// every write: 0 skips the overlap check); total is len(bySeq).
	uncaptured atomic.Int64
	total      atomic.Int64

	captures      atomic.Uint64
	capturedBytes atomic.Uint64
	binds         atomic.Uint64 // writes over a record bound instead of captured
}

func (x *imageRecs) init() {
	x.bySeq = map[uint64]*imageRec{}
	x.byChunk = map[int64][]*imageRec{}
}

// add indexes r, an image-backed record (not captured).
func (x *imageRecs) add(r *Record) {
	v := &imageRec{seq: r.Seq, epoch: r.Epoch, off: r.Offset, end: r.End(), crc: r.crc, time: r.Time.UnixNano()}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.bySeq[v.seq] = v
	v.listed = true
	for c := v.off / imageChunk; c <= (v.end-1)/imageChunk; c++ {
		x.byChunk[c] = append(x.byChunk[c], v)
	}
	x.uncaptured.Add(1)
	x.total.Store(int64(len(x.bySeq)))
}

func (x *imageRecs) get(seq uint64) *imageRec {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.bySeq[seq]
}

// unlist drops v from the overlap index (captured or deleted). x.mu is
// held.
func (x *imageRecs) unlist(v *imageRec) {
	if !v.listed {
		return
	}
	v.listed = false
	x.uncaptured.Add(-1)
	for c := v.off / imageChunk; c <= (v.end-1)/imageChunk; c++ {
		list := x.byChunk[c]
		if i := slices.Index(list, v); i >= 0 {
			list[i] = list[len(list)-1]
			list = list[:len(list)-1]
		}
		if len(list) == 0 {
			delete(x.byChunk, c)
		} else {
			x.byChunk[c] = list
		}
	}
}

// overlapping returns the uncaptured records overlapping [off, end), in
// seq order (the order captures lock them in).
func (x *imageRecs) overlapping(off, end int64) []*imageRec {
	if x.uncaptured.Load() == 0 {
		return nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []*imageRec
	hit := func(v *imageRec) bool { return v.off < end && off < v.end }
	first, last := off/imageChunk, (end-1)/imageChunk
	if last-first+1 > int64(len(x.byChunk)) {
		// Wider than the index (a discard of the whole disk): walk the
		// listed records instead of the chunks.
		seen := map[*imageRec]bool{}
		for _, list := range x.byChunk {
			for _, v := range list {
				if !seen[v] && hit(v) {
					seen[v] = true
					out = append(out, v)
				}
			}
		}
	} else {
		for c := first; c <= last; c++ {
			for _, v := range x.byChunk[c] {
				// A record in several chunks is seen once: at the
				// first chunk it shares with [off, end).
				if hit(v) && max(v.off/imageChunk, first) == c {
					out = append(out, v)
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b *imageRec) int { return cmp.Compare(a.seq, b.seq) })
	return out
}

// inRange returns the records with a seq in [first, last] (DeleteRange).
func (x *imageRecs) inRange(first, last uint64) []*imageRec {
	if x.total.Load() == 0 {
		return nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	var vs []*imageRec
	for seq, v := range x.bySeq {
		if seq >= first && seq <= last {
			vs = append(vs, v)
		}
	}
	return vs
}

// among returns the records among recs (Delete).
func (x *imageRecs) among(recs []Record) []*imageRec {
	if x.total.Load() == 0 {
		return nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	var vs []*imageRec
	for i := range recs {
		if v := x.bySeq[recs[i].Seq]; v != nil {
			vs = append(vs, v)
		}
	}
	return vs
}

// drop marks vs deleted (under each one's lock, which a capture or a read
// may hold: the lock order is imageRec.mu, then imageRecs.mu) and drops
// them from the index: writes over their ranges no longer capture them.
// Only once their deletion is durable (see Journal.drained): a power loss
// that took the deletion would bring them back as pending, with their
// bytes in the image overwritten by writes that did not capture them;
// replay would take them for torn, leave them out, and re-apply older
// records over the newer bytes (found by TestE2EPowerCut).
func (x *imageRecs) drop(vs []*imageRec) {
	for _, v := range vs {
		v.mu.Lock()
		v.deleted = true
		v.mu.Unlock()
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, v := range vs {
		x.unlist(v)
		delete(x.bySeq, v.seq)
	}
	x.total.Store(int64(len(x.bySeq)))
}

// imageBacked says whether an append of r with an apply function keeps
// its payload in the image only: a large write, while fewer than
// maxImageRecords are pending.
func (j *Journal) imageBacked(r *Record) bool {
	return j.img != nil && r.Kind == KindData && r.Length >= ImageMin && j.imgs.total.Load() < maxImageRecords
}

// bindOrCapture binds (bind.go) or captures every pending
// image-backed record that [off, end) overlaps, then syncs the journal if
// a sync has begun to cover the epoch of one it captured (syncCover),
// before a write changes the image over that range (see the top of this
// file). It returns the records it bound, whose binds the caller settles
// (bindDone) once the write is appended. The caller holds the range
// (Disk's range lock), so no new image-backed record can appear in it
// meanwhile.
func (j *Journal) bindOrCapture(off, end int64) (bound []*imageRec, err error) {
	victims := j.imgs.overlapping(off, end)
	if len(victims) == 0 {
		return nil, nil
	}
	if err := j.syncImageForBind(victims); err != nil {
		return nil, fmt.Errorf("sync the local image to bind image-backed records: %w", err)
	}
	oldest := uint64(math.MaxUint64) // the oldest epoch among those captured
	for _, v := range victims {
		v.mu.Lock()
		if v.deleted {
			v.mu.Unlock()
			continue
		}
		if v.captured {
			// Captured by another writer meanwhile, whose sync may
			// not be done: the check below covers it too.
			oldest = min(oldest, v.epoch)
			v.mu.Unlock()
			continue
		}
		if j.bindable(v) {
			bound = append(bound, v)
			v.mu.Unlock()
			continue
		}
		oldest = min(oldest, v.epoch)
		_, err := j.captureLocked(v, !v.overwritten)
		v.mu.Unlock()
		if err != nil {
			j.bindDone(bound, 0, false)
			return nil, err
		}
	}
	if oldest > j.syncCover.Load() {
		// No sync has started to make a victim's epoch durable: no
		// barrier acknowledged one, and the blob has none, so a power
		// loss may take any of them, and the image's newer bytes over
		// them then stand for them (replay finds them torn). A sync
		// that starts from now on carries the captures, logged above,
		// before it acknowledges their epochs.
		return bound, nil
	}
	if err := j.syncLog(); err != nil {
		j.bindDone(bound, 0, false)
		return nil, fmt.Errorf("sync the journal after capturing image-backed records: %w", err)
	}
	return bound, nil
}

// captureBuf is the size of the pieces a capture copies through.
const captureBuf = directMax

// captureLocked copies v's bytes from the image to a segment and logs its
// new index entry. With verify, bytes that do not match v's CRC are an
// error (the image must hold them: nothing writes over an uncaptured
// record); without, the copy takes what the image holds and the CRC
// becomes its own (recovery's torn records). v.mu is held.
func (j *Journal) captureLocked(v *imageRec, verify bool) (Record, error) {
	n := v.end - v.off
	seg, segOff, err := j.segs.reserve(n)
	if err != nil {
		return Record{}, fmt.Errorf("capture journal record %d: %w", v.seq, err)
	}
	defer seg.inflight.Add(-1)
	bp := directBufs.Get().(*[]byte)
	defer directBufs.Put(bp)
	var crc uint32
	for done := int64(0); done < n; {
		b := (*bp)[:min(n-done, captureBuf)]
		if _, err := j.img.ReadAt(b, v.off+done); err != nil {
			return Record{}, fmt.Errorf("capture journal record %d: read %d+%d of the local image: %w", v.seq, v.off+done, len(b), err)
		}
		crc = crc32.Update(crc, castagnoli, b)
		if err := seg.writePayload(b, segOff+done); err != nil {
			return Record{}, fmt.Errorf("capture journal record %d: write %s: %w", v.seq, segName(seg.id), err)
		}
		done += int64(len(b))
	}
	if verify && crc != v.crc {
		// Nothing logged: the reserved bytes stay unused until the
		// segment goes.
		return Record{}, &notHeldError{seq: v.seq, off: v.off, n: n, got: crc, want: v.crc}
	}
	seg.dirty.Store(true)
	r := v.record()
	r.seg, r.segOff, r.crc, r.captured = seg.id, segOff, crc, true
	err = j.logEntry(intentlog.Entry{Key: recKey(v.seq), Val: r.encode()}, nil, 0, false)
	// Even when logging failed: the entry may be in the intent log, which
	// a restart replays, and its segment must outlive it.
	seg.keep(v.seq)
	if err != nil {
		return Record{}, fmt.Errorf("capture journal record %d: %w", v.seq, err)
	}
	v.captured, v.seg, v.segOff, v.crc = true, seg.id, segOff, crc
	j.imgs.mu.Lock()
	j.imgs.unlist(v)
	j.imgs.mu.Unlock()
	j.imgs.captures.Add(1)
	j.imgs.capturedBytes.Add(uint64(n))
	return r, nil
}

// loadImageRecord reads the payload of a record appended image-backed: from
// the image (checked against its CRC) or, if captured since, from its
// copy. The caller has waited for every committed record to reach the
// image (WaitApplied).
func (j *Journal) loadImageRecord(r *Record) error {
	v := j.imgs.get(r.Seq)
	if v == nil {
		return fmt.Errorf("journal record %d: its payload is in the local image but the record is not pending", r.Seq)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.captured {
		cr := v.record()
		data, err := j.segs.read(&cr)
		r.Data = data
		return err
	}
	buf := make([]byte, v.end-v.off)
	if _, err := j.img.ReadAt(buf, v.off); err != nil {
		return fmt.Errorf("journal record %d: read %d+%d from the local image: %w", v.seq, v.off, len(buf), err)
	}
	if crc := crc32c(buf); crc != v.crc && !v.overwritten {
		return &notHeldError{seq: v.seq, off: v.off, n: int64(len(buf)), got: crc, want: v.crc}
	}
	r.Data = buf
	return nil
}

// notHeldError: the image does not hold an uncaptured image-backed
// record's bytes (their CRC differs), which nothing the daemon does can
// cause: the journal counts as damaged.
type notHeldError struct {
	seq       uint64
	off, n    int64
	got, want uint32
}

func (e *notHeldError) Error() string {
	return fmt.Sprintf("journal record %d (%d+%d): %v: the local image holds bytes with CRC-32C %08x, the record's is %08x (was disk.img written to while the disk was not mounted?); %s",
		e.seq, e.off, e.n, ErrJournalDamaged, e.got, e.want, damagedAdvice)
}

func (e *notHeldError) Unwrap() error { return ErrJournalDamaged }

// Capture copies r, a pending image-backed record (Record.ImageBacked),
// from the image to a segment and returns its new index entry; Sync makes
// it durable. Recovery captures them all, before anything writes the
// image, with verify: held is false (and nothing captured) for a record
// whose bytes the image does not hold, torn by a power loss; those it
// captures without verify once the other records are re-applied.
func (j *Journal) Capture(r Record, verify bool) (rec Record, held bool, err error) {
	v := j.imgs.get(r.Seq)
	if v == nil {
		return Record{}, false, fmt.Errorf("journal record %d: not a pending image-backed record", r.Seq)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.captured || v.deleted {
		return Record{}, false, fmt.Errorf("journal record %d: already captured or deleted", r.Seq)
	}
	rec, err = j.captureLocked(v, verify)
	if _, torn := errors.AsType[*notHeldError](err); torn {
		return Record{}, false, nil
	}
	return rec, err == nil, err
}

// Captured reports whether the record was appended image-backed and its
// bytes copied to a segment since (a capture). A copy made after a bound
// write went over the record holds that write's bytes (bind.go).
func (r *Record) Captured() bool { return r.captured }

// ImageBacked reports whether the record's payload is in the local image
// only (appended image-backed and not captured since, as its index entry
// said when read).
func (r *Record) ImageBacked() bool { return r.Kind == KindData && r.seg == imageSeg }

// revertCaptures rewrites the index entries of captured records whose copy
// a power loss took back to the image-backed records they were.
func (j *Journal) revertCaptures(recs []Record) error {
	wb := j.db.NewWriteBatch()
	defer wb.Cancel()
	for i := range recs {
		if err := wb.Set(recKey(recs[i].Seq), recs[i].encode()); err != nil {
			return err
		}
	}
	if err := wb.Flush(); err != nil {
		return err
	}
	j.log.Warn("journal: image-backed records whose capture a power loss took are read from the local image again",
		"records", len(recs), "first_seq", recs[0].Seq)
	return nil
}
