package main

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/internal/testenv"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// qemuDynamic makes a 256M dynamic VHD with qemu-img (268,886,016 bytes:
// CHS rounding, not a whole MiB) and writes to it with qemu-io.
func qemuDynamic(t *testing.T, path string) {
	t.Helper()
	qemu := testenv.QemuImg(t)
	qio := testenv.RequireTool(t, "qemu-io", "make deps (or: apt-get install qemu-utils)")
	testenv.Run(t, qemu, "create", "-q", "-f", "vpc", path, "256M")
	testenv.Run(t, qio, "-f", "vpc", "-c", "write -P 0x5a 1M 300k", "-c", "write -P 0x11 9438720 1536",
		"-c", "write -P 0x22 100M 5M", "-c", "write -P 0x33 268885504 512", path)
}

func mustRun(t *testing.T, env map[string]string, args ...string) string {
	t.Helper()
	code, out, errOut := vhdsync(t, env, args...)
	if code != ExitOK {
		t.Fatalf("vhdsync %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// TestImportDownloadCLI: import a qemu-made dynamic VHD (rounded up, said
// so), download it as a VHD and as a raw image (qemu-img compare judges
// both), verify the state directory against the blob, and the refusals.
func TestImportDownloadCLI(t *testing.T) {
	qemu := testenv.QemuImg(t)
	az := azurite.Start(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "dyn.vhd")
	qemuDynamic(t, src)
	url := az.BlobURL("disks", "dyn.vhd")
	state := filepath.Join(dir, "state")

	out := mustRun(t, nil, "import", "--blob", url, "--state", state, "--create-container", src)
	for _, want := range []string{"dynamic VHD", "rounded up from 268886016 to 269484032 bytes (257 MiB)", "read as zeros",
		"non-zero data", "sent 5552128 bytes", "vhdsync mount --state"} {
		if !strings.Contains(out, want) {
			t.Errorf("import output lacks %q:\n%s", want, out)
		}
	}
	t.Logf("import output:\n%s", out)

	vhd, img := filepath.Join(dir, "out.vhd"), filepath.Join(dir, "out.img")
	out = mustRun(t, nil, "download", "--blob", url, vhd)
	if !strings.Contains(out, "footer checked") {
		t.Errorf("download output: %s", out)
	}
	mustRun(t, nil, "download", "--raw", "--blob", url, img)
	testenv.Run(t, qemu, "compare", "-f", "vpc", "-F", "vpc", vhd, src)
	testenv.Run(t, qemu, "compare", "-f", "raw", "-F", "vpc", img, src)
	if st, _ := os.Stat(img); st.Size() != 269484032 {
		t.Fatalf("raw download is %d bytes", st.Size())
	}
	mustRun(t, nil, "inspect", vhd)
	mustRun(t, nil, "verify", "--state", state)

	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"file exists", []string{"download", "--blob", url, vhd}, ExitExists, "--overwrite"},
		{"state in use", []string{"import", "--blob", az.BlobURL("disks", "x.vhd"), "--state", state, src}, ExitState, "already holds a vhdsync disk"},
		{"blob exists", []string{"import", "--blob", url, "--state", filepath.Join(dir, "s2"), src}, ExitExists, "--overwrite"},
		{"bad format", []string{"import", "--blob", url, "--state", filepath.Join(dir, "s3"), "--format", "qcow2", src}, ExitUsage, "auto, raw or vhd"},
		{"bad gap", []string{"import", "--blob", url, "--state", filepath.Join(dir, "s3"), "--zero-gap", "100", src}, ExitUsage, "512 bytes"},
		{"missing source", []string{"import", "--blob", az.BlobURL("disks", "y.vhd"), "--state", filepath.Join(dir, "s4"), filepath.Join(dir, "nope")}, ExitFailure, "no such file"},
		{"not a vhd", []string{"import", "--format", "vhd", "--blob", az.BlobURL("disks", "y.vhd"), "--state", filepath.Join(dir, "s5"), img}, ExitNotVHD, "not a VHD"},
		{"download missing blob", []string{"download", "--blob", az.BlobURL("disks", "none.vhd"), filepath.Join(dir, "n.vhd")}, ExitNotFound, "blob not found"},
	}
	for _, c := range cases {
		code, o, e := vhdsync(t, nil, c.args...)
		if code != c.code || !strings.Contains(e, c.want) {
			t.Errorf("%s: exit %d (want %d), stderr lacks %q?\n%s%s", c.name, code, c.code, c.want, o, e)
		}
	}
	// A refused first import leaves no state directory behind.
	for _, s := range []string{"s2", "s3", "s4", "s5"} {
		if _, err := os.Stat(filepath.Join(dir, s)); !os.IsNotExist(err) {
			t.Errorf("a refused import left %s: %v", s, err)
		}
	}
}

// TestCreateFromBlob: a blob made by create and written by Put Page
// becomes a state directory whose image equals the blob, which verify
// accepts; a leased blob is refused.
func TestCreateFromBlob(t *testing.T) {
	az := azurite.Start(t)
	ctx := context.Background()
	dir := t.TempDir()
	url := az.BlobURL("disks", "made.vhd")
	mustRun(t, nil, "create", "--blob", url, "--size", "64MiB", "--state", filepath.Join(dir, "orig"), "--create-container")
	c, err := pageblob.Open(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	chunks := map[int64][]byte{0: pattern("a", 1<<20), 20<<20 + 512: pattern("b", 4096), 63 << 20: pattern("c", 1<<20)}
	for off, b := range chunks {
		if err := c.PutPages(ctx, off, b, ""); err != nil {
			t.Fatal(err)
		}
	}
	state := filepath.Join(dir, "from")
	out := mustRun(t, nil, "create", "--from-blob", url, "--state", state, "--name", "restored")
	if !strings.Contains(out, "vhdsync mount --state") {
		t.Errorf("output: %s", out)
	}
	d, err := statedir.Open(state)
	if err != nil {
		t.Fatal(err)
	}
	if d.State.Name != "restored" || d.State.VirtualSize != 64<<20 || d.State.BlobURL != url {
		t.Fatalf("state %+v", d.State)
	}
	local := filepath.Join(dir, "blob.vhd")
	download(t, url, local)
	lb, _ := os.ReadFile(local)
	ib, _ := os.ReadFile(d.ImagePath())
	if !bytes.Equal(lb[:64<<20], ib) || !bytes.Equal(lb[64<<20:], d.State.Footer) {
		t.Fatal("the image is not the blob's data, or the footer differs")
	}
	mustRun(t, nil, "verify", "--state", state)

	// Refusals: a used state directory, --from-blob with --size, a leased blob.
	if code, _, e := vhdsync(t, nil, "create", "--from-blob", url, "--state", state); code != ExitState {
		t.Errorf("used state: exit %d %s", code, e)
	}
	if code, _, e := vhdsync(t, nil, "create", "--from-blob", url, "--size", "1GiB", "--state", filepath.Join(dir, "x")); code != ExitUsage {
		t.Errorf("--size with --from-blob: exit %d %s", code, e)
	}
	if code, _, e := vhdsync(t, nil, "create", "--state", filepath.Join(dir, "x")); code != ExitUsage {
		t.Errorf("neither --blob nor --from-blob: exit %d %s", code, e)
	}
	if code, _, e := vhdsync(t, nil, "create", "--blob", url, "--state", filepath.Join(dir, "x")); code != ExitUsage || !strings.Contains(e, "size") {
		t.Errorf("--blob without --size: exit %d %s", code, e)
	}
	if _, err := c.AcquireLease(ctx, "11111111-2222-3333-4444-555555555555"); err != nil {
		t.Fatal(err)
	}
	if code, _, e := vhdsync(t, nil, "create", "--from-blob", url, "--state", filepath.Join(dir, "leased")); code != ExitLeased || !strings.Contains(e, "unmount") {
		t.Errorf("leased blob: exit %d %s", code, e)
	}
	if _, err := os.Stat(filepath.Join(dir, "leased")); !os.IsNotExist(err) {
		t.Errorf("a refused create --from-blob left its state directory: %v", err)
	}
}

// putProxy is a reverse proxy in front of Azurite that records every Put
// Page and can kill the client process around the k-th one.
type putProxy struct {
	mu   sync.Mutex
	puts []putSeen
	n    int
	// round counts take calls: an answer to a put of an earlier round (a
	// killed client's request still in flight) is not recorded in this one.
	round int
	// onPut runs before the n-th Put Page is forwarded (after false) and
	// once the service answered it (after true); before forwarding, true
	// drops the request.
	onPut func(n int, after bool) bool
	srv   *httptest.Server
}

type putSeen struct {
	off, end int64
	status   int // 0: never answered
}

func newPutProxy(t *testing.T, target string) *putProxy {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &putProxy{}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: u.Scheme, Host: u.Host})
	rp.ErrorLog = log.New(io.Discard, "", 0) // a killed client's requests end in errors
	rp.ModifyResponse = func(resp *http.Response) error {
		if k, ok := resp.Request.Context().Value(putKey{}).(putRef); ok {
			p.mu.Lock()
			if k.round != p.round {
				p.mu.Unlock()
				return nil
			}
			p.puts[k.n-1].status = resp.StatusCode
			hook := p.onPut
			p.mu.Unlock()
			if hook != nil {
				hook(k.n, true)
			}
		}
		return nil
	}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && r.URL.Query().Get("comp") == "page" && strings.EqualFold(r.Header.Get("x-ms-page-write"), "update") {
			s := putSeen{off: -1}
			if a, b, ok := strings.Cut(strings.TrimPrefix(r.Header.Get("x-ms-range"), "bytes="), "-"); ok {
				s.off, _ = strconv.ParseInt(a, 10, 64)
				e, _ := strconv.ParseInt(b, 10, 64)
				s.end = e + 1
			}
			p.mu.Lock()
			p.puts = append(p.puts, s)
			p.n++
			n, round := p.n, p.round
			hook := p.onPut
			p.mu.Unlock()
			if hook != nil && hook(n, false) {
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			r = r.WithContext(context.WithValue(r.Context(), putKey{}, putRef{round: round, n: n}))
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(p.srv.Close)
	return p
}

type putKey struct{}

// putRef names a forwarded put: its proxy round and its number in it.
type putRef struct{ round, n int }

func (p *putProxy) setHook(h func(n int, after bool) bool) {
	p.mu.Lock()
	p.onPut = h
	p.mu.Unlock()
}

// url is the proxy's URL for a blob of the Azurite behind it.
func (p *putProxy) url(container, blob string) string {
	return p.srv.URL + "/" + azurite.DevAccount + "/" + container + "/" + blob
}

func (p *putProxy) take() []putSeen {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.puts
	p.puts, p.n = nil, 0
	p.round++
	return out
}

// TestImportKill9Resume kills the real binary with SIGKILL at a random Put
// Page (before it reaches the service, or after the service applied it
// but before the client heard), checks that a changed source is refused
// (exit 12), and resumes: the second run sends nothing the service had
// acknowledged, at most one range per worker of what the first run tried,
// and the blob ends identical to the source.
func TestImportKill9Resume(t *testing.T) {
	qemu := testenv.QemuImg(t)
	bin := e2eBinary(t)
	az := azurite.Start(t)
	proxy := newPutProxy(t, az.Endpoint)
	seed := uint64(time.Now().UnixNano())
	r := rand.New(rand.NewPCG(seed, 5))
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.raw")
	const size = 128<<20 + 3*512 // not a whole MiB
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for range 24 {
		b := make([]byte, 4096*(1+r.IntN(600)))
		_, _ = crand.Read(b)
		if _, err := f.WriteAt(b, r.Int64N((size-int64(len(b)))/4096)*4096); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	url := proxy.url("disks", "killed.vhd")
	state := filepath.Join(dir, "state")
	const workers = 4
	args := []string{"import", "--blob", url, "--state", state, "--workers", strconv.Itoa(workers), "--create-container", src}

	k := 3 + r.IntN(12) // the footer is put 1
	after := r.IntN(2) == 1
	t.Logf("seed %d: kill -9 at put %d, after the service answered: %v", seed, k, after)
	cmd := exec.Command(bin, args...)
	cmd.Env = e2eEnv()
	var out1 bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out1, &out1
	// The proxy's hook stops the k-th put where it is until the test has
	// killed the client: before forwarding it, or before answering it.
	hit, killed := make(chan struct{}), make(chan struct{})
	proxy.setHook(func(n int, answered bool) bool {
		if n == k && answered == after {
			close(hit)
			<-killed
			return true
		}
		return false
	})
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	select {
	case <-hit:
		_ = cmd.Process.Kill()
		<-waited
		close(killed)
	case err := <-waited:
		t.Fatalf("the import ended before put %d: %v\n%s", k, err, out1.String())
	}
	proxy.setHook(nil)
	run1 := proxy.take()
	if _, err := os.Stat(filepath.Join(state, transfer.ProgressFile)); err != nil {
		t.Fatalf("no progress file after the kill: %v\n%s", err, out1.String())
	}

	// A changed source is refused with exit 12, and accepted again once
	// restored.
	st, _ := os.Stat(src)
	if err := os.Chtimes(src, time.Now(), st.ModTime().Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	if code, _, e := vhdsync(t, nil, args...); code != ExitSrcChanged || !strings.Contains(e, "source changed") {
		t.Fatalf("changed source: exit %d: %s", code, e)
	}
	if err := os.Chtimes(src, time.Now(), st.ModTime()); err != nil {
		t.Fatal(err)
	}

	res := execTimeout(t, dir, 3*time.Minute, bin, args...)
	if res.code != 0 || !strings.Contains(res.stdout, "resuming an interrupted import") {
		t.Fatalf("resume: %s", res)
	}
	run2 := proxy.take()
	vsize := int64(vhdlayer.RoundUpMiB(size))
	var acked, tried []putSeen
	for _, p := range run1 {
		if p.off >= vsize {
			continue
		}
		tried = append(tried, p)
		if p.status/100 == 2 {
			acked = append(acked, p)
		}
	}
	overlaps := func(set []putSeen, p putSeen) bool {
		for _, q := range set {
			if q.off < p.end && p.off < q.end {
				return true
			}
		}
		return false
	}
	again, againAcked := 0, 0
	var sent2 int64
	for _, p := range run2 {
		if p.off >= vsize {
			continue
		}
		sent2 += p.end - p.off
		if overlaps(tried, p) {
			again++
		}
		if overlaps(acked, p) {
			againAcked++
		}
	}
	t.Logf("run 1: %d puts tried, %d acknowledged by the service; run 2: %d puts (%s); sent again: %d ranges run 1 tried (limit %d, one per worker), %d the service had acknowledged",
		len(tried), len(acked), len(run2), humanBytes(sent2), again, workers, againAcked)
	t.Logf("resume output:\n%s", res.stdout)
	if again > workers || againAcked != 0 {
		t.Fatalf("run 2 sent %d ranges run 1 had tried (limit %d) and %d the blob held", again, workers, againAcked)
	}

	dl := filepath.Join(dir, "out.vhd")
	mustRun(t, nil, "download", "--blob", az.BlobURL("disks", "killed.vhd"), dl)
	testenv.Run(t, qemu, "compare", "-f", "vpc", "-F", "raw", dl, src)
	if _, err := statedir.Open(state); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, qemu, "compare", "-f", "raw", "-F", "raw", filepath.Join(state, "disk.img"), src)
}
