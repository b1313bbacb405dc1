package main

// Helpers of the end-to-end tests (e2e_test.go): they run the real vhdsync
// binary, real loop devices, filesystems, qemu-nbd and fio, and undo all of
// it in t.Cleanup, in reverse order of creation, also when a test fails.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/mountinfo"
	"github.com/vhdsync/vhdsync/internal/testenv"
)

var (
	e2eBuildOnce sync.Once
	e2eBinPath   string
	e2eBuildErr  error
)

// raceBuild reports whether this test binary was built with -race; the
// daemon is then built with -race too, so the end-to-end load checks it.
func raceBuild() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" && s.Value == "true" {
			return true
		}
	}
	return false
}

// e2eBinary builds the vhdsync binary once per test process. It goes next
// to the test binary when that lives in go test's own work directory
// (removed by go test when it finishes); otherwise into a temporary
// directory, which is then left behind (its path is logged).
func e2eBinary(t *testing.T) string {
	t.Helper()
	e2eBuildOnce.Do(func() {
		dir := ""
		if exe, err := os.Executable(); err == nil && strings.Contains(exe, string(filepath.Separator)+"go-build") {
			dir = filepath.Dir(exe)
		}
		if dir == "" {
			d, err := os.MkdirTemp("", "vhdsync-e2e-bin-")
			if err != nil {
				e2eBuildErr = err
				return
			}
			dir = d
			t.Logf("the vhdsync binary for the end-to-end tests is in %s (not removed)", dir)
		}
		out := filepath.Join(dir, "vhdsync-e2e")
		args := []string{"build", "-o", out}
		if raceBuild() {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, ".")...)
		if b, err := cmd.CombinedOutput(); err != nil {
			e2eBuildErr = fmt.Errorf("go build: %v\n%s", err, b)
			return
		}
		e2eBinPath = out
	})
	if e2eBuildErr != nil {
		t.Fatal(e2eBuildErr)
	}
	return e2eBinPath
}

// e2e is one end-to-end test's world: the binary, an Azurite, a work dir.
type e2e struct {
	t   *testing.T
	bin string
	az  *azurite.Server
	dir string
}

// newE2E checks the machine (root, /dev/fuse, the tools), builds the
// binary and starts a fresh Azurite (stopped last, by its own cleanup).
func newE2E(t *testing.T, tools ...string) *e2e {
	t.Helper()
	testenv.RequireRoot(t, "FUSE mounts, loop devices and mount(8)")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Missing(t, "/dev/fuse", "modprobe fuse (or run the tests where FUSE is available)")
	}
	for _, tool := range append([]string{"losetup", "mount", "umount"}, tools...) {
		testenv.RequireTool(t, tool, "make deps (or: apt-get install qemu-utils fuse3 fio e2fsprogs)")
	}
	bin := e2eBinary(t)
	az := azurite.Start(t)
	return &e2e{t: t, bin: bin, az: az, dir: t.TempDir()}
}

// path names a file in the test's work directory.
func (e *e2e) path(name string) string { return filepath.Join(e.dir, name) }

// mkdir makes a directory in the test's work directory.
func (e *e2e) mkdir(name string) string {
	e.t.Helper()
	p := e.path(name)
	if err := os.MkdirAll(p, 0o700); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// ensureDir makes dir unless something is there already (a dead FUSE
// mount answers ENOTCONN, not "missing": leave it to the command tested).
func ensureDir(t *testing.T, dir string) {
	t.Helper()
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
	}
}

// result is what a finished command gave.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
}

// e2eEnv is the environment the binary and the tools see: the test's own,
// without any Azure credentials or vhdsync settings (an Azurite URL uses
// the emulator's development account by itself). A -race binary sleeps a
// second at every exit unless GORACE says otherwise; it need not.
func e2eEnv() []string {
	var env []string
	gorace := "atexit_sleep_ms=0"
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "AZURE_") || strings.HasPrefix(kv, "VHDSYNC_") {
			continue
		}
		if v, ok := strings.CutPrefix(kv, "GORACE="); ok {
			if !strings.Contains(v, "atexit_sleep_ms") {
				v += " " + gorace
			}
			gorace = strings.TrimSpace(v)
			continue
		}
		env = append(env, kv)
	}
	return append(env, "GORACE="+gorace)
}

// execTimeout runs a command to its end, bounded by timeout, and returns
// its exit code and output. A command that cannot start or times out
// fails the test.
func execTimeout(t *testing.T, dir string, timeout time.Duration, name string, args ...string) result {
	t.Helper()
	r, err := runTimeout(dir, timeout, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// runTimeout is execTimeout returning the failure to run instead (for
// cleanups, which must go on).
func runTimeout(dir string, timeout time.Duration, name string, args ...string) (result, error) {
	return runTimeoutEnv(dir, timeout, nil, name, args...)
}

// runTimeoutEnv is runTimeout with extra KEY=VALUE environment variables
// on top of e2eEnv's.
func runTimeoutEnv(dir string, timeout time.Duration, extra []string, name string, args ...string) (result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(e2eEnv(), extra...)
	cmd.WaitDelay = 5 * time.Second
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		return r, fmt.Errorf("%s %s: no answer within %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), timeout, r.stdout, r.stderr)
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		return r, fmt.Errorf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return r, nil
}

// vhdsync runs the binary (timeout 2 minutes) and returns its result.
func (e *e2e) vhdsync(args ...string) result {
	e.t.Helper()
	return execTimeout(e.t, e.dir, 2*time.Minute, e.bin, args...)
}

// mustVhdsync runs the binary and fails the test unless it exits 0.
func (e *e2e) mustVhdsync(args ...string) result {
	e.t.Helper()
	r := e.vhdsync(args...)
	if r.code != 0 {
		e.t.Fatalf("vhdsync %s: %s", strings.Join(args, " "), r)
	}
	return r
}

// must runs an external tool (timeout 2 minutes) and fails the test
// unless it exits 0; it returns the standard output.
func (e *e2e) must(name string, args ...string) string {
	e.t.Helper()
	r := execTimeout(e.t, e.dir, 2*time.Minute, name, args...)
	if r.code != 0 {
		e.t.Fatalf("%s %s: %s", name, strings.Join(args, " "), r)
	}
	return r.stdout
}

// waitFor polls cond every 20 ms until it holds, failing the test after
// timeout with what it waited for and cond's last error.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for {
		ok, err := cond()
		if ok {
			return
		}
		last = err
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s; last: %v", timeout, what, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// createDisk creates a disk of sizeMiB on the test's Azurite, named name;
// it returns the blob URL and the state directory.
func (e *e2e) createDisk(name string, sizeMiB int) (url, state string) {
	e.t.Helper()
	url = e.az.BlobURL("disks", name+".vhd")
	state = e.path("state-" + name)
	e.mustVhdsync("create", "--blob", url, "--size", fmt.Sprintf("%dMiB", sizeMiB), "--state", state, "--create-container")
	return url, state
}

// status runs `vhdsync status --state DIR --json`. Its report comes with
// the exit codes that describe the disk (11: writes pending and no daemon,
// 15: not healthy); other codes are errors.
func (e *e2e) status(state string) (statusReport, error) {
	e.t.Helper()
	r := execTimeout(e.t, e.dir, time.Minute, e.bin, "status", "--state", state, "--json")
	if r.code != 0 && r.code != ExitNotDrained && r.code != ExitUnhealthy {
		return statusReport{}, fmt.Errorf("vhdsync status: %s", r)
	}
	var s statusReport
	if err := json.Unmarshal([]byte(r.stdout), &s); err != nil {
		return statusReport{}, fmt.Errorf("status JSON: %v: %s", err, r.stdout)
	}
	return s, nil
}

// mustStatus is status that fails the test on an error.
func (e *e2e) mustStatus(state string) statusReport {
	e.t.Helper()
	s, err := e.status(state)
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

var daemonPidRE = regexp.MustCompile(`daemon pid (\d+)`)

// daemon is a mount made by `vhdsync mount` in the background.
type daemon struct {
	e     *e2e
	state string
	mp    string
	pid   int
	out   string // what vhdsync mount printed
}

// mount mounts state at mountpoint mp (made if missing) with the normal
// background `vhdsync mount`, and registers the cleanup: vhdsync unmount
// (or umount -l for a dead or stuck mount), then SIGKILL for a daemon
// still alive, then a look at the daemon's log for data races and panics.
func (e *e2e) mount(state, mp string, extra ...string) *daemon {
	e.t.Helper()
	ensureDir(e.t, mp)
	args := append([]string{"mount", "--state", state}, extra...)
	r := e.vhdsync(append(args, mp)...)
	// Register the cleanup whatever happened: a mount that half worked
	// must be undone too.
	d := &daemon{e: e, state: state, mp: mp, out: r.stdout}
	if m := daemonPidRE.FindStringSubmatch(r.stdout); m != nil {
		d.pid, _ = strconv.Atoi(m[1])
	}
	e.t.Cleanup(d.cleanup)
	if r.code != 0 {
		e.t.Fatalf("vhdsync mount: %s", r)
	}
	if !isMounted(mp) {
		e.t.Fatalf("vhdsync mount exited 0 but %s is not mounted: %s", mp, r)
	}
	s := e.mustStatus(state)
	if !s.Mounted || s.PID <= 0 || s.Mountpoint != mp {
		e.t.Fatalf("status after mount: %+v", s)
	}
	if d.pid != s.PID {
		e.t.Errorf("mount said daemon pid %d, status says %d: %s", d.pid, s.PID, r.stdout)
	}
	d.pid = s.PID
	return d
}

// alive reports whether the daemon process still runs (and is ours: its
// command line names our binary and state directory).
func (d *daemon) alive() bool {
	if d.pid <= 0 || !processAlive(d.pid) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", d.pid))
	if err != nil {
		return false
	}
	if len(b) == 0 {
		// Exiting: its memory (and so its command line) is gone, but not
		// yet its files, the state directory's lock among them.
		return true
	}
	return strings.Contains(string(b), "\x00mount\x00--state\x00"+d.state+"\x00")
}

// waitExit waits until the daemon process is gone.
func (d *daemon) waitExit(timeout time.Duration) {
	d.e.t.Helper()
	waitFor(d.e.t, timeout, fmt.Sprintf("daemon pid %d to exit", d.pid), func() (bool, error) { return !d.alive(), nil })
}

// logPath is the daemon's log, the state directory's vhdsync.log (a
// relative state directory is relative to the work directory, where the
// binary runs).
func (d *daemon) logPath() string {
	if filepath.IsAbs(d.state) {
		return filepath.Join(d.state, "vhdsync.log")
	}
	return filepath.Join(d.e.dir, d.state, "vhdsync.log")
}

// log returns the daemon's log.
func (d *daemon) log() string {
	b, _ := os.ReadFile(d.logPath())
	return string(b)
}

func (d *daemon) cleanup() {
	t := d.e.t
	if isMounted(d.mp) {
		// A bounded drain: with the remote gone it would never end.
		r, err := runTimeout(d.e.dir, time.Minute, d.e.bin, "unmount", "--timeout", "15s", d.mp)
		if (err != nil || r.code != 0) && !t.Failed() {
			t.Errorf("cleanup: vhdsync unmount %s: %v %s", d.mp, err, r)
		}
		if isMounted(d.mp) {
			if err := syscall.Unmount(d.mp, syscall.MNT_DETACH); err != nil {
				t.Errorf("cleanup: umount -l %s: %v", d.mp, err)
			}
		}
	}
	// A daemon still alive is draining: let it finish, then stop its drain
	// with SIGTERM (the journal is kept), then SIGKILL.
	for _, sig := range []syscall.Signal{0, syscall.SIGTERM, syscall.SIGKILL} {
		if !d.alive() {
			break
		}
		if sig != 0 {
			if !t.Failed() {
				t.Errorf("cleanup: daemon pid %d still alive; sending %v", d.pid, sig)
			}
			_ = syscall.Kill(d.pid, sig)
		}
		for deadline := time.Now().Add(5 * time.Second); d.alive() && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if d.alive() {
		t.Errorf("cleanup: daemon pid %d survived SIGKILL", d.pid)
	}
	log := d.log()
	for _, bad := range []string{"WARNING: DATA RACE", "panic:", "fatal error:"} {
		if strings.Contains(log, bad) {
			t.Errorf("the daemon's log (%s) shows %q", d.logPath(), bad)
		}
	}
	if t.Failed() {
		t.Logf("daemon log %s:\n%s", d.logPath(), tail(log, 60))
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// mountInfo is one line of /proc/self/mountinfo.
type mountInfo struct{ fstype, source string }

// mountpoints lists the mounts of /proc/self/mountinfo by mountpoint.
func mountpoints() map[string]mountInfo {
	out := map[string]mountInfo{}
	mounts, _ := mountinfo.Read()
	for _, m := range mounts {
		out[m.Mountpoint] = mountInfo{fstype: m.FSType, source: m.Source}
	}
	return out
}

// isMounted reports whether something is mounted at path.
func isMounted(path string) bool {
	_, ok := mountpoints()[path]
	return ok
}

// losetup attaches file to a free loop device (extra: e.g. --read-only,
// --sizelimit N) and registers its detach, done only while the device
// still has this backing file (never someone else's device).
func (e *e2e) losetup(file string, extra ...string) string {
	e.t.Helper()
	args := append([]string{"--find", "--show"}, extra...)
	dev := strings.TrimSpace(e.must("losetup", append(args, file)...))
	if !strings.HasPrefix(dev, "/dev/loop") {
		e.t.Fatalf("losetup gave %q", dev)
	}
	e.t.Cleanup(func() { detachLoop(e.t, dev, file) })
	return dev
}

// loopBacking returns the backing file of a loop device ("" if none).
func loopBacking(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// detachLoop detaches dev if it is still attached to file.
func detachLoop(t *testing.T, dev, file string) {
	t.Helper()
	if b := loopBacking(dev); b == "" || (b != file && !strings.HasPrefix(b, file+" ")) {
		return
	}
	if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
		t.Errorf("cleanup: losetup -d %s: %v: %s", dev, err, out)
	}
}

// mountFS mounts dev at dir (made if missing) with mount(8) options and
// registers its unmount.
func (e *e2e) mountFS(dev, dir string, opts ...string) {
	e.t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		e.t.Fatal(err)
	}
	args := append(opts, dev, dir)
	e.must("mount", args...)
	e.t.Cleanup(func() { umountFS(e.t, dir) })
}

// umountFS unmounts dir if something is mounted there.
func umountFS(t *testing.T, dir string) {
	t.Helper()
	if !isMounted(dir) {
		return
	}
	if err := syscall.Unmount(dir, 0); err != nil {
		t.Errorf("cleanup: umount %s: %v; detaching it lazily", dir, err)
		_ = syscall.Unmount(dir, syscall.MNT_DETACH)
	}
}

// bg is a long-running tool started by startBackground.
type bg struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once it has exited (and been reaped)
	err  error         // its Wait error, valid after done
}

// exited reports whether the tool has ended.
func (b *bg) exited() bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

// startBackground starts a long-running tool (qemu-nbd, fio) with its
// output in a file of the work directory (dir: its working directory,
// default the work directory), and registers its stop: SIGTERM, then
// SIGKILL if it lingers.
func (e *e2e) startBackground(dir, logName, name string, args ...string) *bg {
	e.t.Helper()
	logf, err := os.Create(e.path(logName))
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(name, args...)
	cmd.Dir = e.dir
	if dir != "" {
		cmd.Dir = dir
	}
	cmd.Env = e2eEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		e.t.Fatalf("start %s: %v", name, err)
	}
	b := &bg{cmd: cmd, done: make(chan struct{})}
	go func() { b.err = cmd.Wait(); logf.Close(); close(b.done) }()
	e.t.Cleanup(func() {
		if b.exited() {
			return
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-b.done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-b.done
		}
	})
	return b
}

// blobClient returns an official SDK client for url (Azurite's account).
func blobClient(t *testing.T, url string) *blob.Client {
	t.Helper()
	cred, err := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := blob.NewClientWithSharedKeyCredential(url, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// blobState is what a reader in Azure sees of a blob: its sequence
// number, lease state and length.
type blobState struct {
	seq    int64
	lease  string
	length int64
}

func getBlobState(t *testing.T, url string) blobState {
	t.Helper()
	p, err := blobClient(t, url).GetProperties(context.Background(), nil)
	if err != nil {
		t.Fatalf("blob properties: %v", err)
	}
	s := blobState{}
	if p.BlobSequenceNumber != nil {
		s.seq = *p.BlobSequenceNumber
	}
	if p.LeaseState != nil {
		s.lease = string(*p.LeaseState)
	}
	if p.ContentLength != nil {
		s.length = *p.ContentLength
	}
	return s
}

// blobRange downloads n bytes at off with the official SDK.
func blobRange(t *testing.T, url string, off, n int64) []byte {
	t.Helper()
	buf := make([]byte, n)
	if _, err := blobClient(t, url).DownloadBuffer(context.Background(), buf, &blob.DownloadBufferOptions{Range: blob.HTTPRange{Offset: off, Count: n}}); err != nil {
		t.Fatalf("download %d+%d: %v", off, n, err)
	}
	return buf
}

// stateFooter returns the footer recorded in the state directory.
func stateFooter(t *testing.T, state string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "vhdsync.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Footer []byte `json:"footer"`
	}
	if err := json.Unmarshal(b, &st); err != nil || len(st.Footer) != 512 {
		t.Fatalf("footer in vhdsync.json: %v (%d bytes)", err, len(st.Footer))
	}
	return st.Footer
}

// checkBlobIsImage downloads the blob with the SDK into the work directory
// and checks it byte for byte: the data region equals the state's
// disk.img, the last 512 bytes equal the recorded footer. It returns the
// downloaded file's path.
func (e *e2e) checkBlobIsImage(url, state string, size int64) string {
	e.t.Helper()
	local := e.path(fmt.Sprintf("blob-%d.vhd", time.Now().UnixNano()))
	download(e.t, url, local)
	bf, err := os.Open(local)
	if err != nil {
		e.t.Fatal(err)
	}
	defer bf.Close()
	if st, _ := bf.Stat(); st.Size() != size+512 {
		e.t.Fatalf("downloaded blob is %d bytes, want %d", st.Size(), size+512)
	}
	img, err := os.Open(filepath.Join(state, "disk.img"))
	if err != nil {
		e.t.Fatal(err)
	}
	defer img.Close()
	if off, ok := sameBytes(io.NewSectionReader(bf, 0, size), img); !ok {
		e.t.Fatalf("blob and %s/disk.img differ, first in the 1 MiB at byte %d", state, off)
	}
	foot := make([]byte, 512)
	if _, err := bf.ReadAt(foot, size); err != nil {
		e.t.Fatal(err)
	}
	if !bytes.Equal(foot, stateFooter(e.t, state)) {
		e.t.Fatal("the blob's footer is not the one the state directory recorded")
	}
	return local
}

// sameBytes compares two readers 1 MiB at a time; on a difference it
// returns the offset of the first differing MiB.
func sameBytes(a, b io.Reader) (int64, bool) {
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; off += 1 << 20 {
		na, ea := io.ReadFull(a, ba)
		nb, eb := io.ReadFull(b, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return off, false
		}
		if ea != nil || eb != nil {
			return 0, (ea == nil) == (eb == nil)
		}
	}
}

// pattern returns n deterministic pseudo-random bytes for seed (never all
// zero, so a lost write cannot pass for an unwritten range).
func pattern(seed string, n int) []byte {
	out := make([]byte, 0, n+sha256.Size)
	h := sha256.Sum256([]byte(seed))
	for len(out) < n {
		out = append(out, h[:]...)
		h = sha256.Sum256(h[:])
	}
	return out[:n]
}

// writeAtSync writes chunks (offset -> bytes) into file with WriteAt and
// one fsync, as a plain program would.
func writeAtSync(t *testing.T, file string, chunks map[int64][]byte) {
	t.Helper()
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for off, b := range chunks {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatalf("write %s at %d: %v", file, off, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync %s: %v", file, err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close %s: %v", file, err)
	}
}

// checkBlobHas downloads each chunk's range and compares.
func checkBlobHas(t *testing.T, url string, chunks map[int64][]byte) {
	t.Helper()
	for off, want := range chunks {
		if got := blobRange(t, url, off, int64(len(want))); !bytes.Equal(got, want) {
			t.Errorf("the blob lacks the %d bytes written at %d", len(want), off)
		}
	}
}

// readLastStop reads STATE/last-stop.json.
func readLastStop(t *testing.T, state string) lastStop {
	t.Helper()
	var ls lastStop
	b, err := os.ReadFile(filepath.Join(state, lastStopFile))
	if err != nil {
		t.Fatalf("last stop: %v", err)
	}
	if err := json.Unmarshal(b, &ls); err != nil {
		t.Fatalf("last stop %s: %v", b, err)
	}
	return ls
}

// logInt finds the last "key=N" in a daemon log line containing msg.
func logInt(log, msg, key string) (int, bool) {
	n, found := 0, false
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, msg) {
			continue
		}
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, key+"="); ok {
				if x, err := strconv.Atoi(v); err == nil {
					n, found = x, true
				}
			}
		}
	}
	return n, found
}
