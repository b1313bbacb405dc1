package main

// Journal full: the state directory on a tiny tmpfs that
// the writes fill. The writer gets an error (ENOSPC or EIO), never an
// acknowledgement that is later lost; once space returns (the tmpfs is
// grown) the same mount takes writes again, drains, and the blob equals
// the image. (Backpressure with the remote down is tested in writeback.)

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestE2EStateFilesystemFull(t *testing.T) {
	e := newE2E(t)
	const sizeMiB = 64
	fsDir := e.path("tiny")
	e.mountFS("tmpfs", fsDir, "-t", "tmpfs", "-o", "size=24m,mode=0700")
	url := e.az.BlobURL("disks", "full.vhd")
	state := filepath.Join(fsDir, "state")
	e.mustVhdsync("create", "--blob", url, "--size", fmt.Sprintf("%dMiB", sizeMiB), "--state", state, "--create-container")
	mp := e.path("mnt")
	d := e.mount(state, mp, "--linger", "20ms")
	img := filepath.Join(mp, "full.img")

	// Write 1 MiB blocks, an fsync after every fourth, until the
	// filesystem is full. Every write that returned success is recorded.
	acked := map[int64][]byte{}
	writeBlocks := func(first, last int, tag string) (n int, err error) {
		f, err := os.OpenFile(img, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for i := first; i < last; i++ {
			off := int64(i) << 20
			b := pattern(fmt.Sprintf("%s-%d", tag, i), 1<<20)
			done := make(chan error, 1)
			go func() {
				_, err := f.WriteAt(b, off)
				if err == nil && i%4 == 3 {
					err = f.Sync()
				}
				done <- err
			}()
			select {
			case err = <-done:
			case <-time.After(2 * time.Minute):
				t.Fatalf("write %d: no answer in 2 minutes (the writer hangs on a full state filesystem)", i)
			}
			if err != nil {
				return n, fmt.Errorf("block %d: %w", i, err)
			}
			acked[off] = b
			n++
		}
		return n, f.Sync()
	}
	n, failure := writeBlocks(0, sizeMiB, "a")
	if failure == nil {
		t.Fatalf("wrote all %d MiB into a 24 MiB state filesystem without an error", n)
	}
	if !errors.Is(failure, syscall.ENOSPC) && !errors.Is(failure, syscall.EIO) {
		t.Errorf("the writer got %v, want ENOSPC or EIO", failure)
	}
	t.Logf("state filesystem full after %d acknowledged 1 MiB writes: %v", n, failure)
	if !d.alive() {
		t.Fatalf("the daemon died on a full state filesystem:\n%s", tail(d.log(), 30))
	}

	// The acknowledged writes reach the blob, and read back, while the
	// filesystem is still full.
	waitFor(t, 60*time.Second, "the journal to drain on the full filesystem", func() (bool, error) {
		s, err := e.status(state)
		return err == nil && s.JournalRecords == 0, err
	})
	checkBlobHas(t, url, acked)
	readBack(t, img, acked)
	// Nothing pending: the blob equals the image, the failed write
	// included (in both or in neither).
	e.checkBlobIsImage(url, state, sizeMiB<<20)
	t.Logf("the daemon's log of the failure:\n%s", grepLines(d.log(), "level=ERROR", "level=WARN"))

	// Space returns: the same mount takes the whole disk again.
	e.must("mount", "-o", "remount,size=256m", fsDir)
	var m int
	var err error
	waitFor(t, 60*time.Second, "the mount to take writes again", func() (bool, error) {
		m, err = writeBlocks(0, sizeMiB, "b")
		return err == nil, err
	})
	t.Logf("after space returned: %d acknowledged 1 MiB writes", m)
	waitFor(t, 60*time.Second, "the journal to drain", func() (bool, error) {
		s, err := e.status(state)
		return err == nil && s.JournalRecords == 0, err
	})
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	checkBlobHas(t, url, acked)
	readBack(t, filepath.Join(state, "disk.img"), acked)
	e.mustVhdsync("verify", "--state", state)
	e.checkBlobIsImage(url, state, sizeMiB<<20)
}

// readBack checks that file holds every chunk.
func readBack(t *testing.T, file string, chunks map[int64][]byte) {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off, want := range chunks {
		got := make([]byte, len(want))
		if _, err := f.ReadAt(got, off); err != nil {
			t.Fatalf("read %s at %d: %v", file, off, err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s lacks the write acknowledged at %d", file, off)
		}
	}
}

// grepLines returns the lines of s containing any of subs.
func grepLines(s string, subs ...string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		for _, sub := range subs {
			if strings.Contains(l, sub) {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}
