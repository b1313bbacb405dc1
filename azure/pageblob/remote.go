package pageblob

import (
	"context"

	"github.com/vhdsync/vhdsync/remote"
)

// Remote adapts a page-blob client to remote.Remote, the interface the
// replication core writes through.
type Remote struct{ C *Client }

var (
	_ remote.Remote     = Remote{}
	_ remote.Throttling = Remote{}
	_ remote.Resizer    = Remote{}
)

// Resize implements remote.Resizer.
func (a Remote) Resize(ctx context.Context, size int64, leaseID string) error {
	return a.C.Resize(ctx, size, leaseID)
}

// Size implements remote.Resizer.
func (a Remote) Size(ctx context.Context) (int64, error) {
	p, err := a.C.Properties(ctx)
	if err != nil {
		return 0, err
	}
	return p.Length, nil
}

// Throttled implements remote.Throttling.
func (a Remote) Throttled() uint64 { return a.C.Throttled() }

// InFlightLimit implements remote.Throttling.
func (a Remote) InFlightLimit() int { return a.C.InFlightLimit() }

// PutPages implements remote.Remote.
func (a Remote) PutPages(ctx context.Context, off int64, data remote.Pages, c remote.Cond) error {
	return a.C.PutPagesVec(ctx, off, data, c.LeaseID, c.IfSequenceEq)
}

// ClearPages implements remote.Remote.
func (a Remote) ClearPages(ctx context.Context, off, length int64, c remote.Cond) error {
	return a.C.ClearPages(ctx, off, length, c.LeaseID, c.IfSequenceEq)
}

// RaiseSequence implements remote.Remote.
func (a Remote) RaiseSequence(ctx context.Context, n int64, leaseID string) error {
	return a.C.RaiseSequence(ctx, n, leaseID)
}

// Sequence implements remote.Remote.
func (a Remote) Sequence(ctx context.Context) (int64, error) { return a.C.Sequence(ctx) }

// AcquireLease implements remote.Remote.
func (a Remote) AcquireLease(ctx context.Context, id string) (string, error) {
	return a.C.AcquireLease(ctx, id)
}

// BreakLease implements remote.Remote.
func (a Remote) BreakLease(ctx context.Context) error { return a.C.BreakLease(ctx) }

// ReleaseLease implements remote.Remote.
func (a Remote) ReleaseLease(ctx context.Context, id string) error {
	return a.C.ReleaseLease(ctx, id)
}
