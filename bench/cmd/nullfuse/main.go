// Command nullfuse is the FUSE ceiling of the benchmarks: it serves one
// file, NAME.img, from memory through fusefs.Mount, so the go-fuse options
// (max write, direct I/O, parallel direct writes, async DIO, max
// background) are exactly vhdsync's. No journal, no image file, no remote.
//
//	nullfuse --size 64GiB --name null MOUNTPOINT
//
// Memory is allocated in 1 MiB chunks on first write; it runs until
// SIGINT/SIGTERM, then unmounts.
//
// With --backing FILE it is the passthrough ceiling instead: every write is
// one buffered pwrite to FILE (as vhdsync's write to its local image), a
// flush is one fdatasync, a discard one hole punch. That is the least any
// FUSE disk keeping its data in a local file can do per request, so the
// write path's ratio to it is the cost of journaling, apart from FUSE's
// and the image's own.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/fusefs"
)

const chunk = 1 << 20

// memDisk is a sparse in-memory disk; chunks are created lock-free.
type memDisk struct {
	size   int64
	chunks []atomic.Pointer[[chunk]byte]
}

func (m *memDisk) Size() int64 { return m.size }

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		i, o := (off+int64(n))/chunk, (off+int64(n))%chunk
		l := min(len(p)-n, chunk-int(o))
		if c := m.chunks[i].Load(); c != nil {
			copy(p[n:n+l], c[o:])
		} else {
			clear(p[n : n+l])
		}
		n += l
	}
	return n, nil
}

func (m *memDisk) get(i int64) *[chunk]byte {
	if c := m.chunks[i].Load(); c != nil {
		return c
	}
	c := new([chunk]byte)
	if m.chunks[i].CompareAndSwap(nil, c) {
		return c
	}
	return m.chunks[i].Load()
}

func (m *memDisk) WriteAt(_ context.Context, p []byte, off int64) error {
	n := 0
	for n < len(p) {
		i, o := (off+int64(n))/chunk, (off+int64(n))%chunk
		l := min(len(p)-n, chunk-int(o))
		copy(m.get(i)[o:], p[n:n+l])
		n += l
	}
	return nil
}

func (m *memDisk) Zero(_ context.Context, off, n int64, _ bool) error {
	for n > 0 {
		i, o := off/chunk, off%chunk
		l := min(n, chunk-o)
		if c := m.chunks[i].Load(); c != nil {
			clear(c[o : o+l])
		}
		off += l
		n -= l
	}
	return nil
}

func (m *memDisk) Flush() error { return nil }

// fileDisk passes every request through to a local file.
type fileDisk struct {
	size int64
	f    *os.File
}

func (d *fileDisk) Size() int64 { return d.size }

func (d *fileDisk) ReadAt(p []byte, off int64) (int, error) { return d.f.ReadAt(p, off) }

func (d *fileDisk) WriteAt(_ context.Context, p []byte, off int64) error {
	_, err := d.f.WriteAt(p, off)
	return err
}

func (d *fileDisk) Zero(_ context.Context, off, n int64, _ bool) error {
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

func (d *fileDisk) Flush() error { return unix.Fdatasync(int(d.f.Fd())) }

func parseSize(s string) (int64, error) {
	var n int64
	var unit string
	if _, err := fmt.Sscanf(s, "%d%s", &n, &unit); err != nil && unit == "" {
		if _, err2 := fmt.Sscanf(s, "%d", &n); err2 != nil {
			return 0, err
		}
	}
	switch unit {
	case "", "B":
	case "KiB":
		n <<= 10
	case "MiB":
		n <<= 20
	case "GiB":
		n <<= 30
	default:
		return 0, fmt.Errorf("unknown unit %q", unit)
	}
	return n, nil
}

func main() {
	size := flag.String("size", "64GiB", "disk size (B, KiB, MiB, GiB)")
	name := flag.String("name", "null", "file base name")
	maxWrite := flag.Int("max-write", 0, "FUSE max write (0: fusefs default)")
	backing := flag.String("backing", "", "serve this local file (made sparse at --size) instead of memory: the passthrough ceiling")
	latency := flag.String("latency", "", "at exit, write to this file how long the server took to answer writes and fsyncs: \"op count mean_us p50_us p99_us\" per line (the daemon's side of a request, as vhdsync's fuse_duration_seconds)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: nullfuse [--size N] [--name NAME] [--backing FILE] MOUNTPOINT")
		os.Exit(2)
	}
	n, err := parseSize(*size)
	if err != nil || n <= 0 || n%chunk != 0 {
		fmt.Fprintf(os.Stderr, "nullfuse: bad --size %q (a multiple of 1 MiB)\n", *size)
		os.Exit(2)
	}
	var d fusefs.Disk = &memDisk{size: n, chunks: make([]atomic.Pointer[[chunk]byte], n/chunk)}
	if *backing != "" {
		f, err := os.OpenFile(*backing, os.O_RDWR|os.O_CREATE, 0o600)
		if err == nil {
			err = f.Truncate(n)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "nullfuse: backing file:", err)
			os.Exit(1)
		}
		defer f.Close()
		d = &fileDisk{size: n, f: f}
	}
	opts := fusefs.Options{Name: *name, FsName: "nullfuse", MaxWrite: *maxWrite}
	var lat latencies
	if *latency != "" {
		opts.Latency = lat.add
		defer func() {
			if err := os.WriteFile(*latency, lat.report(), 0o644); err != nil {
				fmt.Fprintln(os.Stderr, "nullfuse: latency report:", err)
			}
		}()
	}
	srv, _, err := fusefs.Mount(flag.Arg(0), d, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "nullfuse:", err)
		os.Exit(1)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		_ = srv.Unmount()
	}()
	fmt.Println("ready")
	srv.Wait()
}

// latencies keeps every answer time of the operations fusefs measures.
type latencies struct {
	mu  sync.Mutex
	ops map[string][]time.Duration
}

func (l *latencies) add(op string, d time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ops == nil {
		l.ops = map[string][]time.Duration{}
	}
	l.ops[op] = append(l.ops[op], d)
}

// report is one line per operation: count, mean, p50 and p99 in µs.
func (l *latencies) report() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b bytes.Buffer
	for _, op := range slices.Sorted(maps.Keys(l.ops)) {
		ds := l.ops[op]
		slices.Sort(ds)
		var sum time.Duration
		for _, d := range ds {
			sum += d
		}
		q := func(p float64) int64 { return ds[int(p*float64(len(ds)-1))].Microseconds() }
		fmt.Fprintf(&b, "%s %d %d %d %d\n", op, len(ds), (sum / time.Duration(len(ds))).Microseconds(), q(0.5), q(0.99))
	}
	return b.Bytes()
}
