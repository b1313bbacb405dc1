package points

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/remote"
)

// covers reports whether every byte of want is inside some range of got.
func covers(got []Range, want Range) bool {
	for _, g := range got {
		if g.Off <= want.Off && want.End <= g.End {
			return true
		}
	}
	return false
}

// TestChangesEncodeRoundTrip: a record decodes to the ranges it was made
// of (widened to 512 bytes), merged and sorted.
func TestChangesEncodeRoundTrip(t *testing.T) {
	c := NewChanges()
	c.Add(Range{4096, 8192}, Range{0, 1}, Range{8192, 9000}, Range{1 << 40, 1<<40 + 512}, Range{700, 700})
	want := []Range{{0, 512}, {4096, 9216}, {1 << 40, 1<<40 + 512}}
	if got := c.Ranges(); !slices.Equal(got, want) {
		t.Fatalf("ranges %v, want %v", got, want)
	}
	d, err := DecodeChanges(c.Encode())
	if err != nil {
		t.Fatal(err)
	}
	if got := d.Ranges(); !slices.Equal(got, want) {
		t.Fatalf("decoded %v, want %v", got, want)
	}
	for _, bad := range []string{"", "v2.AAAA", "v1.!!", "v1." + strings.Repeat("A", 10), "incomplete"} {
		if _, err := DecodeChanges(bad); err == nil {
			t.Errorf("DecodeChanges(%q) accepted", bad)
		}
	}
}

// TestChangesCoarsenNeverLoses: many scattered writes, more than the
// memory bound and far more than a metadata value holds, become a coarser
// record that still covers every one of them and fits the budget.
func TestChangesCoarsenNeverLoses(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	c := NewChanges()
	var written []Range
	for range 200_000 {
		off := rng.Int64N(64<<30) &^ 511
		r := Range{off, off + 512*(1+rng.Int64N(8))}
		written = append(written, r)
		c.Add(r)
	}
	enc := c.Encode()
	if len(enc) > changesBudget {
		t.Fatalf("encoded %d bytes, over the budget %d", len(enc), changesBudget)
	}
	d, err := DecodeChanges(enc)
	if err != nil {
		t.Fatal(err)
	}
	got := d.Ranges()
	for _, w := range written {
		if !covers(got, w) {
			t.Fatalf("write %v lost by the record (grain %d, %d ranges)", w, d.Grain(), len(got))
		}
	}
	if len(c.Ranges()) > maxRanges {
		t.Errorf("%d ranges in memory, over %d", len(c.Ranges()), maxRanges)
	}
	t.Logf("200000 writes over 64 GiB: grain %d in memory (%d ranges), %d in the record (%d ranges, %d bytes, %.1f%% of the disk)",
		c.Grain(), len(c.Ranges()), d.Grain(), len(got), len(enc), 100*float64(d.Bytes())/float64(64<<30))
}

// memSnaps is an in-memory Snapshotter whose blob sequence number the
// test sets.
type memSnaps struct {
	mu    sync.Mutex
	seq   int64
	n     int
	snaps []remote.Snapshot
}

func (m *memSnaps) CreateSnapshot(_ context.Context, md map[string]string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.n++
	t := time.Date(2026, 1, 1, 0, 0, m.n, 0, time.UTC)
	id := t.Format(time.RFC3339Nano)
	m.snaps = append(m.snaps, remote.Snapshot{ID: id, Time: t, SequenceNumber: m.seq, Metadata: md})
	return id, nil
}

func (m *memSnaps) ListSnapshots(context.Context) ([]remote.Snapshot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.snaps), nil
}

func (m *memSnaps) DeleteSnapshot(_ context.Context, id, _ string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.snaps = slices.DeleteFunc(m.snaps, func(s remote.Snapshot) bool { return s.ID == id })
	return nil
}

// TestChangesChain: points record what their batches sent; the changes
// between two points are the union of the records after the first; a
// process that begins with the blob past its newest point marks its first
// point incomplete, and a chain through it, or through a deleted point,
// is refused with ErrNoRecord, never answered with fewer ranges.
func TestChangesChain(t *testing.T) {
	ctx := context.Background()
	m := &memSnaps{}
	newRP := func() *RecoveryPoints {
		rp, err := NewRecoveryPoints(m, RecoveryPointsOptions{Interval: time.Nanosecond, Keep: 100})
		if err != nil {
			t.Fatal(err)
		}
		return rp
	}
	// batch sends one range as the flusher would, and completes epoch e.
	batch := func(rp *RecoveryPoints, e uint64, r Range, point bool) {
		rp.Sending(remote.Sequence(m.seq), e, []Range{r})
		m.seq = int64(remote.Complete(e))
		if point {
			rp.AfterBatch(ctx, e)
		}
	}
	list := func() []Point {
		pts, _, err := ListPoints(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		return pts
	}
	rp := newRP()
	batch(rp, 1, Range{0, 4096}, true) // the first point: nothing before it
	batch(rp, 2, Range{1 << 20, 2 << 20}, true)
	batch(rp, 3, Range{8192, 8704}, false) // no point at this boundary
	batch(rp, 4, Range{4 << 20, 5 << 20}, true)
	pts := list()
	if len(pts) != 3 || pts[0].Changes != nil || pts[1].Prev != pts[0].ID || pts[2].Prev != pts[1].ID {
		t.Fatalf("points %+v", pts)
	}
	ch, err := ChangesBetween(pts, pts[0].ID, pts[2].ID)
	if err != nil {
		t.Fatal(err)
	}
	if want := []Range{{1 << 20, 2 << 20}, {4 << 20, 5 << 20}}; !slices.Equal(ch.Ranges(), append([]Range{{8192, 8704}}, want...)) {
		t.Fatalf("changes 0..2 %v", ch.Ranges())
	}
	if ch, err := ChangesBetween(pts, pts[1].ID, pts[1].ID); err != nil || len(ch.Ranges()) != 0 {
		t.Fatalf("a point to itself: %v %v", ch, err)
	}
	if _, err := ChangesBetween(pts, pts[2].ID, pts[0].ID); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("backwards: %v", err)
	}

	// A restart with the blob exactly at the newest point: complete.
	rp = newRP()
	batch(rp, 5, Range{0, 512}, true)
	// A restart after a batch that no point followed (its record lost
	// with the process): the next point is incomplete.
	batch(rp, 6, Range{9 << 20, 10 << 20}, false)
	rp = newRP()
	batch(rp, 7, Range{0, 512}, true)
	batch(rp, 8, Range{0, 512}, true)
	pts = list()
	if len(pts) != 6 || pts[3].Changes == nil || pts[4].Changes != nil || pts[5].Changes == nil {
		t.Fatalf("after restarts: %+v", pts)
	}
	if _, err := ChangesBetween(pts, pts[2].ID, pts[3].ID); err != nil {
		t.Errorf("through a restart at the point: %v", err)
	}
	if _, err := ChangesBetween(pts, pts[2].ID, pts[5].ID); !errors.Is(err, ErrNoRecord) || !strings.Contains(err.Error(), "incomplete") {
		t.Errorf("through the incomplete point: %v", err)
	}
	if _, err := ChangesBetween(pts, pts[4].ID, pts[5].ID); err != nil {
		t.Errorf("after the incomplete point: %v", err)
	}
	// A point deleted between two others breaks the chain; the first one
	// deleted does not.
	m.DeleteSnapshot(ctx, pts[1].ID, "")
	m.DeleteSnapshot(ctx, pts[0].ID, "")
	if _, err := ChangesBetween(list(), pts[0].ID, pts[2].ID); !errors.Is(err, ErrNoRecord) || !strings.Contains(err.Error(), "deleted") {
		t.Errorf("through a deleted point: %v", err)
	}
	if _, err := ChangesBetween(list(), pts[1].ID, pts[3].ID); err != nil {
		t.Errorf("from a deleted point: %v", err)
	}
}

// TestChangesCarried: a stopping process hands its record to the next
// one, which trusts it only if the blob is where it was left (the same
// newest point, the same sequence number when its first batch begins);
// a process that sent nothing hands it on unchanged.
func TestChangesCarried(t *testing.T) {
	ctx := context.Background()
	m := &memSnaps{}
	newRP := func(c *Carried) *RecoveryPoints {
		rp, err := NewRecoveryPoints(m, RecoveryPointsOptions{Interval: time.Nanosecond, Keep: 100, Carried: c})
		if err != nil {
			t.Fatal(err)
		}
		return rp
	}
	batch := func(rp *RecoveryPoints, e uint64, r Range, point bool) {
		rp.Sending(remote.Sequence(m.seq), e, []Range{r})
		m.seq = int64(remote.Complete(e))
		if point {
			rp.AfterBatch(ctx, e)
		}
	}
	newest := func() Point {
		pts, _, err := ListPoints(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		return pts[len(pts)-1]
	}
	rp := newRP(nil)
	batch(rp, 1, Range{0, 512}, true)
	batch(rp, 2, Range{0, 512}, true)
	batch(rp, 3, Range{1 << 20, 2 << 20}, false) // no point: carried
	c, ok := rp.Carry(remote.Sequence(m.seq))
	if !ok || c.Prev != newest().ID || c.Sequence != m.seq {
		t.Fatalf("carry: %+v %v", c, ok)
	}
	// A process that sends nothing hands it on as it is.
	idle := newRP(&c)
	if c2, ok := idle.Carry(remote.Sequence(m.seq)); !ok || c2 != c {
		t.Fatalf("carry of an idle process: %+v %v", c2, ok)
	}
	rp = newRP(&c)
	batch(rp, 4, Range{4 << 20, 5 << 20}, true)
	p := newest()
	if p.Changes == nil || !covers(p.Changes.Ranges(), Range{1 << 20, 2 << 20}) || !covers(p.Changes.Ranges(), Range{4 << 20, 5 << 20}) {
		t.Fatalf("point after a carried record: %+v %v", p, p.Changes)
	}
	// The blob moved on after the carry (another process completed a
	// batch): the record is not trusted.
	batch(rp, 5, Range{0, 512}, false)
	c, _ = rp.Carry(remote.Sequence(m.seq))
	m.seq = int64(remote.Complete(6))
	rp = newRP(&c)
	batch(rp, 7, Range{0, 512}, true)
	if p := newest(); p.Changes != nil {
		t.Fatalf("point after a stale carried record: %+v", p)
	}
}

// TestChangesClusteredRecord: writes clustered in hot regions (as a file
// system's are) keep a record close to what was written when they
// outgrow the budget: the smallest gaps are joined first.
func TestChangesClusteredRecord(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	c := NewChanges()
	var written []Range
	var bytes int64
	for range 50_000 {
		hot := rng.Int64N(100) * (640 << 20) // 100 regions of 16 MiB over 64 GiB
		off := hot + rng.Int64N(16<<20)&^4095
		r := Range{off, off + 4096}
		written = append(written, r)
		c.Add(r)
	}
	for _, r := range c.Ranges() {
		bytes += r.End - r.Off
	}
	d, err := DecodeChanges(c.Encode())
	if err != nil {
		t.Fatal(err)
	}
	got := d.Ranges()
	for _, w := range written {
		if !covers(got, w) {
			t.Fatalf("write %v lost by the record", w)
		}
	}
	t.Logf("50000 4 KiB writes in 100 hot 16 MiB regions of 64 GiB: %d distinct bytes in %d ranges; the record: %d ranges, %d bytes (%.2fx the distinct bytes, %.3f%% of the disk)",
		bytes, len(c.Ranges()), len(got), d.Bytes(), float64(d.Bytes())/float64(bytes), 100*float64(d.Bytes())/float64(64<<30))
	if d.Bytes() > 2<<30 {
		t.Errorf("the record covers %d bytes for writes within 1.6 GiB of regions", d.Bytes())
	}
}

// TestChangesMissing: what a list of ranges (the service's diff) holds
// that the record does not.
func TestChangesMissing(t *testing.T) {
	c := NewChanges()
	c.Add(Range{1024, 2048}, Range{4096, 8192})
	got := c.Missing([]Range{{1024, 2048}, {512, 3072}, {5000, 6000}, {7680, 9216}, {0, 512}})
	want := []Range{{512, 1024}, {2048, 3072}, {8192, 9216}, {0, 512}}
	if !slices.Equal(got, want) {
		t.Fatalf("missing %v, want %v", got, want)
	}
	if m := c.Missing([]Range{{4096, 8192}}); len(m) != 0 {
		t.Fatalf("a recorded range reported missing: %v", m)
	}
}

// TestChangesGapBetweenBatches: a batch that begins at an even sequence
// number other than the one the batch before completed at means the blob
// was changed without the hook (a resize): the next point's record is
// incomplete and none is carried over; the one after is complete again.
// A superset after a preemption begins at the process's own odd mark and
// is no gap.
func TestChangesGapBetweenBatches(t *testing.T) {
	ctx := context.Background()
	m := &memSnaps{}
	rp, err := NewRecoveryPoints(m, RecoveryPointsOptions{Interval: time.Nanosecond, Keep: 100})
	if err != nil {
		t.Fatal(err)
	}
	send := func(e uint64, point bool) {
		rp.Sending(remote.Sequence(m.seq), e, []Range{{0, 512}})
		m.seq = int64(remote.Complete(e))
		if point {
			rp.AfterBatch(ctx, e)
		}
	}
	newest := func() Point {
		pts, _, err := ListPoints(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		return pts[len(pts)-1]
	}
	send(1, true)
	send(2, true)
	// A preempted batch of epochs 3-4 under its odd mark, then its
	// superset 3-5 from that mark.
	m.seq = int64(remote.Started(4))
	rp.Sending(remote.Sequence(m.seq), 4, []Range{{4096, 8192}})
	send(5, true)
	if p := newest(); p.Changes == nil || !covers(p.Changes.Ranges(), Range{4096, 8192}) {
		t.Fatalf("after a preemption: %+v", p)
	}
	// A resize moves the blob to Complete(6) on its own.
	m.seq = int64(remote.Complete(6))
	send(7, false)
	if _, ok := rp.Carry(remote.Sequence(m.seq)); ok {
		t.Error("a record with a gap was carried over")
	}
	send(8, true)
	if p := newest(); p.Changes != nil || p.Record != "incomplete" {
		t.Fatalf("the point after a resize: %+v", p)
	}
	send(9, true)
	if p := newest(); p.Changes == nil {
		t.Fatalf("the point after that: %+v", p)
	}
}
