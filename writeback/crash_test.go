package writeback

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/bytediff"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"pgregory.net/rapid"
)

// remoteFault is a remote.MemRemote.Fault the test controls (remote.MemRemote calls it
// under its own lock; the test changes it under this one). It counts the
// calls; from call crashAt on every call fails permanently, as if the
// process had died (the crashAt-th call may land with its response lost);
// with down set every call fails with a transient error.
//
// With pace > 0 it also paces the flusher: each call waits until the
// writer has done pace more operations (or stopped), so that epochs pile up
// behind a batch as they do when the network is slower than the writer,
// and the flusher merges them into marked multi-epoch batches.
type remoteFault struct {
	mu      sync.Mutex
	calls   int
	crashAt int // 0: no crash
	lost    bool
	down    bool
	crashed chan struct{} // closed by call crashAt

	pace           int
	ops, opsAtCall int
	writing        bool
	progress       *sync.Cond

	onMark int // if > 0: crash at this many calls after the next odd mark
}

var errProcessDead = errors.New("injected: the process is dead")

func newRemoteFault() *remoteFault {
	f := &remoteFault{crashed: make(chan struct{}), writing: true}
	f.progress = sync.NewCond(&f.mu)
	return f
}

// writerStep and writerDone report the writer's progress for pacing.
func (f *remoteFault) writerStep() {
	f.mu.Lock()
	f.ops++
	f.progress.Broadcast()
	f.mu.Unlock()
}

func (f *remoteFault) writerDone() {
	f.mu.Lock()
	f.writing = false
	f.progress.Broadcast()
	f.mu.Unlock()
}

func (f *remoteFault) fault(op string, off, n int64) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for f.pace > 0 && f.writing && f.ops < f.opsAtCall+f.pace {
		f.progress.Wait()
	}
	f.opsAtCall = f.ops
	if f.down {
		return false, &remote.TransientError{Msg: "injected: remote unreachable"}
	}
	f.calls++
	switch {
	case f.crashAt == 0 || f.calls < f.crashAt:
		return true, nil
	case f.calls == f.crashAt:
		close(f.crashed)
		return f.lost, errProcessDead
	default:
		return false, errProcessDead
	}
}

// arm sets the crash at the k-th call from now; with onMark, at the k-th
// call after the next odd mark (a crash inside a multi-epoch batch).
func (f *remoteFault) arm(k int, onMark bool) {
	f.mu.Lock()
	if onMark {
		f.onMark = k
	} else {
		f.crashAt = f.calls + k
	}
	f.mu.Unlock()
}

// observed sees each state of the blob (remote.MemRemote.Observe, under the
// blob's lock, as fault is).
func (f *remoteFault) observed(seq int64) {
	f.mu.Lock()
	if f.onMark > 0 && seq%2 == 1 && f.crashAt == 0 {
		f.crashAt = f.calls + f.onMark
		f.onMark = 0
	}
	f.mu.Unlock()
}

func (f *remoteFault) crashCall() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.crashAt
}

// crashNow makes every call from now on fail, if the crash has not
// happened yet.
func (f *remoteFault) crashNow() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.crashAt == 0 || f.crashAt > f.calls {
		f.crashAt, f.lost = f.calls+1, false
	}
	f.onMark = 0
}

func (f *remoteFault) heal() {
	f.mu.Lock()
	f.crashAt, f.down, f.onMark = 0, false, 0
	f.mu.Unlock()
}

func (f *remoteFault) setDown(down bool) {
	f.mu.Lock()
	f.down = down
	f.mu.Unlock()
}

// TestCrashRecovery: a random workload with barriers runs until the
// remote call chosen as the crash point; from that call on nothing reaches
// the blob (the call itself may land with its response lost), and the
// "process" stops: the writer stops, and Close(ctx, false) stops the
// flusher and closes the journal without draining, keeping the lease. A
// new Disk is opened on the same image, journal and blob with the same
// lease id (as the state directory would give it), a few more writes may
// follow, then a clean drain. Then the blob and the image must equal the
// model of every acknowledged write, the journal must be empty, and every
// state the blob went through, across the crash, must pass checkOrder.
func TestCrashRecovery(t *testing.T) {
	var total orderStats
	points := map[string]int{}
	base := propBaseDir(t)
	cases, replayed, alreadyRemote, imageBacked, overwritten := 0, 0, 0, 0, 0
	rapid.Check(t, func(rt *rapid.T) {
		ctx := context.Background()
		size := rapid.SampledFrom([]int64{128 << 10, 256 << 10}).Draw(rt, "size")
		nOps := rapid.IntRange(5, 30).Draw(rt, "nOps")
		ops := rapid.SliceOfN(genOp(size, 96<<10, defaultKinds), nOps, nOps).Draw(rt, "ops")
		// The crash: the k-th remote call after the writer's op armAt.
		armAt := rapid.IntRange(0, nOps-1).Draw(rt, "armAt")
		onMark := rapid.Bool().Draw(rt, "inMarkedBatch")
		crashK := rapid.IntRange(1, 8).Draw(rt, "crashK")
		if onMark {
			// The mark itself is call 0: calls 1..3 hit the spans and the
			// complete mark of a small batch.
			crashK = rapid.IntRange(1, 3).Draw(rt, "crashKInBatch")
		}
		lost := rapid.Bool().Draw(rt, "responseLost")
		after := rapid.SliceOfN(genOp(size, 96<<10, defaultKinds), 0, 6).Draw(rt, "opsAfterRestart")
		o := DiskOptions{}
		o.Journal.MaxEpochBytes = rapid.Int64Range(4<<10, 64<<10).Draw(rt, "maxEpochBytes")
		o.Flusher.MaxBatchBytes = 1<<20 - rapid.Int64Range(0, 1<<20-8<<10).Draw(rt, "maxBatchBytesBelow1MiB")
		// Batches cut at a few ranges (0: the default): after a replay,
		// the first batch must still reach past every record that bound
		// writes went over (journal/bind.go).
		o.Flusher.MaxBatchExtents = rapid.IntRange(0, 24).Draw(rt, "maxBatchExtents")
		// Bindings spanning at most a few records (0: the default), and
		// replay binding again only that far.
		o.Journal.MaxBindRecords = uint64(rapid.IntRange(0, 16).Draw(rt, "maxBindRecords"))
		o.Sender.Workers = rapid.IntRange(2, 4).Draw(rt, "workers")
		o.Flusher.Linger = time.Duration(rapid.IntRange(100, 2000).Draw(rt, "lingerMicros")) * time.Microsecond
		// Batches stopped for a superset as soon as the writer pauses,
		// and request-bound batches held for more epochs: both must keep
		// every state the blob shows a state of the disk.
		o.Flusher.PreemptAfter = rapid.IntRange(1, 16).Draw(rt, "preemptAfter")
		o.Flusher.MergeWait = time.Duration(rapid.IntRange(-1, 3000).Draw(rt, "mergeWaitMicros")) * time.Microsecond

		dir := propTempDir(base, rt)
		tab := newSecTable()
		m := newDiskModel(tab, size)
		obs := newBlobObserver(tab, size)
		r := remote.NewMemRemote(size + 512)
		f := newRemoteFault()
		r.Observe = func(data []byte, seq int64) {
			obs.observe(data, seq)
			f.observed(seq)
		}
		f.lost = lost
		f.pace = 3 - rapid.IntRange(0, 3).Draw(rt, "paceBelow3")
		r.Fault = f.fault

		d := propOpenDisk(rt, dir, size, r, o)
		rt.Cleanup(func() { d.Close(ctx, false) })
		lease := d.Stats().LeaseID
	run:
		for i, op := range ops {
			select {
			case <-f.crashed:
				break run
			default:
			}
			if i == armAt {
				f.arm(crashK, onMark)
			}
			if err := m.apply(ctx, d, i, op); err != nil {
				rt.Fatalf("op %d (%v): %v", i, op, err)
			}
			f.writerStep()
		}
		// The process dies here, if the chosen call has not come yet.
		f.writerDone()
		f.crashNow()
		r.Sequence(ctx) // waits for a call holding the blob's lock
		crash, crashCall := len(obs.states), f.crashCall()
		if err := d.Close(ctx, false); err != nil {
			rt.Fatalf("close without drain: %v", err)
		}
		if r.Lease() != lease {
			rt.Fatalf("the lease %q was not kept (blob has %q)", lease, r.Lease())
		}
		if i := bytediff.First(readImageAt(rt, dir), m.bytes); i >= 0 {
			rt.Fatalf("the image lost an acknowledged write at byte %d", i)
		}
		points[crashKind(obs, crash)]++

		f.heal()
		o.LeaseID = lease
		d2 := propOpenDisk(rt, dir, size, r, o)
		rt.Cleanup(func() { d2.Close(ctx, false) })
		rp := d2.Replay()
		if i := bytediff.First(readImageAt(rt, dir), m.bytes); i >= 0 {
			rt.Fatalf("replay changed the image at byte %d", i)
		}
		for i, op := range after {
			if err := m.apply(ctx, d2, len(ops)+i, op); err != nil {
				rt.Fatalf("op %d after restart (%v): %v", i, op, err)
			}
		}
		if err := m.apply(ctx, d2, len(ops)+len(after), diskOp{Kind: opFlush}); err != nil {
			rt.Fatal(err)
		}
		closed := d2.j.ClosedEpoch()
		if err := d2.Drain(ctx); err != nil {
			rt.Fatal(err)
		}
		if st := d2.Stats().Journal; st.PendingRecords != 0 || st.PendingBytes != 0 {
			rt.Fatalf("journal not empty after the drain: %d records, %d bytes pending", st.PendingRecords, st.PendingBytes)
		}
		if err := d2.Close(ctx, true); err != nil {
			rt.Fatal(err)
		}
		states, errs := obs.snapshot()
		if len(errs) > 0 {
			rt.Fatal(errs[0])
		}
		ost, err := checkOrder(m, states, crash)
		if err != nil {
			rt.Fatalf("%v\ncrash after %d states (call %d, response lost %v), steps %d, barriers %v, replay %+v", err, crash, crashCall, lost, m.last(), m.barriers, rp)
		}
		propFinalCheck(rt, dir, r, m, closed)
		cases++
		total.add(ost)
		replayed += rp.Records
		alreadyRemote += rp.AlreadyRemote
		imageBacked += rp.ImageBacked
		overwritten += rp.Overwritten
		if rp.Torn > 0 {
			rt.Fatalf("%d image-backed records found torn without a power loss", rp.Torn)
		}
	})
	t.Logf("crash: %d crash points %v; %d records replayed, %d of them already on the blob, %d image-backed (captured by the replay, %d of them overwritten by bound writes); %d states checked (%d in segments across a crash)",
		cases, points, replayed, alreadyRemote, imageBacked, overwritten, total.states, total.crashSegment)
	if cases > 20 && imageBacked == 0 {
		t.Errorf("no image-backed record was pending at a crash: the test does not exercise their replay")
	}
	if cases > 20 && overwritten == 0 {
		t.Errorf("no image-backed record was overwritten by a bound write at a crash: the test does not exercise their replay")
	}
}

// crashKind says where in the flusher's cycle the crash hit.
func crashKind(obs *blobObserver, crash int) string {
	states, _ := obs.snapshot()
	states = states[:crash]
	lastComplete, seq := -1, int64(0)
	for i, s := range states {
		if s.seq%2 == 0 && s.seq > seq {
			lastComplete = i
		}
		seq = s.seq
	}
	switch {
	case len(states) == 0:
		return "before any change"
	case lastComplete == len(states)-1:
		return "between batches"
	case seq%2 == 1:
		return "inside a marked batch"
	default:
		return "inside an unmarked batch"
	}
}

func readImageAt(t propT, dir string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBackpressureBlocksUntilRemoteReturns (invariant 6): with the remote
// down (every call fails with a transient error) the journal fills to its
// cap and writers block; none fails. When the remote returns, every write
// completes and the blob converges.
func TestBackpressureBlocksUntilRemoteReturns(t *testing.T) {
	ctx := context.Background()
	const size = 256 << 10
	const writers, perWriter, chunk = 4, 32, 4096
	dir := propBaseDir(t)
	r := remote.NewMemRemote(size + 512)
	f := newRemoteFault()
	f.setDown(true)
	r.Fault = f.fault
	o := DiskOptions{}
	o.Journal.MaxPendingBytes = 64 << 10
	o.Journal.MaxEpochBytes = 16 << 10
	o.Flusher.MaxBatchBytes = 32 << 10
	o.Flusher.Linger = 200 * time.Microsecond
	d := propOpenDisk(t, dir, size, r, o)
	defer d.Close(ctx, false)

	var mu sync.Mutex
	done := 0
	errc := make(chan error, writers)
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perWriter; i++ {
				p := backpressurePayload(w, i)
				if err := d.WriteAt(ctx, p, backpressureOffset(w, i)); err != nil {
					errc <- fmt.Errorf("writer %d write %d: %w", w, i, err)
					return
				}
				mu.Lock()
				done++
				mu.Unlock()
			}
		}()
	}
	// Wait until writers block on the cap.
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := d.Stats()
		if st.Journal.PendingBytes > o.Journal.MaxPendingBytes {
			t.Fatalf("pending %d bytes above the cap %d", st.Journal.PendingBytes, o.Journal.MaxPendingBytes)
		}
		if st.Journal.BlockedWriters > 0 && st.Flusher.Retries > 0 {
			break
		}
		select {
		case err := <-errc:
			t.Fatalf("a writer failed while the remote was down: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("writers never blocked: %+v", st)
		}
		time.Sleep(time.Millisecond)
	}
	st := d.Stats()
	mu.Lock()
	accepted := done
	mu.Unlock()
	if st.Flusher.State != replicate.StateRetrying || st.Flusher.Batches != 0 {
		t.Fatalf("flusher while the remote is down: %+v", st.Flusher)
	}
	if limit := int(o.Journal.MaxPendingBytes) / (chunk + journal.IndexSize); accepted > limit {
		t.Fatalf("%d writes acknowledged with the remote down, the cap allows %d", accepted, limit)
	}
	if seq, _ := r.Sequence(ctx); seq != 0 || !bytediff.Zero(r.Bytes()) {
		t.Fatal("the blob changed while the remote was down")
	}
	t.Logf("remote down: %d of %d writes acknowledged, %d writers blocked, %d pending bytes (cap %d), %d retries",
		accepted, writers*perWriter, st.Journal.BlockedWriters, st.Journal.PendingBytes, o.Journal.MaxPendingBytes, st.Flusher.Retries)

	f.setDown(false)
	all := make(chan struct{})
	go func() { wg.Wait(); close(all) }()
	select {
	case <-all:
	case <-time.After(30 * time.Second):
		t.Fatalf("writers still blocked after the remote returned: %+v", d.Stats())
	}
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for w := 0; w < writers; w++ {
		for i := 0; i < perWriter; i++ {
			copy(want[backpressureOffset(w, i):], backpressurePayload(w, i))
		}
	}
	if i := bytediff.First(r.Bytes()[:size], want); i >= 0 {
		t.Fatalf("blob differs from the writes at byte %d", i)
	}
	if i := bytediff.First(readImage(t, dir), want); i >= 0 {
		t.Fatalf("image differs from the writes at byte %d", i)
	}
}

// Each writer owns 64 KiB and overwrites its 4 KiB chunks in turn.
func backpressureOffset(w, i int) int64 { return int64(w)*(64<<10) + int64(i%16)*4096 }

func backpressurePayload(w, i int) []byte {
	p := make([]byte, 4096)
	for k := range p {
		p[k] = byte(w*67 + i*13 + k%251 + 1)
	}
	return p
}

// TestFlusherWaitsForImageWrites: a record must be in the local image
// before the flusher reads its batch (an image-backed record's payload is
// the image) and before it syncs the image and deletes the record, even
// when the writer's image write comes late (the writer goroutine
// descheduled between its journal append and its pwrite). Otherwise a
// kill -9 right then, or a power loss before the next image sync, leaves
// the write on the blob but in neither the journal nor the image, or the
// blob gets what the image held before. The writer here kicks the flusher
// once its record is committed and gives it the chance to send (it must
// not) before it writes the image.
func TestFlusherWaitsForImageWrites(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	j, err := journal.Open(propBaseDir(t), journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	r := remote.NewMemRemote(64 << 10)
	onBlob := make(chan struct{})
	var mu sync.Mutex
	image := make([]byte, 4096)
	early := make(chan bool, 1) // whether the image lacked the write when the blob got it
	r.Observe = func(_ []byte, seq int64) {
		if seq == 2 {
			mu.Lock()
			early <- image[0] != 0xAB
			mu.Unlock()
			close(onBlob)
		}
	}
	synced := make(chan bool, 1) // whether the image held the write at the sync
	f := replicate.NewFlusher(j, replicate.NewSender(r, "", 0, replicate.SenderOptions{}), replicate.FlusherOptions{Linger: time.Millisecond, SyncImage: func() error {
		mu.Lock()
		ok := image[0] == 0xAB
		mu.Unlock()
		select {
		case synced <- ok:
		default:
		}
		return nil
	}})
	runErr := make(chan error, 1)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		runErr <- f.Run(ctx)
	}()
	defer func() {
		cancel()
		<-stopped
		j.Close()
	}()

	rec := journal.Record{Offset: 0, Length: 4096, Kind: journal.KindData, Data: bytes.Repeat([]byte{0xAB}, 4096)}
	applyErr := make(chan error, 1)
	go func() {
		applyErr <- j.AppendApply(ctx, &rec, func() error {
			f.Kick() // the record is committed
			// A send or an image sync now would be too early; give them
			// the chance to happen (they must not).
			select {
			case <-onBlob:
			case ok := <-synced:
				synced <- ok
			case <-time.After(200 * time.Millisecond):
			}
			mu.Lock()
			copy(image, rec.Data)
			mu.Unlock()
			return nil
		})
	}()
	if err := <-applyErr; err != nil {
		t.Fatal(err)
	}
	select {
	case bad := <-early:
		if bad {
			t.Fatal("the flusher sent the record before it was written to the image")
		}
	case err := <-runErr:
		t.Fatalf("flusher stopped: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("the record never reached the blob")
	}
	select {
	case ok := <-synced:
		if !ok {
			t.Fatal("the flusher synced the image (and went on to delete the record) before the record was written to it")
		}
	case err := <-runErr:
		t.Fatalf("flusher stopped: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("the flusher never synced the image")
	}
}

// delayingRemote holds back some Put Page and Clear Pages requests, as a
// network that delays a request after the client gave up on it: the
// caller sees a transient error, and the request can be delivered later.
type delayingRemote struct {
	*remote.MemRemote
	mu    sync.Mutex
	calls int
	held  []func() error
}

func (d *delayingRemote) hold(deliver func() error) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls++
	if d.calls%3 != 0 {
		return false
	}
	d.held = append(d.held, deliver)
	return true
}

func copyCond(c remote.Cond) remote.Cond {
	if c.IfSequenceEq != nil {
		v := *c.IfSequenceEq
		c.IfSequenceEq = &v
	}
	return c
}

func (d *delayingRemote) PutPages(ctx context.Context, off int64, data remote.Pages, c remote.Cond) error {
	data2, c2 := remote.Pages{data.Bytes()}, copyCond(c)
	if d.hold(func() error { return d.MemRemote.PutPages(ctx, off, data2, c2) }) {
		return &remote.TransientError{Msg: "injected: timed out (the request is still in the network)"}
	}
	return d.MemRemote.PutPages(ctx, off, data, c)
}

func (d *delayingRemote) ClearPages(ctx context.Context, off, n int64, c remote.Cond) error {
	c2 := copyCond(c)
	if d.hold(func() error { return d.MemRemote.ClearPages(ctx, off, n, c2) }) {
		return &remote.TransientError{Msg: "injected: timed out (the request is still in the network)"}
	}
	return d.MemRemote.ClearPages(ctx, off, n, c)
}

// TestDelayedRequestsAreFenced: every Put Page and Clear Pages carries the
// lease and a sequence-number fence, so a request delayed in the network
// and delivered after its batch completed is refused and cannot overwrite
// newer data.
func TestDelayedRequestsAreFenced(t *testing.T) {
	ctx := context.Background()
	const size = 128 << 10
	dir := propBaseDir(t)
	r := &delayingRemote{MemRemote: remote.NewMemRemote(size + 512)}
	o := DiskOptions{}
	o.Journal.MaxEpochBytes = 8 << 10
	o.Flusher.MaxBatchBytes = 32 << 10
	o.Flusher.Linger = 200 * time.Microsecond
	d := propOpenDisk(t, dir, size, r, o)
	defer d.Close(ctx, false)
	for i := 0; i < 120; i++ {
		// Rewrite the same 16 KiB over and over, so a late request would
		// put old data over new.
		off := int64(i%8) * 2048
		var err error
		switch i % 10 {
		case 3:
			err = d.Zero(ctx, off, 4096, i%20 == 3)
		case 7:
			err = d.Flush()
		default:
			err = d.WriteAt(ctx, bytes.Repeat([]byte{byte(i + 1)}, 4096), off)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	want := r.Bytes()
	r.mu.Lock()
	held := r.held
	r.mu.Unlock()
	if len(held) == 0 {
		t.Fatal("no request was delayed")
	}
	for k, deliver := range held {
		if err := deliver(); !errors.Is(err, remote.ErrMemCondition) {
			t.Fatalf("delayed request %d of %d delivered after its batch: %v, want the fence to refuse it", k, len(held), err)
		}
	}
	if !bytes.Equal(r.Bytes(), want) {
		t.Fatal("a delayed request changed the blob")
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	if i := bytediff.First(readImage(t, dir), want[:size]); i >= 0 {
		t.Fatalf("blob and image differ at byte %d", i)
	}
	t.Logf("%d delayed requests refused", len(held))
}

// TestWriteZerosChunked: the fallback of punch for file systems without
// hole punching zeroes exactly the range, with a bounded buffer.
func TestWriteZerosChunked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img")
	const size = 5<<20 + 3*journal.SectorSize
	want := bytes.Repeat([]byte{0x5A}, size)
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	off, n := int64(journal.SectorSize), int64(3<<20+journal.SectorSize)
	if err := writeZeros(f, off, n); err != nil {
		t.Fatal(err)
	}
	clear(want[off : off+n])
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if i := bytediff.First(got, want); i >= 0 {
		t.Fatalf("differs at byte %d", i)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if err := writeZeros(f, 0, 16<<20); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > 4<<20 {
		t.Fatalf("zeroing 16 MiB allocated %d bytes", d)
	}
}
