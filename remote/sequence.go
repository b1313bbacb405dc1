package remote

// Sequence is the blob's sequence number read as the replication
// protocol's mark (docs/DESIGN.md, invariant 3). Epochs are the intervals
// between the disk's barriers; the flusher sends them in batches of whole
// epochs first..last, and marks each batch on the blob:
//
//   - Complete(e) = 2e (even): the blob is exactly the disk at the barrier
//     that closed epoch e, and holds nothing of a later epoch.
//   - Started(last) = 2last-1 (odd): a batch ending at epoch last is being
//     written; the blob holds every epoch before its first completely and
//     some of the batch. It is no consistent disk until Complete(last).
//
// The number only ever rises (the service's max update), and every write
// of a batch is fenced to the batch's starting mark, so a request delayed
// in the network is refused once the mark has moved on.
type Sequence int64

// Complete is the mark of a blob that holds every epoch up to e and
// nothing later: 2e.
func Complete(e uint64) Sequence { return Sequence(2 * e) }

// Started is the mark of a batch ending at epoch last being written:
// 2last-1. last must be at least 1.
func Started(last uint64) Sequence { return Sequence(2*last - 1) }

// InProgress reports whether a batch was being written (odd): the blob
// is then no consistent disk.
func (s Sequence) InProgress() bool { return s%2 == 1 }

// Epoch is the last epoch the blob holds completely.
func (s Sequence) Epoch() uint64 { return uint64(s / 2) }

// Target is the last epoch of the batch the mark belongs to: the batch in
// progress when odd, Epoch when even. After a crash mid-batch, the next
// batch must reach at least Target before the blob can be even again.
func (s Sequence) Target() uint64 { return uint64(s+1) / 2 }

// IsComplete reports whether s is the even mark of epoch e: the blob (or
// a snapshot of it) is exactly the disk at the barrier that closed e.
func (s Sequence) IsComplete(e uint64) bool { return s == Complete(e) }
