package main

// The power-cut loop: the daemon's state directory lives on the power-cut
// file system (internal/powercut), which keeps every change in memory until
// the strict POSIX model makes it durable. ext4 on a loop device over the
// daemon's view takes a writer that records what was acknowledged before
// its last returned fsync, file churn and fstrim; then the power is cut
// (everything unsynced dropped) and the daemon killed at the same instant,
// at a random moment or right after a chosen operation of the journal.
// After each cut: mount again (the journal replayed from what survived),
// ext4 mounted (its journal replayed), every acknowledged-and-synced write
// read back, e2fsck -fn. At the end: drain, and the blob compared with the
// image. `make test` runs powercutShortCuts cuts; `make powercut
// DURATION=...` sets VHDSYNC_POWERCUT_DURATION and loops until it has
// passed.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/fuseconn"
	"github.com/vhdsync/vhdsync/internal/powercut"
)

// The loop's sizes: the disk, the writer's file on ext4 and its block.
const (
	powercutDiskMiB   = 64
	powercutFileMiB   = 8
	powercutBlock     = 4096
	powercutShortCuts = 20
	// powercutThinShortCuts: the thin-attached loop's cuts in make test.
	powercutThinShortCuts = 8
	powercutThinDiskMiB   = 256
	// powercutHookWait is how long a cycle waits for its chosen moment
	// before it cuts at random instead.
	powercutHookWait = 4 * time.Second
)

// TestE2EPowerCut: see the file comment. Figures go to RELIABILITY.md.
func TestE2EPowerCut(t *testing.T) {
	runPowerCut(t, false, powercutShortCuts, envDuration(t, "VHDSYNC_POWERCUT_DURATION"))
}

// TestE2EThinPowerCut is the same loop on a thin-attached disk: the blob
// holds ext4 and the writer's file when the state directory (on the
// power-cut file system) is made with create --from-blob --thin, and the
// prefetch crawls (0.25 MiB/s); every chunk of the blob holds data, so
// that reads and writes fetch chunks while the cuts come, some right after
// a chunk's mark is written or synced. A chunk marked without its data would read as zeros (lost
// writes); one fetched again over a replayed write would lose it too.
func TestE2EThinPowerCut(t *testing.T) {
	runPowerCut(t, true, powercutThinShortCuts, envDuration(t, "VHDSYNC_THIN_POWERCUT_DURATION"))
}

func runPowerCut(t *testing.T, thinAttach bool, shortCuts int, long time.Duration) {
	e := newE2E(t, "mkfs.ext4", "e2fsck", "fstrim")
	began := time.Now()
	r := &pcRun{t: t, e: e, rng: rand.New(rand.NewSource(time.Now().UnixNano())), fired: map[string]int{}, missed: map[string]int{}, thin: thinAttach, diskMiB: powercutDiskMiB}
	if thinAttach {
		// More chunks, fetched one by one as the loop's writes reach them.
		r.diskMiB = powercutThinDiskMiB
	}
	r.mountPC()
	r.url = e.az.BlobURL("disks", "pc.vhd")
	r.state = filepath.Join(r.pcMP, "state")
	r.mp = e.path("mnt")
	r.fsDir = e.path("fs")
	if thinAttach {
		r.prepareThin()
	} else {
		e.mustVhdsync("create", "--blob", r.url, "--size", fmt.Sprintf("%dMiB", r.diskMiB), "--state", r.state, "--create-container")
	}

	defer func() {
		// The replays that found records bound writes had gone over
		// (journal/bind.go), as far as the daemon's log, itself on the
		// power-cut file system, kept their lines.
		b, _ := os.ReadFile(filepath.Join(r.state, "vhdsync.log"))
		t.Logf("power-cut loop: %d replays logged image-backed records overwritten by bound writes", strings.Count(string(b), "later writes went over"))
		writes, lost := r.model.counts()
		t.Logf("RELIABILITY | power cuts%s | %d cuts in %v (%d at a random moment, %d of them with the emulator frozen; %d at chosen moments: %s) | %d acknowledged-and-synced writes checked | %d lost | %d replays failed | e2fsck -fn after every replay: %d runs, %d failures | blob equals image: after %d replays and drains, and at the end: %v |",
			r.thinLabel(), r.cuts, time.Since(began).Round(time.Second), r.cuts-r.hooked, r.frozen, r.hooked, r.firedSummary(), writes, lost, r.replayFailed, r.fscks, r.fsckFailed, r.converged, r.blobOK)
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		t.Logf("power-cut loop memory: test process (power-cut file system included) max RSS %d MiB; daemon VmHWM max %d MiB; %d cuts dropped %d MiB of unsynced changes in %d files and %d directory entries; writer: %d writes, %d fsyncs; %d blocks torn by writes in flight (legal)",
			ru.Maxrss>>10, r.daemonHWM>>10, r.cuts, r.droppedBytes>>20, r.droppedFiles, r.droppedEntries, r.model.writes, r.model.fsyncs, r.model.torn)
	}()

	// The first mount: ext4 on the disk, the writer's file written whole
	// and made durable (file and directory) before anything is recorded
	// (a thin disk's blob holds them already).
	if !r.mountDaemon(nil) {
		t.Fatal("the first mount was cut")
	}
	r.attach()
	if !thinAttach {
		r.e.must("mkfs.ext4", "-q", r.loop)
	}
	r.mountFS()
	if !thinAttach {
		r.model = newPCModel(powercutFileMiB << 20 / powercutBlock)
		if err := r.model.create(filepath.Join(r.fsDir, "data.bin")); err != nil {
			t.Fatal(err)
		}
	}

	moments := powercutMoments()
	if thinAttach {
		// First, while most chunks are still to be fetched.
		moments = append(thinPowercutMoments(), moments...)
	}
	// VHDSYNC_POWERCUT_MOMENT names a moment every cut is made at.
	var forced *cutMoment
	if name := os.Getenv("VHDSYNC_POWERCUT_MOMENT"); name != "" {
		for i := range moments {
			if moments[i].name == name {
				forced = &moments[i]
			}
		}
		if forced == nil {
			t.Fatalf("VHDSYNC_POWERCUT_MOMENT=%q: no such moment", name)
		}
	}
	converge := false // the last cut asks for a convergence check
	for cycle := 1; r.cuts < shortCuts || time.Since(began) < long; cycle++ {
		// Every other cut is at a chosen moment, in turn.
		var m *cutMoment
		if cycle%2 == 0 {
			m = &moments[(cycle/2-1)%len(moments)]
		}
		if forced != nil {
			m = forced
		}
		if cycle > 1 {
			var mountFired <-chan powercut.CutStats
			if m != nil && m.atMount {
				mountFired = r.pc.CutAfter(m.pred(r.rng))
			}
			if !r.mountDaemon(mountFired) {
				r.afterCut(m, true)
				continue // cut during the mount: the next mount checks
			}
			if mountFired != nil {
				r.missed[m.name]++
				r.t.Logf("cycle %d: the mount did not reach %s: cut at random", cycle, m.name)
				m = nil
			}
			if converge || cycle%4 == 0 {
				r.convergeCheck(cycle)
			}
			r.attach()
			r.mountFS()
			r.check()
		}
		r.workload(cycle, m)
		converge = m != nil && m.converge
	}
	// The end: a last check, then drain, verify, blob against image (a
	// thin disk fetches the rest first).
	r.mountArgs = nil
	if !r.mountDaemon(nil) {
		t.Fatal("the last mount was cut")
	}
	r.attach()
	r.mountFS()
	r.check()
	if thinAttach {
		if st := r.e.mustStatus(r.state); st.Thin != nil {
			r.thinMissing = int(st.Thin.MissingChunks)
		}
		waitFor(t, 2*time.Minute, "the thin disk to complete", func() (bool, error) {
			b, err := os.ReadFile(filepath.Join(r.state, "vhdsync.json"))
			return err == nil && !strings.Contains(string(b), `"thin": true`), err
		})
	}
	umountFS(t, r.fsDir)
	r.e.must("losetup", "-d", r.loop)
	r.e.mustVhdsync("unmount", r.mp)
	r.d.waitExit(time.Minute)
	r.e.mustVhdsync("verify", "--state", r.state)
	r.e.checkBlobIsImage(r.url, r.state, int64(r.diskMiB)<<20)
	r.blobOK = true // both fail the test otherwise
	if _, lost := r.model.counts(); lost != 0 || r.replayFailed != 0 || r.fsckFailed != 0 {
		t.Errorf("%d acknowledged writes lost, %d replays failed, %d e2fsck failures: all must be 0", lost, r.replayFailed, r.fsckFailed)
	}
}

// pcRun is the loop's world.
type pcRun struct {
	t   *testing.T
	e   *e2e
	rng *rand.Rand

	pcBacking, pcMP string
	pc              *powercut.FS
	url, state, mp  string
	d               *daemon
	loop, fsDir     string
	model           *pcModel

	cuts, hooked, replayFailed, fscks, fsckFailed, converged int
	// frozen counts the cycles cut while the emulator was frozen (see
	// workload).
	frozen        int
	fired, missed map[string]int
	blobOK        bool
	daemonHWM     int64 // KiB
	// thin: the disk is thin-attached; mountArgs go to every mount but
	// the last; thinMissing is the chunks still missing at the end.
	thin                         bool
	mountArgs                    []string
	thinMissing                  int
	thinCuts                     int // cuts after which the disk was still thin
	diskMiB                      int // the disk's size
	droppedBytes                 int64
	droppedFiles, droppedEntries int
}

// mountPC mounts the power-cut file system and registers its unmount,
// which runs after every other cleanup of the test.
func (r *pcRun) mountPC() {
	r.pcBacking, r.pcMP = r.e.path("pc-backing"), r.e.mkdir("pc")
	fs, err := powercut.Mount(r.pcBacking, r.pcMP, powercut.Options{})
	if err != nil {
		r.t.Fatal(err)
	}
	r.pc = fs
	r.t.Cleanup(func() {
		if r.pc == nil {
			return
		}
		if err := r.pc.Unmount(); err != nil {
			r.t.Errorf("cleanup: unmount the power-cut file system: %v", err)
		}
	})
}

// remountPC unmounts the cut file system (lazily while the killed daemon's
// last files close) and mounts what survived.
func (r *pcRun) remountPC() {
	if err := r.pc.Unmount(); err != nil {
		r.t.Fatal(err)
	}
	r.pc = nil
	fs, err := powercut.Mount(r.pcBacking, r.pcMP, powercut.Options{})
	if err != nil {
		r.t.Fatal(err)
	}
	r.pc = fs
}

// mountDaemon runs `vhdsync mount`. With fired (a cut armed for the
// mount), a cut during the mount kills the daemon at once and returns
// false; the mount is then cleaned up by afterCut. A mount that fails
// without a cut is a failed replay: the test stops.
func (r *pcRun) mountDaemon(fired <-chan powercut.CutStats) bool {
	ensureDir(r.t, r.mp)
	type res struct {
		r   result
		err error
	}
	done := make(chan res, 1)
	go func() {
		args := append(append([]string{"mount", "--state", r.state}, r.mountArgs...), r.mp)
		out, err := runTimeout(r.e.dir, 2*time.Minute, r.e.bin, args...)
		done <- res{out, err}
	}()
	var out res
	select {
	case out = <-done:
		if fired != nil && !r.pc.Disarm() {
			r.noteCut(<-fired)
			r.killDaemons()
			return false
		}
	case s := <-fired:
		r.noteCut(s)
		r.killDaemons()
		<-done
		return false
	}
	d := &daemon{e: r.e, state: r.state, mp: r.mp}
	if m := daemonPidRE.FindStringSubmatch(out.r.stdout); m != nil {
		d.pid, _ = strconv.Atoi(m[1])
	}
	r.t.Cleanup(d.cleanup)
	r.d = d
	if out.err != nil || out.r.code != 0 || !isMounted(r.mp) {
		r.replayFailed++
		b, _ := os.ReadFile(filepath.Join(r.state, "vhdsync.log"))
		r.t.Fatalf("vhdsync mount after a power cut (replay failed): %v %s\ndaemon log:\n%s", out.err, out.r, tail(string(b), 40))
	}
	return true
}

// killDaemons kills every process of the binary serving our state
// directory (the daemon, and a `vhdsync mount` still waiting for it).
func (r *pcRun) killDaemons() {
	pattern := "\x00mount\x00--state\x00" + r.state + "\x00"
	for deadline := time.Now().Add(30 * time.Second); ; {
		ents, _ := os.ReadDir("/proc")
		alive := 0
		for _, ent := range ents {
			pid, err := strconv.Atoi(ent.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			// Alive first (from /proc/PID/stat): reading the command line of
			// a zombie whose threads are stuck in the kernel blocks on its
			// memory map, and would hang the loop on somebody else's process.
			if !processAlive(pid) {
				continue
			}
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if err != nil || !strings.Contains(string(b), pattern) {
				continue
			}
			alive++
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if alive == 0 {
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("a vhdsync process of %s survives SIGKILL", r.state)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// noteCut counts a cut and what it dropped.
func (r *pcRun) noteCut(s powercut.CutStats) {
	r.cuts++
	r.droppedBytes += s.Bytes
	r.droppedFiles += s.Files
	r.droppedEntries += s.Entries
}

// attach puts a loop device on the disk's raw view.
func (r *pcRun) attach() {
	r.loop = r.e.losetup(filepath.Join(r.mp, "pc.img"))
}

// mountFS mounts ext4 (replaying its journal).
func (r *pcRun) mountFS() {
	r.e.mountFS(r.loop, r.fsDir)
}

// check reads every acknowledged-and-synced write back, then runs e2fsck
// -fn on the unmounted filesystem and mounts it again.
func (r *pcRun) check() {
	if err := r.model.verify(r.t, filepath.Join(r.fsDir, "data.bin")); err != nil {
		r.t.Fatal(err)
	}
	umountFS(r.t, r.fsDir)
	r.fscks++
	if res := execTimeout(r.t, r.e.dir, 2*time.Minute, "e2fsck", "-fn", r.loop); res.code != 0 {
		r.fsckFailed++
		r.t.Errorf("e2fsck -fn after the replay of cut %d: %s", r.cuts, res)
	}
	r.mountFS()
}

// workload runs the writer and the churn until the cut of this cycle: at
// moment m (if it comes within powercutHookWait), else at random.
func (r *pcRun) workload(cycle int, m *cutMoment) {
	stop := make(chan struct{})
	var cutting atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	pc := r.pc
	fail := func(what string, err error) {
		// A cut armed for a chosen moment fails the daemon's requests
		// before the test hears of it.
		if err != nil && !cutting.Load() && !pc.Dead() {
			errs <- fmt.Errorf("%s before the cut: %w", what, err)
		}
	}
	wrng := rand.New(rand.NewSource(r.rng.Int63()))
	wg.Go(func() { fail("writer", r.model.write(filepath.Join(r.fsDir, "data.bin"), wrng, stop)) })
	crng := rand.New(rand.NewSource(r.rng.Int63()))
	wg.Go(func() { fail("file churn", r.churn(cycle, crng, stop)) })

	var fired <-chan powercut.CutStats
	if m != nil && !m.atMount {
		fired = r.pc.CutAfter(m.pred(r.rng))
	}
	var s powercut.CutStats
	wait := time.Duration(200+r.rng.Intn(1300)) * time.Millisecond
	if fired != nil {
		wait = powercutHookWait
	} else if r.rng.Intn(3) == 0 {
		// The emulator stops answering until after the cut: the flusher
		// is stuck on its batch, so writes over later large records bind
		// their epochs rather than copy them (journal/bind.go), and the
		// replay finds them overwritten.
		if err := r.e.az.Pause(); err != nil {
			r.t.Fatal(err)
		}
		r.frozen++
		defer func() {
			if err := r.e.az.Resume(); err != nil {
				r.t.Error(err)
			}
		}()
	}
	select {
	case s = <-fired:
		cutting.Store(true)
		_ = syscall.Kill(r.d.pid, syscall.SIGKILL)
	case <-time.After(wait):
		if fired != nil && !r.pc.Disarm() {
			s = <-fired // it fired meanwhile
			cutting.Store(true)
			_ = syscall.Kill(r.d.pid, syscall.SIGKILL)
			break
		}
		// Stop the daemon, cut, kill: it makes no request after the cut.
		cutting.Store(true)
		r.noteHWM()
		_ = syscall.Kill(r.d.pid, syscall.SIGSTOP)
		waitStopped(r.d.pid, 200*time.Millisecond)
		s = r.pc.Cut()
		_ = syscall.Kill(r.d.pid, syscall.SIGKILL)
	}
	close(stop)
	r.noteCut(s)
	switch {
	case s.After != nil:
		r.hooked++
		r.fired[m.name]++
		r.t.Logf("cycle %d: cut right after %s %s (%s)", cycle, s.After.Kind, s.After.Path, m.name)
	case m != nil:
		r.missed[m.name]++
		r.t.Logf("cycle %d: %s did not come within %v: cut at random", cycle, m.name, wait)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		r.t.Errorf("cycle %d: %v", cycle, err)
	}
	r.afterCut(m, false)
}

// afterCut takes down what the killed daemon leaves: ext4, the loop
// device, the dead FUSE mount; waits for the daemon to be gone; and mounts
// the power-cut file system again: it now shows what survived.
func (r *pcRun) afterCut(m *cutMoment, atMount bool) {
	if atMount {
		r.hooked++
		r.fired[m.name]++
		r.t.Logf("cut during the mount, right after %s", m.name)
	}
	if isMounted(r.fsDir) {
		if err := syscall.Unmount(r.fsDir, 0); err != nil {
			_ = syscall.Unmount(r.fsDir, syscall.MNT_DETACH)
		}
	}
	if r.loop != "" {
		detachLoop(r.t, r.loop, filepath.Join(r.mp, "pc.img"))
		r.loop = ""
	}
	// The killed daemon's own connection: a thread of it may wait on a
	// request to its own mount, which nobody answers any more (package
	// fuseconn). Found before the mount is detached, aborted once the
	// daemon is killed.
	conn, connErr := fuseconn.ID(r.mp)
	if isMounted(r.mp) {
		if err := syscall.Unmount(r.mp, syscall.MNT_DETACH); err != nil {
			r.t.Fatalf("umount -l %s: %v", r.mp, err)
		}
	}
	if r.d != nil && !atMount {
		r.d.waitExit(30 * time.Second)
	}
	r.killDaemons()
	if connErr == nil {
		if err := fuseconn.Abort(conn); err != nil {
			r.t.Errorf("abort the killed daemon's FUSE connection: %v", err)
		}
	}
	r.remountPC()
	if r.thinLocal() != nil {
		r.thinCuts++
	}
}

// noteHWM records the daemon's peak memory.
func (r *pcRun) noteHWM() {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", r.d.pid))
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			if kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64); err == nil {
				r.daemonHWM = max(r.daemonHWM, kb)
			}
		}
	}
}

// waitStopped waits until every thread of pid is stopped (or timeout).
func waitStopped(pid int, timeout time.Duration) {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return
		}
		stopped := true
		for _, task := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
			if i := strings.LastIndexByte(string(b), ')'); err == nil && i >= 0 && i+2 < len(b) && b[i+2] != 'T' && b[i+2] != 't' {
				stopped = false
				break
			}
		}
		if stopped {
			return
		}
	}
}

// churn creates, writes, fsyncs, renames and deletes files, and trims the
// filesystem now and then, until stop.
func (r *pcRun) churn(cycle int, rng *rand.Rand, stop <-chan struct{}) error {
	// Earlier cycles' trees go first: the filesystem is small. Every one
	// of them, not just the last cycle's: a cycle cut during its mount
	// churns nothing, and a cut can bring back a tree whose removal ext4
	// had not committed (the long form filled the filesystem after about
	// 200 cycles).
	old, err := filepath.Glob(filepath.Join(r.fsDir, "tree-*"))
	if err != nil {
		return err
	}
	for _, dir := range old {
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
	}
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		if _, err := fileChurn(filepath.Join(r.fsDir, fmt.Sprintf("tree-%d", cycle)), 6); err != nil {
			return err
		}
		if rng.Intn(3) == 0 {
			if out, err := runTool("fstrim", r.fsDir); err != nil {
				return fmt.Errorf("fstrim: %v: %s", err, out)
			}
		}
	}
}

// runTool runs a tool and returns its combined output.
func runTool(name string, args ...string) (string, error) {
	res, err := runTimeout("", time.Minute, name, args...)
	if err == nil && res.code != 0 {
		err = fmt.Errorf("exit %d", res.code)
	}
	return res.stdout + res.stderr, err
}

// firedSummary lists how often each chosen moment was cut at.
func (r *pcRun) firedSummary() string {
	var parts []string
	for name, n := range r.fired {
		parts = append(parts, fmt.Sprintf("%s %d", name, n))
	}
	sort.Strings(parts)
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// cutMoment is a chosen moment to cut at: right after an operation of the
// daemon on its state directory (paths relative to the power-cut root).
type cutMoment struct {
	name string
	// atMount: armed for the mount (the moment happens while the daemon
	// opens the journal and replays it), else while the workload runs.
	atMount bool
	// pred returns a fresh predicate (see nth).
	pred func(rng *rand.Rand) func(powercut.Op) bool
	// converge: the next mount checks that blob and image converge.
	converge bool
}

// nth makes a predicate that fires at a random one (first to most-th) of
// the operations match accepts.
func nth(most int, match func(powercut.Op) bool) func(*rand.Rand) func(powercut.Op) bool {
	return func(rng *rand.Rand) func(powercut.Op) bool {
		left := 1 + rng.Intn(most)
		return func(op powercut.Op) bool {
			if !match(op) {
				return false
			}
			left--
			return left == 0
		}
	}
}

// journalFile reports whether op is kind on a journal file name with
// prefix and suffix.
func journalFile(op powercut.Op, kind powercut.OpKind, prefix, suffix string) bool {
	name, ok := strings.CutPrefix(op.Path, "state/journal/")
	return ok && op.Kind == kind && strings.HasPrefix(name, prefix) && strings.HasSuffix(name, suffix) && !strings.Contains(name, "/")
}

// powercutMoments are the chosen moments. While the workload runs: the
// flusher's image sync (the records it delivered are deleted right after),
// the journal directory's fsync (new segment or badger files), an intent
// log file started again after a recycle. During the mount: the intent
// log's replay (its files deleted once badger holds their entries), the
// replay's image sync (then the records the blob holds are deleted), the
// deletion of drained segments, and badger flushing the memtables its log
// held (the table, the MANIFEST, the log's deletion).
func powercutMoments() []cutMoment {
	return []cutMoment{
		{name: "image synced before the flusher's delete", converge: true, pred: nth(3, func(op powercut.Op) bool {
			return op.Kind == powercut.OpFsync && op.Path == "state/disk.img"
		})},
		{name: "intent log replayed and deleted", atMount: true, pred: nth(1, func(op powercut.Op) bool { return journalFile(op, powercut.OpUnlink, "ilog-", ".dat") })},
		{name: "journal directory synced", pred: nth(3, func(op powercut.Op) bool {
			return op.Kind == powercut.OpFsyncDir && op.Path == "state/journal"
		})},
		{name: "image synced by the replay", atMount: true, pred: nth(1, func(op powercut.Op) bool {
			return op.Kind == powercut.OpFsync && op.Path == "state/disk.img"
		})},
		{name: "intent log file reused", pred: func(*rand.Rand) func(powercut.Op) bool {
			// A file's header is written when it is made, when it is first
			// used, and again at each reuse after a recycle.
			headers := map[string]int{}
			return func(op powercut.Op) bool {
				if !journalFile(op, powercut.OpWrite, "ilog-", ".dat") || op.Off != 0 || op.Len > 512 {
					return false
				}
				headers[op.Path]++
				return headers[op.Path] >= 3
			}
		}},
		{name: "drained segment deleted", atMount: true, pred: nth(1, func(op powercut.Op) bool { return journalFile(op, powercut.OpUnlink, "seg-", ".dat") })},
		{name: "badger table written (memtable flush)", atMount: true, pred: nth(1, func(op powercut.Op) bool { return journalFile(op, powercut.OpFsync, "", ".sst") })},
		{name: "badger manifest synced", atMount: true, pred: nth(1, func(op powercut.Op) bool { return journalFile(op, powercut.OpFsync, "MANIFEST", "") })},
		{name: "badger log deleted after a flush", atMount: true, pred: nth(1, func(op powercut.Op) bool { return journalFile(op, powercut.OpUnlink, "", ".mem") })},
	}
}

// pcModel is what the writer's file must hold: per block, the write
// acknowledged by the last fsync that returned, and the writes made since
// (in flight at a cut: any of them may have landed).
type pcModel struct {
	mu      sync.Mutex
	acked   []uint64   // block -> write id (0: zeros; undefined: torn)
	pending [][]uint64 // block -> write ids since the last returned fsync
	checked []bool     // the acked write was compared after a cut
	nextID  uint64

	writes, fsyncs, torn int
	writesChecked, lost  int
}

// undefined marks a block a write in flight at a cut tore: it may hold
// anything until written again.
const undefined = ^uint64(0)

func newPCModel(blocks int) *pcModel {
	return &pcModel{acked: make([]uint64, blocks), pending: make([][]uint64, blocks), checked: make([]bool, blocks), nextID: 1}
}

func (m *pcModel) counts() (checked, lost int) {
	if m == nil {
		return 0, 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writesChecked, m.lost
}

// blockData is write id's contents for block blk: id and block in a
// header, then bytes from a generator seeded by both.
func blockData(id uint64, blk int) []byte {
	b := make([]byte, powercutBlock)
	if id == 0 {
		return b
	}
	binary.LittleEndian.PutUint64(b, id)
	binary.LittleEndian.PutUint64(b[8:], uint64(blk))
	x := id*0x9E3779B97F4A7C15 ^ uint64(blk)*0xC2B2AE3D27D4EB4F | 1
	for i := 16; i < len(b); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
	return b
}

// create writes the file whole (zeros), fsyncs it and its directory.
func (m *pcModel) create(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(make([]byte, len(m.acked)*powercutBlock)); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// write writes 1-4 blocks at a time at random, and one time in four
// 16-32 (64-128 KiB, which the daemon keeps in its image only, and
// captures when a later write lands on them), an fsync or fdatasync after
// a random number of writes, until stop or an error.
func (m *pcModel) write(path string, rng *rand.Rand, stop <-chan struct{}) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	blocks := len(m.acked)
	untilSync := 1 + rng.Intn(8)
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		k := 1 + rng.Intn(4)
		if rng.Intn(4) == 0 {
			k = min(16+rng.Intn(17), blocks)
		}
		first := rng.Intn(blocks - k + 1)
		buf := make([]byte, 0, k*powercutBlock)
		m.mu.Lock()
		id := m.nextID
		m.nextID++
		for b := first; b < first+k; b++ {
			buf = append(buf, blockData(id, b)...)
			m.pending[b] = append(m.pending[b], id)
		}
		m.writes++
		m.mu.Unlock()
		if _, err := f.WriteAt(buf, int64(first)*powercutBlock); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if untilSync--; untilSync > 0 {
			continue
		}
		untilSync = 1 + rng.Intn(8)
		if rng.Intn(2) == 0 {
			err = f.Sync()
		} else {
			err = syscall.Fdatasync(int(f.Fd()))
		}
		if err != nil {
			return fmt.Errorf("fsync: %w", err)
		}
		m.mu.Lock()
		m.fsyncs++
		for b, ids := range m.pending {
			if len(ids) > 0 {
				m.acked[b] = ids[len(ids)-1]
				m.checked[b] = false
				m.pending[b] = nil
			}
		}
		m.mu.Unlock()
	}
}

// verify reads the file and compares every block with the model: its
// acknowledged write, or one of the writes in flight at the cut (which
// then becomes the block's content). A block holding anything else lost
// an acknowledged write, unless a write in flight covered it (a torn
// write, legal: the block is undefined until written again).
func (m *pcModel) verify(t *testing.T, path string) error {
	got, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read the writer's file after the replay: %w", err)
	}
	if len(got) != len(m.acked)*powercutBlock {
		return fmt.Errorf("the writer's file is %d bytes after the replay, want %d", len(got), len(m.acked)*powercutBlock)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for b := range m.acked {
		blk := got[b*powercutBlock : (b+1)*powercutBlock]
		id := binary.LittleEndian.Uint64(blk)
		whole := bytes.Equal(blk, blockData(id, b))
		acked, pending := m.acked[b], m.pending[b]
		m.pending[b] = nil
		switch {
		case whole && id == acked:
			if !m.checked[b] && acked != 0 {
				m.writesChecked++
			}
			m.checked[b] = true
		case whole && contains(pending, id):
			m.acked[b], m.checked[b] = id, true
		case acked == undefined:
			if whole {
				m.acked[b], m.checked[b] = id, true
			}
		case len(pending) > 0:
			m.acked[b] = undefined
			m.torn++
		default:
			m.lost++
			t.Errorf("block %d lost its acknowledged write %d: it holds write %d (whole: %v)", b, acked, id, whole)
		}
	}
	return nil
}

func contains(ids []uint64, id uint64) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}

// convergeCheck waits until the journal is drained after a replay and
// requires the blob to equal the image (invariant 2 after a power cut).
// A cut right after the flusher's image sync left them different for good
// before Journal.SyncApplied (the image kept a write the journal lost).
func (r *pcRun) convergeCheck(cycle int) {
	waitFor(r.t, time.Minute, "the journal to drain after the replay", func() (bool, error) {
		st, err := r.e.status(r.state)
		return err == nil && st.JournalRecords == 0, err
	})
	r.converged++
	f, err := os.Open(filepath.Join(r.state, "disk.img"))
	if err != nil {
		r.t.Fatal(err)
	}
	defer f.Close()
	// 4 MiB at a time: the whole disk twice would be the test's largest
	// allocation.
	const chunk = 4 << 20
	img := make([]byte, chunk)
	first, last, n := int64(-1), int64(-1), 0
	// A thin disk's chunks not yet fetched are on the blob only.
	local := r.thinLocal()
	for off := int64(0); off < int64(r.diskMiB)<<20; off += chunk {
		if local != nil && !local(off) {
			continue
		}
		if _, err := f.ReadAt(img, off); err != nil {
			r.t.Fatal(err)
		}
		blob := blobRange(r.t, r.url, off, chunk)
		if bytes.Equal(img, blob) {
			continue
		}
		for i := 0; i < chunk; i += 512 {
			if !bytes.Equal(img[i:i+512], blob[i:i+512]) {
				if first < 0 {
					first = off + int64(i)
				}
				last, n = off+int64(i), n+1
			}
		}
	}
	if n == 0 {
		return
	}
	r.t.Fatalf("cycle %d: after the replay of cut %d and a drain the blob differs from the image: %d sectors, bytes %d-%d", cycle, r.cuts, n, first, last+512)
}

// prepareThin makes the blob a disk with ext4 and the writer's file
// (through a state directory of its own, off the power-cut file system),
// then the loop's state directory from it with create --from-blob --thin,
// and the mounts' crawling prefetch.
func (r *pcRun) prepareThin() {
	src := r.e.path("state-src")
	r.e.mustVhdsync("create", "--blob", r.url, "--size", fmt.Sprintf("%dMiB", r.diskMiB), "--state", src, "--create-container")
	mp := r.e.path("mnt-src")
	d := r.e.mount(src, mp)
	loop := r.e.losetup(filepath.Join(mp, "pc.img"))
	// Data in every chunk of the blob (what ext4 leaves free included), so
	// that the loop's writes fetch chunks all along; mkfs without discard
	// keeps it.
	r.e.must("dd", "if=/dev/urandom", "of="+loop, "bs=1M", fmt.Sprintf("count=%d", r.diskMiB), "oflag=direct", "status=none")
	r.e.must("mkfs.ext4", "-q", "-E", "nodiscard", loop)
	r.e.mountFS(loop, r.fsDir)
	r.model = newPCModel(powercutFileMiB << 20 / powercutBlock)
	if err := r.model.create(filepath.Join(r.fsDir, "data.bin")); err != nil {
		r.t.Fatal(err)
	}
	umountFS(r.t, r.fsDir)
	detachLoop(r.t, loop, filepath.Join(mp, "pc.img"))
	r.e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	r.e.mustVhdsync("create", "--from-blob", r.url, "--state", r.state, "--thin")
	r.mountArgs = []string{"--prefetch", "0.25"}
}

// thinLabel names the loop in its figures.
func (r *pcRun) thinLabel() string {
	if r.thin {
		return fmt.Sprintf(", thin-attached disk (%d of the cuts while chunks were missing; %d still missing before the last prefetch)", r.thinCuts, r.thinMissing)
	}
	return ""
}

// thinLocal returns, for a thin disk, whether the 4 MiB chunk at an offset
// is marked local (nil: not thin, every chunk is).
func (r *pcRun) thinLocal() func(off int64) bool {
	st, err := os.ReadFile(filepath.Join(r.state, "vhdsync.json"))
	if err != nil || !strings.Contains(string(st), `"thin": true`) {
		return nil
	}
	bits, err := os.ReadFile(filepath.Join(r.state, "thin.present"))
	if err != nil {
		r.t.Fatalf("a thin state directory without its bitmap: %v", err)
	}
	return func(off int64) bool {
		c := off / (4 << 20)
		return bits[c/8]&(1<<(c%8)) != 0
	}
}

// thinPowercutMoments are the thin disk's chosen moments: right after a
// chunk's mark is written (not yet synced: the cut drops it), and right
// after it is synced.
func thinPowercutMoments() []cutMoment {
	return []cutMoment{
		{name: "thin chunk mark written", pred: nth(2, func(op powercut.Op) bool {
			return op.Kind == powercut.OpWrite && op.Path == "state/thin.present"
		})},
		{name: "thin chunk mark synced", converge: true, pred: nth(2, func(op powercut.Op) bool {
			return op.Kind == powercut.OpFsync && op.Path == "state/thin.present"
		})},
	}
}
