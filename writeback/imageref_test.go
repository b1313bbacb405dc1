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
	r := NewMemRemote(size + 512)
	var down atomic.Bool
	down.Store(true)
	r.Fault = func(string, int64, int64) (bool, error) {
		if down.Load() {
			return false, &TransientError{"remote down"}
		}
		return true, nil
	}
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
