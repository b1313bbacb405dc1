package writeback

import (
	"errors"
	"fmt"
	"sync"

	badger "github.com/dgraph-io/badger/v4"
)

// maxGroupEntries caps the index entries of one group commit; badger
// refuses a transaction above its own limits (ErrTxnTooBig, about 15 % of
// a memtable), which a bigger group is split against anyway.
const maxGroupEntries = 1024

// groupCommit commits the index entries of concurrent appends together:
// each append queues its entry and waits; whichever waiter finds no commit
// running takes every queued entry and writes them in one badger
// transaction (a leader, not a dedicated goroutine, so a lone writer pays
// no hand-off). A commit in flight collects the next group meanwhile. Every
// waiter returns only once its own entry is committed, with that
// transaction's error, so Append's contract (it returns once the record
// survives kill -9) is unchanged; the cost of a badger transaction (the
// oracle, the write channel, the memtable insert) is paid once per group
// instead of once per write.
type groupCommit struct {
	db    *badger.DB
	mu    sync.Mutex
	cond  *sync.Cond
	queue []*groupEntry
	busy  bool // a leader is writing a group

	// groups and entries count what was committed (tests and profiles).
	groups, entries uint64
}

type groupEntry struct {
	key, val []byte
	done     bool
	err      error
}

func (g *groupCommit) init(db *badger.DB) {
	g.db = db
	g.cond = sync.NewCond(&g.mu)
}

// commit writes key=val to badger, grouped with concurrent calls, and
// returns once it is committed (or failed).
func (g *groupCommit) commit(key, val []byte) error {
	e := &groupEntry{key: key, val: val}
	g.mu.Lock()
	g.queue = append(g.queue, e)
	for !e.done {
		if g.busy {
			g.cond.Wait()
			continue
		}
		// Lead: take the queue (e is in it) and commit it.
		g.busy = true
		batch := g.queue
		g.queue = nil
		g.mu.Unlock()
		g.write(batch)
		g.mu.Lock()
		g.busy = false
		g.groups++
		g.entries += uint64(len(batch))
		g.cond.Broadcast()
	}
	g.mu.Unlock()
	return e.err
}

// write commits batch in as few transactions as badger allows, and marks
// every entry done with the error of the transaction that carried it.
// Called without g.mu; the marks are published by the caller's Broadcast
// under g.mu.
func (g *groupCommit) write(batch []*groupEntry) {
	for len(batch) > 0 {
		n := g.writeSome(batch[:min(len(batch), maxGroupEntries)])
		batch = batch[n:]
	}
}

// writeSome commits a prefix of batch in one transaction and returns its
// length (at least 1: an entry that alone is too big fails by itself).
func (g *groupCommit) writeSome(batch []*groupEntry) int {
	txn := g.db.NewTransaction(true)
	defer txn.Discard()
	n := 0
	var err error
	for _, e := range batch {
		if err = txn.Set(e.key, e.val); err != nil {
			break
		}
		n++
	}
	switch {
	case err == nil:
		err = txn.Commit()
	case errors.Is(err, badger.ErrTxnTooBig) && n > 0:
		err = txn.Commit() // the rest goes in the next transaction
	default:
		n = max(n, 1)
	}
	if err != nil {
		err = fmt.Errorf("commit %d journal index entries: %w", n, err)
	}
	for _, e := range batch[:n] {
		e.err, e.done = err, true
	}
	return n
}
