package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/points"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/writeback"
)

// restoreRig is a disk made by `vhdsync create` on Azurite, opened
// through writeback.Disk with recovery points fed by the sender, as a
// mount does; reopen is a new process (its record of changes gone).
type restoreRig struct {
	t     *testing.T
	url   string
	sd    *statedir.Dir
	size  int64
	c     *pageblob.Client
	disk  *writeback.Disk
	rp    *points.RecoveryPoints
	take  atomic.Bool // AfterBatch takes points only while set
	dir   string
	rng   *rand.Rand
	model []byte // what the disk holds
}

func newRestoreRig(t *testing.T, size string) *restoreRig {
	s := azurite.Start(t)
	dir := t.TempDir()
	r := &restoreRig{t: t, url: s.BlobURL("disks", "inc.vhd"), dir: dir, rng: rand.New(rand.NewPCG(7, 8))}
	state := filepath.Join(dir, "state")
	if code, out, errOut := vhdsync(t, nil, "create", "--blob", r.url, "--size", size, "--state", state, "--create-container"); code != ExitOK {
		t.Fatalf("create: exit %d\n%s%s", code, out, errOut)
	}
	var err error
	if r.sd, err = statedir.Open(state); err != nil {
		t.Fatal(err)
	}
	r.size = int64(r.sd.State.VirtualSize)
	r.model = make([]byte, r.size)
	if r.c, err = pageblob.Open(r.url, &pageblob.Options{Env: func(string) string { return "" }, MaxRetries: -1}); err != nil {
		t.Fatal(err)
	}
	r.open()
	t.Cleanup(func() {
		if r.disk != nil {
			r.disk.Close(context.Background(), false)
		}
	})
	return r
}

// open opens the disk with a new RecoveryPoints, as a new daemon would.
func (r *restoreRig) open() {
	r.t.Helper()
	rp, err := points.NewRecoveryPoints(r.c, points.RecoveryPointsOptions{Interval: time.Nanosecond, Keep: 100})
	if err != nil {
		r.t.Fatal(err)
	}
	r.rp = rp
	r.take.Store(false)
	r.disk, err = writeback.Open(context.Background(), writeback.DiskOptions{
		ImagePath: r.sd.ImagePath(), JournalDir: r.sd.JournalPath(), VirtualSize: r.size,
		Remote: pageblob.Remote{C: r.c},
		Sender: replicate.SenderOptions{OnSend: onSendHook(rp)},
		Flusher: replicate.FlusherOptions{Linger: time.Hour, AfterBatch: func(ctx context.Context, e uint64) {
			if r.take.Load() {
				rp.AfterBatch(ctx, e)
			}
		}},
	})
	if err != nil {
		r.t.Fatal(err)
	}
}

// closeDisk drains and closes the disk: the process ends, and with it
// the record of what it sent since its last point, as in a crash.
func (r *restoreRig) closeDisk() {
	r.t.Helper()
	if err := r.disk.Close(context.Background(), true); err != nil {
		r.t.Fatal(err)
	}
	r.disk = nil
}

// write writes random data (or, with zero, a discard) at off.
func (r *restoreRig) write(off, n int64, zero bool) {
	r.t.Helper()
	ctx := context.Background()
	if zero {
		if err := r.disk.Zero(ctx, off, n, true); err != nil {
			r.t.Fatal(err)
		}
		clear(r.model[off : off+n])
		return
	}
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.rng.Uint32())
	}
	if err := r.disk.WriteAt(ctx, p, off); err != nil {
		r.t.Fatal(err)
	}
	copy(r.model[off:], p)
}

// sent flushes and waits until the blob holds every epoch closed.
func (r *restoreRig) sent() {
	r.t.Helper()
	if err := r.disk.Flush(); err != nil {
		r.t.Fatal(err)
	}
	want := r.disk.Stats().Journal.ClosedEpoch
	deadline := time.Now().Add(30 * time.Second)
	for r.disk.Stats().Flusher.RemoteEpoch < want {
		if time.Now().After(deadline) {
			r.t.Fatalf("epoch %d not on the blob: %+v", want, r.disk.Stats().Flusher)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// point takes a recovery point of the disk as written so far and returns
// its id. Points are taken only here: the epochs written so far go to the
// blob first (a batch closed at 32 MiB would otherwise bring a point of
// its own), then one more sector is written and flushed, and its batch
// takes the point.
func (r *restoreRig) point() string {
	r.t.Helper()
	r.sent()
	before := r.rp.Stats().Taken
	r.take.Store(true)
	defer r.take.Store(false)
	r.write(r.size-4096, 512, false)
	if err := r.disk.Flush(); err != nil {
		r.t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for r.rp.Stats().Taken == before {
		if time.Now().After(deadline) {
			r.t.Fatalf("no point taken: %+v", r.rp.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	return r.rp.Stats().LastID
}

// download runs vhdsync download with args and FILE name; it fails the
// test unless the exit code is want.
func (r *restoreRig) download(want int, name string, args ...string) (stdout, stderr string) {
	r.t.Helper()
	a := append([]string{"download", "--blob", r.url}, args...)
	code, out, errOut := vhdsync(r.t, nil, append(a, filepath.Join(r.dir, name))...)
	if code != want {
		r.t.Fatalf("download %v: exit %d, want %d\n%s%s", args, code, want, out, errOut)
	}
	return out, errOut
}

// check compares FILE with the model and the blob's footer, and a full
// download of the same point byte for byte.
func (r *restoreRig) check(name string, model []byte, full string) {
	r.t.Helper()
	got, err := os.ReadFile(filepath.Join(r.dir, name))
	if err != nil {
		r.t.Fatal(err)
	}
	footer := r.sd.FooterBytes()
	if int64(len(got)) != r.size+512 || !bytes.Equal(got[:r.size], model) || !bytes.Equal(got[r.size:], footer[:]) {
		r.t.Fatalf("%s differs from the disk at its point", name)
	}
	if full != "" {
		want, err := os.ReadFile(filepath.Join(r.dir, full))
		if err != nil {
			r.t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			r.t.Fatalf("%s differs from the full download %s", name, full)
		}
	}
}

var (
	incRead  = regexp.MustCompile(`read \S+ \S+ \((\d+) bytes\) in (\d+) requests; a full download reads \S+ \S+ \((\d+) bytes\)`)
	fullRead = regexp.MustCompile(`from \d+ page ranges in (\d+) requests`)
)

// TestIncrementalRestore is the test: data, point A, a full
// download of A; more writes and a discard, point B; download --point B
// --since A reads only what changed (a fraction of the full download,
// counted) and leaves FILE byte for byte the full download of B. A wrong
// --since, a FILE changed since its download, and one without its record
// are refused (exit 12) saying what to do; a daemon restart after batches
// that no point followed makes the next point's record incomplete, and
// --since through it downloads in full, never a wrong file.
func TestIncrementalRestore(t *testing.T) {
	r := newRestoreRig(t, "64MiB")
	// 40 MiB of data, point A.
	for off := int64(0); off < 40<<20; off += 4 << 20 {
		r.write(off, 4<<20, false)
	}
	a := r.point()
	modelA := bytes.Clone(r.model)
	r.download(ExitOK, "inc.vhd", "--point", a)
	r.check("inc.vhd", modelA, "")
	rec, err := transfer.ReadPointRecord(filepath.Join(r.dir, "inc.vhd"))
	if err != nil || rec.Point != a || rec.Blob != r.c.Location().URL() || rec.Raw {
		t.Fatalf("record of the full download: %+v, %v", rec, err)
	}
	r.download(ExitOK, "a-raw.img", "--point", a, "--raw")

	// Scattered writes over two batches (one without a point) and a
	// discard of 2 MiB of A's data, point B.
	r.write(1<<20+4096, 64<<10, false)
	r.write(50<<20, 128<<10, false) // beyond A's data
	r.sent()
	r.write(20<<20+512, 8<<10, false)
	r.write(30<<20, 2<<20, true)
	r.write(39<<20, 4096, false)
	b := r.point()
	modelB := bytes.Clone(r.model)
	r.download(ExitOK, "b-full.vhd", "--point", b)
	r.check("b-full.vhd", modelB, "")

	out, _ := r.download(ExitOK, "inc.vhd", "--point", b, "--since", a)
	t.Logf("download --since:\n%s", out)
	r.check("inc.vhd", modelB, "b-full.vhd")
	m := incRead.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no counts in the output:\n%s", out)
	}
	read, reqs, full := atoi(t, m[1]), atoi(t, m[2]), atoi(t, m[3])
	if read > 1<<20 || read*20 > full || reqs > 8 {
		t.Errorf("incremental restore read %d bytes in %d requests; the full download reads %d", read, reqs, full)
	}
	code, fullOut, _ := vhdsync(t, nil, "download", "--blob", r.url, "--point", b, "--overwrite", filepath.Join(r.dir, "b-full2.vhd"))
	fm := fullRead.FindStringSubmatch(fullOut)
	if code != ExitOK || fm == nil {
		t.Fatalf("full download: exit %d\n%s", code, fullOut)
	}
	t.Logf("incremental vs full: %d vs %d bytes read (%.2f%%), %d vs %s requests", read, full, 100*float64(read)/float64(full), reqs, fm[1])
	if rec, err := transfer.ReadPointRecord(filepath.Join(r.dir, "inc.vhd")); err != nil || rec.Point != b || rec.UpdatingTo != "" {
		t.Fatalf("record after the incremental restore: %+v, %v", rec, err)
	}
	// The raw image too, --raw taken from its record. The cross-check
	// asks the emulator, which ignores prevsnapshot and lists every valid
	// page as changed: more than the records hold, so the point is
	// downloaded in full (the service's answer only ever widens a restore).
	out, _ = r.download(ExitOK, "a-raw.img", "--point", b, "--since", a, "--cross-check")
	if !strings.Contains(out, "that the points' records lack") || !strings.Contains(out, "in full") {
		t.Errorf("--cross-check on the emulator:\n%s", out)
	}
	t.Logf("--cross-check on the emulator:\n%s", out)
	raw, err := os.ReadFile(filepath.Join(r.dir, "a-raw.img"))
	if err != nil || !bytes.Equal(raw, modelB) {
		t.Fatalf("raw image after --since: %v", err)
	}

	// Refusals: FILE holds B, not A; --raw on a VHD; a FILE written to
	// since; a FILE without its record.
	_, errOut := r.download(ExitSrcChanged, "inc.vhd", "--point", b, "--since", a)
	if !strings.Contains(errOut, "holds recovery point "+b) || !strings.Contains(errOut, "--since "+b) {
		t.Errorf("wrong --since: %s", errOut)
	}
	_, errOut = r.download(ExitSrcChanged, "inc.vhd", "--point", b, "--since", b, "--raw")
	if !strings.Contains(errOut, "is a VHD") {
		t.Errorf("--raw on a VHD: %s", errOut)
	}
	changed := filepath.Join(r.dir, "b-full.vhd")
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(changed, later, later); err != nil {
		t.Fatal(err)
	}
	_, errOut = r.download(ExitSrcChanged, "b-full.vhd", "--point", b, "--since", b)
	if !strings.Contains(errOut, "changed since it was restored") || !strings.Contains(errOut, "--overwrite") {
		t.Errorf("FILE changed since: %s", errOut)
	}
	if err := os.Remove(transfer.PointRecordPath(changed)); err != nil {
		t.Fatal(err)
	}
	_, errOut = r.download(ExitSrcChanged, "b-full.vhd", "--point", b, "--since", b)
	if !strings.Contains(errOut, "no record of the recovery point") {
		t.Errorf("FILE without a record: %s", errOut)
	}
	r.download(ExitUsage, "inc.vhd", "--since", a)

	// A restart right at point B: the next point's record is complete.
	r.closeDisk()
	r.open()
	r.write(5<<20, 4096, false)
	c := r.point()
	modelC := bytes.Clone(r.model)
	// As if a restore from B to C had been cut short: the record says so,
	// and the file holds neither point. Only that restore may go on.
	incPath := filepath.Join(r.dir, "inc.vhd")
	rec, err = transfer.ReadPointRecord(incPath)
	if err != nil {
		t.Fatal(err)
	}
	rec.UpdatingTo = c
	if err := transfer.WritePointRecord(incPath, rec); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(incPath, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xff}, 4096), 5<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	_, errOut = r.download(ExitSrcChanged, "inc.vhd", "--point", b, "--since", b)
	if !strings.Contains(errOut, "cut short") || !strings.Contains(errOut, "--point "+c+" --since "+b) {
		t.Errorf("a restore cut short, another target: %s", errOut)
	}
	out, _ = r.download(ExitOK, "inc.vhd", "--point", c, "--since", b)
	if !strings.Contains(out, "updated ") {
		t.Errorf("through a restart at the point: %s", out)
	}
	r.check("inc.vhd", modelC, "")

	// A batch no point followed, then the daemon ends (a crash loses the
	// same record): the next point is incomplete, and --since through it
	// downloads in full.
	r.write(7<<20, 4096, false)
	r.sent()
	r.closeDisk()
	r.open()
	r.write(9<<20, 4096, false)
	d := r.point()
	out, _ = r.download(ExitOK, "inc.vhd", "--point", d, "--since", c)
	if !strings.Contains(out, "not possible") || !strings.Contains(out, "incomplete") || !strings.Contains(out, "in full") {
		t.Errorf("through an incomplete point: %s", out)
	}
	r.check("inc.vhd", r.model, "")
	if rec, err := transfer.ReadPointRecord(filepath.Join(r.dir, "inc.vhd")); err != nil || rec.Point != d {
		t.Fatalf("record after the fallback: %+v, %v", rec, err)
	}
	// points --json says which points record their changes.
	code, out, _ = vhdsync(t, nil, "points", "--blob", r.url, "--json")
	var rep pointsReport
	if err := json.Unmarshal([]byte(out), &rep); code != ExitOK || err != nil {
		t.Fatalf("points --json: exit %d, %v: %s", code, err, out)
	}
	want := map[string][2]string{a: {"", "incomplete"}, b: {a, "recorded"}, c: {b, "recorded"}, d: {c, "incomplete"}}
	for _, p := range rep.Points {
		if w, ok := want[p.ID]; ok && (p.Prev != w[0] || p.Record != w[1]) {
			t.Errorf("point %s: prev %q record %q, want %q %q", p.ID, p.Prev, p.Record, w[0], w[1])
		}
	}
}

func atoi(t *testing.T, s string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestE2EIncrementalRestoreAfterKill: a real mount, SIGKILLed after a
// batch that no recovery point followed. The next daemon's first point
// is marked incomplete (the record of that batch died with the process),
// so --since through it downloads in full and the file is still exactly
// the point; the point after it, in the same daemon, restores
// incrementally again, and so does one after a clean unmount and mount
// (the record handed over in the state directory).
func TestE2EIncrementalRestoreAfterKill(t *testing.T) {
	e := newE2E(t)
	url, state := e.createDisk("ir", 20)
	mp := e.path("mnt")
	img := filepath.Join(mp, "ir.img")
	// waitPoint waits until the daemon has taken n points and returns the
	// newest one's id and the disk as of it (read through the mount: with
	// --linger 1h only the test's fsyncs close epochs).
	waitPoint := func(n uint64) (string, time.Time, []byte) {
		t.Helper()
		var id string
		var when time.Time
		waitFor(t, 30*time.Second, fmt.Sprintf("recovery point %d", n), func() (bool, error) {
			s, err := e.status(state)
			if err != nil || s.RecoveryPoints == nil || s.RecoveryPoints.Taken < n {
				return false, err
			}
			id, when = s.RecoveryPoints.LastID, s.RecoveryPoints.LastTime
			return true, nil
		})
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		return id, when, b
	}
	d := e.mount(state, mp, "--linger", "1h", "--recovery-points", "1h")
	writeAtSync(t, img, map[int64][]byte{0: pattern("a", 4<<20)})
	a, _, imgA := waitPoint(1)
	// A batch after A, on the blob, and no point (the interval is 1h).
	writeAtSync(t, img, map[int64][]byte{6 << 20: pattern("after a", 1<<20)})
	waitFor(t, 30*time.Second, "the batch after point A on the blob", func() (bool, error) {
		s, err := e.status(state)
		return err == nil && s.JournalRecords == 0 && s.RecoveryPoints != nil && s.RemoteEpoch > s.RecoveryPoints.LastEpoch, err
	})
	if err := syscall.Kill(d.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitExit(10 * time.Second)
	if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
		t.Fatalf("umount -l %s: %v", mp, err)
	}

	d = e.mount(state, mp, "--linger", "1h", "--recovery-points", "1s")
	// The interval counts from the newest point on the blob: a point
	// comes at the first boundary a second after A.
	time.Sleep(1100 * time.Millisecond)
	writeAtSync(t, img, map[int64][]byte{10 << 20: pattern("b", 512<<10)})
	b, bTime, imgB := waitPoint(1)
	time.Sleep(time.Until(bTime.Add(1100 * time.Millisecond)))
	writeAtSync(t, img, map[int64][]byte{12 << 20: pattern("c", 64<<10), 0: pattern("c0", 4096)})
	c, _, imgC := waitPoint(2)
	// A batch right after C (within the interval: no point), then a clean
	// unmount, which takes a point of the blob it leaves (or, were that to
	// fail, hands its record to the next mount): point D after the
	// remount still restores incrementally from C.
	writeAtSync(t, img, map[int64][]byte{14 << 20: pattern("d1", 8192)})
	e.mustVhdsync("unmount", mp)
	unmounted := time.Now()
	if _, err := os.Stat(filepath.Join(state, carriedFile)); err != nil {
		t.Errorf("the unmount left no record of changes: %v", err)
	}
	e.mount(state, mp, "--linger", "1h")
	// The interval counts from the unmount's point.
	time.Sleep(time.Until(unmounted.Add(1100 * time.Millisecond)))
	writeAtSync(t, img, map[int64][]byte{16 << 20: pattern("d2", 4096)})
	dp, _, imgD := waitPoint(1)
	e.mustVhdsync("unmount", mp)

	file := e.path("restored.img")
	e.mustVhdsync("download", "--raw", "--blob", url, "--point", a, file)
	same := func(want []byte, what string) {
		t.Helper()
		got, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: the file differs from the disk at that point", what)
		}
	}
	same(imgA, "point A")
	r := e.mustVhdsync("download", "--blob", url, "--point", b, "--since", a, file)
	if !strings.Contains(r.stdout, "incomplete") || !strings.Contains(r.stdout, "in full") {
		t.Errorf("--since through the point after the kill did not download in full:\n%s", r.stdout)
	}
	same(imgB, "point B, in full")
	r = e.mustVhdsync("download", "--blob", url, "--point", c, "--since", b, file)
	m := incRead.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("--since after B did not restore incrementally:\n%s", r.stdout)
	}
	same(imgC, "point C, incremental")
	t.Logf("B to C: read %s bytes in %s requests; a full download reads %s", m[1], m[2], m[3])
	if read := atoi(t, m[1]); read > 128<<10 {
		t.Errorf("B to C read %d bytes for 68 KiB written", read)
	}
	r = e.mustVhdsync("download", "--blob", url, "--point", dp, "--since", c, file)
	if !incRead.MatchString(r.stdout) {
		t.Fatalf("--since C through a clean unmount did not restore incrementally:\n%s", r.stdout)
	}
	same(imgD, "point D, incremental through an unmount")
	bc, err := pageblob.Open(url, &pageblob.Options{Env: func(string) string { return "" }, MaxRetries: -1})
	if err != nil {
		t.Fatal(err)
	}
	pts, _, err := points.ListPoints(context.Background(), bc)
	if err != nil {
		t.Fatal(err)
	}
	switch last := pts[len(pts)-1]; {
	case last.ID != dp || last.Changes == nil:
		t.Fatalf("point D: %+v", last)
	case last.Prev != c:
		t.Logf("the batch after C got a point of its own (%s, the unmount's)", last.Prev)
	case !slices.ContainsFunc(last.Changes.Ranges(), func(r points.Range) bool { return r.Off <= 14<<20 && 14<<20+8192 <= r.End }):
		t.Fatalf("point D's record misses the write carried over the unmount: %v", last.Changes.Ranges())
	}
}
