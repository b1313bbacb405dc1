package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// The machine-loss test's sizes: the disk, its blocks, the writers.
const (
	syncLossDiskMiB = 32
	syncLossBlock   = 4096
	syncLossWriters = 4
)

// TestE2ESyncMachineLoss: with `mount --sync`, losing the whole machine,
// state directory included, loses nothing a barrier acknowledged. Writers
// do O_DIRECT|O_DSYNC writes (fio's --sync=1: every write acknowledged
// went through a barrier) to a loop device over the disk; at a random
// moment the daemon is killed with SIGKILL and its state directory
// deleted. The blob, read back, must hold every acknowledged write (or
// the one in flight after it, on that block). The same in write-back mode
// must lose acknowledged writes, or the test could not fail.
// VHDSYNC_SYNCLOSS_CYCLES sets the cycles (default 4).
func TestE2ESyncMachineLoss(t *testing.T) {
	e := newE2E(t)
	cycles := 4
	if v := os.Getenv("VHDSYNC_SYNCLOSS_CYCLES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("VHDSYNC_SYNCLOSS_CYCLES=%q: want a positive number", v)
		}
		cycles = n
	}
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 11))
	t.Logf("seed %d", seed)
	var acked, lost, checked int
	began := time.Now()
	for c := range cycles {
		r := syncLossCycle(t, e, fmt.Sprintf("sync%d", c), true, rng)
		acked += r.acked
		checked += r.blocks
		lost += r.lost
	}
	t.Logf("RELIABILITY | synchronous replication, the machine lost | %d cycles in %v: SIGKILL of the daemon and its state directory deleted under %d O_DSYNC writers | %d writes acknowledged, %d blocks checked on the blob | %d lost |",
		cycles, time.Since(began).Round(time.Second), syncLossWriters, acked, checked, lost)
	if lost > 0 {
		t.Fatalf("--sync: %d acknowledged writes missing from the blob after the machine was lost", lost)
	}
	// Write-back: the blob lags the acknowledged writes, so the same loss
	// takes some (a few attempts: a kill right after the flusher caught
	// up loses none).
	wbLost := 0
	for c := 0; c < 3 && wbLost == 0; c++ {
		r := syncLossCycle(t, e, fmt.Sprintf("wb%d", c), false, rng)
		wbLost += r.lost
		t.Logf("write-back control %d: %d writes acknowledged, %d lost", c, r.acked, r.lost)
	}
	if wbLost == 0 {
		t.Fatalf("write-back mode lost no acknowledged write in 3 machine losses: the test cannot tell synchronous mode from write-back")
	}
}

// syncLossResult is one cycle's count.
type syncLossResult struct {
	acked, blocks, lost int
}

// syncLossCycle runs one machine loss on a new disk named name.
func syncLossCycle(t *testing.T, e *e2e, name string, syncMode bool, rng *rand.Rand) syncLossResult {
	t.Helper()
	url, state := e.createDisk(name, syncLossDiskMiB)
	mp := e.path("mnt-" + name)
	var extra []string
	if syncMode {
		extra = append(extra, "--sync")
	}
	d := e.mount(state, mp, extra...)
	if s := e.mustStatus(state); s.Sync != syncMode {
		t.Fatalf("status sync %v, mounted with --sync %v", s.Sync, syncMode)
	}
	img := filepath.Join(mp, name+".img")
	dev := e.losetup(img)

	blocks := syncLossDiskMiB << 20 / syncLossBlock
	acked := make([]uint64, blocks)    // the last write acknowledged (0: none)
	inflight := make([]uint64, blocks) // the write under way (0: none)
	var mu sync.Mutex
	nacked := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, syncLossWriters)
	for w := range syncLossWriters {
		wseed := rng.Uint64()
		wg.Go(func() {
			f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT|syscall.O_DSYNC, 0)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			wr := rand.New(rand.NewPCG(wseed, uint64(w)))
			buf := alignedBlock()
			for id := uint64(w + 1); ; id += syncLossWriters {
				select {
				case <-stop:
					return
				default:
				}
				// Each writer owns the blocks b with b % writers == w: one
				// write at a time per block.
				b := wr.IntN(blocks/syncLossWriters)*syncLossWriters + w
				fillBlock(buf, b, id)
				mu.Lock()
				inflight[b] = id
				mu.Unlock()
				if _, err := f.WriteAt(buf, int64(b)*syncLossBlock); err != nil {
					return // the machine is gone
				}
				mu.Lock()
				acked[b], inflight[b] = id, 0
				nacked++
				mu.Unlock()
			}
		})
	}
	waitFor(t, 30*time.Second, "the first acknowledged write", func() (bool, error) {
		mu.Lock()
		defer mu.Unlock()
		return nacked > 0, nil
	})
	// The loss comes at a random moment of the load.
	time.Sleep(time.Duration(200+rng.IntN(2000)) * time.Millisecond)
	// The machine is lost: the daemon dies and its state directory with it.
	if err := syscall.Kill(d.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(state); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatalf("open %s: %v", dev, err)
	default:
	}
	detachLoop(t, dev, img)
	if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("umount -l %s: %v", mp, err)
	}
	d.waitExit(30 * time.Second)

	data := blobRange(t, url, 0, syncLossDiskMiB<<20)
	res := syncLossResult{acked: nacked}
	want := make([]byte, syncLossBlock)
	for b := range blocks {
		if acked[b] == 0 && inflight[b] == 0 {
			continue
		}
		res.blocks++
		got := data[b*syncLossBlock : (b+1)*syncLossBlock]
		ok := false
		for _, id := range []uint64{acked[b], inflight[b]} {
			if id == 0 && acked[b] != 0 {
				continue
			}
			if id == 0 {
				clear(want)
			} else {
				fillBlock(want, b, id)
			}
			if bytes.Equal(got, want) {
				ok = true
				break
			}
		}
		if !ok && acked[b] != 0 {
			res.lost++
			if res.lost <= 3 {
				t.Logf("%s: block %d: the blob holds write %d, want the acknowledged write %d (or %d, in flight)",
					name, b, binary.LittleEndian.Uint64(got[8:]), acked[b], inflight[b])
			}
		}
	}
	return res
}

// alignedBlock returns a block-sized buffer aligned for O_DIRECT.
func alignedBlock() []byte {
	raw := make([]byte, 2*syncLossBlock)
	off := int(-uintptr(unsafe.Pointer(&raw[0])) & (syncLossBlock - 1))
	return raw[off : off+syncLossBlock]
}

// fillBlock writes write id's contents for block b into buf: the block,
// the id, a pattern drawn from both, and a CRC of it all.
func fillBlock(buf []byte, b int, id uint64) {
	binary.LittleEndian.PutUint64(buf[0:], uint64(b))
	binary.LittleEndian.PutUint64(buf[8:], id)
	x := id*0x9e3779b97f4a7c15 ^ uint64(b)
	for i := 16; i < len(buf)-4; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(buf[i:], x)
	}
	binary.LittleEndian.PutUint32(buf[len(buf)-4:], crc32.ChecksumIEEE(buf[:len(buf)-4]))
}
