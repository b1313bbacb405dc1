package main

// kill -9 loop: cycles of a writer (32 KiB slots at
// random, each write followed by an fsync: small enough for the journal
// to carry it in its intent log; every other write covers 4 slots, 128
// KiB, which the journal writes to its segment with O_DIRECT) and a kill
// -9 of the daemon at
// a random moment; then the dead mount is cleaned up, mounted again (the
// journal replayed) and every slot read back against the model of what was
// acknowledged. At the end: unmount (drain), `vhdsync verify`, and the blob
// against the model and the image. `make test` runs 3 cycles;
// `make soak DURATION=10m` sets VHDSYNC_SOAK_DURATION and loops until it
// has passed.

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func TestE2EKill9Loop(t *testing.T) {
	e := newE2E(t)
	soak := envDuration(t, "VHDSYNC_SOAK_DURATION") / 2 // the fault loop takes the other half
	const sizeMiB, slot = 32, killSlot
	const slots = sizeMiB << 20 / slot
	url, state := e.createDisk("loop", sizeMiB)
	mp := e.path("mnt")
	img := filepath.Join(mp, "loop.img")
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))

	data := func(id int) []byte {
		if id == 0 {
			return make([]byte, slot)
		}
		return pattern(fmt.Sprintf("w%d", id), slot)
	}
	model := make([]int, slots) // slot -> id of its acknowledged content (0: zeros)
	var acked, lost, cycles, ambiguousNew, replayed int
	// The write in flight at the last kill: its first slot (-1: none),
	// slot count and id.
	inflight, inflightN, inflightID := -1, 0, 0
	// resolve settles the write in flight at the kill, after the replay:
	// it may or may not have landed, so each of its slots must hold the
	// old or the new content (anything else is a torn write of a failed
	// request, legal: the slot is then undefined until written again).
	resolve := func() {
		if inflight < 0 {
			return
		}
		got := make([]byte, slot)
		f, err := os.Open(img)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		landed := false
		for s := inflight; s < inflight+inflightN; s++ {
			if _, err := f.ReadAt(got, int64(s)*slot); err != nil {
				t.Fatal(err)
			}
			switch {
			case bytes.Equal(got, data(inflightID)):
				model[s] = inflightID
				landed = true
			case model[s] >= 0 && bytes.Equal(got, data(model[s])):
			default:
				model[s] = -1
			}
		}
		if landed {
			ambiguousNew++
		}
		inflight = -1
	}
	start := time.Now()
	for cycles < 3 || time.Since(start) < soak {
		cycles++
		d := e.mount(state, mp)
		resolve()
		// Every acknowledged write reads back after the replay.
		checkSlots(t, img, model, data, &lost)

		// The writer, until the kill.
		errc := make(chan error, 1)
		nextID := cycles * 1_000_000
		commits := make(chan [3]int, 1<<16) // first slot (-1-first: in flight), slots, id
		wrng := rand.New(rand.NewSource(rng.Int63()))
		go func() {
			f, err := os.OpenFile(img, os.O_WRONLY, 0)
			if err != nil {
				errc <- err
				return
			}
			defer f.Close()
			for n := 1; ; n++ {
				k := 1 + 3*(n%2) // 1 or 4 slots
				s, id := wrng.Intn(slots-k+1), nextID+n
				buf := bytes.Repeat(data(id), k)
				commits <- [3]int{-1 - s, k, id} // in flight
				if _, err := f.WriteAt(buf, int64(s)*slot); err != nil {
					errc <- err
					return
				}
				if err := f.Sync(); err != nil {
					errc <- err
					return
				}
				commits <- [3]int{s, k, id}
			}
		}()
		// Kill at a random moment of the writing: 100-1500 ms in.
		<-time.After(time.Duration(100+rng.Intn(1400)) * time.Millisecond)
		if err := syscall.Kill(d.pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		d.waitExit(10 * time.Second)
		var werr error
		select {
		case werr = <-errc:
		case <-time.After(time.Minute):
			t.Fatal("the writer did not fail within a minute of the kill")
		}
		if !errors.Is(werr, syscall.EIO) && !errors.Is(werr, syscall.ENOTCONN) && !errors.Is(werr, syscall.ECONNABORTED) {
			t.Logf("cycle %d: the writer failed with %v", cycles, werr)
		}
		close(commits)
		for c := range commits {
			if c[0] < 0 {
				inflight, inflightN, inflightID = -1-c[0], c[1], c[2]
				continue
			}
			for s := c[0]; s < c[0]+c[1]; s++ {
				model[s] = c[2]
			}
			acked++
			inflight = -1
		}
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
			t.Fatalf("umount -l %s: %v", mp, err)
		}
		// The state lock goes with the killed daemon's last file; say how
		// long that took if status did not answer at once.
		var s statusReport
		first, waited := "", time.Now()
		waitFor(t, 60*time.Second, "the killed daemon's state lock to go", func() (bool, error) {
			var err error
			s, err = e.status(state)
			if err != nil && first == "" {
				st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", d.pid))
				wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", d.pid))
				first = fmt.Sprintf("%v; /proc/%d/stat %q wchan %q", err, d.pid, st, wchan)
			}
			return err == nil, err
		})
		if first != "" {
			t.Logf("cycle %d: the state lock went %v after the kill was seen: %s", cycles, time.Since(waited).Round(time.Millisecond), first)
		}
		replayed += int(s.JournalRecords)
	}
	d := e.mount(state, mp)
	resolve()
	checkSlots(t, img, model, data, &lost)
	e.mustVhdsync("unmount", mp)
	d.waitExit(time.Minute)
	e.mustVhdsync("verify", "--state", state)
	e.checkBlobIsImage(url, state, sizeMiB<<20)
	mismatches := 0
	for s, id := range model {
		if id < 0 {
			continue
		}
		if !bytes.Equal(blobRange(t, url, int64(s)*slot, slot), data(id)) {
			mismatches++
		}
	}
	t.Logf("RELIABILITY | kill -9 loop | %d cycles in %v | %d writes acknowledged (write+fsync) | %d journal records replayed | %d in-flight writes landed | %d acknowledged writes lost | %d slots differing on the blob after the drain |",
		cycles, time.Since(start).Round(time.Second), acked, replayed, ambiguousNew, lost, mismatches)
	if lost != 0 || mismatches != 0 {
		t.Errorf("%d acknowledged writes lost, %d slots of the blob differ", lost, mismatches)
	}
}

// killSlot is the kill -9 loop's write size.
const killSlot = 32 << 10

// checkSlots reads every slot through the mount and counts those whose
// content is not the acknowledged one (slots marked -1 are undefined).
func checkSlots(t *testing.T, img string, model []int, data func(int) []byte, lost *int) {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const slot = killSlot
	got := make([]byte, slot)
	for s, id := range model {
		if id < 0 {
			continue
		}
		if _, err := f.ReadAt(got, int64(s)*slot); err != nil {
			t.Fatalf("read slot %d: %v", s, err)
		}
		if !bytes.Equal(got, data(id)) {
			*lost++
			t.Errorf("slot %d lacks its acknowledged write %d", s, id)
		}
	}
}
