// Package intentlog is the journal's intent log: files of fixed-size slots
// that make an append's index entry (and a small write's payload) survive
// kill -9 with one pwrite, and power loss with an fdatasync, until the
// journal's index holds it.
//
// It exists because a badger commit per write, even shared by a group of
// concurrent writes, cost 45 % of random 4 KiB IOPS through FUSE (27 k
// against 48 k with the commit skipped, same run), mostly in goroutine
// hand-offs and thread wake-ups rather than in badger's own work. So the
// journal writes each append's entry here (Log.Write) and the append is
// complete; it commits the entries to badger in large transactions, in
// the background, and then says so (Log.Resolve). A barrier fdatasyncs the
// log's dirty files (Log.Sync) instead of badger's WAL. At open the
// journal replays every valid entry the last run left (List, Read) into
// badger before anything reads it.
//
// # Files
//
// A file, ilog-<id>.dat, is a header block (magic, id, generation, a
// random incarnation, slot count, CRC) and SlotSize-byte slots. It is
// written with zeros in full when made (and fdatasync'ed, its name too),
// so a slot write never changes its size or allocation: fdatasync then
// writes the data only, without a filesystem journal commit. A slot counts
// only with the right magic, CRC, the file's incarnation and its own
// index: a slot torn by a kill, never written, or left from the file's
// previous use, is ignored. Each slot stands alone, and slots are replayed
// in generation and slot order, which is the order their appends reserved
// them in. Once a file is full, every slot in it is in badger and badger's
// logs have been fsync'ed since, it is recycled: a new header (next
// generation, new incarnation) makes it the next file, with no fsync and
// no directory change. Making files (in the background, ahead of need) is
// the slow path: under heavy writes a directory fsync took long enough to
// stall writers (p99.9 52 ms).
//
// # Inline payloads
//
// A small record's payload travels in the log too, in the slots right
// after its entry's, in the same pwrite (Entry.Inline). The journal
// reserves its place in a segment file at append but writes it there only
// later, before badger gets the entry (so every read, which waits for
// badger, finds it). A barrier then needs no segment fdatasync for small
// writes: segment files grow, and an fdatasync of a grown file commits the
// filesystem's journal (p50 346 µs for a barrier after one 4 KiB write),
// while the log's files never change size. The journal fdatasyncs the
// segments it copied payloads to before a log file is recycled or
// deleted (having started their writeback a MiB at a time as it copied,
// so that this fdatasync is no burst that barriers queue behind), and
// replay writes the payloads again. The payload slots are a
// length, a CRC-32C and the payload: a payload whose CRC does not check (a
// torn write) voids its entry.
//
// # Concurrency
//
// Write, WriteDirect, Resolve, Done and Sync may be called from many
// goroutines. Log.mu guards the reservation of slots and the set of files;
// it is taken last (no other lock is taken while it is held), and slots
// are written and files synced outside it. Sync and Recycle must not overlap,
// as Recycle may close a file Sync is about to fdatasync: the caller
// serialises them (the journal holds its syncMu around both).
package intentlog
