package journal

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// Bound epochs: a write over a pending image-backed record without a copy.
//
// A capture (imagerec.go) copies an image-backed record before a write
// changes the image under it, so that the blob can still be given the
// record's own bytes at the barrier that closed its epoch. The copy is
// needed only if a batch may end between the record's epoch and the
// write's: a batch that holds both sends the newer bytes anyway (the last
// write wins per sector). So a write over a record no batch has claimed
// yet binds the two epochs instead: the record is marked overwritten, the
// flusher reads it from the image as it then is (the newer bytes where the
// write covers it), and no batch may end from the record's epoch up to
// the write's (ClaimBatch). Rewriting pending large data then costs one
// write, where a capture cost a second copy of every byte.
//
// The flusher claims every closed epoch when it plans a batch (ClaimBatch):
// a write over a record of a claimed epoch captures it as before, because
// the batch being planned or sent may end before the write's epoch. So
// binding never holds a batch back by more than the open epoch: writers
// can bind only records the flusher has not reached, and a chain of
// bindings is cut at the next plan.
//
// After a power loss. Binding needs the record's bytes durable in the
// image before a write goes over them, and a durable note that they are:
// the image-synced mark (keyImageSynced), the highest seq whose record was
// applied to the image before an image sync (SyncApplied logs it, and the
// next journal sync makes it durable). A write binds only records at or
// below the durable mark; for one above it, it syncs the image first
// (syncImageForBind), at most every imageSyncEvery, or captures. At open,
// an image-backed record whose CRC no longer matches the image is then
// one of two things:
//   - above the mark: torn by the power loss, never acknowledged, as
//     before (imagerec.go): left out of the re-application;
//   - at or below the mark: its bytes were durable, so only a write over
//     it (bound, acknowledged or not) changed them: the image holds it or
//     something newer, and replay leaves it the winner of its range, so
//     that no older record is re-applied over it (writeback's replay).
// Its copy then holds the newer bytes, and so may the copy of any record
// captured before the crash; the bindings themselves are not persisted,
// so replay binds each such record again (BindReplay) up to the record
// maxBindRecords seqs after it, as far as a bound write can lie.

// A bound batch cannot be cut, so its size is bounded where bindings are
// made: a write binds only while the records from the oldest bound record
// still pending up to it number at most maxBindRecords (the flusher's
// default bound on a batch's ranges), and captures beyond that until the
// flusher has sent past it. Every span therefore lies within
// maxBindRecords records of its record, which replay relies on.
const maxBindRecords = 1 << 20

// keyImageSynced holds the image-synced mark (big-endian seq).
var keyImageSynced = []byte("m/imgsynced")

// imageSyncEvery is the default least time between two image syncs a
// writer runs to bind rather than capture (syncImageForBind): each flushes every dirty
// page of the image, so a writer rewriting recent data captures instead of
// syncing at every write.
const imageSyncEvery = 250 * time.Millisecond

// epochSpan is a binding as the flusher sees it: no batch may end at an
// epoch e with from <= e < to.
type epochSpan struct{ from, to uint64 }

// bindable reports whether a write may go over v without a capture, and
// if so binds it: marks it overwritten and counts a bind whose epoch is not
// known yet (bindDone settles it). v.mu is held.
func (j *Journal) bindable(v *imageRec) bool {
	if v.seq > j.imgSynced.Load() {
		return false
	}
	j.bindMu.Lock()
	defer j.bindMu.Unlock()
	if v.epoch <= j.claim.Load() {
		// A batch may hold v and end before the write's epoch.
		return false
	}
	oldest := v.seq
	if j.oldestBound != 0 {
		oldest = min(oldest, j.oldestBound)
	}
	if j.nextSeq.Load()-oldest > j.maxBindRecords {
		// The batch the binding would tie together grows too large.
		return false
	}
	v.overwritten = true
	v.binding++
	if !v.inBound {
		v.inBound = true
		j.boundRecs[v] = struct{}{}
		j.oldestBound = oldest
	}
	j.imgs.binds.Add(1)
	return true
}

// bindDone settles the binds of vs by a write appended in epoch (ok) or
// not appended at all.
func (j *Journal) bindDone(vs []*imageRec, epoch uint64, ok bool) {
	if len(vs) == 0 {
		return
	}
	j.bindMu.Lock()
	defer j.bindMu.Unlock()
	for _, v := range vs {
		v.binding--
		if ok {
			v.boundTo = max(v.boundTo, epoch)
		}
	}
}

// unbind forgets drained records' bindings.
func (j *Journal) unbind(vs []*imageRec) {
	j.bindMu.Lock()
	defer j.bindMu.Unlock()
	n := len(j.boundRecs)
	for _, v := range vs {
		if v.inBound {
			v.inBound = false
			delete(j.boundRecs, v)
		}
	}
	if len(j.boundRecs) == n {
		return
	}
	j.oldestBound = 0
	for v := range j.boundRecs {
		if j.oldestBound == 0 || v.seq < j.oldestBound {
			j.oldestBound = v.seq
		}
	}
}

// MaxBindRecords is the most records a binding spans (see maxBindRecords):
// a write bound over a record lies within that many seqs after it.
func (j *Journal) MaxBindRecords() uint64 { return j.maxBindRecords }

// BindReplay records that no batch may end from epoch from up to epoch to
// (exclusive): replay captured image-backed records that bound writes had
// gone over, and their copies hold those writes' bytes (see the top of
// this file).
//
// Replay calls it once per captured record, in seq order, so the spans
// mostly overlap: one that starts inside or at the end of the last joins
// it, as ClaimBatch would merge them, and the flusher does not copy and
// sort a span per record at every plan after a crash.
func (j *Journal) BindReplay(from, to uint64) {
	j.bindMu.Lock()
	defer j.bindMu.Unlock()
	if n := len(j.replayBound); n > 0 {
		if last := &j.replayBound[n-1]; last.from <= from && from <= last.to {
			last.to = max(last.to, to)
			return
		}
	}
	j.replayBound = append(j.replayBound, epochSpan{from, to})
}

// ClaimBatch is called by the flusher as it plans a batch of epochs up to
// closed (every record of which is applied). From now on a write over an
// image-backed record of an epoch up to closed captures it rather than
// binds it. It returns the last epoch the batch may reach (closed, or less
// where a binding reaches past closed: its write's epoch is still open, or
// not known yet) and whether a batch may end at a given epoch.
func (j *Journal) ClaimBatch(closed uint64) (limit uint64, endsAt func(uint64) bool) {
	j.bindMu.Lock()
	if closed > j.claim.Load() {
		j.claim.Store(closed)
	}
	drained := j.drainedEpoch.Load()
	spans := make([]epochSpan, 0, len(j.boundRecs)+len(j.replayBound))
	for v := range j.boundRecs {
		to := v.boundTo
		if v.binding > 0 {
			to = math.MaxUint64
		}
		if to > v.epoch {
			spans = append(spans, epochSpan{v.epoch, to})
		}
	}
	j.replayBound = slices.DeleteFunc(j.replayBound, func(s epochSpan) bool { return s.to <= drained })
	spans = append(spans, j.replayBound...)
	j.bindMu.Unlock()
	if len(spans) == 0 {
		return closed, func(uint64) bool { return true }
	}
	slices.SortFunc(spans, func(a, b epochSpan) int { return cmp.Compare(a.from, b.from) })
	merged := spans[:1]
	for _, s := range spans[1:] {
		// Touching spans merge too: a batch may end at neither side's
		// epochs, so the limit below is never inside another span.
		if last := &merged[len(merged)-1]; s.from <= last.to {
			last.to = max(last.to, s.to)
		} else {
			merged = append(merged, s)
		}
	}
	limit = closed
	for _, s := range merged {
		if s.from <= closed && closed < s.to {
			limit = s.from - 1
		}
	}
	endsAt = func(e uint64) bool {
		i, _ := slices.BinarySearchFunc(merged, e, func(s epochSpan, e uint64) int {
			if s.to <= e {
				return -1
			}
			return 1
		})
		return i == len(merged) || merged[i].from > e
	}
	return limit, endsAt
}

// noteImageSynced logs the image-synced mark: every record up to seq was
// applied to the image before an image sync that has just returned. The
// next journal sync makes it durable (syncOnce). Best effort: a lost mark
// only makes writes capture rather than bind.
func (j *Journal) noteImageSynced(seq uint64) {
	if j.ilog == nil || j.closing.Load() || seq <= j.imgSyncLogged.Load() {
		return
	}
	if err := j.logMark(keyImageSynced, seq); err != nil {
		return
	}
	j.imgSyncLogged.Store(seq)
	j.imgSyncedAt.Store(time.Now().UnixNano())
}

// ImageSyncedSeq is the durable image-synced mark as the journal was
// opened (replay's dividing line between torn and overwritten records).
func (j *Journal) ImageSyncedSeq() uint64 { return j.imgSyncedAtOpen }

// syncImageForBind makes the image-synced mark durable over victims when
// a write would bind one of them but the durable mark is below it: with a
// journal sync if the mark is logged already (a barrier synced the image),
// otherwise by syncing the image first, unless such a sync ran less than
// imageSyncEvery ago. Without it the write captures.
func (j *Journal) syncImageForBind(victims []*imageRec) error {
	// The highest seq to bind above the durable mark. claim is read
	// without bindMu: a hint on the write path; bindable decides under it.
	var need uint64
	synced, claim := j.imgSynced.Load(), j.claim.Load()
	for _, v := range victims {
		if v.seq > synced && v.epoch > claim {
			need = max(need, v.seq)
		}
	}
	if need == 0 {
		return nil
	}
	if need > j.imgSyncLogged.Load() {
		if time.Now().UnixNano()-j.imgSyncedAt.Load() < int64(j.imageSyncEvery) {
			return nil
		}
		if err := j.SyncApplied(func() error { return Datasync(j.img) }); err != nil {
			return err
		}
	}
	return j.syncLog()
}
