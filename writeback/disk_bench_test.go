package writeback

import (
	"context"
	"math/rand/v2"
	"testing"
)

// BenchmarkDiskWriteAt4K measures the local write path alone (widen,
// journal append, image write) with 4 KiB random writes from parallel
// goroutines, the remote refusing everything so the flusher only retries.
func BenchmarkDiskWriteAt4K(b *testing.B) {
	benchWrite(b, 4<<10)
}

// BenchmarkDiskWriteAt1M is the same with 1 MiB writes.
func BenchmarkDiskWriteAt1M(b *testing.B) {
	benchWrite(b, 1<<20)
}

func benchWrite(b *testing.B, size int) {
	const disk = 1 << 30
	r := NewMemRemote(disk + 512)
	r.Fault = func(string, int64, int64) (bool, error) { return false, &TransientError{Msg: "remote down"} }
	d := newTestDisk(b, b.TempDir(), disk, r, DiskOptions{})
	defer d.Close(context.Background(), false)
	b.SetBytes(int64(size))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(rand.Uint64(), 1))
		buf := make([]byte, size)
		for i := range buf {
			buf[i] = byte(i)
		}
		for pb.Next() {
			off := rng.Int64N(disk/int64(size)) * int64(size)
			if err := d.WriteAt(context.Background(), buf, off); err != nil {
				b.Fatal(err)
			}
		}
	})
}
