package writeback

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/points"
	"github.com/vhdsync/vhdsync/replicate"
)

// memSnaps is an in-memory points.Snapshotter whose blob sequence number the test
// sets; fail makes the next calls of an operation fail.
type memSnaps struct {
	mu    sync.Mutex
	seq   int64
	n     int
	snaps []pageblob.Snapshot
	fail  map[string]int // op -> how many more calls fail
}

func (m *memSnaps) failing(op string) error {
	if m.fail[op] > 0 {
		m.fail[op]--
		return fmt.Errorf("injected %s failure", op)
	}
	return nil
}

func (m *memSnaps) CreateSnapshot(_ context.Context, md map[string]string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failing("create"); err != nil {
		return "", err
	}
	m.n++
	t := time.Date(2026, 1, 1, 0, 0, m.n, 0, time.UTC)
	id := t.Format(time.RFC3339Nano)
	m.snaps = append(m.snaps, pageblob.Snapshot{ID: id, Time: t, SequenceNumber: m.seq, Metadata: md})
	return id, nil
}

func (m *memSnaps) ListSnapshots(context.Context) ([]pageblob.Snapshot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failing("list"); err != nil {
		return nil, err
	}
	return slices.Clone(m.snaps), nil
}

func (m *memSnaps) DeleteSnapshot(_ context.Context, id, _ string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.failing("delete"); err != nil {
		return err
	}
	m.snaps = slices.DeleteFunc(m.snaps, func(s pageblob.Snapshot) bool { return s.ID == id })
	return nil
}

// TestRecoveryPointsSchedule checks the rules without a blob: the first
// boundary takes a point when the blob has none, later ones only once the
// interval has passed; a failure is retried at the very next boundary
// whatever the interval, counted and shown until a point succeeds; an
// inconsistent snapshot is deleted; retention keeps Keep and never touches
// a foreign snapshot.
func TestRecoveryPointsSchedule(t *testing.T) {
	ctx := context.Background()
	m := &memSnaps{fail: map[string]int{}}
	m.snaps = append(m.snaps, pageblob.Snapshot{ID: "2025-01-01T00:00:00Z", SequenceNumber: 0, Metadata: map[string]string{"vhdsync_disk_id": "x"}})
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if _, err := points.NewRecoveryPoints(m, points.RecoveryPointsOptions{Interval: 0, Keep: 1}); err == nil {
		t.Fatal("interval 0 accepted")
	}
	if _, err := points.NewRecoveryPoints(m, points.RecoveryPointsOptions{Interval: time.Second, Keep: 0}); err == nil {
		t.Fatal("keep 0 accepted")
	}
	rp, err := points.NewRecoveryPoints(m, points.RecoveryPointsOptions{Interval: time.Minute, Keep: 2, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	boundary := func(e uint64) {
		m.mu.Lock()
		m.seq = int64(2 * e)
		m.mu.Unlock()
		rp.AfterBatch(ctx, e)
	}
	boundary(1) // none yet: taken
	if s := rp.Stats(); s.Taken != 1 || s.LastEpoch != 1 || s.Count != 1 {
		t.Fatalf("first boundary: %+v", s)
	}
	now = now.Add(30 * time.Second)
	boundary(2) // interval not over
	if s := rp.Stats(); s.Taken != 1 {
		t.Fatalf("taken before the interval: %+v", s)
	}
	now = now.Add(31 * time.Second)
	m.fail["create"] = 1
	boundary(3) // due, fails
	s := rp.Stats()
	if s.Taken != 1 || s.Failures != 1 || s.LastError == "" {
		t.Fatalf("failed point not recorded: %+v", s)
	}
	now = now.Add(time.Second)
	boundary(4) // retried at once
	if s := rp.Stats(); s.Taken != 2 || s.LastEpoch != 4 || s.LastError != "" || s.Count != 2 {
		t.Fatalf("retry: %+v", s)
	}
	now = now.Add(time.Minute)
	boundary(4) // same epoch: the blob did not move, nothing to take
	if s := rp.Stats(); s.Taken != 2 {
		t.Fatalf("a second point of the same epoch: %+v", s)
	}
	// The blob moves on under the snapshot: not a consistent point.
	m.mu.Lock()
	m.seq = 11
	m.mu.Unlock()
	rp.AfterBatch(ctx, 5)
	if s := rp.Stats(); s.Failures != 2 || s.Count != 2 {
		t.Fatalf("inconsistent point: %+v", s)
	}
	boundary(6)
	boundary(7) // due again? no: the interval started at 6
	pts, foreign, err := points.ListPoints(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	var epochs []uint64
	for _, p := range pts {
		if !p.Consistent {
			t.Errorf("inconsistent point kept: %+v", p)
		}
		epochs = append(epochs, p.Epoch)
	}
	if !slices.Equal(epochs, []uint64{4, 6}) || foreign != 1 {
		t.Fatalf("points of epochs %v and %d foreign, want [4 6] and 1", epochs, foreign)
	}
	if s := rp.Stats(); s.Taken != 4 || s.Deleted != 1 {
		t.Fatalf("final stats: %+v", s)
	}

	// A restart finds the newest point and waits for its interval.
	now = now.Add(10 * time.Second)
	rp2, _ := points.NewRecoveryPoints(m, points.RecoveryPointsOptions{Interval: time.Minute, Keep: 2, Now: func() time.Time { return now }})
	boundary2 := func(e uint64) { m.seq = int64(2 * e); rp2.AfterBatch(ctx, e) }
	boundary2(8)
	if s := rp2.Stats(); s.Taken != 0 || s.LastEpoch != 6 || s.Count != 2 {
		t.Fatalf("after a restart: %+v", s)
	}
}

// pointRecorder records the local image's hash at each closed epoch: with
// one writer and a flusher that never closes an epoch by itself (a very
// long Linger), every epoch closes at a Flush, and right after Flush
// returns the image is the disk as of that barrier.
type pointRecorder struct {
	byEpoch map[uint64][32]byte
}

// TestAzuriteRecoveryPointsMatchEpochs is the test: writes and
// fsyncs through writeback.Disk, a short interval, and every snapshot
// taken must hold exactly the disk as of the epoch its metadata names
// (read back with the official SDK, independently of pageblob).
func TestAzuriteRecoveryPointsMatchEpochs(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 8 * azMiB
	url, _ := azBlob(t, s, "points.vhd", size)
	c := azClient(t, url, nil, 30*time.Second)
	rp, err := points.NewRecoveryPoints(c, points.RecoveryPointsOptions{Interval: 40 * time.Millisecond, Keep: 1000})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: replicate.FlusherOptions{Linger: time.Hour, AfterBatch: rp.AfterBatch}})
	rec := pointRecorder{byEpoch: map[uint64][32]byte{}}
	rng := rand.New(rand.NewPCG(7, 7))
	const rounds = 40
	for round := range rounds {
		for range 1 + rng.IntN(6) {
			off := rng.Int64N(size - 300<<10)
			n := 1 + rng.IntN(300<<10)
			if rng.IntN(5) == 0 {
				if err := d.Zero(ctx, off, int64(n), rng.IntN(2) == 0); err != nil {
					t.Fatal(err)
				}
				continue
			}
			if err := d.WriteAt(ctx, azRandBytes(rng, n), off); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		e := d.j.ClosedEpoch()
		rec.byEpoch[e] = sha256.Sum256(readImage(t, dir))
		if round%3 == 0 {
			time.Sleep(time.Duration(rng.IntN(60)) * time.Millisecond)
		}
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	st := rp.Stats()
	if st.Failures != 0 {
		t.Fatalf("recovery point failures: %+v", st)
	}
	pts, foreign, err := points.ListPoints(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if foreign != 0 || len(pts) != int(st.Taken) || len(pts) < 5 {
		t.Fatalf("%d points (%d foreign), %d taken: want at least 5, all listed", len(pts), foreign, st.Taken)
	}
	cred, _ := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	base, err := blob.NewClientWithSharedKeyCredential(url, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	equal := 0
	for _, p := range pts {
		want, ok := rec.byEpoch[p.Epoch]
		if !ok {
			t.Errorf("point %s names epoch %d, which no Flush closed", p.ID, p.Epoch)
			continue
		}
		if !p.Consistent {
			t.Errorf("point %s: sequence %d for epoch %d", p.ID, p.Sequence, p.Epoch)
		}
		sc, err := base.WithSnapshot(p.ID)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, size)
		if _, err := sc.DownloadBuffer(ctx, buf, &blob.DownloadBufferOptions{Range: blob.HTTPRange{Offset: 0, Count: size}}); err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(buf) != want {
			t.Errorf("point %s (epoch %d): content differs from the disk at that epoch", p.ID, p.Epoch)
			continue
		}
		equal++
	}
	t.Logf("%d epochs closed by Flush, %d recovery points taken, %d checked, %d equal to the disk at their epoch", len(rec.byEpoch), st.Taken, len(pts), equal)
}

// TestAzuriteRecoveryPointsRetention: with Keep 3, after seven points the
// blob holds exactly the newest three, and a foreign snapshot (taken by
// someone else, carrying the base blob's vhdsync_disk_id) is untouched.
func TestAzuriteRecoveryPointsRetention(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 4 * azMiB
	url, _ := azBlob(t, s, "keep.vhd", size)
	c := azClient(t, url, nil, 30*time.Second)
	foreignID, err := c.CreateSnapshot(ctx, map[string]string{"vhdsync_disk_id": "someone-else", "note": "manual"})
	if err != nil {
		t.Fatal(err)
	}
	rp, err := points.NewRecoveryPoints(c, points.RecoveryPointsOptions{Interval: time.Nanosecond, Keep: 3})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: replicate.FlusherOptions{Linger: time.Hour, AfterBatch: rp.AfterBatch}})
	var epochs []uint64
	for i := range 7 {
		if err := d.WriteAt(ctx, []byte{byte(i + 1)}, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		epochs = append(epochs, d.j.ClosedEpoch())
		azWaitFor(t, "point taken", 20*time.Second, func() bool { return rp.Stats().Taken == uint64(i+1) })
	}
	snaps, err := c.ListSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []uint64
	foreignLeft := false
	for _, sn := range snaps {
		if p, ok := points.PointFromSnapshot(sn); ok {
			got = append(got, p.Epoch)
		} else if sn.ID == foreignID {
			foreignLeft = true
		} else {
			t.Errorf("unexpected snapshot %+v", sn)
		}
	}
	if !slices.Equal(got, epochs[4:]) {
		t.Errorf("points left for epochs %v, want the newest three %v", got, epochs[4:])
	}
	if !foreignLeft {
		t.Error("the foreign snapshot was deleted")
	}
	if st := rp.Stats(); st.Taken != 7 || st.Deleted != 4 || st.Count != 3 || st.Failures != 0 {
		t.Errorf("stats %+v", st)
	}
	if err := d.Close(ctx, true); err != nil && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
}

// failingSnaps fails its first n snapshots.
type failingSnaps struct {
	*pageblob.Client
	mu sync.Mutex
	n  int
}

func (f *failingSnaps) CreateSnapshot(ctx context.Context, md map[string]string) (string, error) {
	f.mu.Lock()
	fail := f.n > 0
	f.n--
	f.mu.Unlock()
	if fail {
		return "", errors.New("injected: snapshot refused")
	}
	return f.Client.CreateSnapshot(ctx, md)
}

// TestAzuriteRecoveryPointFailureKeepsReplicating: snapshots that fail do
// not stop or slow the flusher: the blob converges, the failures are
// counted with the last error shown, and the point is taken at the very
// next boundary once snapshots work again.
func TestAzuriteRecoveryPointFailureKeepsReplicating(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 4 * azMiB
	url, footer := azBlob(t, s, "fail.vhd", size)
	c := azClient(t, url, nil, 30*time.Second)
	fs := &failingSnaps{Client: c, n: 2}
	rp, err := points.NewRecoveryPoints(fs, points.RecoveryPointsOptions{Interval: time.Hour, Keep: 3})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: replicate.FlusherOptions{Linger: time.Hour, AfterBatch: rp.AfterBatch}})
	for i := range 3 {
		if err := d.WriteAt(ctx, bytes.Repeat([]byte{byte(i + 1)}, 8192), int64(i)<<20); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		azWaitFor(t, "batch", 20*time.Second, func() bool { return d.Stats().Flusher.Batches == uint64(i+1) })
		st := rp.Stats()
		switch {
		case i < 2 && (st.Failures != uint64(i+1) || !strings.Contains(st.LastError, "injected") || st.Taken != 0):
			t.Fatalf("after boundary %d: %+v", i, st)
		case i == 2 && (st.Taken != 1 || st.LastError != "" || st.Count != 1 || st.LastEpoch != d.j.ClosedEpoch()):
			t.Fatalf("the point was not retried at the next boundary: %+v", st)
		}
	}
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	azCheckConverged(t, url, dir, size, footer)
}
