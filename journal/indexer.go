package journal

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhdsync/vhdsync/journal/intentlog"
)

// indexer commits the entries appends wrote to the intent log into badger,
// in the background and in order (see package intentlog), after writing
// their inline payloads to their segments. Reads wait for it with flush. A failed commit is retried, from the failed entry on, so the
// entries reach badger in the order they were written: a later entry for a
// key never lands before an earlier one.
type indexer struct {
	g *groupCommit
	// onCommitted runs after each successful commit, outside mu, with the
	// spans whose entries it made durable in badger's memtable.
	onCommitted func([]intentlog.Span)

	mu        sync.Mutex
	cond      *sync.Cond // progress, new work, or stop
	queue     []indexItem
	enq, done uint64      // items queued and committed, ever
	err       error       // the last commit's error, until one succeeds
	broken    atomic.Bool // err != nil, read without mu on the write path
	stop      bool
	finished  chan struct{}
	// gate is held around each commit; a test holds it to keep entries
	// in the intent log only, as at a kill before the indexer got to them.
	gate sync.Mutex
}

// indexItem is one append's entries, queued for badger, and the intent
// log spans they took. An inline payload (the intent log's copy) goes to
// seg at off first.
type indexItem struct {
	entries []intentlog.Entry
	spans   []intentlog.Span
	seg     *segment
	off     int64
	inline  []byte
}

// ErrIndexRefused: badger refuses the journal's index entries, or a segment
// the inline payloads of small writes (see package intentlog) are copied to
// (a full or failing state filesystem). Writes then fail; those
// acknowledged before are in the intent log.
var ErrIndexRefused = errors.New("the journal cannot index its entries (badger or a segment write fails)")

// indexAdvice follows ErrIndexRefused.
const indexAdvice = "every write acknowledged so far is kept in the intent log and replayed at the next mount: free space or fix the state directory's filesystem (see the kernel log), then unmount and mount again"

// indexerRetry is the wait before a failed commit is tried again.
const indexerRetry = 100 * time.Millisecond

func newIndexer(g *groupCommit, onCommitted func([]intentlog.Span)) *indexer {
	x := &indexer{g: g, onCommitted: onCommitted, finished: make(chan struct{})}
	x.cond = sync.NewCond(&x.mu)
	go x.run()
	return x
}

// add queues it (already in the intent log) for badger.
func (x *indexer) add(it indexItem) {
	x.mu.Lock()
	x.queue = append(x.queue, it)
	x.enq++
	x.cond.Broadcast()
	x.mu.Unlock()
}

// flush waits until everything queued before it is in badger, or returns
// the error that keeps it out.
func (x *indexer) flush() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	want := x.enq
	for x.done < want && x.err == nil {
		x.cond.Wait()
	}
	if x.done < want {
		return x.err
	}
	return nil
}

// failed returns the error of the last commit if it failed.
func (x *indexer) failed() error {
	if !x.broken.Load() {
		return nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.err
}

// close commits what is queued (one attempt) and stops.
func (x *indexer) close() {
	x.mu.Lock()
	x.stop = true
	x.cond.Broadcast()
	x.mu.Unlock()
	<-x.finished
}

func (x *indexer) run() {
	defer close(x.finished)
	var retry *time.Timer
	for {
		x.mu.Lock()
		for len(x.queue) == 0 && !x.stop {
			x.cond.Wait()
		}
		if len(x.queue) == 0 {
			x.mu.Unlock()
			return
		}
		batch := x.queue
		x.queue = nil
		stopping := x.stop
		x.mu.Unlock()

		x.gate.Lock()
		n, err := x.commit(batch)
		x.gate.Unlock()
		var spans []intentlog.Span
		for _, it := range batch[:n] {
			spans = append(spans, it.spans...)
		}
		if n > 0 && x.onCommitted != nil {
			x.onCommitted(spans)
		}
		if err != nil {
			err = fmt.Errorf("%w: %w; %s", ErrIndexRefused, err, indexAdvice)
		}
		x.mu.Lock()
		x.done += uint64(n)
		x.err = err
		x.broken.Store(err != nil)
		if err != nil {
			// The rest goes first next time, in order.
			x.queue = append(batch[n:len(batch):len(batch)], x.queue...)
		}
		x.cond.Broadcast()
		x.mu.Unlock()
		if err != nil {
			if stopping {
				return
			}
			if retry == nil {
				retry = time.NewTimer(indexerRetry)
			} else {
				retry.Reset(indexerRetry)
			}
			<-retry.C
		}
	}
}

// commit writes batch's inline payloads to their segments, then its
// entries to badger in as few transactions as it allows, in order, and
// stops at the first failure: it returns how many items are committed and
// that failure.
func (x *indexer) commit(batch []indexItem) (int, error) {
	n, perr := writeInline(batch)
	done, err := x.commitEntries(batch[:n])
	if err != nil {
		return done, err
	}
	return done, perr
}

// commitEntries writes batch's entries to badger (see commit).
func (x *indexer) commitEntries(batch []indexItem) (int, error) {
	// One array for the batch's entries, not one allocation per record:
	// the indexer runs once per append under random writes.
	entries := make([]*groupEntry, len(batch))
	backing := make([]groupEntry, len(batch))
	for i := range batch {
		backing[i].kvs = batch[i].entries
		entries[i] = &backing[i]
	}
	done := 0
	for done < len(entries) {
		n := x.g.writeSome(entries[done:min(len(entries), done+maxGroupEntries)])
		if err := entries[done].err; err != nil {
			return done, err
		}
		x.g.groups.Add(1)
		x.g.entries.Add(uint64(n))
		done += n
	}
	return done, nil
}
