package writeback

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/remote"
)

// TestSyncFlushWaitsForTheBlob: with DiskOptions.Sync a barrier returns
// only once the blob holds the writes before it; with SyncTimeout a
// barrier the blob cannot take in time returns anyway, the disk degraded
// (later barriers do not wait) until the blob has caught up, when
// barriers wait again.
func TestSyncFlushWaitsForTheBlob(t *testing.T) {
	ctx := context.Background()
	const size = 8 << 20
	r := &gatedRemote{MemRemote: remote.NewMemRemote(size + 512), entered: make(chan struct{}), open: make(chan struct{})}
	d := newTestDisk(t, t.TempDir(), size, r, DiskOptions{Sync: true, SyncTimeout: 300 * time.Millisecond})
	defer d.Close(ctx, true)
	a := bytes.Repeat([]byte{0xA1}, 4096)
	if err := d.WriteAt(ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	flushed := make(chan error, 1)
	start := time.Now()
	go func() { flushed <- d.Flush() }()
	<-r.entered // the batch is being sent, and held
	select {
	case err := <-flushed:
		t.Fatalf("the barrier returned (%v) while the blob did not hold its write", err)
	case <-time.After(100 * time.Millisecond):
	}
	// Past the timeout it returns, degraded.
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited < 300*time.Millisecond {
		t.Fatalf("the barrier returned after %v, before --sync-timeout", waited)
	}
	if st := d.Sync(); !st.On || !st.Degraded || st.Timeouts != 1 {
		t.Fatalf("after a timed-out barrier: %+v, want on, degraded, 1 timeout", st)
	}
	// Degraded: the next barrier does not wait for the held blob.
	b := bytes.Repeat([]byte{0xB1}, 4096)
	if err := d.WriteAt(ctx, b, 1<<20); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited >= 300*time.Millisecond {
		t.Fatalf("a barrier while degraded waited %v", waited)
	}
	if st := d.Sync(); !st.Degraded || st.Timeouts != 1 {
		t.Fatalf("after a degraded barrier: %+v, want degraded, still 1 timeout", st)
	}
	// The blob takes the writes: the disk is synchronous again, and a
	// barrier returns with its write on the blob.
	close(r.open)
	waitCond(t, 10*time.Second, "the blob to catch up", func() bool { return !d.Sync().Degraded })
	c := bytes.Repeat([]byte{0xC1}, 4096)
	if err := d.WriteAt(ctx, c, 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := r.MemRemote.Bytes()[2<<20 : 2<<20+4096]; !bytes.Equal(got, c) {
		t.Fatal("a synchronous barrier returned before the blob held its write")
	}
	if st := d.Sync(); st.Degraded || st.Timeouts != 1 {
		t.Fatalf("after catching up: %+v, want not degraded, 1 timeout", st)
	}
}

// TestSyncRefusesStaged: the staged transfer writes the blob long after a
// barrier; synchronous mode refuses it.
func TestSyncRefusesStaged(t *testing.T) {
	_, err := Open(context.Background(), DiskOptions{Sync: true, Staging: stagingStub{}})
	if !errors.Is(err, ErrSyncStaged) {
		t.Fatalf("Open with Sync and Staging: %v, want ErrSyncStaged", err)
	}
}

// stagingStub is a segment store Open must refuse before using it.
type stagingStub struct{}

func (stagingStub) PutSegment(context.Context, string, []byte) error { return errors.New("unused") }
func (stagingStub) ListSegments(context.Context) ([]string, error)   { return nil, errors.New("unused") }
func (stagingStub) GetSegment(context.Context, string) ([]byte, error) {
	return nil, errors.New("unused")
}
func (stagingStub) DeleteSegment(context.Context, string) error { return errors.New("unused") }

// waitCond polls cond until it holds or timeout passes.
func waitCond(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
