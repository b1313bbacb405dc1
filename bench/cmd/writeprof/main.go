// Command writeprof profiles vhdsync's write path without FUSE: it opens a
// writeback.Disk on an in-memory remote whose writes never complete (the
// flusher waits, as with the remote detached in make bench), runs fio-like
// writers (random 4 KiB or sequential 256 KiB, the FUSE max write) for a
// while, and writes a CPU profile.
//
//	writeprof --dir DIR --bs 4096 --random --jobs 32 --seconds 5 --cpuprofile cpu.out
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/writeback"
)

// stuck is a remote whose writes wait for the context to end.
type stuck struct{ *remote.MemRemote }

func (s stuck) PutPages(ctx context.Context, _ int64, _ remote.Pages, _ remote.Cond) error {
	<-ctx.Done()
	return ctx.Err()
}

func (s stuck) ClearPages(ctx context.Context, _, _ int64, _ remote.Cond) error {
	<-ctx.Done()
	return ctx.Err()
}

func main() {
	dir := flag.String("dir", "", "work directory (removed)")
	bs := flag.Int("bs", 4096, "write size")
	random := flag.Bool("random", true, "random offsets (else sequential per job)")
	jobs := flag.Int("jobs", 32, "concurrent writers (FUSE requests in flight)")
	secs := flag.Float64("seconds", 5, "duration")
	span := flag.Int64("span", 2<<30, "bytes of the disk written")
	prof := flag.String("cpuprofile", "", "CPU profile output")
	warm := flag.Float64("warm-seq", 0, "seconds of sequential 1 MiB writes over the span first (not measured), as make bench's write stage runs before its random run")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "writeprof: --dir is required")
		os.Exit(2)
	}
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "writeprof:", err)
		os.Exit(1)
	}
	defer os.RemoveAll(*dir)
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		fail(err)
	}
	const size = 4 << 30 // MemRemote holds the whole disk in memory
	img := filepath.Join(*dir, "image")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		fail(err)
	}
	if err := os.Truncate(img, size); err != nil {
		fail(err)
	}
	ctx := context.Background()
	d, err := writeback.Open(ctx, writeback.DiskOptions{
		ImagePath: img, JournalDir: filepath.Join(*dir, "journal"), VirtualSize: size,
		Remote: stuck{remote.NewMemRemote(size)}, SaveLeaseID: func(string) error { return nil },
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		fail(err)
	}
	if *warm > 0 {
		buf := make([]byte, 1<<20)
		end := time.Now().Add(time.Duration(*warm * float64(time.Second)))
		var wg sync.WaitGroup
		for j := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for off := int64(j) << 20; time.Now().Before(end); off = (off + 8<<20) % *span {
					if err := d.WriteAt(ctx, buf, off); err != nil {
						fail(err)
					}
				}
			}()
		}
		wg.Wait()
	}
	if *prof != "" {
		f, err := os.Create(*prof)
		if err != nil {
			fail(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fail(err)
		}
	}
	var ops atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(time.Duration(*secs * float64(time.Second)))
	t0 := time.Now()
	for j := range *jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, *bs)
			for i := range buf {
				buf[i] = byte(i*7 + j)
			}
			blocks := *span / int64(*bs)
			next := int64(j) * blocks / int64(*jobs)
			for time.Now().Before(deadline) {
				var off int64
				if *random {
					off = rand.Int64N(blocks) * int64(*bs)
				} else {
					off = (next % blocks) * int64(*bs)
					next++
				}
				if err := d.WriteAt(ctx, buf, off); err != nil {
					fail(err)
				}
				ops.Add(1)
			}
		}()
	}
	wg.Wait()
	el := time.Since(t0)
	if *prof != "" {
		pprof.StopCPUProfile()
	}
	n := ops.Load()
	fmt.Printf("bs=%d random=%v jobs=%d: %.0f writes/s, %.1f MiB/s\n", *bs, *random, *jobs,
		float64(n)/el.Seconds(), float64(n)*float64(*bs)/(1<<20)/el.Seconds())
	os.Exit(0) // the flusher is stuck by design: no drain
}
