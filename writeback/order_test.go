package writeback

// Property tests of invariant 3 (order) against the in-memory page blob.
//
// The writer is one goroutine, so the journal's records come in a known
// order. The model numbers them: step t is the t-th record (WriteAt is one
// record; Zero is up to three, mirrored from Disk.Zero: head edge, tail
// edge, then the aligned middle), and M_t is the disk after step t (M_0 is
// all zeros). Every Flush is a writer barrier at step t_b; right after it
// returns, the journal's closed epoch e_b is read: with one writer and no
// append in flight, nothing can close another epoch before the next step,
// so every step <= t_b is in an epoch <= e_b and every later one in an
// epoch > e_b.
//
// The flusher closes more epochs than the writer asks for (linger,
// MaxEpochBytes), at points the test does not know, and remote.MemRemote.Observe
// shows every state the blob passes through. From the flusher's contract
// (batches of whole epochs, one at a time, the sequence number raised to
// 2*last-1 before a multi-epoch batch and to 2*last when a batch is
// complete) and invariant 3, the test derives what each state may be. Let
// c(e) be the step that ends epoch e. Then:
//
//   - Complete states. When the sequence number becomes an even 2e, the
//     blob is exactly M_c for one step c: a consistent point. c must
//     satisfy c >= t_b for every barrier with e_b <= e and c <= t_b for
//     every barrier with e_b >= e (so c = t_b when e = e_b), and c is not
//     below the previous complete state's step: the blob never goes back.
//   - In-progress states (every state between two complete ones P and N):
//     each 512-byte sector holds its value in P or its value in N; nothing
//     older than P, nothing from after N, and no value written in between
//     and overwritten before N (coalescing: last write wins per batch).
//   - With an odd sequence number, that number is N's minus one: the mark
//     names the batch that completes next.
//   - With an even sequence number (no mark), the batch is a single epoch,
//     N's number is P's plus 2, and there is no writer barrier strictly
//     between P's step and N's step. This is invariant 3 at the writer's
//     level: an unmarked blob never holds a write from after a barrier
//     while missing one from before it. It is also why "even" does not mean
//     "exactly M_t" while a single-epoch batch is in flight: the blob is
//     then the disk at barrier P plus a subset of one epoch, which is what a
//     disk may show after a power cut, but not necessarily any M_t.
//   - The sequence number never falls, and after a clean drain it is
//     2 * the journal's last closed epoch, with the blob and the local
//     image equal to the model.
//
// The crash test reuses the checker; for the one segment that contains
// the crash (a batch cut short, then resent by the next process, possibly
// merged with later epochs) a sector may hold any value it had between P
// and N.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/bytediff"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
	"pgregory.net/rapid"
)

// propT is what the helpers need of *testing.T and *rapid.T.
type propT interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
}

// secTable interns 512-byte sector contents as small integers, so states of
// the blob and of the model compare cheaply. Id 0 is the zero sector.
type secTable struct {
	mu  sync.Mutex
	ids map[string]int32
}

func newSecTable() *secTable {
	t := &secTable{ids: map[string]int32{}}
	t.ids[string(make([]byte, journal.SectorSize))] = 0
	return t
}

func (t *secTable) id(b []byte) int32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if id, ok := t.ids[string(b)]; ok {
		return id
	}
	id := int32(len(t.ids))
	t.ids[string(b)] = id
	return id
}

func hashIDs(ids []int32) uint64 {
	h := uint64(14695981039346656037)
	for _, v := range ids {
		h ^= uint64(uint32(v))
		h *= 1099511628211
	}
	return h
}

// barrierPoint is a writer barrier: Flush returned after step steps, and
// closed journal epoch epoch.
type barrierPoint struct {
	step  int
	epoch uint64
}

// diskModel is the writer's view of the disk, step by step.
type diskModel struct {
	tab      *secTable
	bytes    []byte
	steps    [][]int32 // steps[t]: sector ids after step t
	hashes   []uint64
	barriers []barrierPoint
}

func newDiskModel(tab *secTable, size int64) *diskModel {
	m := &diskModel{tab: tab, bytes: make([]byte, size)}
	ids := make([]int32, size/journal.SectorSize)
	m.steps = [][]int32{ids}
	m.hashes = []uint64{hashIDs(ids)}
	return m
}

// record applies one journal record's effect on [off, off+len(p)) (p nil
// for a zero range of n bytes) and adds a step.
func (m *diskModel) record(off int64, p []byte, n int64) {
	if p != nil {
		copy(m.bytes[off:], p)
		n = int64(len(p))
	} else {
		clear(m.bytes[off : off+n])
	}
	ids := slices.Clone(m.steps[len(m.steps)-1])
	for s := off / journal.SectorSize; s*journal.SectorSize < off+n; s++ {
		ids[s] = m.tab.id(m.bytes[s*journal.SectorSize : (s+1)*journal.SectorSize])
	}
	m.steps = append(m.steps, ids)
	m.hashes = append(m.hashes, hashIDs(ids))
}

func (m *diskModel) last() int { return len(m.steps) - 1 }

// cutRange bounds the step that ends epoch e, from the barriers.
func (m *diskModel) cutRange(e uint64) (lo, hi int) {
	lo, hi = 0, m.last()
	for _, b := range m.barriers {
		if e >= b.epoch {
			lo = max(lo, b.step)
		}
		if e <= b.epoch {
			hi = min(hi, b.step)
		}
	}
	return lo, hi
}

// find returns the steps in [lo, hi] whose state is ids.
func (m *diskModel) find(ids []int32, lo, hi int) []int {
	h := hashIDs(ids)
	var out []int
	for t := lo; t <= hi && t < len(m.steps); t++ {
		if m.hashes[t] == h && slices.Equal(m.steps[t], ids) {
			out = append(out, t)
		}
	}
	return out
}

// barrierBetween reports whether a writer barrier lies strictly between
// steps a and c.
func (m *diskModel) barrierBetween(a, c int) bool {
	for _, b := range m.barriers {
		if a < b.step && b.step < c {
			return true
		}
	}
	return false
}

// writer names the step that last gave sector x the value v at or before
// step hi, for messages.
func (m *diskModel) writer(x int, v int32, hi int) string {
	for t := min(hi, m.last()); t >= 0; t-- {
		if m.steps[t][x] == v {
			for t > 0 && m.steps[t-1][x] == v {
				t--
			}
			return fmt.Sprintf("its value after step %d", t)
		}
	}
	for t := hi + 1; t < len(m.steps); t++ {
		if m.steps[t][x] == v {
			return fmt.Sprintf("a value first written by step %d", t)
		}
	}
	return "a value the writer never wrote"
}

// blobState is one state remote.MemRemote.Observe showed.
type blobState struct {
	seq int64
	ids []int32
}

// blobObserver records every state of the blob's first size bytes.
type blobObserver struct {
	tab     *secTable
	mu      sync.Mutex
	prev    []byte
	cur     []int32
	states  []blobState
	lastSeq int64
	errs    []string
}

func newBlobObserver(tab *secTable, size int64) *blobObserver {
	return &blobObserver{tab: tab, prev: make([]byte, size), cur: make([]int32, size/journal.SectorSize)}
}

// observe is remote.MemRemote.Observe: it runs under the remote's lock.
func (o *blobObserver) observe(data []byte, seq int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if seq < o.lastSeq {
		o.errs = append(o.errs, fmt.Sprintf("sequence number fell from %d to %d", o.lastSeq, seq))
	}
	o.lastSeq = seq
	for s := range o.cur {
		a, b := o.prev[s*journal.SectorSize:(s+1)*journal.SectorSize], data[s*journal.SectorSize:(s+1)*journal.SectorSize]
		if !bytes.Equal(a, b) {
			copy(a, b)
			o.cur[s] = o.tab.id(b)
		}
	}
	o.states = append(o.states, blobState{seq: seq, ids: slices.Clone(o.cur)})
}

func (o *blobObserver) snapshot() ([]blobState, []string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.states), slices.Clone(o.errs)
}

// orderStats counts what checkOrder looked at.
type orderStats struct {
	states, complete, marked, unmarked, crashSegment int
}

func (s *orderStats) add(o orderStats) {
	s.states += o.states
	s.complete += o.complete
	s.marked += o.marked
	s.unmarked += o.unmarked
	s.crashSegment += o.crashSegment
}

// checkOrder checks states against the model (see the comment at the top
// of this file). The blob starts at sequence number 0, all zeros. crash is
// the number of states observed before the crash (-1 for none).
//
// A batch preempted for a superset (replicate's Flusher.preempt) is such a
// segment too: its odd mark names the batch that was stopped, not the
// superset that completes the segment, and every sector holds a value it
// had between the two complete states. Segments whose odd marks all name
// the batch completing them keep the strict rule.
func checkOrder(m *diskModel, states []blobState, crash int) (orderStats, error) {
	return checkOrderRelaxed(m, states, crash, 0)
}

// checkOrderRelaxed is checkOrder for the staged transfer after a daemon
// restart: from state relaxFrom on, a segment whose in-progress mark does
// not name the batch that completes it (the worker marked a segment staged
// before the restart, was killed, and the next worker applied a segment
// restaged over it) gets the crash segment's rule: every sector holds a
// value it had between the two complete states.
func checkOrderRelaxed(m *diskModel, states []blobState, crash, relaxFrom int) (orderStats, error) {
	var st orderStats
	type complete struct {
		seq   int64
		ids   []int32
		cands []int
	}
	prev := complete{seq: 0, ids: m.steps[0], cands: []int{0}}
	segStart := 0
	for i, s := range states {
		st.states++
		if s.seq < prev.seq {
			return st, fmt.Errorf("state %d: sequence number %d below the last complete %d", i, s.seq, prev.seq)
		}
		if s.seq%2 == 1 || s.seq == prev.seq {
			continue
		}
		// The sequence number became even: a batch is complete.
		st.complete++
		e := uint64(s.seq / 2)
		lo, hi := m.cutRange(e)
		lo = max(lo, prev.cands[0])
		cands := m.find(s.ids, lo, hi)
		if len(cands) == 0 {
			return st, fmt.Errorf("state %d: the batch completing epoch %d (sequence number %d) left the blob equal to no step in [%d, %d] (%s)",
				i, e, s.seq, lo, hi, describeDiff(m, s.ids, lo, hi))
		}
		next := complete{seq: s.seq, ids: s.ids, cands: cands}
		// The crash falls in this segment if a state of it was observed
		// before the crash and the state completing it after.
		crashed := segStart < crash && crash <= i
		if relaxFrom >= 0 && i >= relaxFrom {
			for k := segStart; k < i && !crashed; k++ {
				crashed = states[k].seq%2 == 1 && states[k].seq != next.seq-1
			}
		}
		for k := segStart; k < i; k++ {
			p := states[k]
			if crashed {
				st.crashSegment++
				if p.seq%2 == 0 && p.seq != prev.seq || p.seq >= next.seq {
					return st, fmt.Errorf("state %d: sequence number %d between complete %d and %d", k, p.seq, prev.seq, next.seq)
				}
				a, c := prev.cands[0], next.cands[len(next.cands)-1]
				for x, v := range p.ids {
					ok := false
					for t := a; t <= c && !ok; t++ {
						ok = m.steps[t][x] == v
					}
					if !ok {
						return st, fmt.Errorf("state %d (sequence number %d, across the crash): sector %d holds %s, not a value it had in steps [%d, %d]",
							k, p.seq, x, m.writer(x, v, c), a, c)
					}
				}
				continue
			}
			if p.seq%2 == 1 {
				st.marked++
				if p.seq != next.seq-1 {
					return st, fmt.Errorf("state %d: in-progress mark %d, but the batch completed at %d", k, p.seq, next.seq)
				}
			} else {
				st.unmarked++
				if next.seq != prev.seq+2 {
					return st, fmt.Errorf("state %d: blob changed under the even sequence number %d by a batch that completed at %d (more than one epoch, unmarked)", k, p.seq, next.seq)
				}
			}
			mixed := false
			for x, v := range p.ids {
				switch v {
				case prev.ids[x], next.ids[x]:
					if v != prev.ids[x] {
						mixed = true
					}
				default:
					return st, fmt.Errorf("state %d (sequence number %d): sector %d holds %s, neither its value in the complete state at sequence number %d (step %d) nor in the next at %d (step %d)",
						k, p.seq, x, m.writer(x, v, next.cands[0]), prev.seq, prev.cands[0], next.seq, next.cands[0])
				}
			}
			if p.seq%2 == 0 && mixed && !slices.Equal(p.ids, next.ids) {
				ok := false
				for _, c := range next.cands {
					a := -1
					for _, x := range prev.cands {
						if x <= c {
							a = x
						}
					}
					if a >= 0 && !m.barrierBetween(a, c) {
						ok = true
						break
					}
				}
				if !ok {
					return st, fmt.Errorf("state %d (even sequence number %d): the blob mixes steps %v and %v across a writer barrier", k, p.seq, prev.cands, next.cands)
				}
			}
		}
		prev, segStart = next, i+1
	}
	for k := segStart; k < len(states); k++ {
		if !slices.Equal(states[k].ids, prev.ids) {
			return st, fmt.Errorf("state %d (sequence number %d): the blob changed after the last complete batch and no batch completed it", k, states[k].seq)
		}
	}
	return st, nil
}

func describeDiff(m *diskModel, ids []int32, lo, hi int) string {
	best, bestN := -1, len(ids)+1
	for t := lo; t <= hi && t < len(m.steps); t++ {
		n := 0
		for x := range ids {
			if ids[x] != m.steps[t][x] {
				n++
			}
		}
		if n < bestN {
			best, bestN = t, n
		}
	}
	if best < 0 {
		return "empty range"
	}
	for x := range ids {
		if ids[x] != m.steps[best][x] {
			return fmt.Sprintf("closest is step %d with %d sectors different; sector %d holds %s", best, bestN, x, m.writer(x, ids[x], hi))
		}
	}
	return fmt.Sprintf("step %d", best)
}

// Workload operations.

type opKind int

const (
	opWrite opKind = iota
	opZero
	opDiscard
	opFlush
	opRead
)

func (k opKind) String() string {
	return [...]string{"write", "zero", "discard", "flush", "read"}[k]
}

type fillKind int

const (
	fillRandom fillKind = iota
	fillZero
	fillHoley // random with a zero run in the middle (and zero sectors)
)

type diskOp struct {
	Kind   opKind
	Off, N int64
	Fill   fillKind
	Seed   uint64
}

func (o diskOp) String() string {
	if o.Kind == opFlush {
		return "flush"
	}
	return fmt.Sprintf("%s %d+%d fill %d seed %d", o.Kind, o.Off, o.N, o.Fill, o.Seed)
}

// GoString makes rapid's logs of drawn ops readable.
func (o diskOp) GoString() string { return "{" + o.String() + "}" }

// payload is the op's data; i (the op's index) makes every op's bytes
// distinct even when rapid draws equal seeds.
func (o diskOp) payload(i int) []byte {
	p := make([]byte, o.N)
	if o.Fill == fillZero {
		return p
	}
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], o.Seed)
	binary.LittleEndian.PutUint64(key[8:], uint64(i))
	rand.NewChaCha8(key).Read(p)
	if o.Fill == fillHoley {
		clear(p[len(p)/4 : 3*len(p)/4])
		for k := 0; k+journal.SectorSize <= len(p); k += 7 * journal.SectorSize {
			clear(p[k : k+journal.SectorSize])
		}
	}
	return p
}

// genOp draws one operation on a disk of size bytes.
func genOp(size, maxLen int64, kinds []opKind) *rapid.Generator[diskOp] {
	return rapid.Custom(func(t *rapid.T) diskOp {
		o := diskOp{Kind: rapid.SampledFrom(kinds).Draw(t, "kind")}
		if o.Kind == opFlush {
			return o
		}
		aligned := rapid.Bool().Draw(t, "aligned")
		var n int64
		switch rapid.IntRange(0, 2).Draw(t, "lenClass") {
		case 0:
			n = rapid.Int64Range(1, 4096).Draw(t, "n")
		case 1:
			n = rapid.Int64Range(4097, 64<<10).Draw(t, "n")
		default:
			n = rapid.Int64Range(64<<10+1, maxLen).Draw(t, "n")
		}
		n = min(n, size, maxLen)
		if aligned {
			n = max(journal.SectorSize, n&^(journal.SectorSize-1))
		}
		o.Off = rapid.Int64Range(0, size-n).Draw(t, "off")
		if aligned {
			o.Off &^= journal.SectorSize - 1
		}
		o.N = n
		if o.Kind == opWrite {
			o.Fill = rapid.SampledFrom([]fillKind{fillRandom, fillRandom, fillZero, fillHoley}).Draw(t, "fill")
			o.Seed = rapid.Uint64().Draw(t, "seed")
		}
		return o
	})
}

var defaultKinds = []opKind{opWrite, opWrite, opWrite, opWrite, opWrite, opZero, opDiscard, opFlush, opFlush, opRead}

// apply runs op i on d and, once it is acknowledged, on the model. Flush
// records the barrier with the epoch it closed.
func (m *diskModel) apply(ctx context.Context, d *Disk, i int, o diskOp) error {
	switch o.Kind {
	case opWrite:
		p := o.payload(i)
		if err := d.WriteAt(ctx, p, o.Off); err != nil {
			return err
		}
		m.writeWidened(o.Off, p)
	case opZero, opDiscard:
		discard := o.Kind == opDiscard
		if err := d.Zero(ctx, o.Off, o.N, discard); err != nil {
			return err
		}
		// The records Disk.Zero journals, in its order.
		off, n := o.Off, o.N
		aoff := (off + journal.SectorSize - 1) &^ (journal.SectorSize - 1)
		aend := (off + n) &^ (journal.SectorSize - 1)
		if !discard {
			if aoff > off {
				m.writeWidened(off, make([]byte, min(aoff, off+n)-off))
			}
			if aend < off+n && aend >= aoff {
				m.writeWidened(aend, make([]byte, off+n-aend))
			}
		}
		if aend > aoff {
			m.record(aoff, nil, aend-aoff)
		}
	case opFlush:
		if err := d.Flush(); err != nil {
			return err
		}
		m.barriers = append(m.barriers, barrierPoint{step: m.last(), epoch: d.j.ClosedEpoch()})
	case opRead:
		p := make([]byte, o.N)
		if _, err := d.ReadAt(p, o.Off); err != nil {
			return err
		}
		if !bytes.Equal(p, m.bytes[o.Off:o.Off+o.N]) {
			return fmt.Errorf("read %d+%d: the local image differs from the model", o.Off, o.N)
		}
	}
	return nil
}

// writeWidened is WriteAt's one record: p widened to whole sectors.
func (m *diskModel) writeWidened(off int64, p []byte) {
	aoff := off &^ (journal.SectorSize - 1)
	aend := (off + int64(len(p)) + journal.SectorSize - 1) &^ (journal.SectorSize - 1)
	buf := slices.Clone(m.bytes[aoff:aend])
	copy(buf[off-aoff:], p)
	m.record(aoff, buf, 0)
}

// propOpenDisk opens a Disk on dir (image created on first use).
func propOpenDisk(t propT, dir string, size int64, r remote.Remote, o DiskOptions) *Disk {
	t.Helper()
	img := filepath.Join(dir, "disk.img")
	if _, err := os.Stat(img); os.IsNotExist(err) {
		f, err := os.Create(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	o.ImagePath = img
	o.JournalDir = filepath.Join(dir, "journal")
	o.VirtualSize = size
	o.Remote = r
	if o.Sender.RetryMin == 0 {
		o.Sender.RetryMin = 100 * time.Microsecond
		o.Sender.RetryMax = 2 * time.Millisecond
	}
	d, err := Open(context.Background(), o)
	if err != nil {
		t.Fatalf("open disk: %v", err)
	}
	return d
}

// propTempDir is a directory removed when the rapid case ends. The
// property and crash tests check ordering and recovery logic, not fsync:
// their directories go to a tmpfs (/dev/shm) when there is one, where an
// fsync costs nothing instead of ~10 ms, which lets them run many more
// cases. VHDSYNC_TEST_TMPFS=0 keeps them under $TMPDIR. The kill -9 test
// and the journal tests use the real file system.
func propTempDir(base string, rt *rapid.T) string {
	dir, err := os.MkdirTemp(base, "case")
	if err != nil {
		rt.Fatal(err)
	}
	rt.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// propBaseDir is a temporary directory for one test, on /dev/shm when
// possible (see propTempDir).
func propBaseDir(t *testing.T) string {
	if os.Getenv("VHDSYNC_TEST_TMPFS") != "0" {
		if dir, err := os.MkdirTemp("/dev/shm", "vhdsync-test-"); err == nil {
			t.Cleanup(func() { os.RemoveAll(dir) })
			return dir
		}
	}
	return t.TempDir()
}

// propFinalCheck: after a clean drain, blob, image and model agree and the
// sequence number is 2 * the last closed epoch.
func propFinalCheck(t propT, dir string, r *remote.MemRemote, m *diskModel, closedEpoch uint64) {
	t.Helper()
	size := int64(len(m.bytes))
	img, err := os.ReadFile(filepath.Join(dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	blob := r.Bytes()
	if off := bytediff.First(img, m.bytes); off >= 0 {
		t.Fatalf("local image differs from the model at byte %d", off)
	}
	if off := bytediff.First(blob[:size], m.bytes); off >= 0 {
		t.Fatalf("blob differs from the model at byte %d", off)
	}
	if !bytediff.Zero(blob[size:]) {
		t.Fatal("the blob's footer area was written")
	}
	seq, _ := r.Sequence(context.Background())
	if seq%2 != 0 || uint64(seq) != 2*closedEpoch {
		t.Fatalf("sequence number %d after a clean drain, last closed epoch %d", seq, closedEpoch)
	}
	if r.Lease() != "" {
		t.Fatal("the lease is still held after a clean close")
	}
}

// TestOrderProperty is the main order test: random writes, zero ranges,
// discards and barriers from one writer while the flusher drains with
// small batches, small epochs, a short linger and several workers; every
// state the blob passes through is checked by checkOrder.
func TestOrderProperty(t *testing.T) {
	var total orderStats
	cases, steps, batches, filled, unfilled, preempted := 0, 0, uint64(0), uint64(0), uint64(0), uint64(0)
	captures, binds := uint64(0), uint64(0)
	base := propBaseDir(t)
	rapid.Check(t, func(rt *rapid.T) {
		ctx := context.Background()
		size := rapid.SampledFrom([]int64{128 << 10, 256 << 10, 512 << 10}).Draw(rt, "size")
		nOps := rapid.IntRange(10, 60).Draw(rt, "nOps")
		ops := rapid.SliceOfN(genOp(size, min(size, 320<<10), defaultKinds), nOps, nOps).Draw(rt, "ops")
		o := DiskOptions{}
		o.Journal.MaxEpochBytes = rapid.Int64Range(4<<10, 128<<10).Draw(rt, "maxEpochBytes")
		// rapid favours small numbers: count down from the large end, so that
		// batches often have room for several epochs.
		o.Flusher.MaxBatchBytes = 1<<20 - rapid.Int64Range(0, 1<<20-8<<10).Draw(rt, "maxBatchBytesBelow1MiB")
		// Batches cut at a few ranges (0: the default) while catching up:
		// a cut must never fall inside bound epochs (journal/bind.go).
		o.Flusher.MaxBatchExtents = rapid.IntRange(0, 24).Draw(rt, "maxBatchExtents")
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
		r.Observe = obs.observe
		pacer := newRemoteFault()
		pacer.pace = 3 - rapid.IntRange(0, 3).Draw(rt, "paceBelow3")
		r.Fault = pacer.fault
		d := propOpenDisk(rt, dir, size, r, o)
		rt.Cleanup(func() { pacer.writerDone(); d.Close(ctx, false) })
		for i, op := range ops {
			if err := m.apply(ctx, d, i, op); err != nil {
				rt.Fatalf("op %d (%v): %v", i, op, err)
			}
			pacer.writerStep()
		}
		pacer.writerDone()
		if err := m.apply(ctx, d, len(ops), diskOp{Kind: opFlush}); err != nil {
			rt.Fatal(err)
		}
		closed := d.j.ClosedEpoch()
		if err := d.Drain(ctx); err != nil {
			rt.Fatal(err)
		}
		st := d.Stats()
		if st.Journal.PendingRecords != 0 || st.Journal.PendingBytes != 0 {
			rt.Fatalf("journal not empty after drain: %+v", st.Journal)
		}
		if err := d.Close(ctx, true); err != nil {
			rt.Fatal(err)
		}
		states, errs := obs.snapshot()
		if len(errs) > 0 {
			rt.Fatal(errs[0])
		}
		ost, err := checkOrder(m, states, -1)
		if err != nil {
			rt.Fatalf("%v\nsteps %d, barriers %v", err, m.last(), m.barriers)
		}
		propFinalCheck(rt, dir, r, m, closed)
		cases++
		steps += m.last()
		total.add(ost)
		batches += st.Flusher.Batches
		filled += st.Flusher.FilledBytes
		preempted += st.Flusher.PreemptedBatches
		unfilled += st.Flusher.UnfilledBytes
		captures += st.Journal.Captures
		binds += st.Journal.Binds
	})
	t.Logf("order: %d cases, %d journal records, %d states checked (%d complete batches, %d in progress under an odd mark, %d under an even number), %d flusher batches (%d preempted), %d bytes filled from the image (%d planned fill bytes refused: written since, or holes), %d image-backed records captured, %d writes bound over them",
		cases, steps, total.states, total.complete, total.marked, total.unmarked, batches, preempted, filled, unfilled, captures, binds)
	if cases > 20 && preempted == 0 {
		t.Errorf("no batch was preempted: the test does not exercise preemption")
	}
	if cases > 20 && captures == 0 {
		t.Errorf("no image-backed record was captured: the test does not exercise writes over large pending writes")
	}
	if cases > 20 && binds == 0 {
		t.Errorf("no write was bound over an image-backed record: the test does not exercise bound epochs")
	}
	if cases > 20 && filled == 0 {
		t.Errorf("no Put Page carried clean sectors from the image: the test does not exercise fills")
	}
	if cases > 20 && (total.marked == 0 || total.unmarked == 0) {
		t.Errorf("the workload never produced both kinds of in-progress state (marked %d, unmarked %d): the test is too weak", total.marked, total.unmarked)
	}
}

// TestSequenceRisesAndEndsEven: the blob's sequence number only rises, and
// after a clean drain it is even and 2 * the journal's last closed epoch
// (the flusher's RemoteSequence agrees).
func TestSequenceRisesAndEndsEven(t *testing.T) {
	ctx := context.Background()
	const size = 256 << 10
	for seed := uint64(1); seed <= 3; seed++ {
		dir := propBaseDir(t)
		r := remote.NewMemRemote(size + 512)
		var last, changes atomic.Int64
		var fell atomic.Bool
		r.Observe = func(_ []byte, seq int64) {
			if seq < last.Load() {
				fell.Store(true)
			}
			if seq != last.Load() {
				changes.Add(1)
			}
			last.Store(seq)
		}
		o := DiskOptions{}
		o.Journal.MaxEpochBytes = 16 << 10
		o.Flusher.MaxBatchBytes = 64 << 10
		o.Flusher.Linger = 200 * time.Microsecond
		d := propOpenDisk(t, dir, size, r, o)
		rng := rand.New(rand.NewPCG(seed, 7))
		for i := 0; i < 200; i++ {
			if rng.IntN(8) == 0 {
				if err := d.Flush(); err != nil {
					t.Fatal(err)
				}
				continue
			}
			p := make([]byte, 1+rng.IntN(20000))
			for k := range p {
				p[k] = byte(rng.Uint32())
			}
			if err := d.WriteAt(ctx, p, rng.Int64N(size-int64(len(p)))); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Drain(ctx); err != nil {
			t.Fatal(err)
		}
		closed := d.j.ClosedEpoch()
		fs := d.Stats().Flusher
		if err := d.Close(ctx, true); err != nil {
			t.Fatal(err)
		}
		seq, _ := r.Sequence(ctx)
		if fell.Load() {
			t.Fatal("the sequence number fell")
		}
		if seq%2 != 0 || uint64(seq) != 2*closed || fs.RemoteSequence != seq || fs.RemoteEpoch != closed {
			t.Fatalf("after drain: blob sequence %d, flusher %d/epoch %d, journal closed epoch %d", seq, fs.RemoteSequence, fs.RemoteEpoch, closed)
		}
		if !bytes.Equal(readImage(t, dir), r.Bytes()[:size]) {
			t.Fatal("blob differs from the image after drain")
		}
		t.Logf("seed %d: %d sequence changes, final %d = 2 * epoch %d, %d batches", seed, changes.Load(), seq, closed, fs.Batches)
	}
}

// TestConcurrentOverlappingWritesConverge: several writers hit overlapping
// ranges at once (FUSE delivers writes in parallel); whatever order the
// range lock picks, the journal's order must be the image's order, so the
// blob converges to the image.
func TestConcurrentOverlappingWritesConverge(t *testing.T) {
	ctx := context.Background()
	const size = 128 << 10
	dir := propBaseDir(t)
	r := remote.NewMemRemote(size + 512)
	o := DiskOptions{}
	o.Journal.MaxEpochBytes = 8 << 10
	o.Flusher.MaxBatchBytes = 32 << 10
	o.Flusher.Linger = 100 * time.Microsecond
	d := propOpenDisk(t, dir, size, r, o)
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			for i := 0; i < 150; i++ {
				n := 1 + rng.Int64N(3000)
				off := rng.Int64N(16<<10) + int64(rng.IntN(2))*(size-(20<<10)) // two hot spots
				var err error
				switch rng.IntN(10) {
				case 0:
					err = d.Zero(ctx, off, n, rng.IntN(2) == 0)
				case 1:
					err = d.Flush()
				default:
					p := bytes.Repeat([]byte{byte(w*16 + i%16 + 1)}, int(n))
					err = d.WriteAt(ctx, p, off)
				}
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	if off := bytediff.First(readImage(t, dir), r.Bytes()[:size]); off >= 0 {
		t.Fatalf("blob and image differ at byte %d after concurrent overlapping writes", off)
	}
}
