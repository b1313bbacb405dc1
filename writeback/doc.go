// Package writeback is vhdsync's write-back path: the durable journal of
// every write (payloads in segment files or the image, entries in an
// intent log, indexed by badger), epochs closed by barriers (fsync), the
// ordered flusher that drains the journal to the page blob, the lease, and
// replay after a crash.
//
// The invariants it keeps (numbered as in DESIGN.md):
//
//  1. Durable ack: a write is in the journal before it is acknowledged, and
//     everything acknowledged before a Barrier returned is durable.
//  2. Convergence: after any crash, Open replays the journal into the local
//     image and the flusher drains it, so image and blob become equal.
//  3. Order: the blob never holds a write from after barrier b while
//     missing one from before b. The flusher sends one batch (one or more
//     whole epochs) at a time and marks a batch in progress on the blob with
//     an odd sequence number, 2*lastEpoch-1, and complete with 2*lastEpoch.
//  5. One writer: the blob is leased while the journal is open for writing.
//  6. Bounded: pending journal bytes are capped; above the cap writers
//     block until the flusher drains, they never fail.
//
// The ordering rule lives in one place: Flusher.sendBatch.
package writeback
