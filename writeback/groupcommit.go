package writeback

import (
	"fmt"
	"sync"
	"sync/atomic"

	badger "github.com/dgraph-io/badger/v4"
)

// maxGroupEntries caps the index entries of one group commit; badger
// refuses a transaction above its own limits (ErrTxnTooBig, about 15 % of
// a memtable), which a bigger group is split against anyway.
const maxGroupEntries = 1024

// maxGroupsInFlight is how many group transactions may be committing at
// once. badger's write goroutine already batches the transactions waiting
// for it, and writes one batch while it collects the next: with one group
// in flight, a second writer would wait for the first commit to finish
// before starting its own (measured: 0.73 × the ungrouped IOPS with 2
// writers); with two, the next group is ready when badger is.
const maxGroupsInFlight = 2

// groupCommit commits the index entries of concurrent appends together:
// each append queues its entry; if fewer than maxGroupsInFlight groups are
// committing it leads: it takes every queued entry (its own among them)
// and writes them in one badger transaction (a leader, not a dedicated
// goroutine, so a lone writer pays no hand-off). Otherwise it waits. When
// a leader's transaction is done it hands its place to the first entry
// queued since (which then leads with everything queued by then), and
// wakes each entry of its group with the result: every waiter is woken
// exactly once, and returns only once its own entry is committed, with
// that transaction's error, so Append's contract (it returns once the
// record survives kill -9) is unchanged. The cost of a badger transaction
// (the oracle, the write channel, the pending-writes map) is paid once per
// group instead of once per write.
type groupCommit struct {
	db       *badger.DB
	mu       sync.Mutex
	queue    []*groupEntry
	inFlight int // groups committing, or leaders handed a place

	// groups and entries count what was committed (tests and profiles).
	groups, entries atomic.Uint64
}

type groupEntry struct {
	kvs  []keyValue // committed together, in one transaction
	err  error
	wake chan bool // one message: true = lead, false = done (err set)
}

// keyValue is one badger entry of a group commit: set key to val, or
// delete key (del).
type keyValue struct {
	key, val []byte
	del      bool
}

func (g *groupCommit) init(db *badger.DB) {
	g.db = db
}

// commit writes key=val to badger, grouped with concurrent calls, and
// returns once it is committed (or failed).
func (g *groupCommit) commit(key, val []byte) error {
	return g.commitAll([]keyValue{{key: key, val: val}})
}

// commitAll is commit for several entries that must land in the same
// transaction (at most maxGroupEntries of them).
func (g *groupCommit) commitAll(kvs []keyValue) error {
	e := &groupEntry{kvs: kvs, wake: make(chan bool, 1)}
	var batch []*groupEntry
	g.mu.Lock()
	if g.inFlight < maxGroupsInFlight {
		g.inFlight++
		batch = append(g.queue, e)
	} else {
		g.queue = append(g.queue, e)
		g.mu.Unlock()
		if lead := <-e.wake; !lead {
			return e.err
		}
		// Handed a place (and taken off the queue): lead what queued since.
		g.mu.Lock()
		batch = append([]*groupEntry{e}, g.queue...)
	}
	g.queue = nil
	g.mu.Unlock()
	g.write(batch)
	g.groups.Add(1)
	g.entries.Add(uint64(len(batch)))
	g.mu.Lock()
	if len(g.queue) > 0 {
		next := g.queue[0]
		g.queue = g.queue[1:]
		next.wake <- true // the place passes on: inFlight unchanged
	} else {
		g.inFlight--
	}
	g.mu.Unlock()
	for _, x := range batch {
		if x != e {
			x.wake <- false
		}
	}
	return e.err
}

// write commits batch in as few transactions as badger allows, and marks
// every entry done with the error of the transaction that carried it.
// Called without g.mu; the results are published by the wake messages.
func (g *groupCommit) write(batch []*groupEntry) {
	for len(batch) > 0 {
		n := g.writeSome(batch[:min(len(batch), maxGroupEntries)])
		batch = batch[n:]
	}
}

// writeSome commits a prefix of batch in one transaction and returns its
// length (at least 1: an entry badger refuses in an empty transaction
// fails by itself).
func (g *groupCommit) writeSome(batch []*groupEntry) int {
	txn := g.db.NewTransaction(true)
	defer txn.Discard()
	n, size := 0, 0
	var err error
	for _, e := range batch {
		if n > 0 && size+len(e.kvs) > maxGroupEntries {
			break
		}
		for _, kv := range e.kvs {
			if kv.del {
				err = txn.Delete(kv.key)
			} else {
				err = txn.Set(kv.key, kv.val)
			}
			if err != nil {
				break
			}
		}
		if err != nil {
			if n > 0 {
				// Part of this entry is in the transaction: start again
				// with the entries before it.
				txn.Discard()
				return g.writeSome(batch[:n])
			}
			break
		}
		n++
		size += len(e.kvs)
	}
	if n > 0 {
		// All of batch, or the prefix badger took (ErrTxnTooBig): the
		// rest goes in the next transaction.
		err = txn.Commit()
	} else {
		n = 1 // the first entry alone was refused: it fails by itself
	}
	if err != nil {
		err = fmt.Errorf("commit %d journal index entries: %w", n, err)
	}
	for _, e := range batch[:n] {
		e.err = err
	}
	return n
}
