package writeback

import (
	"context"
	"errors"
	"net"
	"syscall"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
)

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

// flat is the payload as one buffer: its only buffer itself, or a joined
// copy of several.
func (p Pages) flat() []byte {
	if len(p) == 1 {
		return p[0]
	}
	return p.Bytes()
}

// cut splits p after n bytes (n <= p.Len()); head and tail share p's
// buffers.
func (p Pages) cut(n int64) (head, tail Pages) {
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

// Remote is the page blob as the flusher sees it. writeback/pageblob
// implements it for Azure; memblob implements it in memory for tests.
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

// transient is implemented by errors that say whether a retry can help.
type transient interface{ Transient() bool }

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
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		switch re.StatusCode {
		case 408, 429, 500, 502, 503, 504:
			return true
		}
		return false
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
	if errors.Is(err, errUnexpectedEOF) {
		return true
	}
	return false
}
