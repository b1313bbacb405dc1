// Package writeback is the disk: the local image behind a range lock, the
// journal in front of it and the flusher behind it, wired together; the
// lease on the blob, and replay of the journal after a crash. Writes from
// fusefs come here (Disk.WriteAt, Zero, Flush) and are acknowledged once
// journaled and applied to the image.
//
// It keeps (numbered as in docs/DESIGN.md) invariant 2, convergence: after
// any crash, Open replays the journal into the image (coalesced, the last
// write wins per sector), syncs it, and drops only what the blob holds
// completely, so image and blob become equal once the flusher has drained;
// and invariant 5, one writer: the blob is leased while the disk is open
// for writing. It also gives the flusher the clean sectors it fills Put
// Pages with (fill.go), under the range lock. The journal keeps invariants
// 1 and 6, replicate invariants 3 and 4.
package writeback
