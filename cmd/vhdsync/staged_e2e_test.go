package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/vhdsync/vhdsync/internal/azurite"
)

// stagedSegments lists the segment blobs in the staging container.
func stagedSegments(t *testing.T, stagingURL string) []string {
	t.Helper()
	cred, err := container.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := container.NewClientWithSharedKeyCredential(stagingURL, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	pager := cc.NewListBlobsFlatPager(nil)
	for pager.More() {
		page, err := pager.NextPage(context.Background())
		if err != nil {
			t.Fatalf("list staging: %v", err)
		}
		for _, b := range page.Segment.BlobItems {
			if strings.Contains(*b.Name, "/seg-") {
				out = append(out, *b.Name)
			}
		}
	}
	return out
}

// stagedWorkload writes through the .img view of a staged mount in several
// fsync'ed rounds, compressible and random data mixed, so that several
// segments are staged.
func stagedWorkload(t *testing.T, img string, rounds int) {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(rounds), 7))
	for r := 0; r < rounds; r++ {
		chunks := map[int64][]byte{}
		for i := 0; i < 8; i++ {
			off := int64(rng.IntN(28<<20/4096)) * 4096
			n := (1 + rng.IntN(64)) * 4096
			if rng.IntN(2) == 0 {
				chunks[off] = pattern(fmt.Sprintf("r%d-%d", r, i), n)
			} else {
				chunks[off] = []byte(strings.Repeat(fmt.Sprintf("round %d chunk %d compresses well. ", r, i), n/30+1)[:n])
			}
		}
		writeAtSync(t, img, chunks)
	}
}

// TestE2EStagedTransfer: a workload (ext4 on loop plus direct writes)
// through a mount with --transfer staged reaches only the staging
// container; the apply worker, killed with SIGKILL at random moments and
// restarted, brings the blob to a byte-equal copy of the local image, with
// the blob's sequence number at 2 * the last staged epoch and no segment
// left; e2fsck accepts the downloaded blob.
func TestE2EStagedTransfer(t *testing.T) {
	e := newE2E(t, "mkfs.ext4", "e2fsck")
	url, state := e.createDisk("staged", 64)
	stagingURL := e.az.ContainerURL("staging")
	mp := e.mkdir("mnt")
	d := e.mount(state, mp, "--transfer", "staged", "--staging", stagingURL, "--linger", "20ms")
	img := filepath.Join(mp, "staged.img")

	dev := e.losetup(img)
	e.must("mkfs.ext4", "-q", "-E", "nodiscard", dev)
	fsDir := e.mkdir("fs")
	e.mountFS(dev, fsDir)
	for i := 0; i < 20; i++ {
		b := []byte(strings.Repeat(fmt.Sprintf("file %d of the staged e2e test\n", i), 2000))
		if err := os.WriteFile(filepath.Join(fsDir, fmt.Sprintf("f%02d.txt", i)), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	e.must("sync")
	umountFS(t, fsDir)
	detachLoop(t, dev, img)
	stagedWorkload(t, img, 6)

	// The flusher stages its first batch on its own time: wait for it
	// (the status was read before it once, on a busy machine).
	var s statusReport
	waitFor(t, time.Minute, "a staged epoch in the status", func() (bool, error) {
		var err error
		s, err = e.status(state)
		return err == nil && s.StagedEpoch > 0, err
	})
	if s.Transfer != transferStaged {
		t.Fatalf("status of a staged mount: transfer %q, staged epoch %d", s.Transfer, s.StagedEpoch)
	}
	e.mustVhdsync("unmount", mp)
	_ = d
	segs := stagedSegments(t, stagingURL)
	if len(segs) < 3 {
		t.Fatalf("%d segments staged, want several: %v", len(segs), segs)
	}
	if bs := getBlobState(t, url); bs.seq != 0 {
		t.Fatalf("the blob's sequence number is %d before any apply: the daemon wrote it directly", bs.seq)
	}
	// The worker: killed at random moments, restarted each time.
	applyArgs := []string{"apply", "--staging", stagingURL, "--blob", url, "--workers", "4", "--poll", "50ms"}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	kills, oddKills := 0, 0
	for i := 0; i < 6 && len(stagedSegments(t, stagingURL)) > 0; i++ {
		cmd := exec.Command(e.bin, applyArgs...)
		cmd.Env = e2eEnv()
		logf, err := os.Create(e.path(fmt.Sprintf("apply-%d.log", i)))
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		// Chaos, not synchronisation: the kill lands wherever the worker is.
		select {
		case <-time.After(time.Duration(20+rng.IntN(400)) * time.Millisecond):
		case <-done:
		}
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-done
		logf.Close()
		kills++
		if getBlobState(t, url).seq%2 == 1 {
			oddKills++
		}
	}
	r := e.mustVhdsync(append(applyArgs, "--once")...)
	if !strings.Contains(r.stdout, "applied") {
		t.Fatalf("apply output: %s", r)
	}
	if left := stagedSegments(t, stagingURL); len(left) != 0 {
		t.Fatalf("segments left after apply --once: %v", left)
	}
	bs := getBlobState(t, url)
	if bs.seq%2 != 0 || uint64(bs.seq) < 2*s.StagedEpoch {
		t.Fatalf("blob sequence %d after apply, staged epoch was %d at least", bs.seq, s.StagedEpoch)
	}
	if bs.lease != "available" {
		t.Fatalf("lease after apply --once: %q, want available (released, so a managed disk can be made from it)", bs.lease)
	}
	local := e.checkBlobIsImage(url, state, 64<<20)
	e.must("e2fsck", "-fn", local)
	t.Logf("staged: %d segments, worker killed %d times (%d while a segment was half applied), blob byte-equal, e2fsck clean", len(segs), kills, oddKills)
}

// TestE2EStagedRefusals: a corrupt segment stops the worker (exit 13)
// before anything is applied, and a direct mount is refused (exit 8) while
// staged segments wait.
func TestE2EStagedRefusals(t *testing.T) {
	e := newE2E(t)
	url, state := e.createDisk("refuse", 32)
	stagingURL := e.az.ContainerURL("staging")
	mp := e.mkdir("mnt")
	e.mount(state, mp, "--transfer", "staged", "--staging", stagingURL, "--linger", "20ms")
	stagedWorkload(t, filepath.Join(mp, "refuse.img"), 2)
	e.mustVhdsync("unmount", mp)
	segs := stagedSegments(t, stagingURL)
	if len(segs) == 0 {
		t.Fatal("nothing staged")
	}

	// A direct mount now would overtake the staged segments.
	r := e.vhdsync("mount", "--state", state, "--transfer", "direct", mp)
	if r.code != ExitState || !strings.Contains(r.stderr, "vhdsync apply --once") {
		t.Fatalf("direct mount with staged segments waiting: %s", r)
	}
	if isMounted(mp) {
		t.Fatal("the refused mount is mounted")
	}

	// Corrupt the first segment's last byte (inside the compressed payload).
	bc := blobClient(t, stagingURL+"/"+segs[0])
	buf := make([]byte, 64<<20)
	n, err := bc.DownloadBuffer(context.Background(), buf, nil)
	if err != nil {
		t.Fatal(err)
	}
	data := buf[:n]
	data[len(data)-1] ^= 0xff
	cred, _ := container.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	bb, err := blockblob.NewClientWithSharedKeyCredential(stagingURL+"/"+segs[0], cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bb.UploadBuffer(context.Background(), data, nil); err != nil {
		t.Fatal(err)
	}
	before := getBlobState(t, url)
	r = e.vhdsync("apply", "--once", "--staging", stagingURL, "--blob", url)
	if r.code != ExitBadSegment || !strings.Contains(r.stderr, "corrupt") {
		t.Fatalf("apply of a corrupt segment: %s", r)
	}
	after := getBlobState(t, url)
	if after.seq != before.seq || after.lease != "available" {
		t.Fatalf("blob changed by a refused apply: %+v -> %+v", before, after)
	}
	if left := stagedSegments(t, stagingURL); len(left) != len(segs) {
		t.Fatalf("segments %d -> %d after a refused apply", len(segs), len(left))
	}
}
