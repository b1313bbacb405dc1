package journal

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/vhdsync/vhdsync/journal/intentlog"
)

// Torn records after a power loss.
//
// A large payload goes to its segment file before the record's index
// entry goes to the intent log, but nothing orders their durability: a
// barrier's fdatasync of an intent log file carries every slot written so
// far, records of the next (unacknowledged) epoch among them, while the
// segments it syncs were listed when it started; badger's logs are synced
// before a recycle or a reclaim without the segments; and the kernel may
// write any dirty page back early. So after a power loss an index entry
// can survive whose payload, or whose new segment file's name, did not.
// Such a record was never acknowledged: the barrier that would have
// acknowledged it syncs its segment (and the directory, for a new one)
// before it returns. Found by TestJournalPowerCut and TestE2EPowerCut: the
// mount refused to start ("payload CRC-32C is ..., the index says ...";
// "journal segment ... is missing").
//
// After each successful sync the journal records the epoch closed when
// that sync started (markSynced): every record of an epoch up to it has a
// durable payload. At open, the records of later epochs are checked (their
// segment is there, their payload matches its CRC) and a torn one is
// dropped: what a power cut does to a write in flight. Below the mark a
// bad payload is damage, refused as before.

// keySynced holds the last epoch markSynced recorded (big-endian).
var keySynced = []byte("m/synced")

// markEvery is the least time between two marks: a mark is one more
// intent log slot, written through the page cache, so a writer that
// fsyncs every write (whose entries otherwise reach the device with
// O_DIRECT) pays an extra page write for it. A mark that lags only makes
// the check at open look at a few more records.
const markEvery = 50 * time.Millisecond

// markSynced records that every record of an epoch up to closed is
// durable, its payload included: an intent log entry, durable with the
// next sync, and in badger once indexed. Best effort: a lost mark only
// widens the check at open.
func (j *Journal) markSynced(closed uint64) {
	if j.ilog == nil || j.closing.Load() || closed <= j.markedEpoch.Load() {
		return
	}
	now := time.Now().UnixNano()
	last := j.markedAt.Load()
	if now-last < int64(markEvery) || !j.markedAt.CompareAndSwap(last, now) {
		return
	}
	j.markMu.Lock()
	defer j.markMu.Unlock()
	if closed <= j.markedEpoch.Load() {
		return
	}
	if err := j.logMark(keySynced, closed); err != nil {
		return
	}
	j.markedEpoch.Store(closed)
	j.marks.Add(1)
}

// logMark logs the counter key = v (big-endian) as an intent log entry:
// durable with the next sync, in badger once indexed, read back at open by
// counter. The synced mark and the image-synced mark (bind.go) are such
// counters.
func (j *Journal) logMark(key []byte, v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	return j.logEntry(intentlog.Entry{Key: key, Val: b[:]}, nil, 0, false)
}

// tornCheck reports whether record r, read at open, is torn: its epoch is
// above the synced mark and its segment is missing or its payload does not
// match its CRC. Below the mark such a record is damage (an error).
//
// A captured record (imagerec.go) carries the epoch of the record it
// copies, below the mark as often as not, so its copy is checked whatever
// its epoch, and a bad one is torn too: the caller turns it back into the
// image-backed record it was.
func (j *Journal) tornCheck(r Record, synced uint64) (torn bool, err error) {
	if r.Kind != KindData || r.InImage() || r.ImageBacked() {
		return false, nil
	}
	_, gerr := j.segs.get(r.seg)
	if gerr == nil && (r.Epoch > synced || r.captured) {
		_, gerr = j.segs.read(&r)
	}
	switch {
	case gerr == nil:
		return false, nil
	case r.Epoch > synced || r.captured:
		return true, nil
	default:
		return false, fmt.Errorf("journal record %d: %w", r.Seq, gerr)
	}
}

// dropTorn deletes the index entries of torn records (not durably: after
// another power loss they come back, torn, and go again).
func (j *Journal) dropTorn(torn []uint64, synced uint64) error {
	wb := j.db.NewWriteBatch()
	defer wb.Cancel()
	for _, seq := range torn {
		if err := wb.Delete(recKey(seq)); err != nil {
			return err
		}
	}
	if err := wb.Flush(); err != nil {
		return err
	}
	j.log.Warn("journal: dropped records whose payload a power loss took; they were written after the last synced barrier and never acknowledged by an fsync",
		"records", len(torn), "first_seq", torn[0], "synced_epoch", synced)
	return nil
}
