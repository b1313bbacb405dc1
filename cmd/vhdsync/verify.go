package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/thin"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// verifyChunk is the comparison unit: one hash per 4 MiB.
const verifyChunk = 4 << 20

// errDiffers: verify found a difference (exit 1).
var errDiffers = errors.New("the blob differs from the local image")

func newVerifyCmd(g *globals) *cobra.Command {
	var state string
	var workers int
	var bf blobFlags
	cmd := &cobra.Command{
		Use:   "verify --state DIR",
		Short: "Compare the local image with the blob; exit 1 naming the first difference",
		Long: `Compare the disk's local image with its page blob, 4 MiB at a time (SHA-256
of each side), skipping ranges that both sides know to be empty (holes in the
sparse image and pages the blob reports as never written or cleared). Also
checks that the blob ends in the state directory's footer.

The disk must not be mounted (writes in flight would show as differences):
unmount it first. Exit status 0: identical; 1: a difference, named by its
byte range.`,
		Example: `  vhdsync verify --state /var/lib/vhdsync/data`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runVerify(cmd.Context(), g, state, workers, bf)
		},
	}
	cmd.Flags().StringVar(&state, "state", "", "state directory (required)")
	cmd.Flags().IntVar(&workers, "workers", 8, "parallel downloads")
	bf.register(cmd.Flags())
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

func runVerify(ctx context.Context, g *globals, state string, workers int, bf blobFlags) error {
	d, err := statedir.Open(state)
	if err != nil {
		return err
	}
	lock, err := d.TryLock("verifying")
	if err != nil {
		return err
	}
	defer lock.Unlock()
	c, err := connect(g, d, bf, false)
	if err != nil {
		return err
	}
	if err := checkBlob(ctx, c, d); err != nil {
		return err
	}
	size := int64(d.State.VirtualSize)
	img, err := os.Open(d.ImagePath())
	if err != nil {
		return fmt.Errorf("open local image: %w", err)
	}
	defer img.Close()
	remote, err := c.PageRanges(ctx, 0, size)
	if err != nil {
		return err
	}
	local, err := transfer.FileExtents(img, size)
	if err != nil {
		return err
	}
	for _, e := range local {
		remote = append(remote, pageblob.Range{Off: e.Offset, Len: e.Length})
	}
	chunks := chunksTouching(remote, size)
	// A thin disk's chunks not yet local are on the blob only: nothing
	// to compare there.
	thinNote := ""
	if d.State.Thin {
		m, err := thin.Open(d.Path, size)
		if err != nil {
			return err
		}
		kept := chunks[:0]
		for _, off := range chunks {
			if m.Present(off, min(off+verifyChunk, size)) {
				kept = append(kept, off)
			}
		}
		thinNote = fmt.Sprintf("; thin disk: %d chunks not local yet, not compared", len(chunks)-len(kept))
		chunks = kept
		if err := m.Close(); err != nil {
			return err
		}
	}
	res := compareChunks(ctx, c, img, chunks, size, workers)
	if res.err != nil {
		return res.err
	}
	if res.diff != nil {
		return fmt.Errorf("%w: first difference at bytes %d-%d (sector %d); compared %d of %d chunks of 4 MiB",
			errDiffers, res.diff.Off, res.diff.Off+res.diff.Len-1, res.diff.Off/vhdlayer.SectorSize, res.compared, (size+verifyChunk-1)/verifyChunk)
	}
	fmt.Fprintf(g.stdout, "identical: %d of %d chunks of 4 MiB compared (%s), the rest empty on both sides; footer matches%s\n",
		res.compared, (size+verifyChunk-1)/verifyChunk, humanBytes(res.bytes), thinNote)
	return nil
}

// chunksTouching returns the sorted 4 MiB chunk offsets any range touches.
func chunksTouching(rs []pageblob.Range, size int64) []int64 {
	set := map[int64]struct{}{}
	for _, r := range rs {
		for c := r.Off / verifyChunk * verifyChunk; c < min(r.Off+r.Len, size); c += verifyChunk {
			set[c] = struct{}{}
		}
	}
	out := make([]int64, 0, len(set))
	for c := range set {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

type compareResult struct {
	diff     *pageblob.Range
	compared int
	bytes    int64
	err      error
}

func compareChunks(ctx context.Context, c *pageblob.Client, img *os.File, chunks []int64, size int64, workers int) compareResult {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var mu sync.Mutex
	res := compareResult{}
	work := make(chan int64)
	var wg sync.WaitGroup
	for w := 0; w < max(1, workers); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lb := make([]byte, verifyChunk)
			rb := make([]byte, verifyChunk)
			for off := range work {
				n := min(int64(verifyChunk), size-off)
				if _, err := img.ReadAt(lb[:n], off); err != nil && !errors.Is(err, io.EOF) {
					mu.Lock()
					res.err = fmt.Errorf("read local image at %d: %w", off, err)
					mu.Unlock()
					cancel()
					return
				}
				if err := c.ReadAt(ctx, rb[:n], off); err != nil {
					mu.Lock()
					if res.err == nil && ctx.Err() == nil {
						res.err = err
					}
					mu.Unlock()
					cancel()
					return
				}
				same := sha256.Sum256(lb[:n]) == sha256.Sum256(rb[:n])
				mu.Lock()
				res.compared++
				res.bytes += n
				if !same {
					first := off
					for s := int64(0); s < n; s += vhdlayer.SectorSize {
						if !bytes.Equal(lb[s:s+vhdlayer.SectorSize], rb[s:s+vhdlayer.SectorSize]) {
							first = off + s
							break
						}
					}
					if res.diff == nil || first < res.diff.Off {
						res.diff = &pageblob.Range{Off: first, Len: off + n - first}
					}
				}
				mu.Unlock()
			}
		}()
	}
	for _, off := range chunks {
		select {
		case work <- off:
		case <-ctx.Done():
		}
	}
	close(work)
	wg.Wait()
	return res
}
