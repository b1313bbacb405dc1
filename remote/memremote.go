package remote

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// MemRemote is an in-memory page blob with Azure's rules (4 MiB Put Page
// cap, 512-byte alignment, lease and sequence-number conditions, max
// sequence updates), for property and crash tests. It is not evidence for
// Azure's behaviour; the Azurite tests are.
type MemRemote struct {
	mu    sync.Mutex
	data  []byte
	seq   int64
	lease string
	// Fault, when set, is asked before each write (op is "put", "clear" or
	// "seq"). apply says whether the write lands; err is what the caller
	// sees. apply with a non-nil err is "applied, but the response was lost".
	Fault func(op string, off, n int64) (apply bool, err error)
	// Observe, when set, is called (under the lock) after every write
	// that changed the blob, with the blob's bytes and sequence number.
	Observe func(data []byte, seq int64)
	// Calls counts the requests that reached the blob, by op.
	Calls map[string]int
}

// NewMemRemote returns a zeroed blob of size bytes.
func NewMemRemote(size int64) *MemRemote {
	return &MemRemote{data: make([]byte, size), Calls: map[string]int{}}
}

// TransientError is a retryable failure injected by tests.
type TransientError struct{ Msg string }

// Error implements error.
func (e *TransientError) Error() string { return e.Msg }

// Transient marks the error retryable.
func (e *TransientError) Transient() bool { return true }

// ThrottledError is the service's back-pressure (503 ServerBusy) injected
// by tests: retryable, and a signal to send fewer requests at once.
type ThrottledError struct{ Msg string }

// Error implements error.
func (e *ThrottledError) Error() string { return e.Msg }

// Transient marks the error retryable.
func (e *ThrottledError) Transient() bool { return true }

// Throttled marks the error as back-pressure.
func (e *ThrottledError) Throttled() bool { return true }

// ErrMemCondition is the in-memory 412.
var ErrMemCondition = errors.New("412: condition not met")

func (m *MemRemote) check(c Cond) error {
	if m.lease != "" && c.LeaseID != m.lease {
		return fmt.Errorf("%w: lease id %q, blob leased as %q", ErrMemCondition, c.LeaseID, m.lease)
	}
	if c.IfSequenceEq != nil && *c.IfSequenceEq != m.seq {
		return fmt.Errorf("%w: sequence number is %d, request wants %d", ErrMemCondition, m.seq, *c.IfSequenceEq)
	}
	return nil
}

func (m *MemRemote) fault(op string, off, n int64) (bool, error) {
	if m.Fault == nil {
		return true, nil
	}
	return m.Fault(op, off, n)
}

// PutPages implements Remote.
func (m *MemRemote) PutPages(_ context.Context, off int64, data Pages, c Cond) error {
	n := data.Len()
	if off%512 != 0 || n%512 != 0 || n == 0 || n > MaxPutPage || off+n > int64(len(m.data)) {
		return fmt.Errorf("put page %d+%d: invalid range", off, n)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	apply, ferr := m.fault("put", off, n)
	if !apply {
		return ferr
	}
	if err := m.check(c); err != nil {
		return err
	}
	m.Calls["put"]++
	at := off
	for _, b := range data {
		at += int64(copy(m.data[at:], b))
	}
	m.observe()
	return ferr
}

// ClearPages implements Remote.
func (m *MemRemote) ClearPages(_ context.Context, off, n int64, c Cond) error {
	if off%512 != 0 || n%512 != 0 || n <= 0 || off+n > int64(len(m.data)) {
		return fmt.Errorf("clear pages %d+%d: invalid range", off, n)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	apply, ferr := m.fault("clear", off, n)
	if !apply {
		return ferr
	}
	if err := m.check(c); err != nil {
		return err
	}
	m.Calls["clear"]++
	clear(m.data[off : off+n])
	m.observe()
	return ferr
}

// RaiseSequence implements Remote.
func (m *MemRemote) RaiseSequence(_ context.Context, n int64, lease string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	apply, ferr := m.fault("seq", n, 0)
	if !apply {
		return ferr
	}
	if err := m.check(Cond{LeaseID: lease}); err != nil {
		return err
	}
	m.Calls["seq"]++
	if n > m.seq {
		m.seq = n
		m.observe()
	}
	return ferr
}

func (m *MemRemote) observe() {
	if m.Observe != nil {
		m.Observe(m.data, m.seq)
	}
}

// Sequence implements Remote.
func (m *MemRemote) Sequence(context.Context) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.seq, nil
}

// AcquireLease implements Remote.
func (m *MemRemote) AcquireLease(_ context.Context, id string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lease != "" && m.lease != id {
		return "", fmt.Errorf("lease already present")
	}
	m.lease = id
	return id, nil
}

// BreakLease implements Remote.
func (m *MemRemote) BreakLease(context.Context) error {
	m.mu.Lock()
	m.lease = ""
	m.mu.Unlock()
	return nil
}

// ReleaseLease implements Remote.
func (m *MemRemote) ReleaseLease(_ context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lease != id {
		return fmt.Errorf("release lease: not the holder")
	}
	m.lease = ""
	return nil
}

// Bytes returns a copy of the blob.
func (m *MemRemote) Bytes() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data...)
}

// Lease returns the lease id held on the blob ("" if none).
func (m *MemRemote) Lease() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lease
}

var _ Resizer = (*MemRemote)(nil)

// Resize implements Resizer.
func (m *MemRemote) Resize(_ context.Context, size int64, lease string) error {
	if size%512 != 0 || size < 0 {
		return fmt.Errorf("resize to %d: not a multiple of 512", size)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	apply, ferr := m.fault("resize", size, 0)
	if !apply {
		return ferr
	}
	if err := m.check(Cond{LeaseID: lease}); err != nil {
		return err
	}
	m.Calls["resize"]++
	if size <= int64(len(m.data)) {
		m.data = m.data[:size:size]
	} else {
		m.data = append(m.data, make([]byte, size-int64(len(m.data)))...)
	}
	m.observe()
	return ferr
}

// Size implements Resizer.
func (m *MemRemote) Size(context.Context) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data)), nil
}

// ReadAt reads the blob's bytes at off into p (a thin disk's fetch).
func (m *MemRemote) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return fmt.Errorf("read %d+%d beyond the %d-byte blob", off, len(p), len(m.data))
	}
	copy(p, m.data[off:])
	m.Calls["read"]++
	return nil
}
