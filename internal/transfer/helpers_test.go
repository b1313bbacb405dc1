package transfer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/testenv"
)

// wireCall is one operation the counting policy saw.
type wireCall struct {
	method, comp, write string
	off, end            int64 // range, end exclusive; -1 when absent
	status              int   // 0 when no response came
	respLen             int64
}

func (c wireCall) isPut() bool {
	return c.method == http.MethodPut && c.comp == "page" && strings.EqualFold(c.write, "update")
}

func (c wireCall) isRead() bool { return c.method == http.MethodGet && c.comp == "" }

// wire is an azcore per-call policy that records every operation of a
// pageblob client: Put Page ranges and the bytes of ranged reads. before,
// if set, runs before a Put Page is forwarded (with its 1-based number).
type wire struct {
	mu     sync.Mutex
	calls  []wireCall
	puts   int
	before func(n int, c wireCall)
}

func (w *wire) Do(req *policy.Request) (*http.Response, error) {
	r := req.Raw()
	c := wireCall{method: r.Method, comp: r.URL.Query().Get("comp"), write: header(r, "x-ms-page-write"), off: -1, end: -1}
	rng := header(r, "x-ms-range")
	if rng == "" {
		rng = header(r, "Range")
	}
	if a, b, ok := strings.Cut(strings.TrimPrefix(rng, "bytes="), "-"); ok {
		x, err1 := strconv.ParseInt(a, 10, 64)
		y, err2 := strconv.ParseInt(b, 10, 64)
		if err1 == nil && err2 == nil {
			c.off, c.end = x, y+1
		}
	}
	if c.isPut() {
		w.mu.Lock()
		w.puts++
		n := w.puts
		hook := w.before
		w.mu.Unlock()
		if hook != nil {
			hook(n, c)
		}
	}
	resp, err := req.Next()
	if resp != nil {
		c.status = resp.StatusCode
		if c.isRead() && resp.StatusCode/100 == 2 {
			c.respLen = resp.ContentLength
		}
	}
	w.mu.Lock()
	w.calls = append(w.calls, c)
	w.mu.Unlock()
	return resp, err
}

// header reads a request header whatever its case: the SDK sets its
// x-ms-* headers as lower-case map keys, which Header.Get does not find.
func header(r *http.Request, name string) string {
	if v := r.Header.Get(name); v != "" {
		return v
	}
	for k, v := range r.Header {
		if strings.EqualFold(k, name) && len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

// putsOK returns the acknowledged Put Page calls below limit (the data
// region), and their bytes.
func (w *wire) putsOK(limit int64) ([]wireCall, int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []wireCall
	var n int64
	for _, c := range w.calls {
		if c.isPut() && c.status/100 == 2 && c.off < limit {
			out = append(out, c)
			n += c.end - c.off
		}
	}
	return out, n
}

// putsTried returns every Put Page below limit, answered or not.
func (w *wire) putsTried(limit int64) []wireCall {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []wireCall
	for _, c := range w.calls {
		if c.isPut() && c.off < limit {
			out = append(out, c)
		}
	}
	return out
}

// readBytes is the payload of all ranged reads.
func (w *wire) readBytes() (n int64, calls int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.calls {
		if c.isRead() {
			n += c.respLen
			calls++
		}
	}
	return n, calls
}

func newClient(t *testing.T, url string, w *wire) *pageblob.Client {
	t.Helper()
	o := &pageblob.Options{}
	if w != nil {
		o.PerCallPolicies = []policy.Policy{w}
	}
	c, err := pageblob.Open(url, o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// nonZeroBytes counts the bytes in non-zero 512-byte sectors of a raw file
// (a partial last sector counts whole), independently of scanZeros.
func nonZeroBytes(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var n int64
	for off := int64(0); ; off += int64(len(buf)) {
		m, err := f.ReadAt(buf, off)
		for s := 0; s < m; s += 512 {
			e := min(s+512, m)
			if !bytes.Equal(buf[s:e], make([]byte, e-s)) {
				n += 512
			}
		}
		if errors.Is(err, io.EOF) {
			return n
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// qemuCompare runs qemu-img compare and fails the test on a difference.
func qemuCompare(t *testing.T, qemu, fmtA, a, fmtB, b string) {
	t.Helper()
	out, err := exec.Command(qemu, "compare", "-f", fmtA, "-F", fmtB, a, b).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img compare %s %s: %v\n%s", a, b, err, out)
	}
}

// allocated is the disk space a file takes.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// writeAt writes p at off into path.
func writeAt(t *testing.T, path string, off int64, p []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

func qemuIO(t *testing.T, format, path string, cmds ...string) {
	t.Helper()
	qio := testenv.RequireTool(t, "qemu-io", "make deps (or: apt-get install qemu-utils)")
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	testenv.Run(t, qio, append(args, path)...)
}

func mustPrepare(t *testing.T, ctx context.Context, o ImportOptions) *Import {
	t.Helper()
	im, err := PrepareImport(ctx, o)
	if err != nil {
		t.Fatalf("prepare import: %v", err)
	}
	t.Cleanup(func() { im.Close() })
	return im
}

func mib(n int64) string { return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20)) }
