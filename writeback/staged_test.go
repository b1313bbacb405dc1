package writeback

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/bytediff"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/staged"
	"github.com/vhdsync/vhdsync/staged/segfile"
	"pgregory.net/rapid"
)

// memSegments is an in-memory staged.SegmentStore for the property tests (the
// Azurite tests cover the real container).
type memSegments struct {
	mu   sync.Mutex
	segs map[string][]byte
	puts int
	// beforePut, when set, decides each put: whether the segment is
	// stored, and the error the caller hears (stored or not).
	beforePut func(name string) (store bool, err error)
	// latency, when set, is how long a put takes (uploads overlap and
	// finish out of order).
	latency func() time.Duration
}

func newMemSegments() *memSegments { return &memSegments{segs: map[string][]byte{}} }

func (m *memSegments) PutSegment(_ context.Context, name string, data []byte) error {
	if m.latency != nil {
		time.Sleep(m.latency()) // the upload's duration, not a wait for a condition
	}
	m.mu.Lock()
	m.puts++
	hook := m.beforePut
	m.mu.Unlock()
	store, err := true, error(nil)
	if hook != nil {
		store, err = hook(name)
	}
	if store {
		m.mu.Lock()
		m.segs[name] = slices.Clone(data)
		m.mu.Unlock()
	}
	return err
}

func (m *memSegments) ListSegments(context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for n := range m.segs {
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}

func (m *memSegments) GetSegment(_ context.Context, name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.segs[name]
	if !ok {
		return nil, fmt.Errorf("segment %s: not found", name)
	}
	return slices.Clone(b), nil
}

func (m *memSegments) DeleteSegment(_ context.Context, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.segs, name)
	return nil
}

func (m *memSegments) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.segs)
}

var errWorkerKilled = errors.New("injected: worker killed")

// killableWorker runs Appliers on r one after another; kill() cancels the
// running one at a random request (as kill -9 would: the request may or
// may not land), and a fresh staged.Applier starts from the blob's state.
type killableWorker struct {
	r        *remote.MemRemote
	s        staged.SegmentStore
	calls    atomic.Int64
	killAt   atomic.Int64 // request number that kills the worker (0: never)
	every    int64
	kills    atomic.Int64
	cancelMu sync.Mutex
	cancel   context.CancelFunc
}

func (w *killableWorker) fault(op string, off, n int64) (bool, error) {
	c := w.calls.Add(1)
	if k := w.killAt.Load(); k > 0 && c >= k {
		w.killAt.Store(c + w.every)
		w.kills.Add(1)
		w.cancelMu.Lock()
		if w.cancel != nil {
			w.cancel()
		}
		w.cancelMu.Unlock()
		return c%2 == 0, errWorkerKilled
	}
	return true, nil
}

// run applies until stop is closed, restarting after every kill.
func (w *killableWorker) run(t propT, stop <-chan struct{}, done chan<- error) {
	for {
		ctx, cancel := context.WithCancel(context.Background())
		w.cancelMu.Lock()
		w.cancel = cancel
		w.cancelMu.Unlock()
		go func() {
			select {
			case <-stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		a, err := staged.NewApplier(w.r, w.s, "worker", staged.ApplierOptions{DiskID: "disk", DiskSize: int64(len(w.r.Bytes())) - 512, Workers: 3,
			RetryMin: 100 * time.Microsecond, RetryMax: time.Millisecond, Poll: 200 * time.Microsecond})
		if err != nil {
			done <- err
			return
		}
		err = a.Run(ctx)
		cancel()
		if err != nil && !errors.Is(err, errWorkerKilled) {
			done <- err
			return
		}
		select {
		case <-stop:
			done <- nil
			return
		default:
		}
	}
}

// TestStagedOrderProperty is TestOrderProperty for the staged transfer:
// the disk stages segments, an apply worker that is killed at random
// requests (and restarted from the blob's state) applies them, and every
// state the blob passes through is checked by checkOrder. With
// crashDaemon the daemon also dies once right after storing a segment
// (before deleting its records) and is reopened, so a segment is staged
// twice. After the drain the blob, the image and the model agree and no
// segment is left.
func TestStagedOrderProperty(t *testing.T) {
	var total orderStats
	cases, kills, restaged := 0, int64(0), 0
	base := propBaseDir(t)
	rapid.Check(t, func(rt *rapid.T) {
		ctx := context.Background()
		size := rapid.SampledFrom([]int64{128 << 10, 256 << 10}).Draw(rt, "size")
		nOps := rapid.IntRange(10, 50).Draw(rt, "nOps")
		ops := rapid.SliceOfN(genOp(size, min(size, 320<<10), defaultKinds), nOps, nOps).Draw(rt, "ops")
		crashDaemonAt := rapid.IntRange(-1, 3).Draw(rt, "crashDaemonAtPut")
		o := DiskOptions{DiskID: "disk"}
		o.Journal.MaxEpochBytes = rapid.Int64Range(4<<10, 128<<10).Draw(rt, "maxEpochBytes")
		o.Flusher.MaxBatchBytes = 1<<20 - rapid.Int64Range(0, 1<<20-8<<10).Draw(rt, "maxBatchBytesBelow1MiB")
		o.Flusher.Linger = time.Duration(rapid.IntRange(100, 2000).Draw(rt, "lingerMicros")) * time.Microsecond

		dir := propTempDir(base, rt)
		tab := newSecTable()
		m := newDiskModel(tab, size)
		obs := newBlobObserver(tab, size)
		r := remote.NewMemRemote(size + 512)
		if _, err := r.AcquireLease(ctx, "worker"); err != nil {
			rt.Fatal(err)
		}
		r.Observe = obs.observe
		store := newMemSegments()
		w := &killableWorker{r: r, s: store, every: int64(rapid.IntRange(3, 30).Draw(rt, "killEvery"))}
		w.killAt.Store(w.every)
		r.Fault = w.fault
		var crashed atomic.Bool
		var crashState atomic.Int64 // states observed when the daemon died
		crashState.Store(-1)
		crashStores := rapid.Bool().Draw(rt, "crashedPutStores")
		if crashDaemonAt >= 0 {
			store.beforePut = func(string) (bool, error) {
				store.mu.Lock()
				n := store.puts
				store.mu.Unlock()
				if n > crashDaemonAt && crashed.CompareAndSwap(false, true) {
					obs.mu.Lock()
					crashState.Store(int64(len(obs.states)))
					obs.mu.Unlock()
					// Permanent: the flusher stops, as if dead. The segment
					// is stored or lost; later uploads may be stored anyway.
					return crashStores, errProcessDead
				}
				return true, nil
			}
		}
		o.StagedUploads = rapid.IntRange(1, 3).Draw(rt, "stagedUploads")
		jitter := rand.New(rand.NewPCG(uint64(nOps), 3))
		var jmu sync.Mutex
		store.latency = func() time.Duration {
			jmu.Lock()
			defer jmu.Unlock()
			return time.Duration(jitter.IntN(300)) * time.Microsecond
		}
		o.Staging = store
		d := propOpenDisk(rt, dir, size, r, o)
		rt.Cleanup(func() { d.Close(ctx, false) })
		stop, done := make(chan struct{}), make(chan error, 1)
		go w.run(rt, stop, done)
		reopened := false
		for i, op := range ops {
			if err := m.apply(ctx, d, i, op); err != nil {
				rt.Fatalf("op %d (%v): %v", i, op, err)
			}
			if crashed.Load() && !reopened && d.FlusherErr() != nil {
				// The daemon "died" after storing a segment: reopen it.
				closedBefore := d.j.ClosedEpoch()
				if err := d.Close(ctx, false); err != nil {
					rt.Fatal(err)
				}
				d = propOpenDisk(rt, dir, size, r, o)
				rt.Cleanup(func() { d.Close(ctx, false) })
				if d.j.ClosedEpoch() < closedBefore {
					rt.Fatalf("closed epoch went back from %d to %d", closedBefore, d.j.ClosedEpoch())
				}
				reopened = true
				restaged++
			}
		}
		if err := m.apply(ctx, d, len(ops), diskOp{Kind: opFlush}); err != nil {
			rt.Fatal(err)
		}
		closed := d.j.ClosedEpoch()
		if err := d.Drain(ctx); err != nil {
			if !crashed.Load() || reopened {
				rt.Fatal(err)
			}
			// Crashed during the final drain: reopen and drain again.
			d.Close(ctx, false)
			d = propOpenDisk(rt, dir, size, r, o)
			rt.Cleanup(func() { d.Close(ctx, false) })
			if err := d.Drain(ctx); err != nil {
				rt.Fatal(err)
			}
			closed = max(closed, d.Stats().Flusher.RemoteEpoch)
			restaged++
		}
		if err := d.Close(ctx, true); err != nil {
			rt.Fatal(err)
		}
		// Everything is staged: stop the killer, let the worker finish.
		w.killAt.Store(0)
		deadline := time.Now().Add(20 * time.Second)
		for store.len() > 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond) // polling a condition the worker reaches on its own
		}
		close(stop)
		if err := <-done; err != nil {
			rt.Fatalf("worker: %v", err)
		}
		if n := store.len(); n != 0 {
			rt.Fatalf("%d segments left after the worker ran dry", n)
		}
		if err := r.ReleaseLease(ctx, "worker"); err != nil {
			rt.Fatal(err)
		}
		states, errs := obs.snapshot()
		if len(errs) > 0 {
			rt.Fatal(errs[0])
		}
		ost, err := checkOrderRelaxed(m, states, -1, int(crashState.Load()))
		if err != nil {
			rt.Fatalf("%v\nsteps %d, barriers %v", err, m.last(), m.barriers)
		}
		propFinalCheck(rt, dir, r, m, closed)
		cases++
		kills += w.kills.Load()
		total.add(ost)
	})
	t.Logf("staged order: %d cases, %d states checked (%d complete, %d in progress), %d worker kills, %d daemon restarts with a segment staged twice",
		cases, total.states, total.complete, total.marked, kills, restaged)
	if cases > 20 && (kills == 0 || restaged == 0) {
		t.Errorf("no worker kills (%d) or no daemon restarts (%d): the test is too weak", kills, restaged)
	}
}

// A corrupt segment, or one of another disk, stops the worker before it
// writes anything, and nothing after it is applied.
func TestApplierRefusesBadSegments(t *testing.T) {
	ctx := context.Background()
	enc, _ := segfile.NewEncoder()
	good := func(disk string, prev, last uint64, fill byte) []byte {
		data := make([]byte, 4096)
		for i := range data {
			data[i] = fill
		}
		b, err := segfile.Encode(segfile.Header{DiskID: disk, PrevEpoch: prev, FirstEpoch: prev + 1, LastEpoch: last},
			[]segfile.Range{{Off: 0, Len: 4096, Data: data}}, enc)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name string
		seg  []byte
		want error
	}{
		{"corrupt", func() []byte { b := good("disk", 0, 1, 7); b[len(b)-3] ^= 1; return b }(), segfile.ErrCorrupt},
		{"other disk", good("other", 0, 1, 7), segfile.ErrOtherDisk},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := remote.NewMemRemote(1<<20 + 512)
			r.AcquireLease(ctx, "w")
			s := newMemSegments()
			s.PutSegment(ctx, segfile.Name(0, 1), tc.seg)
			s.PutSegment(ctx, segfile.Name(1, 2), good("disk", 1, 2, 9))
			a, _ := staged.NewApplier(r, s, "w", staged.ApplierOptions{DiskID: "disk", DiskSize: 1 << 20, Once: true})
			err := a.Run(ctx)
			if !errors.Is(err, staged.ErrBadSegment) || !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if seq, _ := r.Sequence(ctx); seq != 0 || !bytediff.Zero(r.Bytes()) {
				t.Fatalf("blob changed: sequence %d", seq)
			}
			if s.len() != 2 {
				t.Fatalf("%d segments left, want both kept", s.len())
			}
			if st := a.Stats(); st.State != replicate.StateFailed || st.LastError == "" {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}
