package main

// The crash-state checker: a real workload on ext4 over a
// loop device over the FUSE view, with every write and fsync that reaches
// the disk recorded by internal/crashcheck (independently of the journal),
// while the blob is snapshotted again and again; each snapshot is judged
// against the recorded stream (invariant 3), and the image as of every
// fsync is rebuilt from the stream and checked with e2fsck.

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	azpageblob "github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/fusefs"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/crashcheck"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/internal/testenv"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/writeback"
)

var _ fusefs.Disk = (*crashcheck.Recorder)(nil)

// crashFsckCap bounds the e2fsck runs on images rebuilt at fsyncs (not in
// the long form, which checks them all); with more fsyncs than this, an
// evenly spread sample (the first and last included) is checked, and the
// summary says so.
const crashFsckCap = 600

// The workload's size: fio's file (written at random, 4 KiB at a time,
// then verified) and rounds of file churn.
const (
	crashFioMiB      = 8
	crashChurnRounds = 60
)

// At least crashMinStates snapshots with an even sequence number, of which
// crashMinFsckStates of the filesystem (after mkfs), are wanted; the
// workload runs more rounds, up to crashMaxRounds, to get them. A faster
// write path finishes a round sooner, so fewer snapshots fit in one: with
// segments allocated whole, 5 rounds (24 s) gave 9 even snapshots.
const (
	crashMinStates     = 10
	crashMinFsckStates = 3
	crashMaxRounds     = 10
)

// crashSnapshotLoops is how many snapshots are downloaded at once: Azurite
// serves a 64 MiB page blob at ~35 MB/s, so one loop alone gets few states.
const crashSnapshotLoops = 2

// TestE2ECrashStates: see the file comment. Figures go to RELIABILITY.md.
func TestE2ECrashStates(t *testing.T) {
	testenv.RequireRoot(t, "FUSE mounts, loop devices and mount(8)")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Missing(t, "/dev/fuse", "modprobe fuse (or run the tests where FUSE is available)")
	}
	for _, tool := range []string{"losetup", "mount", "umount", "mkfs.ext4", "e2fsck", "e2undo", "fstrim", "fio"} {
		testenv.RequireTool(t, tool, "make deps (or: apt-get install fuse3 fio e2fsprogs)")
	}
	began := time.Now()
	az := azurite.Start(t)
	e := &e2e{t: t, az: az, dir: t.TempDir()}
	const size = 64 << 20
	url := az.BlobURL("disks", "crash.vhd")
	state := e.path("state")
	if code, out, errb := vhdsync(t, nil, "create", "--blob", url, "--size", "64MiB", "--state", state, "--create-container"); code != 0 {
		t.Fatalf("vhdsync create: exit %d\n%s%s", code, out, errb)
	}
	m := mountRecorded(t, e, state)

	scratch := scratchDir(t)
	snaps := startSnapshots(t, url, size, m.rec, filepath.Join(scratch, "fsck-snapshot.img"))
	loop := e.losetup(filepath.Join(m.mp, "crash.img"))
	e.must("mkfs.ext4", "-q", loop)
	mkfsDone := m.rec.Now()
	// Snapshots taken once the blob holds the whole new filesystem are
	// also checked with e2fsck (earlier ones may be mid-mkfs).
	if err := m.disk.Drain(context.Background()); err != nil {
		t.Fatalf("drain after mkfs: %v", err)
	}
	snaps.fsckFrom.Store(m.rec.Now())
	fsDir := e.path("fs")
	e.mountFS(loop, fsDir)

	// Rounds of: fio writes a new file at random and verifies it, while
	// files are churned; fstrim; the previous round's fio file deleted.
	// One round, or as many as fit in VHDSYNC_CRASH_DURATION, or more
	// (up to crashMaxRounds) until enough snapshots of the filesystem were
	// taken to mean something (a slow Azurite gives fewer per round).
	long := envDuration(t, "VHDSYNC_CRASH_DURATION")
	rounds, churn := 0, 0
	for rounds == 0 || time.Since(began) < long || (rounds < crashMaxRounds && !snaps.enough()) {
		rounds++
		churn += crashRound(t, e, fsDir, rounds)
	}
	umountFS(t, fsDir)
	e.must("losetup", "-d", loop)
	snaps.stopAndWait()
	workload := time.Since(began)

	// The end: the blob, drained, is the recorded stream's last state, and
	// so is the local image.
	if err := m.disk.Drain(context.Background()); err != nil {
		t.Fatalf("final drain: %v", err)
	}
	if err := m.rec.Err(); err != nil {
		t.Fatalf("the recorder: %v", err)
	}
	stream, err := m.rec.Stream()
	if err != nil {
		t.Fatal(err)
	}
	final := stream.Final()
	got := blobRange(t, url, 0, size)
	if !bytes.Equal(got, final) {
		t.Errorf("the drained blob differs from the recorded stream's final image, first at byte %d", firstDiff(got, final))
	}
	m.unmount()
	if img, err := os.ReadFile(filepath.Join(state, "disk.img")); err != nil || !bytes.Equal(img, final) {
		t.Errorf("the local image differs from the recorded stream's final image (%v), first at byte %d", err, firstDiff(img, final))
	}

	// Every snapshot against the stream, in the order they were taken.
	slices.SortFunc(snaps.states, func(a, b snapState) int { return cmp.Compare(a.taken, b.taken) })
	var verdicts []crashcheck.Verdict
	checked, illegal, odd, oddIllegal := 0, 0, 0, 0
	for i, s := range snaps.states {
		v := stream.Check(s.hashes, s.taken)
		if s.seq%2 == 1 {
			// A multi-epoch batch in progress: not claimed consistent.
			odd++
			if !v.Legal {
				oddIllegal++
			}
			continue
		}
		checked++
		verdicts = append(verdicts, v)
		if !v.Legal {
			illegal++
			t.Errorf("snapshot %d (sequence %d, taken by tick %d): illegal state: %s", i, s.seq, s.taken, v.Reason)
		}
	}
	regress := crashcheck.Regressions(verdicts)
	if regress > 0 {
		t.Errorf("%d snapshots could only be at an earlier fsync than a snapshot before them", regress)
	}
	// e2fsck of the snapshots: the even ones must be clean; an odd one
	// (not a consistent state) may not be, and is only counted.
	snapFsck, snapFsckFail, oddFsck, oddFsckFail := 0, 0, 0, 0
	for i, s := range snaps.states {
		switch {
		case !s.fsckRun:
		case s.seq%2 == 1:
			oddFsck++
			if s.fsckErr != "" {
				oddFsckFail++
				t.Logf("odd snapshot %d (sequence %d, not claimed consistent): %s", i, s.seq, firstLines(s.fsckErr, 4))
			}
		default:
			snapFsck++
			if s.fsckErr != "" {
				snapFsckFail++
				t.Errorf("snapshot %d (sequence %d): %s", i, s.seq, s.fsckErr)
			}
		}
	}
	if checked < crashMinStates || snapFsck < crashMinFsckStates {
		t.Errorf("too few states to mean anything: %d even snapshots, %d fsck'd", checked, snapFsck)
	}

	checkTime := time.Now()
	// The checker on this stream can fail: the final image is legal at the
	// end, but not in a copy taken before the workload wrote it.
	if v := stream.Check(crashcheck.SectorHashes(final), m.rec.Now()); !v.Legal || v.Hi != len(stream.Barriers())-1 {
		t.Errorf("the final image at the end: %+v", v)
	}
	if v := stream.Check(crashcheck.SectorHashes(final), mkfsDone); v.Legal {
		t.Errorf("the final image, as a copy taken right after mkfs, passed the check: %+v", v)
	}

	// e2fsck at the fsyncs, from the one that ended mkfs on.
	bars := stream.Barriers()
	first := stream.LastBarrierBefore(mkfsDone)
	fsckCap := crashFsckCap
	if long > 0 {
		fsckCap = len(bars)
	}
	ks := spread(first, len(bars)-1, fsckCap)
	fsckFail := 0
	base := newFsckBase(t, filepath.Join(scratch, "fsck-barrier.img"), size)
	if err := stream.ImagesAt(ks, func(k int, img []byte, changed []crashcheck.Extent) error {
		if msg := base.check(img, changed); msg != "" {
			fsckFail++
			t.Errorf("image at fsync %d of %d: %s", k, len(bars)-1, msg)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	fsckTime := time.Since(checkTime)
	sample := "every one"
	if len(ks) < len(bars)-first {
		sample = fmt.Sprintf("an even sample of %d", len(bars)-first)
	}
	writes, zeros, dataBytes, fsyncs := m.rec.Counts()
	vers, maxVers := stream.Versions()
	t.Logf("workload: mkfs.ext4, %d rounds of: file churn (%d operations in all: create, write, fsync, rename, unlink), fstrim, fio %d MiB randwrite 4k fsync=16 verify=crc32c; %d writes (%d MiB), %d zero ranges/discards, %d fsyncs reached the disk; %d sector values; most for one sector %d",
		rounds, churn, crashFioMiB, writes, dataBytes>>20, zeros, fsyncs, vers, maxVers)
	t.Logf("RELIABILITY | crash states | %d snapshots with an even sequence number checked | %d illegal | %d odd (batch in progress, not claimed; %d of them would fail) | %d regressions | %d fsyncs | e2fsck at %d fsyncs (%s since mkfs), %d failures | e2fsck of %d even snapshots, %d failures (of %d odd ones: %d) | workload %.1f s, e2fsck at fsyncs %.1f s, total %.1f s |",
		checked, illegal, odd, oddIllegal, regress, fsyncs, len(ks), sample, fsckFail, snapFsck, snapFsckFail, oddFsck, oddFsckFail, workload.Seconds(), fsckTime.Seconds(), time.Since(began).Seconds())
	if illegal != 0 || fsckFail != 0 || snapFsckFail != 0 {
		t.Errorf("illegal states %d, fsck failures %d (fsyncs) and %d (snapshots): all must be 0", illegal, fsckFail, snapFsckFail)
	}
}

// crashRound is one round of the workload on the filesystem at fsDir; it
// returns how many file operations the churn made.
func crashRound(t *testing.T, e *e2e, fsDir string, round int) int {
	t.Helper()
	fioDir := e.mkdir(fmt.Sprintf("fio-%d", round))
	logName := fmt.Sprintf("fio-%d.log", round)
	fio := e.startBackground(fioDir, logName, "fio", "--name=crashcheck", fmt.Sprintf("--filename=%s/fio-%d.dat", fsDir, round),
		"--size="+strconv.Itoa(crashFioMiB)+"m", "--bs=4k", "--rw=randwrite", "--ioengine=psync", "--direct=1", "--fsync=16",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
		"--output-format=json", "--output="+filepath.Join(fioDir, "fio.json"))
	churn, churnErr := fileChurn(filepath.Join(fsDir, fmt.Sprintf("tree-%d", round)), crashChurnRounds)
	// Discards of the freed blocks while fio still writes.
	e.must("fstrim", fsDir)
	<-fio.done
	if churnErr != nil {
		t.Errorf("file workload: %v", churnErr)
	}
	if fio.err != nil {
		b, _ := os.ReadFile(e.path(logName))
		t.Fatalf("fio (write, then verify): %v\n%s", fio.err, b)
	}
	fr := readFioJSON(t, filepath.Join(fioDir, "fio.json"))
	if fr.Jobs[0].Error != 0 || fr.Jobs[0].Write.IOBytes != crashFioMiB<<20 || fr.Jobs[0].Read.IOBytes != crashFioMiB<<20 {
		t.Errorf("fio: error %d, wrote %d, verified %d bytes; want 0 and %d MiB", fr.Jobs[0].Error, fr.Jobs[0].Write.IOBytes, fr.Jobs[0].Read.IOBytes, crashFioMiB)
	}
	if round > 1 {
		if err := os.Remove(fmt.Sprintf("%s/fio-%d.dat", fsDir, round-1)); err != nil {
			t.Error(err)
		}
		if err := os.RemoveAll(filepath.Join(fsDir, fmt.Sprintf("tree-%d", round-1))); err != nil {
			t.Error(err)
		}
	}
	return churn
}

// recordedMount is the disk served in this process through the recorder.
type recordedMount struct {
	t      *testing.T
	mp     string
	disk   *writeback.Disk
	rec    *crashcheck.Recorder
	server interface{ Unmount() error }
	logf   *os.File
	done   bool
}

// mountRecorded opens the state directory's disk in this process, puts a
// recorder in front of it and mounts it, as `vhdsync mount` does (same
// defaults), and registers the cleanup: unmount (lazily if it must),
// close the disk without draining.
func mountRecorded(t *testing.T, e *e2e, state string) *recordedMount {
	t.Helper()
	d, err := statedir.Open(state)
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(e.path("vhdsync.log"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	g := &globals{stdout: io.Discard, stderr: logf, env: func(string) string { return "" }, logLevel: "info"}
	client, err := connect(g, d, blobFlags{}, true)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := checkBlob(ctx, client, d); err != nil {
		t.Fatal(err)
	}
	disk, err := writeback.Open(ctx, writeback.DiskOptions{
		DiskID:      d.State.DiskID,
		ImagePath:   d.ImagePath(),
		JournalDir:  d.JournalPath(),
		VirtualSize: int64(d.State.VirtualSize),
		Remote:      azpageblob.Remote{C: client},
		LeaseID:     d.State.LeaseID,
		SaveLeaseID: func(id string) error { d.State.LeaseID = id; return d.Save() },
		Journal:     journal.Options{MaxPendingBytes: 1 << 30},
		Sender:      replicate.SenderOptions{Workers: 8},
		Flusher:     replicate.FlusherOptions{Linger: 250 * time.Millisecond},
		Logger:      log,
	})
	if err != nil {
		t.Fatal(err)
	}
	m := &recordedMount{t: t, mp: e.mkdir("mnt"), disk: disk, rec: crashcheck.NewRecorder(disk), logf: logf}
	server, _, err := fusefs.Mount(m.mp, m.rec, fusefs.Options{Name: d.State.Name, FsName: d.Path, Footer: d.FooterBytes(), Logger: log})
	if err != nil {
		_ = disk.Close(ctx, false)
		t.Fatal(err)
	}
	m.server = server
	t.Cleanup(func() {
		if !m.done {
			m.unmount()
		}
		if t.Failed() {
			b, _ := os.ReadFile(e.path("vhdsync.log"))
			t.Logf("the disk's log:\n%s", tail(string(b), 40))
		}
		logf.Close()
	})
	return m
}

// unmount unmounts the FUSE mount (lazily if it stays busy) and closes the
// disk, draining it unless the test has failed.
func (m *recordedMount) unmount() {
	m.done = true
	if isMounted(m.mp) {
		var err error
		for try := 0; try < 50; try++ {
			if err = m.server.Unmount(); err == nil || !errors.Is(err, syscall.EBUSY) {
				break
			}
			time.Sleep(100 * time.Millisecond) // a loop device detaching
		}
		if err != nil {
			m.t.Errorf("unmount %s: %v; detaching it lazily", m.mp, err)
			_ = syscall.Unmount(m.mp, syscall.MNT_DETACH)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := m.disk.Close(ctx, !m.t.Failed()); err != nil {
		m.t.Errorf("close the disk: %v", err)
	}
}

// snapState is one snapshot of the blob, reduced to its sector hashes.
type snapState struct {
	asked   uint64 // recorder tick before the snapshot was asked for
	taken   uint64 // recorder tick after the snapshot was answered
	seq     int64  // the snapshot's sequence number
	hashes  []uint64
	fsckRun bool
	fsckErr string
}

// snapshotter snapshots the blob in a loop until stopped.
type snapshotter struct {
	t        *testing.T
	stop     chan struct{}
	done     chan struct{}
	fsckFrom atomic.Uint64 // fsck snapshots taken after this tick (0: none)
	mu       sync.Mutex
	states   []snapState
	errs     []error
}

// startSnapshots snapshots the blob (Azurite; a snapshot needs no lease),
// reads the snapshot's sequence number, downloads its data region and
// keeps its sector hashes, one snapshot at a time, at most one every
// 100 ms, until stopAndWait; errors fail the test there.
func startSnapshots(t *testing.T, url string, size int64, rec *crashcheck.Recorder, fsckImg string) *snapshotter {
	t.Helper()
	cred, err := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := pageblob.NewClientWithSharedKeyCredential(url, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &snapshotter{t: t, stop: make(chan struct{}), done: make(chan struct{})}
	var wg sync.WaitGroup
	for i := range crashSnapshotLoops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.loop(pb, make([]byte, size), rec, fmt.Sprintf("%s.%d", fsckImg, i))
		}()
	}
	go func() { wg.Wait(); close(s.done) }()
	t.Cleanup(s.stopAndWait)
	return s
}

// enough reports whether the snapshots so far meet crashMinStates and
// crashMinFsckStates.
func (s *snapshotter) enough() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	even, fsck := 0, 0
	for _, st := range s.states {
		if st.seq%2 == 0 {
			even++
			if st.fsckRun {
				fsck++
			}
		}
	}
	return even >= crashMinStates && fsck >= crashMinFsckStates
}

// loop takes snapshots until stopped; img is its buffer, fsckImg the file
// its e2fsck runs use.
func (s *snapshotter) loop(pb *pageblob.Client, img []byte, rec *crashcheck.Recorder, fsckImg string) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := snapshotOnce(pb, img, rec)
		if err != nil {
			s.mu.Lock()
			s.errs = append(s.errs, err)
			s.mu.Unlock()
			return
		}
		if from := s.fsckFrom.Load(); from != 0 && st.asked > from {
			st.fsckRun = true
			st.fsckErr = fsckImage(fsckImg, img)
		}
		s.mu.Lock()
		s.states = append(s.states, st)
		s.mu.Unlock()
		select {
		case <-s.stop:
			return
		case <-tick.C:
		}
	}
}

// stopAndWait stops the loop (after the snapshot in progress) and fails
// the test with its errors.
func (s *snapshotter) stopAndWait() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, err := range s.errs {
		s.t.Errorf("snapshots: %v", err)
	}
	s.errs = nil
}

// snapshotOnce takes one snapshot and reads it into img.
func snapshotOnce(pb *pageblob.Client, img []byte, rec *crashcheck.Recorder) (snapState, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// An odd sequence number marks a batch of several epochs in progress
	// (not a consistent state): wait, a second at most, for an even one.
	// The snapshot's own sequence number is what counts.
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); <-poll.C {
		p, err := pb.GetProperties(ctx, nil)
		if err != nil {
			return snapState{}, fmt.Errorf("blob properties: %w", err)
		}
		if p.BlobSequenceNumber != nil && *p.BlobSequenceNumber%2 == 0 {
			break
		}
	}
	asked := rec.Now()
	resp, err := pb.BlobClient().CreateSnapshot(ctx, nil)
	taken := rec.Now()
	if err != nil {
		return snapState{}, fmt.Errorf("create snapshot: %w", err)
	}
	sc, err := pb.WithSnapshot(*resp.Snapshot)
	if err != nil {
		return snapState{}, err
	}
	props, err := sc.GetProperties(ctx, nil)
	if err != nil {
		return snapState{}, fmt.Errorf("snapshot properties: %w", err)
	}
	if props.BlobSequenceNumber == nil {
		return snapState{}, errors.New("the snapshot has no sequence number")
	}
	// Only the pages written: the rest of the data region reads as zeros.
	clear(img)
	size := int64(len(img))
	pager := sc.NewGetPageRangesPager(&pageblob.GetPageRangesOptions{Range: blob.HTTPRange{Offset: 0, Count: size}})
	var ranges [][2]int64
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return snapState{}, fmt.Errorf("snapshot page ranges: %w", err)
		}
		for _, r := range page.PageRange {
			if r.Start == nil || r.End == nil {
				continue
			}
			lo, hi := *r.Start, min(*r.End+1, size)
			if lo >= hi {
				continue
			}

			// Merge ranges less than 64 KiB apart, up to 4 MiB: fewer
			// requests, little more data.
			if n := len(ranges); n > 0 && lo-ranges[n-1][1] < 64<<10 && hi-ranges[n-1][0] <= 4<<20 {
				ranges[n-1][1] = max(ranges[n-1][1], hi)
				continue
			}
			ranges = append(ranges, [2]int64{lo, hi})
		}
	}
	// A few requests at a time: Azurite answers them in parallel.
	work := make(chan [2]int64)
	errc := make(chan error, 4)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range work {
				if _, err := sc.BlobClient().DownloadBuffer(ctx, img[r[0]:r[1]], &blob.DownloadBufferOptions{Range: blob.HTTPRange{Offset: r[0], Count: r[1] - r[0]}}); err != nil {
					errc <- fmt.Errorf("download snapshot %d+%d: %w", r[0], r[1]-r[0], err)
					cancel()
					return
				}
			}
		}()
	}
feed:
	for _, r := range ranges {
		select {
		case work <- r:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errc:
		return snapState{}, err
	default:
	}
	return snapState{asked: asked, taken: taken, seq: *props.BlobSequenceNumber, hashes: crashcheck.SectorHashes(img)}, nil
}

// fsckImage writes img to path and checks it as a crash would leave it for
// the next mount: e2fsck replays the journal (-E journal_only), then
// `e2fsck -fn` must find nothing. It returns "" or what failed.
func fsckImage(path string, img []byte) string {
	if err := writeSparse(path, img); err != nil {
		return err.Error()
	}
	defer os.Remove(path)
	r, err := runTimeout(filepath.Dir(path), time.Minute, "e2fsck", "-p", "-E", "journal_only", path)
	if err != nil {
		return err.Error()
	}
	if r.code > 1 { // 1: the journal was replayed
		return fmt.Sprintf("e2fsck -E journal_only: %s", r)
	}
	r, err = runTimeout(filepath.Dir(path), time.Minute, "e2fsck", "-fn", path)
	if err != nil {
		return err.Error()
	}
	if r.code != 0 {
		return fmt.Sprintf("e2fsck -fn: %s", r)
	}
	return ""
}

// fsckBase is one image file kept equal to the stream's image at
// successive fsyncs by writing only what changed, and checked in place:
// e2fsck replays the journal with an undo file (-z), `e2fsck -fn` checks,
// e2undo puts the replayed blocks back. Every fsckVerifyEvery checks the
// file is compared with the image, to prove the undo exact.
type fsckBase struct {
	t      *testing.T
	path   string
	f      *os.File
	checks int
}

const fsckVerifyEvery = 50

func newFsckBase(t *testing.T, path string, size int64) *fsckBase {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return &fsckBase{t: t, path: path, f: f}
}

// check brings the file up to img (changed: what differs since the last
// call) and checks it; it returns "" or what failed.
func (b *fsckBase) check(img []byte, changed []crashcheck.Extent) string {
	for _, x := range changed {
		if _, err := b.f.WriteAt(img[x.Off:x.Off+x.Len], x.Off); err != nil {
			b.t.Fatalf("update %s: %v", b.path, err)
		}
	}
	b.checks++
	undo := b.path + ".undo"
	_ = os.Remove(undo)
	defer os.Remove(undo)
	// One shell for the three steps: a process start from this (large,
	// race-built) test process costs more than e2fsck itself.
	script := `e2fsck -z "$2" -p -E journal_only "$1" >"$3" 2>&1; rc=$?
if [ $rc -gt 1 ]; then echo "e2fsck -E journal_only: exit $rc"; cat "$3"; exit 1; fi
e2fsck -fn "$1" >"$3" 2>&1; rc=$?
if [ $rc -ne 0 ]; then echo "e2fsck -fn: exit $rc"; cat "$3"; fail=1; fi
if [ -e "$2" ] && ! e2undo "$2" "$1" >"$3" 2>&1; then echo "e2undo failed"; cat "$3"; exit 2; fi
exit ${fail:-0}`
	r, err := runTimeout(filepath.Dir(b.path), time.Minute, "sh", "-c", script, "sh", b.path, undo, b.path+".out")
	if err != nil {
		b.t.Fatalf("e2fsck of %s: %v", b.path, err)
	}
	if r.code == 2 {
		b.t.Fatalf("%s", r.stdout)
	}
	msg := ""
	if r.code != 0 {
		msg = r.stdout
	}
	if b.checks%fsckVerifyEvery == 0 {
		got := make([]byte, len(img))
		if _, err := b.f.ReadAt(got, 0); err != nil {
			b.t.Fatalf("read %s: %v", b.path, err)
		}
		if !bytes.Equal(got, img) {
			b.t.Fatalf("after e2undo, %s differs from the image at byte %d", b.path, firstDiff(got, img))
		}
	}
	return msg
}

// writeSparse writes img to a new file at path, leaving its all-zero
// 64 KiB blocks as holes.
func writeSparse(path string, img []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(int64(len(img))); err != nil {
		return err
	}
	const blk = 64 << 10
	for off := 0; off < len(img); off += blk {
		b := img[off:min(off+blk, len(img))]
		if allZero(b) {
			continue
		}
		if _, err := f.WriteAt(b, int64(off)); err != nil {
			return err
		}
	}
	return f.Close()
}

var zeroBlock [64 << 10]byte

func allZero(b []byte) bool { return bytes.Equal(b, zeroBlock[:len(b)]) }

// scratchDir is a directory for the image e2fsck checks at every fsync: in
// /dev/shm when there is one (tmpfs: e2fsck and e2undo fsync their files,
// which on a disk costs most of a check), else in the test's temporary
// directory. It is removed at the end.
func scratchDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/dev/shm", "vhdsync-crashcheck-")
	if err != nil {
		return t.TempDir()
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// spread returns up to n indices from first to last (both included),
// evenly spread.
func spread(first, last, n int) []int {
	if last < first {
		return nil
	}
	count := last - first + 1
	if count <= n {
		out := make([]int, 0, count)
		for k := first; k <= last; k++ {
			out = append(out, k)
		}
		return out
	}
	out := make([]int, 0, n)
	for i := 0; i < n; i++ {
		out = append(out, first+i*(count-1)/(n-1))
	}
	return out
}

// firstLines returns the first n lines of s.
func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}

// firstDiff returns the first byte at which a and b differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// fileChurn creates, writes, fsyncs, renames and unlinks files under dir
// (rounds of it) and returns how many operations it made.
func fileChurn(dir string, rounds int) (int, error) {
	ops := 0
	for i := 0; i < rounds; i++ {
		sub := filepath.Join(dir, fmt.Sprintf("d%d", i%4))
		if err := os.MkdirAll(sub, 0o700); err != nil {
			return ops, err
		}
		name := filepath.Join(sub, fmt.Sprintf("new%d", i))
		f, err := os.Create(name)
		if err != nil {
			return ops, err
		}
		data := pattern(name, (i%7+1)*37*1024+i*13)
		if _, err := f.Write(data); err != nil {
			f.Close()
			return ops, err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return ops, fmt.Errorf("fsync %s: %w", name, err)
		}
		if err := f.Close(); err != nil {
			return ops, err
		}
		ops += 3
		if err := os.Rename(name, filepath.Join(sub, fmt.Sprintf("f%d", i))); err != nil {
			return ops, err
		}
		ops++
		if i >= 2 && i%3 == 0 {
			old := filepath.Join(dir, fmt.Sprintf("d%d", (i-2)%4), fmt.Sprintf("f%d", i-2))
			if err := os.Remove(old); err != nil {
				return ops, err
			}
			ops++
		}
		if i%5 == 0 {
			if err := syncDir(sub); err != nil {
				return ops, err
			}
			ops++
		}
	}
	return ops, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
