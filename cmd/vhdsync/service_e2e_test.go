package main

// Running vhdsync as a service, end to end with the real binary, FUSE and
// Azurite: systemd's notify protocol on a fake NOTIFY_SOCKET, /etc/fstab
// lines through mount(8) and umount(8), the log reopened on SIGHUP by
// README's logrotate script, and the Prometheus endpoint scraped under
// load.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/testenv"
)

// notification is one datagram the fake systemd received, with what the
// mount looked like the moment it arrived.
type notification struct {
	msg      string
	mounted  bool // the mountpoint was in the mount table
	answered bool // the disk's file answered stat
}

// TestE2ESystemdNotify runs the mount as vhdsync@.service does (in the
// foreground, NOTIFY_SOCKET set, logs on standard error) and stops it as
// its ExecStop does (`vhdsync unmount`): READY=1 arrives once the mount
// answers, STOPPING=1 and STATUS= lines while it drains, and the daemon
// exits 0 with everything on the blob.
func TestE2ESystemdNotify(t *testing.T) {
	e := newE2E(t)
	url, state := e.createDisk("notify", 64)
	mp := e.mkdir("mnt")
	img := filepath.Join(mp, "notify.img")

	// The socket path must fit sun_path (108 bytes): not under t.TempDir.
	sockDir, err := os.MkdirTemp("", "vhdsync-notify-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	notes := make(chan notification, 256)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				return
			}
			nt := notification{msg: string(buf[:n])}
			if strings.Contains(nt.msg, "READY=1") {
				nt.mounted = isMounted(mp)
				_, serr := os.Stat(img)
				nt.answered = serr == nil
			}
			notes <- nt
		}
	}()

	journal := e.path("journal.log") // what systemd would put in the journal
	jf, err := os.Create(journal)
	if err != nil {
		t.Fatal(err)
	}
	defer jf.Close()
	cmd := exec.Command(e.bin, "mount", "--foreground", "--state", state, "--linger", "10ms", mp)
	cmd.Dir = e.dir
	cmd.Env = append(e2eEnv(), "NOTIFY_SOCKET="+sock)
	cmd.Stdout, cmd.Stderr = jf, jf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{}) // closed once the daemon has exited; then exitErr is its status
	var exitErr error
	go func() { exitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		if isMounted(mp) {
			if r, err := runTimeout(e.dir, time.Minute, e.bin, "unmount", "--timeout", "15s", mp); err != nil || r.code != 0 {
				t.Errorf("cleanup: vhdsync unmount: %v %s", err, r)
				_ = syscall.Unmount(mp, syscall.MNT_DETACH)
			}
		}
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			t.Errorf("cleanup: the foreground daemon did not exit; killing it")
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			b, _ := os.ReadFile(journal)
			t.Logf("the daemon's standard error:\n%s", tail(string(b), 60))
		}
		if b, _ := os.ReadFile(journal); bytes.Contains(b, []byte("DATA RACE")) || bytes.Contains(b, []byte("panic:")) {
			t.Errorf("the daemon's standard error shows a race or panic:\n%s", tail(string(b), 60))
		}
	})

	next := func(what string) notification {
		t.Helper()
		select {
		case nt := <-notes:
			return nt
		case <-time.After(time.Minute):
			t.Fatalf("no notification within a minute while waiting for %s (daemon exited: %v)", what, isClosed(exited))
		}
		return notification{}
	}
	ready := next("READY=1")
	if !strings.HasPrefix(ready.msg, "READY=1\n") || !strings.Contains(ready.msg, "STATUS=serving at "+mp) {
		t.Fatalf("first notification %q, want READY=1 with STATUS=serving", ready.msg)
	}
	if !ready.mounted || !ready.answered {
		t.Fatalf("READY=1 arrived before the mount answered (mounted %v, %s answered %v)", ready.mounted, img, ready.answered)
	}

	chunks := map[int64][]byte{0: pattern("notify-a", 1<<20), 17 << 20: pattern("notify-b", 256<<10)}
	writeAtSync(t, img, chunks)

	// ExecStop.
	if r := e.vhdsync("unmount", mp); r.code != 0 {
		t.Fatalf("vhdsync unmount (the unit's ExecStop): %s", r)
	}
	var msgs []string
	for {
		nt := next("STATUS=stopped")
		msgs = append(msgs, nt.msg)
		if strings.HasPrefix(nt.msg, "STATUS=stopped") {
			break
		}
	}
	select {
	case <-exited:
		if exitErr != nil {
			t.Errorf("the daemon exited with %v, want 0", exitErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not exit after STATUS=stopped")
	}
	t.Logf("notifications after READY=1: %q", msgs)
	if len(msgs) < 2 || !strings.HasPrefix(msgs[0], "STOPPING=1\nSTATUS=draining: unmounted, ") {
		t.Errorf("the drain began without STOPPING=1 and a STATUS=draining line: %q", msgs)
	}
	for _, m := range msgs {
		if strings.Contains(m, "READY=1") {
			t.Errorf("READY=1 again while stopping: %q", m)
		}
	}
	if ls := readLastStop(t, state); !ls.Drained {
		t.Errorf("last stop: %+v", ls)
	}
	checkBlobHas(t, url, chunks)

	// Logs under systemd: standard error (the journal), no log file.
	b, _ := os.ReadFile(journal)
	if !bytes.Contains(b, []byte("msg=mounted")) || !bytes.Contains(b, []byte("journal drained")) {
		t.Errorf("the daemon's standard error lacks its log lines:\n%s", tail(string(b), 20))
	}
	if _, err := os.Stat(filepath.Join(state, "vhdsync.log")); err == nil {
		t.Error("a foreground daemon wrote vhdsync.log")
	}
	if bytes.Contains(b, []byte("serving Prometheus metrics")) {
		t.Error("metrics served without --metrics")
	}
}

// isClosed reports whether c is closed.
func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// TestE2EFstabMount mounts through mount(8) as an /etc/fstab line does, in
// a private mount namespace where the helpers are installed (an overlay on
// the directory mount(8) searches, /sbin, and on /usr/local/bin, in root's
// PATH), so nothing changes on the machine:
//
//   - `mount -t fuse.vhdsync STATE MP -o ...` with only the binary on PATH:
//     fuse3's mount.fuse runs `vhdsync STATE MP -o ...`;
//   - `mount -T FSTAB MP` with /sbin/mount.fuse.vhdsync: an fstab line with
//     systemd and mount options, credentials from -o credentials=DIR (a bad
//     SAS first: refused), then `umount MP` through
//     /sbin/umount.fuse.vhdsync, which waits for the drain.
func TestE2EFstabMount(t *testing.T) {
	e := newE2E(t, "unshare", "findmnt", "dd")
	if b, err := os.ReadFile("/proc/filesystems"); err != nil || !bytes.Contains(b, []byte("\toverlay\n")) {
		testenv.Missing(t, "the overlay filesystem (to install the mount helpers in a private mount namespace)", "modprobe overlay")
	}
	if _, err := os.Stat("/sbin/mount.fuse"); err != nil {
		testenv.Missing(t, "/sbin/mount.fuse", "apt-get install fuse3")
	}
	url, state := e.createDisk("fst", 64)
	mp := e.mkdir("mnt")
	sbin, err := filepath.EvalSymlinks("/sbin")
	if err != nil {
		t.Fatal(err)
	}
	helpers, bindir := e.mkdir("helpers"), e.mkdir("bin")
	for _, l := range []string{filepath.Join(helpers, mountHelperName), filepath.Join(helpers, umountHelperName), filepath.Join(bindir, "vhdsync")} {
		if err := os.Symlink(e.bin, l); err != nil {
			t.Fatal(err)
		}
	}
	data1, data2 := pattern("fstab-1", 1<<20), pattern("fstab-2", 512<<10)
	for name, b := range map[string][]byte{"data1": data1, "data2": data2} {
		if err := os.WriteFile(e.path(name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	creds, badCreds := e.mkdir("creds"), e.mkdir("badcreds")
	if err := os.WriteFile(filepath.Join(creds, "sas"), []byte(blobSAS(t, url, azurite.DevKey, time.Hour)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(badCreds, "sas"), []byte(blobSAS(t, url, badKey, time.Hour)), 0o600); err != nil {
		t.Fatal(err)
	}
	line := func(credDir string) string {
		return fmt.Sprintf("%s %s fuse.vhdsync noauto,_netdev,nofail,x-systemd.mount-timeout=30min,linger=10ms,journal_cap=64MiB,credentials=%s 0 0\n", state, mp, credDir)
	}
	fstab, badFstab := e.path("fstab"), e.path("fstab-bad")
	if err := os.WriteFile(fstab, []byte("# test fstab\n"+line(creds)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(badFstab, []byte(line(badCreds)), 0o644); err != nil {
		t.Fatal(err)
	}
	script := `set -eu
fail() { echo "FAIL: $*"; exit 1; }
mounted() { findmnt -rn -o FSTYPE,SOURCE --mountpoint "$MP"; }

# 1. Only the binary, as vhdsync, on root's PATH: mount.fuse runs it.
mount -t overlay overlay -o "lowerdir=$BINDIR:/usr/local/bin" /usr/local/bin
mount -t fuse.vhdsync "$STATE" "$MP" -o _netdev,linger=10ms
[ "$(mounted)" = "fuse.vhdsync $STATE" ] || fail "after mount.fuse: $(mounted)"
dd if="$E/data1" of="$MP/fst.img" bs=64k conv=notrunc,fsync status=none
vhdsync unmount "$MP"
[ -z "$(mounted)" ] || fail "still mounted after vhdsync unmount"

# 2. The helpers in /sbin, and fstab lines.
mount -t overlay overlay -o "lowerdir=$HELPERS:$SBIN" "$SBIN"
if mount -T "$BADFSTAB" "$MP" 2>"$E/bad.err"; then fail "a bad SAS mounted"; fi
grep -q 'authentication failed' "$E/bad.err" || fail "bad SAS: $(cat "$E/bad.err")"
[ -z "$(mounted)" ] || fail "mounted with a bad SAS"
mount -T "$FSTAB" "$MP"
[ "$(mounted)" = "fuse.vhdsync $STATE" ] || fail "after the fstab mount: $(mounted)"
dd if="$E/data2" of="$MP/fst.img" bs=64k seek=64 conv=notrunc,fsync status=none
umount "$MP"
[ -z "$(mounted)" ] || fail "still mounted after umount"
grep -q '"drained": true' "$STATE/last-stop.json" || fail "umount returned before the drain ended"
echo OK
`
	extra := []string{"MP=" + mp, "STATE=" + state, "E=" + e.dir, "BINDIR=" + bindir, "HELPERS=" + helpers, "SBIN=" + sbin, "FSTAB=" + fstab, "BADFSTAB=" + badFstab}
	t.Cleanup(func() { killStateDaemon(t, state) })
	r, err := runTimeoutEnv(e.dir, 3*time.Minute, extra, "unshare", "--mount", "--propagation", "private", "bash", "-c", script)
	t.Logf("in the mount namespace:\n%s%s", r.stdout, r.stderr)
	if err != nil || r.code != 0 || !strings.HasSuffix(r.stdout, "OK\n") {
		if b, rerr := os.ReadFile(filepath.Join(state, "vhdsync.log")); rerr == nil {
			t.Logf("daemon log:\n%s", tail(string(b), 40))
		}
		t.Fatalf("mount through mount(8): %v %s", err, r)
	}
	if ls := readLastStop(t, state); !ls.Drained {
		t.Errorf("umount did not wait for the drain: last stop %+v", ls)
	}
	checkBlobHas(t, url, map[int64][]byte{0: data1, 64 * 64 << 10: data2})
	log, _ := os.ReadFile(filepath.Join(state, "vhdsync.log"))
	if n := strings.Count(string(log), "msg=mounted"); n != 2 {
		t.Errorf("the daemon log shows %d mounts, want 2", n)
	}
	for _, bad := range []string{"DATA RACE", "panic:", "sig="} {
		if strings.Contains(string(log), bad) {
			t.Errorf("the daemon log shows %q", bad)
		}
	}
}

// killStateDaemon kills a daemon still holding state's lock (a test that
// failed half way, in a mount namespace the test cannot reach): its pid
// is in the lock file, checked against its command line.
func killStateDaemon(t *testing.T, state string) {
	b, err := os.ReadFile(filepath.Join(state, "lock"))
	if err != nil {
		return
	}
	f := strings.Fields(string(b))
	if len(f) < 3 || f[1] != "pid" {
		return
	}
	pid, _ := strconv.Atoi(f[2])
	cl, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cl, []byte("\x00--state\x00"+state+"\x00")) {
		return
	}
	t.Errorf("cleanup: daemon pid %d of %s still runs; killing it", pid, state)
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); processAlive(pid) && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
}

// readmeLogrotate returns the postrotate script of README's logrotate
// example, the one the test runs.
func readmeLogrotate(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, block, ok := strings.Cut(string(b), "```logrotate\n")
	block, _, _ = strings.Cut(block, "```")
	_, script, ok2 := strings.Cut(block, "postrotate\n")
	script, _, ok3 := strings.Cut(script, "endscript")
	if !ok || !ok2 || !ok3 {
		t.Fatal("README has no ```logrotate block with a postrotate script")
	}
	return script
}

// TestE2ELogReopen: logrotate renames vhdsync.log and runs README's
// postrotate script, which sends SIGHUP to the daemon: the daemon keeps
// running and writes to a new vhdsync.log, the renamed file gets nothing
// more.
func TestE2ELogReopen(t *testing.T) {
	e := newE2E(t)
	url, state := e.createDisk("hup", 32)
	d := e.mount(state, e.path("mnt"), "--linger", "10ms")
	logp := d.logPath()
	rotated := logp + ".1"
	if err := os.Rename(logp, rotated); err != nil {
		t.Fatal(err)
	}
	script := strings.ReplaceAll(readmeLogrotate(t), "/var/lib/vhdsync/*", filepath.Join(e.dir, "state-*"))
	if r := execTimeout(t, e.dir, time.Minute, "sh", "-c", script); r.code != 0 {
		t.Fatalf("README's postrotate script: %s", r)
	}
	waitFor(t, 10*time.Second, "the daemon to reopen vhdsync.log", func() (bool, error) {
		b, err := os.ReadFile(logp)
		return bytes.Contains(b, []byte("log reopened")), err
	})
	if !d.alive() {
		t.Fatal("SIGHUP stopped the daemon")
	}
	chunks := map[int64][]byte{4 << 20: pattern("hup", 128<<10)}
	writeAtSync(t, filepath.Join(d.mp, "hup.img"), chunks)
	e.mustVhdsync("unmount", d.mp)
	checkBlobHas(t, url, chunks)
	now, _ := os.ReadFile(logp)
	old, _ := os.ReadFile(rotated)
	if !bytes.Contains(old, []byte("msg=mounted")) || bytes.Contains(old, []byte("log reopened")) || bytes.Contains(old, []byte("journal drained")) {
		t.Errorf("the rotated log got lines after SIGHUP:\n%s", old)
	}
	if !bytes.Contains(now, []byte("journal drained")) {
		t.Errorf("the new log lacks the drain's lines:\n%s", now)
	}
	for _, bad := range []string{"DATA RACE", "panic:"} {
		if bytes.Contains(old, []byte(bad)) {
			t.Errorf("the rotated log shows %q", bad)
		}
	}
}

var metricsAddrRE = regexp.MustCompile(`serving Prometheus metrics"? addr=(\S+)`)

// scrape fetches and parses the metrics with Prometheus' text parser.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("scrape: %s: %s", resp.Status, b)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse the scrape: %v", err)
	}
	return mfs
}

// metricValue is the value of name's series with the given label pairs
// (a counter, gauge, or a histogram's count); it fails the test when the
// series is missing.
func metricValue(t *testing.T, mfs map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	mf, ok := mfs[name]
	if !ok {
		t.Fatalf("metric %s missing", name)
	}
next:
	for _, m := range mf.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	t.Fatalf("metric %s%v missing", name, labels)
	return 0
}

// TestE2EMetrics scrapes `mount --metrics` before, during and after a
// write load and parses every scrape with Prometheus' text parser: every
// metric README lists is there, and the values move with the load (FUSE
// writes and their latency histogram, bytes and requests sent, the blob's
// epoch; a write not yet on the blob shows as lag and pending records).
func TestE2EMetrics(t *testing.T) {
	e := newE2E(t)
	_, state := e.createDisk("metrics", 64)
	// A long linger: a write without fsync stays pending long enough to be
	// seen.
	d := e.mount(state, e.path("mnt"), "--linger", "3s", "--metrics", "0")
	m := metricsAddrRE.FindStringSubmatch(d.log())
	if m == nil {
		t.Fatalf("the daemon log does not say where the metrics are:\n%s", d.log())
	}
	addr := m[1]
	if !strings.HasPrefix(addr, "127.0.0.1:") {
		t.Errorf("--metrics 0 listens on %s, want loopback", addr)
	}
	before := scrape(t, addr)
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	// README's table names each metric as `name` or `name{labels}`.
	listed := func(name string) bool {
		return bytes.Contains(readme, []byte("| `"+name+"`")) || bytes.Contains(readme, []byte("| `"+name+"{"))
	}
	for _, def := range metricDefs {
		if _, ok := before[def.name]; !ok {
			t.Errorf("%s missing from the scrape", def.name)
		}
		if !listed(def.name) {
			t.Errorf("README does not list %s", def.name)
		}
	}
	for _, name := range []string{"vhdsync_fuse_duration_seconds", "process_resident_memory_bytes", "go_goroutines"} {
		if _, ok := before[name]; !ok {
			t.Errorf("%s missing from the scrape", name)
		}
		if strings.HasPrefix(name, "vhdsync_") && !listed(name) {
			t.Errorf("README does not list %s", name)
		}
	}
	if v := metricValue(t, before, "vhdsync_flusher_state", "state", "idle") + metricValue(t, before, "vhdsync_flusher_state", "state", "draining"); v != 1 {
		t.Errorf("flusher state idle+draining = %v on a quiet mount", v)
	}
	if v := metricValue(t, before, "vhdsync_replica_lag_seconds"); v != 0 {
		t.Errorf("lag %v with nothing written", v)
	}

	// The load: 256 writes of 64 KiB at random offsets, an fsync every 16,
	// scraped every 100 ms meanwhile.
	img := filepath.Join(d.mp, "metrics.img")
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var scrapes int
	var scrapeErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			resp, err := http.Get("http://" + addr + "/metrics")
			if err == nil {
				p := expfmt.NewTextParser(model.LegacyValidation)
				_, err = p.TextToMetricFamilies(resp.Body)
				resp.Body.Close()
			}
			if err != nil {
				scrapeErr = err
				return
			}
			scrapes++
			time.Sleep(100 * time.Millisecond)
		}
	}()
	rng := rand.New(rand.NewPCG(1, 2))
	const writes, size = 256, 64 << 10
	buf := make([]byte, size)
	for i := 0; i < writes; i++ {
		for j := range buf {
			buf[j] = byte(rng.Uint32() | 1)
		}
		if _, err := f.WriteAt(buf, int64(rng.IntN(60<<20/size))*size); err != nil {
			t.Fatal(err)
		}
		if i%16 == 15 {
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
		}
	}
	stop()
	wg.Wait()
	if scrapeErr != nil || scrapes == 0 {
		t.Fatalf("scraping during the load: %d scrapes, %v", scrapes, scrapeErr)
	}

	// A write not yet on the blob (the epoch stays open for the 3 s
	// linger): lag and pending records show it.
	if _, err := f.WriteAt(buf, 62<<20); err != nil {
		t.Fatal(err)
	}
	pending := scrape(t, addr)
	if v := metricValue(t, pending, "vhdsync_journal_pending_records"); v < 1 {
		t.Errorf("pending records %v right after a write", v)
	}
	if v := metricValue(t, pending, "vhdsync_replica_lag_seconds"); v <= 0 {
		t.Errorf("lag %v right after a write", v)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	var after map[string]*dto.MetricFamily
	waitFor(t, time.Minute, "the journal to drain", func() (bool, error) {
		after = scrape(t, addr)
		return metricValue(t, after, "vhdsync_journal_pending_records") == 0, nil
	})
	grew := func(name string, min float64, labels ...string) {
		t.Helper()
		b, a := metricValue(t, before, name, labels...), metricValue(t, after, name, labels...)
		if a-b < min {
			t.Errorf("%s%v went from %v to %v, want a rise of at least %v", name, labels, b, a, min)
		}
	}
	grew("vhdsync_fuse_operations_total", writes+1, "op", "write")
	grew("vhdsync_fuse_operations_total", writes/16+1, "op", "fsync")
	grew("vhdsync_fuse_bytes_total", (writes+1)*size, "op", "write")
	grew("vhdsync_fuse_duration_seconds", writes+1, "op", "write")
	grew("vhdsync_fuse_duration_seconds", writes/16+1, "op", "fsync")
	grew("vhdsync_remote_bytes_total", size, "kind", "put") // at least the distinct bytes of one write; overwritten ones may merge
	grew("vhdsync_remote_requests_total", 1, "kind", "put")
	grew("vhdsync_flusher_batches_total", 1)
	grew("vhdsync_blob_epoch", 1)
	grew("vhdsync_journal_epochs_closed_total", writes/16+1)
	if v := metricValue(t, after, "vhdsync_replica_lag_seconds"); v != 0 {
		t.Errorf("lag %v once drained", v)
	}
	if v := metricValue(t, after, "vhdsync_blob_consistent"); v != 1 {
		t.Errorf("blob consistent = %v once drained", v)
	}
	// Histogram and counter read the same writes.
	if h, c := metricValue(t, after, "vhdsync_fuse_duration_seconds", "op", "write"), metricValue(t, after, "vhdsync_fuse_operations_total", "op", "write"); h != c {
		t.Errorf("write latency histogram counts %v writes, the counter %v", h, c)
	}
	t.Logf("%d scrapes during the load; put bytes %v, put requests %v, batches %v", scrapes,
		metricValue(t, after, "vhdsync_remote_bytes_total", "kind", "put"), metricValue(t, after, "vhdsync_remote_requests_total", "kind", "put"),
		metricValue(t, after, "vhdsync_flusher_batches_total"))
}

// unitExecStartPre returns the shell script of the unit's ExecStartPre.
func unitExecStartPre(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if s, ok := strings.CutPrefix(l, "ExecStartPre=/bin/sh -c '"); ok && strings.HasSuffix(s, "'") {
			return strings.TrimSuffix(s, "'")
		}
	}
	t.Fatal("the unit has no ExecStartPre=/bin/sh -c '...'")
	return ""
}

// TestE2EUnitRestartAfterKill: after a kill -9 the dead FUSE mount refuses
// a new mount; the unit's ExecStartPre (what Restart=on-failure runs
// first) detaches it, and the next mount replays the journal. On a live
// mount and on a missing mountpoint it does no harm.
func TestE2EUnitRestartAfterKill(t *testing.T) {
	e := newE2E(t, "findmnt")
	url, state := e.createDisk("restart", 32)
	pre := unitExecStartPre(t)
	runPre := func(mp string) {
		t.Helper()
		r, err := runTimeoutEnv(e.dir, time.Minute, []string{"MOUNTPOINT=" + mp}, "sh", "-c", pre)
		if err != nil || r.code != 0 {
			t.Fatalf("ExecStartPre: %v %s", err, r)
		}
	}
	fresh := e.path("fresh/mnt")
	runPre(fresh)
	if st, err := os.Stat(fresh); err != nil || !st.IsDir() {
		t.Fatalf("ExecStartPre did not make the mountpoint: %v", err)
	}
	d := e.mount(state, fresh, "--linger", "10ms")
	runPre(fresh)
	if !isMounted(fresh) || !d.alive() {
		t.Fatal("ExecStartPre detached a live mount")
	}
	chunks := map[int64][]byte{8 << 20: pattern("restart", 256<<10)}
	f, err := os.OpenFile(filepath.Join(fresh, "restart.img"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(chunks[8<<20], 8<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := syscall.Kill(d.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitExit(10 * time.Second)
	if _, err := os.ReadDir(fresh); err == nil || !isMounted(fresh) {
		t.Fatalf("after kill -9: listing %v, mounted %v; want a dead mount", err, isMounted(fresh))
	} else {
		t.Logf("the dead mount: listing it gives %v", err)
	}
	if r := e.vhdsync("mount", "--state", state, fresh); r.code != ExitBusy {
		t.Fatalf("mount on the dead mount: %s", r)
	}
	runPre(fresh)
	if isMounted(fresh) {
		t.Fatal("ExecStartPre left the dead mount")
	}
	d2 := e.mount(state, fresh, "--linger", "10ms")
	e.mustVhdsync("unmount", d2.mp)
	checkBlobHas(t, url, chunks)
}
