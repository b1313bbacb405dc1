package journal

import (
	"fmt"
	"sync/atomic"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/vhdsync/vhdsync/journal/intentlog"
)

// maxGroupEntries caps the index entries of one group commit; badger
// refuses a transaction above its own limits (ErrTxnTooBig, about 15 % of
// a memtable), which a bigger group is split against anyway.
const maxGroupEntries = 1024

// groupCommit writes groups of index entries to badger, as many per
// transaction as badger takes. Appends no longer wait for it: the indexer
// (indexer.go) calls it from one goroutine with everything the intent log
// has queued, and Open with what an intent log left behind.
type groupCommit struct {
	db *badger.DB

	// groups and entries count what was committed: transactions and
	// groupEntries (tests and profiles).
	groups, entries atomic.Uint64
	// failCommit, if set (tests, with the indexer's gate held), fails
	// every commit with its error: badger refusing writes.
	failCommit func() error
}

// groupEntry is one append's entries (set or delete a key, as the intent
// log carries them), committed in one transaction.
type groupEntry struct {
	kvs []intentlog.Entry
	err error
}

func (g *groupCommit) init(db *badger.DB) {
	g.db = db
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
			if kv.Del {
				err = txn.Delete(kv.Key)
			} else {
				err = txn.Set(kv.Key, kv.Val)
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
	if n > 0 && g.failCommit != nil {
		err = g.failCommit()
	} else if n > 0 {
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
