// Command nullfuse is the FUSE ceiling of the benchmarks: it serves one
// file, NAME.img, from memory through fusefs.Mount, so the go-fuse options
// (max write, direct I/O, parallel direct writes, async DIO, max
// background) are exactly vhdsync's. No journal, no image file, no remote.
//
//	nullfuse --size 64GiB --name null MOUNTPOINT
//
// Memory is allocated in 1 MiB chunks on first write; it runs until
// SIGINT/SIGTERM, then unmounts.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

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
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: nullfuse [--size N] [--name NAME] MOUNTPOINT")
		os.Exit(2)
	}
	n, err := parseSize(*size)
	if err != nil || n <= 0 || n%chunk != 0 {
		fmt.Fprintf(os.Stderr, "nullfuse: bad --size %q (a multiple of 1 MiB)\n", *size)
		os.Exit(2)
	}
	d := &memDisk{size: n, chunks: make([]atomic.Pointer[[chunk]byte], n/chunk)}
	srv, _, err := fusefs.Mount(flag.Arg(0), d, fusefs.Options{Name: *name, FsName: "nullfuse", MaxWrite: *maxWrite})
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
