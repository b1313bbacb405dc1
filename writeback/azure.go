package writeback

import (
	"context"

	"github.com/vhdsync/vhdsync/writeback/pageblob"
)

// AzureRemote adapts a page-blob client to Remote.
type AzureRemote struct{ C *pageblob.Client }

var _ Remote = AzureRemote{}

// PutPages implements Remote.
func (a AzureRemote) PutPages(ctx context.Context, off int64, data Pages, c Cond) error {
	return a.C.PutPagesVec(ctx, off, data, c.LeaseID, c.IfSequenceEq)
}

// ClearPages implements Remote.
func (a AzureRemote) ClearPages(ctx context.Context, off, length int64, c Cond) error {
	return a.C.ClearPages(ctx, off, length, c.LeaseID, c.IfSequenceEq)
}

// RaiseSequence implements Remote.
func (a AzureRemote) RaiseSequence(ctx context.Context, n int64, leaseID string) error {
	return a.C.RaiseSequence(ctx, n, leaseID)
}

// Sequence implements Remote.
func (a AzureRemote) Sequence(ctx context.Context) (int64, error) { return a.C.Sequence(ctx) }

// AcquireLease implements Remote.
func (a AzureRemote) AcquireLease(ctx context.Context, id string) (string, error) {
	return a.C.AcquireLease(ctx, id)
}

// BreakLease implements Remote.
func (a AzureRemote) BreakLease(ctx context.Context) error { return a.C.BreakLease(ctx) }

// ReleaseLease implements Remote.
func (a AzureRemote) ReleaseLease(ctx context.Context, id string) error {
	return a.C.ReleaseLease(ctx, id)
}
