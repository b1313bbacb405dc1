package crashcheck

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
)

// memDisk is an in-memory Disk.
type memDisk struct {
	mu   sync.Mutex
	data []byte
	fail error
}

func newMemDisk(sectors int) *memDisk { return &memDisk{data: make([]byte, sectors*SectorSize)} }

func (m *memDisk) Size() int64 { return int64(len(m.data)) }
func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}
func (m *memDisk) WriteAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return m.fail
	}
	copy(m.data[off:], p)
	return nil
}
func (m *memDisk) Zero(_ context.Context, off, n int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}
func (m *memDisk) Flush() error { return nil }

// sector returns one sector filled with b.
func sector(b byte) []byte { return bytes.Repeat([]byte{b}, SectorSize) }

// image builds a copy of a disk of len(vals) sectors, sector i filled with
// vals[i] (0: zeros).
func image(vals ...byte) []byte {
	var out []byte
	for _, v := range vals {
		out = append(out, sector(v)...)
	}
	return out
}

func mustWrite(t *testing.T, r *Recorder, sec int, b byte) {
	t.Helper()
	if err := r.WriteAt(context.Background(), sector(b), int64(sec)*SectorSize); err != nil {
		t.Fatal(err)
	}
}

func mustFsync(t *testing.T, r *Recorder) {
	t.Helper()
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
}

func mustStream(t *testing.T, r *Recorder) *Stream {
	t.Helper()
	if err := r.Err(); err != nil {
		t.Fatal(err)
	}
	s, err := r.Stream()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestCheckSequential: A to sector 0, fsync 1, B to sector 1, fsync 2, C
// to sector 0 (no fsync after it). Which copies are legal.
func TestCheckSequential(t *testing.T) {
	r := NewRecorder(newMemDisk(3))
	mustWrite(t, r, 0, 'A')
	mustFsync(t, r)
	mustWrite(t, r, 1, 'B')
	mustFsync(t, r)
	mustWrite(t, r, 0, 'C')
	end := r.Now()
	s := mustStream(t, r)
	if got := len(s.Barriers()); got != 3 {
		t.Fatalf("%d barriers, want 3 (initial + 2 fsyncs)", got)
	}
	for _, c := range []struct {
		name   string
		img    []byte
		legal  bool
		lo, hi int
	}{
		{"nothing yet", image(0, 0, 0), true, 0, 0},
		{"A landed before its fsync returned", image('A', 0, 0), true, 0, 1},
		{"A and B", image('A', 'B', 0), true, 1, 2},
		{"B without A: B was written after fsync 1 returned", image(0, 'B', 0), false, 0, 0},
		{"C and B", image('C', 'B', 0), true, 2, 2},
		{"C without B: C was written after fsync 2 returned", image('C', 0, 0), false, 0, 0},
		{"a value nobody wrote", image('A', 'B', 'X'), false, 0, 0},
		{"B where A was written", image('B', 0, 0), false, 0, 0},
	} {
		v := s.Check(SectorHashes(c.img), end)
		if v.Legal != c.legal || (c.legal && (v.Lo != c.lo || v.Hi != c.hi)) {
			t.Errorf("%s: %+v, want legal %v barriers %d..%d", c.name, v, c.legal, c.lo, c.hi)
		}
		if !v.Legal && v.Reason == "" {
			t.Errorf("%s: illegal without a reason", c.name)
		}
	}
	// A copy taken before B was written cannot hold B.
	r2 := NewRecorder(newMemDisk(2))
	mustWrite(t, r2, 0, 'A')
	mustFsync(t, r2)
	taken := r2.Now()
	mustWrite(t, r2, 1, 'B')
	s2 := mustStream(t, r2)
	if v := s2.Check(SectorHashes(image('A', 'B')), taken); v.Legal {
		t.Errorf("a copy taken before B was written holds B: %+v", v)
	}
	if v := s2.Check(SectorHashes(image('A', 0)), taken); !v.Legal || v.Possible != 2 {
		t.Errorf("A at fsync 1: %+v", v)
	}
}

// TestCheckReplacedValue: P then Q to sector 0 (Q started after P was
// acknowledged), X to sector 1, fsync 1, then Y to sector 2 after fsync 1
// returned, fsync 2. A copy holding Y must be at barrier >= 1, where
// sector 0 must hold Q: P there is illegal, however the barriers fall.
func TestCheckReplacedValue(t *testing.T) {
	r := NewRecorder(newMemDisk(3))
	mustWrite(t, r, 1, 'X')
	mustWrite(t, r, 0, 'P')
	mustWrite(t, r, 0, 'Q')
	mustFsync(t, r)
	mustWrite(t, r, 2, 'Y')
	mustFsync(t, r)
	s := mustStream(t, r)
	end := r.Now()
	if v := s.Check(SectorHashes(image('P', 'X', 'Y')), end); v.Legal {
		t.Errorf("P, replaced by Q before fsync 1, survived next to Y from after it: %+v", v)
	} else if !strings.Contains(v.Reason, "needs barrier") {
		t.Errorf("reason does not name the conflicting sectors: %s", v.Reason)
	}
	if v := s.Check(SectorHashes(image('P', 'X', 0)), end); !v.Legal || v.Lo != 0 || v.Hi != 0 {
		t.Errorf("P and X before fsync 1 (a subset of its epoch): %+v", v)
	}
	if v := s.Check(SectorHashes(image('Q', 'X', 'Y')), end); !v.Legal || v.Lo != 1 || v.Hi != 2 {
		t.Errorf("everything: %+v", v)
	}
}

// TestCheckConcurrent: two writes to one sector in flight at once may land
// in either order; the copy may hold either after the fsync.
func TestCheckConcurrent(t *testing.T) {
	d := newMemDisk(2)
	r := NewRecorder(d)
	// Interleave by hand: both start before either is acknowledged.
	s1 := r.Now()
	s2 := r.Now()
	a1 := r.Now()
	a2 := r.Now()
	r.mu.Lock()
	r.ops = append(r.ops,
		op{start: s1, ack: a1, off: 0, n: SectorSize, data: sector('A')},
		op{start: s2, ack: a2, off: 0, n: SectorSize, data: sector('B')})
	r.mu.Unlock()
	mustFsync(t, r)
	mustWrite(t, r, 1, 'Z')
	mustFsync(t, r)
	s := mustStream(t, r)
	for _, img := range [][]byte{image('A', 'Z'), image('B', 'Z')} {
		if v := s.Check(SectorHashes(img), r.Now()); !v.Legal || v.Lo != 1 {
			t.Errorf("%q after fsync 1: %+v", img[0], v)
		}
	}
}

// TestCheckDiscard: a discard zeroes the whole sectors inside its range.
func TestCheckDiscard(t *testing.T) {
	r := NewRecorder(newMemDisk(4))
	for i := range 4 {
		mustWrite(t, r, i, 'D')
	}
	mustFsync(t, r)
	// Bytes 100..(3*512+100): sectors 1 and 2 only.
	if err := r.Zero(context.Background(), 100, 3*SectorSize, true); err != nil {
		t.Fatal(err)
	}
	mustFsync(t, r)
	mustWrite(t, r, 3, 'E')
	s := mustStream(t, r)
	end := r.Now()
	if v := s.Check(SectorHashes(image('D', 0, 0, 'E')), end); !v.Legal || v.Lo != 2 {
		t.Errorf("after the discard: %+v", v)
	}
	if v := s.Check(SectorHashes(image('D', 0, 'D', 'D')), end); !v.Legal {
		t.Errorf("part of the discard landed before its fsync: %+v", v)
	}
	if v := s.Check(SectorHashes(image(0, 0, 0, 'E')), end); v.Legal {
		t.Errorf("sector 0 outside the discard read as zeros: %+v", v)
	}
	if v := s.Check(SectorHashes(image('D', 'D', 0, 'E')), end); v.Legal {
		t.Errorf("E from after fsync 2 with the discard before it missing: %+v", v)
	}
	var got [][]byte
	var changes [][]Extent
	if err := s.ImagesAt([]int{0, 1, 2}, func(_ int, img []byte, changed []Extent) error {
		got = append(got, bytes.Clone(img))
		changes = append(changes, slices.Clone(changed))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	want := [][]byte{image(0, 0, 0, 0), image('D', 'D', 'D', 'D'), image('D', 0, 0, 'D')}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Errorf("image at barrier %d differs", i)
		}
	}
	wantChanges := [][]Extent{nil, {{0, 4 * SectorSize}}, {{SectorSize, 2 * SectorSize}}}
	for i := range wantChanges {
		if !slices.Equal(changes[i], wantChanges[i]) {
			t.Errorf("changed at barrier %d: %v, want %v", i, changes[i], wantChanges[i])
		}
	}
	if !bytes.Equal(s.Final(), image('D', 0, 0, 'E')) {
		t.Error("final image differs")
	}
}

// TestRecorderErrors: failed and unaligned operations are reported.
func TestRecorderErrors(t *testing.T) {
	d := newMemDisk(2)
	r := NewRecorder(d)
	if err := r.WriteAt(context.Background(), []byte("abc"), 10); err != nil {
		t.Fatal(err)
	}
	if err := r.Err(); err == nil || !strings.Contains(err.Error(), "not sector-aligned") {
		t.Errorf("unaligned write: %v", err)
	}
	r = NewRecorder(d)
	d.fail = errors.New("boom")
	if err := r.WriteAt(context.Background(), sector('A'), 0); err == nil {
		t.Fatal("the disk's error was not passed on")
	}
	if err := r.Err(); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("failed write: %v", err)
	}
}

// TestRegressions: a copy that can only be older than one before it.
func TestRegressions(t *testing.T) {
	vs := []Verdict{{Legal: true, Lo: 1, Hi: 3}, {Legal: true, Lo: 4, Hi: 5}, {Legal: true, Lo: 0, Hi: 2}, {Legal: true, Lo: 5, Hi: 6}}
	if n := Regressions(vs); n != 1 {
		t.Errorf("%d regressions, want 1", n)
	}
}
