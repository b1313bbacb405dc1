package writeback

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/remote"
)

// newTestDisk makes an image of size bytes in a temp dir and opens a Disk
// on it with remote r.
func newTestDisk(t testing.TB, dir string, size int64, r remote.Remote, o DiskOptions) *Disk {
	t.Helper()
	if o.Flusher.Linger == 0 {
		o.Flusher.Linger = 5 * time.Millisecond
	}
	o.Sender.RetryMin = time.Millisecond
	o.Sender.RetryMax = 5 * time.Millisecond
	return propOpenDisk(t, dir, size, r, o)
}

func readImage(t testing.TB, dir string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDiskConvergesSmoke(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 8 << 20
	r := remote.NewMemRemote(size + 512)
	d := newTestDisk(t, dir, size, r, DiskOptions{})
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 300; i++ {
		off := rng.Int64N(size - 70000)
		n := 1 + rng.IntN(70000)
		switch rng.IntN(6) {
		case 0:
			if err := d.Zero(ctx, off, int64(n), rng.IntN(2) == 0); err != nil {
				t.Fatal(err)
			}
		case 1:
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
		default:
			p := make([]byte, n)
			for k := range p {
				p[k] = byte(rng.IntN(4)) // some zeros, mostly not
			}
			if err := d.WriteAt(ctx, p, off); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	img := readImage(t, dir)
	blob := r.Bytes()
	if !bytes.Equal(img, blob[:size]) {
		t.Fatal("blob differs from the local image after drain")
	}
	if r.Lease() != "" {
		t.Fatal("lease not released after a clean close")
	}
	seq, _ := r.Sequence(ctx)
	if seq%2 != 0 || seq == 0 {
		t.Fatalf("sequence number after drain: %d", seq)
	}
	t.Logf("calls %v, final sequence %d", r.Calls, seq)
}
