package powercut

import "sync"

// OpKind names an operation of the file system, for CutAfter.
type OpKind string

// The operations a CutAfter predicate sees. Reads, lookups and listings
// change nothing and are not reported.
const (
	OpCreate    OpKind = "create" // a file, socket or fifo (create, mknod)
	OpMkdir     OpKind = "mkdir"
	OpSymlink   OpKind = "symlink"
	OpLink      OpKind = "link"
	OpUnlink    OpKind = "unlink"
	OpRmdir     OpKind = "rmdir"
	OpRename    OpKind = "rename"
	OpWrite     OpKind = "write"
	OpTruncate  OpKind = "truncate"  // a size change (setattr)
	OpFallocate OpKind = "fallocate" // allocate, punch a hole, zero a range
	OpFsync     OpKind = "fsync"     // fsync or fdatasync of a file (msync too)
	OpFsyncDir  OpKind = "fsyncdir"
)

// Op is one operation the file system applied.
type Op struct {
	Kind OpKind
	// Path is the file's path relative to the root (the name it was last
	// linked under); for a rename, the old path, and NewPath the new.
	Path, NewPath string
	// Off and Len: a write's, truncate's (Off is the new size) or
	// fallocate's range.
	Off, Len int64
}

// trigger is an armed CutAfter.
type trigger struct {
	mu    sync.Mutex // serialises pred
	fired bool
	pred  func(Op) bool
	ch    chan CutStats
}

// CutAfter arms a cut: after the first operation for which pred returns
// true has been applied (and its result returned to the caller), the
// power is cut, as by Cut, and the channel receives what the cut dropped.
// Operations that start after the one that fired fail with EIO, so the
// cut lies right after it; the caller then kills what used the file
// system. pred runs inside file system operations, one at a time: it
// must be quick and must not use the file system. A later CutAfter
// replaces one that has not fired.
func (f *FS) CutAfter(pred func(Op) bool) <-chan CutStats {
	t := &trigger{pred: pred, ch: make(chan CutStats, 1)}
	f.trigger.Store(t)
	return t.ch
}

// armed reports whether a CutAfter waits (so that an operation builds
// its Op only then).
func (f *FS) armed() bool { return f.trigger.Load() != nil }

// after reports op to the armed trigger; if it fires, no operation may
// start any more, and the cut is made once the operations in flight (this
// one among them) have finished.
func (f *FS) after(op Op) {
	t := f.trigger.Load()
	if t == nil {
		return
	}
	t.mu.Lock()
	fire := !t.fired && t.pred(op)
	t.fired = t.fired || fire
	t.mu.Unlock()
	if !fire {
		return
	}
	f.trigger.CompareAndSwap(t, nil)
	f.dead.Store(true)
	go func() {
		o := op
		t.ch <- f.doCut(&o)
	}()
}

// Disarm removes the armed CutAfter. It returns true if that trigger had
// not fired (it never will now); false if it fired (or none was armed).
func (f *FS) Disarm() bool {
	t := f.trigger.Swap(nil)
	if t == nil {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	was := t.fired
	t.fired = true
	return !was
}
