package writeback

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
)

// gatedRemote holds its first Put Page until open is closed.
type gatedRemote struct {
	*remote.MemRemote
	once    sync.Once
	entered chan struct{}
	open    chan struct{}
}

func (g *gatedRemote) PutPages(ctx context.Context, off int64, data remote.Pages, c remote.Cond) error {
	first := false
	g.once.Do(func() { first = true })
	if first {
		close(g.entered)
		<-g.open
	}
	return g.MemRemote.PutPages(ctx, off, data, c)
}

// TestEpochClosesALingerAfterItsFirstWrite: a write that arrives while a
// batch is being sent waits at most a linger from its own arrival, not a
// linger from the end of that batch: its epoch is closed as soon as the
// batch ends if it is a linger old by then. (Under a steady load each
// batch used to be followed by a linger of nothing.)
func TestEpochClosesALingerAfterItsFirstWrite(t *testing.T) {
	ctx := context.Background()
	const size = 8 << 20
	const linger = 2 * time.Second
	r := &gatedRemote{MemRemote: remote.NewMemRemote(size + 512), entered: make(chan struct{}), open: make(chan struct{})}
	d := newTestDisk(t, t.TempDir(), size, r, DiskOptions{Flusher: replicate.FlusherOptions{Linger: linger}})
	defer d.Close(ctx, true)
	a := bytes.Repeat([]byte{0xA1}, 4096)
	if err := d.WriteAt(ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	<-r.entered // the first batch is being sent, and held
	b := bytes.Repeat([]byte{0xB1}, 4096)
	if err := d.WriteAt(ctx, b, 1<<20); err != nil {
		t.Fatal(err)
	}
	for d.j.OpenEpochAge() < linger {
		time.Sleep(20 * time.Millisecond)
	}
	released := time.Now()
	close(r.open)
	deadline := released.Add(10 * time.Second)
	for !bytes.Equal(r.Bytes()[1<<20:1<<20+4096], b) {
		if time.Now().After(deadline) {
			t.Fatal("the second write never reached the blob")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if waited := time.Since(released); waited >= linger/2 {
		t.Fatalf("the second write reached the blob %v after the first batch was let go: its epoch waited another linger (%v)", waited, linger)
	}
}
