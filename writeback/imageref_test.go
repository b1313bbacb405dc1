package writeback

import (
	"bytes"
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestImageRefsOverlap: the overlap index answers what a scan of every
// record answers, through adds and removals (a capture or a delete), for
// ranges narrower and wider than the index.
func TestImageRefsOverlap(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var x imageRefs
	x.init()
	live := map[uint64]*Record{}
	const size = 8 << 20
	for step := 0; step < 4000; step++ {
		switch k := rng.IntN(10); {
		case k < 6:
			off := rng.Int64N(size/SectorSize) * SectorSize
			n := (1 + rng.Int64N(min(2048, (size-off)/SectorSize))) * SectorSize
			r := &Record{Seq: uint64(step + 1), Epoch: uint64(1 + rng.IntN(5)), Offset: off, Length: n, Kind: KindData}
			x.add(r)
			live[r.Seq] = r
		case len(live) > 0:
			for seq := range live {
				x.remove(seq)
				delete(live, seq)
				break
			}
		}
		off := rng.Int64N(size)
		end := off + 1 + rng.Int64N(size-off)
		if rng.IntN(4) == 0 {
			off, end = 0, size // wider than the index: the scan path
		}
		epoch := uint64(1 + rng.IntN(6))
		var want []uint64
		for seq, r := range live {
			if r.Epoch < epoch && r.Offset < end && off < r.End() {
				want = append(want, seq)
			}
		}
		slices.Sort(want)
		var got []uint64
		for _, ref := range x.overlapping(off, end, epoch) {
			got = append(got, ref.seq)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("step %d: overlapping(%d, %d, epoch %d) = %v, want %v", step, off, end, epoch, got, want)
		}
	}
}

// TestDiskDiscardCapturesMany: a discard of the whole disk, in the epoch
// after 1,500 pending 4 KiB writes the remote has not taken yet, captures
// all of them (more than one group commit holds, so in several
// transactions) before it punches the image. The blob must then pass
// through exactly the written state (at the first batch's even sequence
// number) before it ends all zeros, and the journal must be empty.
func TestDiskDiscardCapturesMany(t *testing.T) {
	ctx := context.Background()
	const size = 8 << 20
	const writes = 1500
	r, down := remoteDown(size + 512)
	want := make([]byte, size)
	var mu sync.Mutex
	var states [][]byte
	r.Observe = func(data []byte, seq int64) {
		if seq%2 == 0 && seq > 0 {
			mu.Lock()
			states = append(states, bytes.Clone(data[:size]))
			mu.Unlock()
		}
	}
	o := DiskOptions{WriteOnce: true}
	o.Flusher.MaxBatchBytes = 64 << 20
	o.Flusher.Linger = time.Hour // epochs close at the barrier only
	d := propOpenDisk(t, t.TempDir(), size, r, o)
	defer d.Close(ctx, false)
	for i := 0; i < writes; i++ {
		p := bytes.Repeat([]byte{byte(i%251 + 1)}, 4096)
		off := int64(i%(size/4096)) * 4096
		if err := d.WriteAt(ctx, p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(ctx, 0, size, true); err != nil {
		t.Fatal(err)
	}
	st := d.Stats().Journal
	if st.Captures < maxGroupEntries {
		t.Fatalf("%d records captured, want at least %d (one per 4 KiB block written, %d writes)", st.Captures, maxGroupEntries, writes)
	}
	down.Store(false)
	if err := d.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if st := d.Stats().Journal; st.PendingRecords != 0 {
		t.Fatalf("%d records pending after the drain", st.PendingRecords)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(states) < 2 {
		t.Fatalf("the blob passed through %d complete states, want the written state and the discarded one", len(states))
	}
	if i := propFirstDiff(states[0], want); i >= 0 {
		t.Fatalf("the first complete state differs from what was written before the barrier at byte %d", i)
	}
	if i := propFirstDiff(states[len(states)-1], make([]byte, size)); i >= 0 {
		t.Fatalf("the final state is not all zeros at byte %d", i)
	}
	t.Logf("%d records captured (%d bytes), %d complete states", st.Captures, st.CapturedBytes, len(states))
}

// TestDiskPartialCaptures: 512-byte writes, each after a
// barrier, over a pending 64 KiB image-backed record copy only the sectors
// they overwrite (pieces), until the record has maxPieces of them and the
// next one copies it whole; a restart in the middle brings the pieces back
// from the journal. The blob, which takes nothing until the end, must then
// pass through the record's own state and, after each barrier, exactly the
// writes before it.
func TestDiskPartialCaptures(t *testing.T) {
	ctx := context.Background()
	const size = 1 << 20
	const small = maxPieces + 4
	r, down := remoteDown(size + 512)
	var mu sync.Mutex
	var states [][]byte
	r.Observe = func(data []byte, seq int64) {
		if seq%2 == 0 && seq > 0 {
			mu.Lock()
			states = append(states, bytes.Clone(data[:64<<10]))
			mu.Unlock()
		}
	}
	o := DiskOptions{WriteOnce: true}
	o.Flusher.Linger = time.Hour
	o.Flusher.MaxBatchBytes = 1 // one epoch per batch: the blob shows every barrier state
	dir := t.TempDir()
	d := propOpenDisk(t, dir, size, r, o)
	defer func() { d.Close(ctx, false) }()
	want := [][]byte{bytes.Repeat([]byte{0xA0}, 64<<10)} // the state after each barrier
	if err := d.WriteAt(ctx, want[0], 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	var pieces int64
	for i := 0; i < small; i++ {
		if i == small/2 {
			// A restart: the journal keeps the pieces.
			pieces += d.Stats().Journal.CapturedBytes
			lease := d.Stats().LeaseID
			if err := d.Close(ctx, false); err != nil {
				t.Fatal(err)
			}
			o.LeaseID = lease
			d = propOpenDisk(t, dir, size, r, o)
		}
		p := bytes.Repeat([]byte{byte(i + 1)}, SectorSize)
		off := int64(i) * 2 * SectorSize // every other sector: one piece each
		if err := d.WriteAt(ctx, p, off); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		next := bytes.Clone(want[len(want)-1])
		copy(next[off:], p)
		want = append(want, next)
	}
	pieces += d.Stats().Journal.CapturedBytes
	// maxPieces sectors copied one by one, then the whole 64 KiB once.
	if pieces < maxPieces*SectorSize || pieces > maxPieces*SectorSize+64<<10 {
		t.Fatalf("%d bytes captured, want %d sectors one by one and the record once (%d)", pieces, maxPieces, maxPieces*SectorSize+64<<10)
	}
	down.Store(false)
	if err := d.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(states) == 0 || !bytes.Equal(states[0], want[0]) {
		t.Fatalf("the blob's first complete state is not the record's own (%d states)", len(states))
	}
	k := 0
	for i, st := range states {
		for k < len(want) && !bytes.Equal(st, want[k]) {
			k++
		}
		if k == len(want) {
			t.Fatalf("complete state %d of the blob is no state after a barrier, or out of order", i)
		}
	}
	if !bytes.Equal(states[len(states)-1], want[len(want)-1]) {
		t.Fatal("the blob does not end in the last state")
	}
	t.Logf("%d bytes captured for %d overwrites; %d complete states, all barrier states in order", pieces, small, len(states))
}

// remoteDown is an in-memory blob that refuses every write (a transient
// error) until the returned flag is cleared.
func remoteDown(size int64) (*MemRemote, *atomic.Bool) {
	r := NewMemRemote(size)
	down := new(atomic.Bool)
	down.Store(true)
	r.Fault = func(string, int64, int64) (bool, error) {
		if down.Load() {
			return false, &TransientError{"remote down"}
		}
		return true, nil
	}
	return r, down
}
