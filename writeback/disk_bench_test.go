package writeback

import (
	"context"
	"math/rand/v2"
	"testing"

	"github.com/vhdsync/vhdsync/remote"
)

// BenchmarkDiskWriteAt4K measures the local write path alone (widen,
// journal append, image write) with 4 KiB random writes from parallel
// goroutines, the remote refusing everything so the flusher only retries.
func BenchmarkDiskWriteAt4K(b *testing.B) {
	benchWrite(b, 4<<10, 1)
}

// BenchmarkDiskWriteAt4KQD32 is BenchmarkDiskWriteAt4K with 16 writers per
// CPU (32 on 2 CPUs): FUSE delivers a queue depth of 32 as that many
// concurrent Write calls, which is where appends can share a commit.
func BenchmarkDiskWriteAt4KQD32(b *testing.B) {
	benchWrite(b, 4<<10, 16)
}

// BenchmarkDiskWriteAt1M is the same with 1 MiB writes.
func BenchmarkDiskWriteAt1M(b *testing.B) {
	benchWrite(b, 1<<20, 1)
}

// benchWrite runs parallelism*GOMAXPROCS writers of size bytes at random
// aligned offsets.
func benchWrite(b *testing.B, size, parallelism int) {
	const disk = 1 << 30
	r := remote.NewMemRemote(disk + 512)
	r.Fault = func(string, int64, int64) (bool, error) { return false, &remote.TransientError{Msg: "remote down"} }
	d := newTestDisk(b, b.TempDir(), disk, r, DiskOptions{})
	defer d.Close(context.Background(), false)
	b.SetBytes(int64(size))
	b.SetParallelism(parallelism)
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
