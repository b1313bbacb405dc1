// Package remote defines the page blob as the replication core sees it:
// the Remote interface, the conditions every write carries, the meaning of
// the blob's sequence number (Sequence: the odd/even ordering marks), and
// how a failure is classified (transient, throttled). It imports no Azure
// SDK: azure/pageblob implements Remote, MemRemote implements it in memory
// for tests. See docs/DESIGN.md.
package remote

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"time"
)

// MaxPutPage is the largest Put Page the service accepts (4 MiB).
const MaxPutPage = 4 << 20

// Cond are the conditions every write to the remote carries.
type Cond struct {
	// LeaseID is the lease this writer holds (invariant 5).
	LeaseID string
	// IfSequenceEq, when set, fences the request to one batch: the service
	// refuses it (412) once the blob's sequence number has moved past the
	// batch's in-progress mark, so a request that was delayed in the
	// network can never land after a later batch started.
	IfSequenceEq *int64
}

// Pages is the payload of one Put Page: buffers sent back to back, so a
// request joined from several records' payloads references them instead of
// copying them into one buffer. The buffers must not change while the
// request (or a retry of it) may still read them.
type Pages [][]byte

// Len is the payload's length in bytes.
func (p Pages) Len() int64 {
	var n int64
	for _, b := range p {
		n += int64(len(b))
	}
	return n
}

// Bytes returns the payload joined into one new buffer.
func (p Pages) Bytes() []byte {
	out := make([]byte, 0, p.Len())
	for _, b := range p {
		out = append(out, b...)
	}
	return out
}

// Flat is the payload as one buffer: its only buffer itself, or a joined
// copy of several.
func (p Pages) Flat() []byte {
	if len(p) == 1 {
		return p[0]
	}
	return p.Bytes()
}

// Cut splits p after n bytes (n <= p.Len()); head and tail share p's
// buffers.
func (p Pages) Cut(n int64) (head, tail Pages) {
	for i, b := range p {
		if n <= 0 {
			return head, p[i:]
		}
		if int64(len(b)) > n {
			head = append(head, b[:n])
			tail = append(Pages{b[n:]}, p[i+1:]...)
			return head, tail
		}
		head = append(head, b)
		n -= int64(len(b))
	}
	return head, nil
}

// Remote is the page blob as the flusher sees it. azure/pageblob
// implements it for Azure; MemRemote implements it in memory for tests.
type Remote interface {
	// PutPages writes data (512-aligned, at most 4 MiB) at off.
	PutPages(ctx context.Context, off int64, data Pages, c Cond) error
	// ClearPages zeroes [off, off+length) (512-aligned, any length).
	ClearPages(ctx context.Context, off, length int64, c Cond) error
	// RaiseSequence sets the blob's sequence number to max(current, n), so
	// a late duplicate can never lower it.
	RaiseSequence(ctx context.Context, n int64, leaseID string) error
	// Sequence reads the blob's sequence number.
	Sequence(ctx context.Context) (int64, error)
	// AcquireLease takes an infinite lease with the proposed id (taking it
	// again with the same id succeeds) and returns the id held.
	AcquireLease(ctx context.Context, proposedID string) (string, error)
	// BreakLease breaks any lease on the blob at once.
	BreakLease(ctx context.Context) error
	// ReleaseLease gives the lease up.
	ReleaseLease(ctx context.Context, id string) error
}

// Throttling is implemented by remotes that pace themselves against the
// service's rate limits (azure/pageblob): how many answers were throttled
// (and sent again), and how many requests may be in flight now.
type Throttling interface {
	Throttled() uint64
	InFlightLimit() int
}

// transient is implemented by errors that say whether a retry can help
// (the Azure edge's service errors, TransientError).
type transient interface{ Transient() bool }

// throttled is implemented by errors that say the service refused the
// request because of its rate limits (503 ServerBusy, 500
// OperationTimedOut, 429).
type throttled interface{ Throttled() bool }

// IsThrottled reports whether err is the service's back-pressure: the
// request was refused because the blob or account is over its request or
// byte rate. Callers slow down (fewer requests in flight) and retry.
func IsThrottled(err error) bool {
	var t throttled
	return err != nil && errors.As(err, &t) && t.Throttled()
}

// IsTransient reports whether err is worth retrying: throttling, server
// errors, timeouts, resets and refused connections (the remote may be
// down for a while; vhdsync waits for it).
func IsTransient(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, context.Canceled) {
		return false
	}
	var t transient
	if errors.As(err, &t) {
		return t.Transient()
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		return true
	}
	// The SDK reports a body that ended early as a plain error.
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return true
	}
	return false
}

// Snapshot is one snapshot of the blob as a listing shows it.
type Snapshot struct {
	// ID is the snapshot's timestamp as the service names it
	// ("2026-11-24T15:20:00.1234567Z"): the value of ?snapshot= in its URL.
	ID string
	// Time is ID parsed (zero if the service's format was unexpected).
	Time time.Time
	// SequenceNumber is the blob sequence number the snapshot carries: the
	// base blob's at the moment the snapshot was taken.
	SequenceNumber int64
	// Length is the snapshot's size in bytes.
	Length int64
	// Metadata are the snapshot's own metadata, names in lower case.
	Metadata map[string]string
}

// Resizer is implemented by remotes whose blob can change size (the page
// blob's Set Blob Properties with a new content length). It is separate
// from Remote so that a remote only ever written at a fixed size (a test
// double, the benchmarks' gated remote) need not implement it.
type Resizer interface {
	// Resize sets the blob's length to size bytes (a multiple of 512):
	// pages added read as zeros, pages beyond size are dropped. The lease
	// is carried as every write carries it.
	Resize(ctx context.Context, size int64, leaseID string) error
	// Size reads the blob's length in bytes.
	Size(ctx context.Context) (int64, error)
}
