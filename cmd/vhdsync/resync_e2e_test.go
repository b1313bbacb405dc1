package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestE2EResyncAfterTakeover: state directory A writes the disk and
// unmounts (with recovery points: a point at its last epoch); another
// writer, state directory B made from the blob, writes over part of it and
// unmounts (its points record what it wrote). A's mount is then refused
// (exit 8: the blob moved on, A's image is the older disk) with the way
// out; `vhdsync resync` reads only what B changed, after which A mounts
// and holds B's writes and its own that B left alone, and the blob equals
// the image.
func TestE2EResyncAfterTakeover(t *testing.T) {
	e := newE2E(t)
	const size = 64 << 20
	url, stateA := e.createDisk("takeover", 64)
	mp := e.path("mnt")
	a := map[int64][]byte{0: pattern("a0", 1<<20), 8 << 20: pattern("a8", 4<<20), 40 << 20: pattern("a40", 2<<20)}
	d := e.mount(stateA, mp, "--recovery-points", "1s")
	writeAtSync(t, filepath.Join(mp, "takeover.img"), a)
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)

	stateB := e.path("state-b")
	e.mustVhdsync("create", "--from-blob", url, "--state", stateB)
	b := map[int64][]byte{8 << 20: pattern("b8", 1<<20), 60 << 20: pattern("b60", 512<<10)}
	d = e.mount(stateB, mp, "--recovery-points", "1s")
	writeAtSync(t, filepath.Join(mp, "takeover.img"), b)
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)

	r := e.mountAttempt(stateA, mp)
	if r.code != ExitState || !strings.Contains(r.stderr, "another writer") || !strings.Contains(r.stderr, "vhdsync resync --state") {
		t.Fatalf("mount of A after B wrote the blob: want exit %d naming the other writer and resync: %s", ExitState, r)
	}
	r = e.mustVhdsync("resync", "--state", stateA)
	if !strings.Contains(r.stdout, "resynced") {
		t.Fatalf("resync: %s", r)
	}
	t.Logf("resync: %s", strings.TrimSpace(r.stdout))
	// Read only what B changed (1.5 MiB), not the disk's 7.5 MiB of data.
	m := regexp.MustCompile(`read \S+ \S* ?\((\d+) bytes\) in \d+ requests; a full download reads \S+ \S* ?\((\d+) bytes\)`).FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("resync did not say what it read: %s", r.stdout)
	}
	read, _ := strconv.ParseInt(m[1], 10, 64)
	full, _ := strconv.ParseInt(m[2], 10, 64)
	if read < 1536<<10 || read > 2*(1536<<10) || full < 7<<20 {
		t.Errorf("resync read %d bytes (a full download %d): want B's 1.5 MiB of changes", read, full)
	}
	if r := e.mustVhdsync("resync", "--state", stateA); !strings.Contains(r.stdout, "up to date") {
		t.Errorf("a second resync should have nothing to do: %s", r)
	}

	d = e.mount(stateA, mp)
	img, err := os.ReadFile(filepath.Join(mp, "takeover.img"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[int64][]byte{0: a[0], 9 << 20: a[8<<20][1<<20:], 40 << 20: a[40<<20], 8 << 20: b[8<<20], 60 << 20: b[60<<20]}
	for off, w := range want {
		if !bytes.Equal(img[off:off+int64(len(w))], w) {
			t.Errorf("after the resync, A's disk at %d does not hold the last writer's data", off)
		}
	}
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	e.mustVhdsync("verify", "--state", stateA)
	e.checkBlobIsImage(url, stateA, size)
}
