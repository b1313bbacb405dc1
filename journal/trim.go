package journal

import (
	"fmt"

	badger "github.com/dgraph-io/badger/v4"
)

// Drained records' index entries, and the segment files that held only
// drained records' payloads, are deleted in the background. A batch is
// committed (DeleteRange) by writing the drained seq alone: every record
// up to it is drained, which recovery, intent log replay, Scan and the
// flusher's reads take as the start of the journal, so an index entry at
// or below it is never read again whether or not it still exists. The
// trimmer then deletes those entries in bounded chunks, off the flusher's
// path: a crash or a Close in between leaves entries the next Open skips
// and its trimmer deletes.
//
// Why this is safe: the drained seq is written in the same badger batch
// that would have held the deletions, and made durable (segments.reclaim
// syncs the index first) before any segment holding those records'
// payloads is deleted, exactly as the deletions were; an entry that
// outlives its payload is below the drained seq, so nothing reads it. A
// segment left behind by a stop or a crash is deleted by the next Open's
// recovery, which deletes every segment no pending record refers to.

// trimChunk is how many index entries one trimmer write batch deletes:
// small enough that Close waits for one chunk at most (a few ms).
const trimChunk = 8192

// trimmer deletes the segments and index entries of drained records.
type trimmer struct {
	wake chan struct{}
	quit chan struct{}
	done chan struct{}
}

// testNoTrim, if set (tests), keeps the trimmer from starting: drained
// records' index entries stay, as after a crash before it reached them.
var testNoTrim bool

// start runs the trimmer for j until stop.
func (t *trimmer) start(j *Journal) {
	if testNoTrim {
		return
	}
	t.wake = make(chan struct{}, 1)
	t.quit = make(chan struct{})
	t.done = make(chan struct{})
	go t.loop(j)
	t.kick()
}

// kick tells the trimmer the drained seq moved.
func (t *trimmer) kick() {
	if t.wake == nil {
		return
	}
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// stop ends the trimmer between two chunks.
func (t *trimmer) stop() {
	if t.quit == nil {
		return
	}
	close(t.quit)
	<-t.done
}

func (t *trimmer) loop(j *Journal) {
	defer close(t.done)
	// cleaned: every index entry with a seq up to it is deleted. Unknown
	// at Open: the first entry tells (entries below the drained seq are
	// those an earlier run did not reach).
	cleaned, known := uint64(0), false
	for {
		select {
		case <-t.quit:
			return
		case <-t.wake:
		}
		if !known {
			first, ok, err := j.firstEntry()
			if err != nil {
				j.log.Warn("journal: find drained index entries", "err", err)
				continue
			}
			cleaned, known = j.drainedSeq.Load(), true
			if ok && first <= cleaned {
				cleaned = first - 1
			}
		}
		target := j.drainedSeq.Load()
		if n, err := j.segs.reclaim(target, j.syncIndex); err != nil {
			// Left for the next kick, or the next Open's recovery, which
			// deletes every segment no pending record needs.
			j.log.Warn("journal: delete drained segments", "err", err)
		} else if n > 0 {
			j.log.Debug("journal: drained segments deleted", "segments", n, "drained_seq", target)
		}
		for cleaned < target {
			select {
			case <-t.quit:
				return
			default:
			}
			to := min(target, cleaned+trimChunk)
			if err := j.deleteEntries(cleaned+1, to); err != nil {
				// Left for the next kick or Open: the entries are
				// skipped meanwhile, only their space is not reclaimed.
				j.log.Warn("journal: delete drained index entries", "from", cleaned+1, "to", to, "err", err)
				break
			}
			cleaned = to
		}
	}
}

// firstEntry is the lowest seq with an index entry.
func (j *Journal) firstEntry() (seq uint64, ok bool, err error) {
	err = j.db.View(func(txn *badger.Txn) error {
		opts := badger.DefaultIteratorOptions
		opts.PrefetchValues = false
		opts.Prefix = recPrefix
		it := txn.NewIterator(opts)
		defer it.Close()
		it.Rewind()
		if it.Valid() {
			seq, ok = entrySeq(it.Item().Key())
		}
		return nil
	})
	return seq, ok, err
}

// deleteEntries deletes the index entries of seqs from..to, all drained.
// A seq without an entry costs a tombstone.
func (j *Journal) deleteEntries(from, to uint64) error {
	wb := j.db.NewWriteBatch()
	defer wb.Cancel()
	for seq := from; seq <= to; seq++ {
		if err := wb.Delete(recKey(seq)); err != nil {
			return fmt.Errorf("delete drained index entries: %w", err)
		}
	}
	if err := wb.Flush(); err != nil {
		return fmt.Errorf("delete drained index entries: %w", err)
	}
	return nil
}
