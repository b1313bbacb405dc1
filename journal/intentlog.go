package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/vhdsync/vhdsync/journal/intentlog"
)

// The Journal's side of the intent log (package intentlog): an append's
// index entry goes to the log, then to badger through the indexer; log
// files go once badger, and the segments their inline payloads were copied
// to, are durable; Open replays what the last run left.

// logEntry writes an append's index entry to the intent log and queues it
// for badger: when it returns nil it survives kill -9 and every read sees
// it. An inline payload (e.Inline) goes to seg at off once the indexer
// gets to it. With direct, the entry goes to the device before it returns
// (intentlog.Log.WriteDirect).
func (j *Journal) logEntry(e intentlog.Entry, seg *segment, off int64, direct bool) error {
	if err := j.idx.failed(); err != nil {
		// Badger refuses entries: stop taking writes rather than pile up
		// intent logs nothing drains.
		return err
	}
	entries := []intentlog.Entry{e}
	var spans []intentlog.Span
	done := false
	var err error
	if direct {
		spans, done, err = j.ilog.WriteDirect(e)
		if done && err == nil {
			j.directEntries.Add(1)
		}
	}
	if !done {
		spans, err = j.ilog.Write(entries)
	}
	if err != nil {
		return err
	}
	it := indexItem{entries: entries, spans: spans}
	if e.Inline != nil {
		// The log's copy of the payload (Write points e.Inline at it).
		it.seg, it.off, it.inline = seg, off, e.Inline.Data
	}
	j.idx.add(it)
	return nil
}

// indexed is the indexer's callback: spans are in badger. Intent log
// files wholly in badger are recycled once badger's logs, and the segments
// their inline payloads went to, are synced. A failure leaves them for the
// next commit (or the next open) to try again: they only hold entries
// badger has.
func (j *Journal) indexed(spans []intentlog.Span) {
	j.ilog.Resolve(spans)
	done := j.ilog.Done()
	if len(done) == 0 {
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
		err = j.ilog.Recycle(done)
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
	ids, err := intentlog.List(j.dir)
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
		gen     uint64
		entries []intentlog.Entry
	}
	var logs []logFile
	for _, id := range ids {
		g, entries, err := intentlog.Read(j.dir, id)
		if err != nil {
			return 0, 0, damaged(err)
		}
		logs = append(logs, logFile{g, entries})
		gen = max(gen, g)
	}
	// Generation order is the order the entries were written in.
	sort.SliceStable(logs, func(a, b int) bool { return logs[a].gen < logs[b].gen })
	var entries []*groupEntry
	var kvs []intentlog.Entry
	count, payloads := 0, 0
	for _, lf := range logs {
		for _, kv := range lf.entries {
			seq, ok := entrySeq(kv.Key)
			if ok && seq <= drained {
				continue
			}
			if in := kv.Inline; in != nil {
				// Its payload goes to its segment again: the indexer may
				// not have written it, or not synced it.
				r, err := decodeRecord(seq, kv.Val)
				if err != nil || r.Kind != KindData || r.seg == 0 || r.crc != in.CRC || r.Length != int64(len(in.Data)) {
					return 0, 0, damaged(fmt.Errorf("intent log entry of record %d does not match its inline payload (%v)", seq, err))
				}
				if err := j.segs.writeAt(r.seg, r.segOff, in.Data); err != nil {
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
		if err := os.Remove(filepath.Join(j.dir, intentlog.Name(id))); err != nil && !errors.Is(err, os.ErrNotExist) {
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
