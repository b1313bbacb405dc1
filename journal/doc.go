// Package journal is the durable, ordered log of every write the remote
// does not hold yet: epochs closed by barriers, payloads in the intent log
// or in segment files, indexed by badger.
//
// An append's index entry (and a small payload) goes to the intent log
// (package intentlog) with one pwrite; an indexer commits the entries to
// badger in the background (indexer.go, groupcommit.go), and small
// payloads to their segment (segment.go). A payload of ImageMin bytes or
// more appended with an apply function stays in the local image only; a
// write over it binds their epochs (bind.go), or, once the flusher has
// claimed its epoch, captures it to a segment first (imagerec.go). Badger
// is the ordered index
// that every read goes through: the flusher scans whole closed epochs in
// seq order (Scan), reads each payload when it sends it (Payload), and
// deletes a batch once delivered (DeleteRange; replay uses Delete), which
// frees their segments. Image-backed records, which only the removed
// write-once mode wrote, are still read back (legacy.go).
//
// # Invariants
//
// Numbered as in docs/DESIGN.md:
//
//  1. Durable ack. A write is in the journal before it is acknowledged:
//     Append returns once the record's entry (and a small payload) is in
//     the intent log and a large payload in its segment file, or, for an
//     image-backed record, in the image, so it survives kill -9, and every
//     read sees it. Everything acknowledged before a Barrier returned is
//     durable: Barrier closes the epoch, then fdatasyncs the intent log and
//     segment files written since the last sync (and the image, when it
//     may hold an image-backed record's bytes only in its page cache), so
//     it survives power loss too.
//  6. Bounded. The pending bytes (payloads and index entries) are capped
//     by Options.MaxPendingBytes: an Append that would exceed the cap
//     blocks until the flusher has drained enough, or its context ends;
//     it never fails for lack of room. A record larger than the whole cap
//     is admitted when nothing else is pending, so no writer waits
//     forever.
//
// # Lock order
//
// A lock is only taken while holding the ones to its left on a line,
// never the reverse:
//
//	applyMu (read) → barrierMu → indexer.mu, intentlog Log.mu
//	imageRec.mu → imageRecs.mu, segments.mu, intentlog Log.mu, indexer.mu
//	applyMu (write) → syncMu, markMu (SyncApplied)
//	markMu → indexer.mu, intentlog Log.mu (markSynced)
//	syncMu → segments.closeMu (read) → segments.mu
//	syncMu → segments.dirMu, intentlog Log.mu
//	filesMu → segments.closeMu (read) → segments.mu
//	filesMu → segments.dirMu
//
// applyMu is held for reading by an append from its commit to the end of
// its apply function (the caller's image write), and for writing by
// WaitApplied, empty, and by SyncApplied across a sync and the caller's
// image sync. syncMu (a barrier's fdatasyncs, an intent log
// recycle) and filesMu (badger's log fsyncs, the segments' copied
// payloads) are never held together: the indexer's recycle releases
// filesMu before it takes syncMu. markMu orders the synced marks (see
// torn.go). barrierMu is never held across a sync:
// Barrier releases it first. segments.closeMu is held for writing by
// reclaim alone, with no other lock. Journal.mu (pending accounting, the
// space condition, legacy records), syncState (Sync's coalescing),
// indexer.mu, segments.mu, segments.dirMu, Log.mu, imageRecs.mu
// (image-backed records, imagerec.go) and bindMu (bind.go, taken under
// an imageRec.mu) are leaves: nothing
// is taken while one is held. indexer.gate is held around each badger
// commit, with none of the others (tests hold it to stall the indexer).
// A caller may hold its own locks (Disk's range lock) across any call; the
// only caller code the journal runs under a lock of its own is the apply
// function of AppendApply, under applyMu (read), which therefore must not
// call WaitApplied.
package journal
