package writeback

import "sync"

// rangeLock serialises overlapping byte ranges and lets disjoint ones run
// in parallel. The write path holds it across widen + journal append +
// image write, so that for overlapping writes the journal's seq order is
// the order in which they reach the local image (otherwise the blob could
// converge to one value and the image to another).
//
// It also feeds the flusher's watches (fill.go): a writer's range is
// recorded in every open watch when the writer releases it.
type rangeLock struct {
	mu      sync.Mutex
	cond    *sync.Cond
	held    map[*heldRange]struct{}
	watches []*watch
}

type heldRange struct{ off, end int64 }

func newRangeLock() *rangeLock {
	l := &rangeLock{held: map[*heldRange]struct{}{}}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// lock waits until [off, end) overlaps no held range, then holds it.
func (l *rangeLock) lock(off, end int64) *heldRange {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.overlaps(off, end) {
		l.cond.Wait()
	}
	h := &heldRange{off, end}
	l.held[h] = struct{}{}
	return h
}

// tryLock holds [off, end) if no held range overlaps it, without waiting.
func (l *rangeLock) tryLock(off, end int64) (*heldRange, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.overlaps(off, end) {
		return nil, false
	}
	h := &heldRange{off, end}
	l.held[h] = struct{}{}
	return h, true
}

func (l *rangeLock) overlaps(off, end int64) bool {
	for h := range l.held {
		if h.off < end && off < h.end {
			return true
		}
	}
	return false
}

// unlock releases a writer's range, recording it in the open watches.
func (l *rangeLock) unlock(h *heldRange) {
	l.mu.Lock()
	l.noteLocked(h.off, h.end)
	delete(l.held, h)
	l.cond.Broadcast()
	l.mu.Unlock()
}

// release releases a reader's range (a fill): nothing was written.
func (l *rangeLock) release(h *heldRange) {
	l.mu.Lock()
	delete(l.held, h)
	l.cond.Broadcast()
	l.mu.Unlock()
}
