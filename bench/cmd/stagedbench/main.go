// Command stagedbench compares the staged transfer with the direct one
// : bytes on the wire and time to drain the journal through a
// bandwidth-limited uplink (one rate shared by all connections) to Azurite, for
// compressible data (Go's own source tree, as a tar stream) and for random
// data. The staged apply worker then runs next to the storage (no limit)
// and its time is reported too.
//
//	stagedbench --dir DIR --size 128MiB --rate 10 --out staged.json
//
// Each configuration fills a fresh disk's journal with 256 KiB writes (the
// FUSE max write) behind a closed gate, then opens the gate and times the
// drain; direct and staged alternate within each data set.
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/azure/staging"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/staged"
	"github.com/vhdsync/vhdsync/vhdlayer"
	"github.com/vhdsync/vhdsync/writeback"
)

type gate chan struct{}

func (g gate) wait(ctx context.Context) error {
	select {
	case <-g:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

type gatedRemote struct {
	pageblob.Remote
	g gate
}

func (r gatedRemote) PutPages(ctx context.Context, off int64, d remote.Pages, c remote.Cond) error {
	if err := r.g.wait(ctx); err != nil {
		return err
	}
	return r.Remote.PutPages(ctx, off, d, c)
}

func (r gatedRemote) ClearPages(ctx context.Context, off, n int64, c remote.Cond) error {
	if err := r.g.wait(ctx); err != nil {
		return err
	}
	return r.Remote.ClearPages(ctx, off, n, c)
}

type gatedStore struct {
	*staging.Store
	g gate
}

func (s gatedStore) PutSegment(ctx context.Context, name string, d []byte) error {
	if err := s.g.wait(ctx); err != nil {
		return err
	}
	return s.Store.PutSegment(ctx, name, d)
}

// result is one measured drain.
type result struct {
	Data       string  `json:"data"`
	Mode       string  `json:"mode"`
	DataBytes  int64   `json:"data_bytes"`
	WireBytes  uint64  `json:"wire_bytes"` // Put Page payload, or compressed segments
	DrainSecs  float64 `json:"drain_seconds"`
	ApplySecs  float64 `json:"apply_seconds,omitempty"`
	Segments   uint64  `json:"segments,omitempty"`
	PutCalls   uint64  `json:"put_calls"`
	RateMiBps  float64 `json:"link_mib_per_second"`
	Compressed float64 `json:"wire_over_data"`
}

type bench struct {
	dir, endpoint string
	lt            limitedTransport
	size          int64
	n             int
	rate          int
}

// limited are client options that send through the shared link.
func (b *bench) limited() *pageblob.Options {
	return &pageblob.Options{MaxRetries: -1, Transport: b.lt}
}

func (b *bench) newBlob(ctx context.Context) (*pageblob.Client, vhdlayer.Footer, error) {
	b.n++
	u := fmt.Sprintf("%s/vhds/b%d.vhd", b.endpoint, b.n)
	c, err := pageblob.Open(u, b.limited())
	if err != nil {
		return nil, vhdlayer.Footer{}, err
	}
	f := vhdlayer.NewFixedFooter(uint64(b.size), time.Now())
	return c, f, c.Create(ctx, uint64(b.size), f.Encode(), pageblob.CreateOptions{CreateContainer: true})
}

func (b *bench) run(ctx context.Context, name string, data []byte, mode string) (result, error) {
	res := result{Data: name, Mode: mode, DataBytes: int64(len(data)), RateMiBps: float64(b.rate)}
	c, footer, err := b.newBlob(ctx)
	if err != nil {
		return res, err
	}
	defer c.Delete(context.WithoutCancel(ctx))
	d := filepath.Join(b.dir, fmt.Sprintf("disk%d", b.n))
	defer os.RemoveAll(d)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return res, err
	}
	img := filepath.Join(d, "image")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		return res, err
	}
	if err := os.Truncate(img, b.size); err != nil {
		return res, err
	}
	g := make(gate)
	o := writeback.DiskOptions{
		ImagePath: img, JournalDir: filepath.Join(d, "journal"), VirtualSize: b.size,
		Remote: gatedRemote{Remote: pageblob.Remote{C: c}, g: g}, SaveLeaseID: func(string) error { return nil },
		Logger: slog.New(slog.DiscardHandler),
	}
	diskID := footer.UniqueID.String()
	var store *staging.Store
	if mode == "staged" {
		if store, err = staging.Open(b.endpoint+"/staging", diskID, b.limited()); err != nil {
			return res, err
		}
		if err := store.EnsureContainer(ctx); err != nil {
			return res, err
		}
		o.Staging, o.DiskID = gatedStore{Store: store, g: g}, diskID
	}
	disk, err := writeback.Open(ctx, o)
	if err != nil {
		return res, err
	}
	const w = 256 << 10
	for off := int64(0); off < int64(len(data)); off += w {
		if err := disk.WriteAt(ctx, data[off:min(off+w, int64(len(data)))], off); err != nil {
			close(g)
			disk.Close(ctx, false)
			return res, err
		}
	}
	if err := disk.Flush(); err != nil {
		return res, err
	}
	t0 := time.Now()
	close(g)
	if err := disk.Drain(ctx); err != nil {
		return res, err
	}
	res.DrainSecs = time.Since(t0).Seconds()
	st := disk.Stats().Flusher
	res.WireBytes, res.Segments, res.PutCalls = st.BytesSent, st.Segments, st.PutCalls
	res.Compressed = float64(st.BytesSent) / float64(len(data))
	if err := disk.Close(ctx, true); err != nil {
		return res, err
	}
	if mode == "staged" {
		// The worker, next to the storage: no bandwidth limit.
		wc, err := pageblob.Open(c.Location().URL(), &pageblob.Options{MaxRetries: -1})
		if err != nil {
			return res, err
		}
		ws, err := staging.Open(b.endpoint+"/staging", diskID, &pageblob.Options{MaxRetries: -1})
		if err != nil {
			return res, err
		}
		r := pageblob.Remote{C: wc}
		lease, err := r.AcquireLease(ctx, "00000000-0000-4000-8000-000000000001")
		if err != nil {
			return res, err
		}
		a, err := staged.NewApplier(r, ws, lease, staged.ApplierOptions{DiskID: diskID, DiskSize: b.size, Once: true})
		if err != nil {
			return res, err
		}
		t1 := time.Now()
		if err := a.Run(ctx); err != nil {
			return res, err
		}
		res.ApplySecs = time.Since(t1).Seconds()
		if err := r.ReleaseLease(ctx, lease); err != nil {
			return res, err
		}
		res.PutCalls = a.Stats().PutCalls
	}
	// The blob must hold the data either way.
	got := make([]byte, len(data))
	if err := c.ReadAt(ctx, got, 0); err != nil {
		return res, err
	}
	if !bytes.Equal(got, data) {
		return res, fmt.Errorf("%s %s: the blob differs from the data written", name, mode)
	}
	return res, nil
}

// goSourceTar is Go's src tree as a tar stream, cut to n bytes (whole
// 512-byte sectors): the compressible data set.
func goSourceTar(n int64) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	root := filepath.Join(runtime.GOROOT(), "src")
	err := filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
		if err != nil || int64(buf.Len()) >= n {
			return err
		}
		if !de.Type().IsRegular() {
			return nil
		}
		fi, err := de.Info()
		if err != nil {
			return err
		}
		h, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		h.Name, _ = filepath.Rel(root, p)
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(tw, f)
		return err
	})
	if err != nil {
		return nil, err
	}
	b := buf.Bytes()
	if int64(len(b)) < n {
		return nil, fmt.Errorf("Go's src tree is only %d bytes, want %d", len(b), n)
	}
	return b[:n], nil
}

// link is one shared uplink of a fixed rate: every request body sent
// through any connection takes its turn. toxiproxy's bandwidth toxic
// limits each connection on its own, which the direct transfer's parallel
// connections would multiply, so the limit is applied here instead.
type link struct {
	mu   sync.Mutex
	next time.Time
	bps  float64
}

func (l *link) take(n int) {
	l.mu.Lock()
	now := time.Now()
	t := l.next
	if t.Before(now) {
		t = now
	}
	l.next = t.Add(time.Duration(float64(n) / l.bps * float64(time.Second)))
	l.mu.Unlock()
	time.Sleep(time.Until(t))
}

type limitedBody struct {
	io.ReadCloser
	l *link
}

func (b limitedBody) Read(p []byte) (int, error) {
	if len(p) > 64<<10 {
		p = p[:64<<10]
	}
	n, err := b.ReadCloser.Read(p)
	b.l.take(n)
	return n, err
}

type limitedTransport struct {
	base *http.Client
	l    *link
}

func (t limitedTransport) Do(req *http.Request) (*http.Response, error) {
	if req.Body != nil && req.Body != http.NoBody {
		req.Body = limitedBody{ReadCloser: req.Body, l: t.l}
	}
	return t.base.Do(req)
}

func main() {
	dir := flag.String("dir", "", "work directory (required)")
	sizeMiB := flag.Int("size-mib", 128, "data per data set, MiB")
	rate := flag.Int("rate", 10, "link bandwidth, MiB/s")
	out := flag.String("out", "", "write the results as JSON here")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "stagedbench: --dir is required")
		os.Exit(2)
	}
	if err := run(*dir, int64(*sizeMiB)<<20, *rate, *out); err != nil {
		fmt.Fprintln(os.Stderr, "stagedbench:", err)
		os.Exit(1)
	}
}

func run(dir string, size int64, rate int, out string) error {
	ctx := context.Background()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	loc := filepath.Join(dir, "azurite")
	srv, err := azurite.Launch(ctx, loc, filepath.Join(dir, "azurite.log"))
	if err != nil {
		return err
	}
	defer func() { srv.Stop(); os.RemoveAll(loc) }()
	lt := limitedTransport{base: &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}, l: &link{bps: float64(rate) * (1 << 20)}}
	text, err := goSourceTar(size)
	if err != nil {
		return err
	}
	random := make([]byte, size)
	if _, err := rand.Read(random); err != nil {
		return err
	}
	b := &bench{dir: dir, endpoint: srv.Endpoint, lt: lt, size: size + 64<<20, rate: rate}
	var results []result
	for _, set := range []struct {
		name string
		data []byte
	}{{"go-src-tar", text}, {"random", random}} {
		for _, mode := range []string{"direct", "staged"} {
			r, err := b.run(ctx, set.name, set.data, mode)
			if err != nil {
				return fmt.Errorf("%s %s: %w", set.name, mode, err)
			}
			fmt.Fprintf(os.Stderr, "%-10s %-6s wire %6.1f MiB (%.2f of data) drain %6.1f s apply %5.1f s segments %d puts %d\n",
				r.Data, r.Mode, float64(r.WireBytes)/(1<<20), r.Compressed, r.DrainSecs, r.ApplySecs, r.Segments, r.PutCalls)
			results = append(results, r)
		}
	}
	fmt.Println("| data | mode | wire MiB | wire / data | drain s (link " + fmt.Sprint(rate) + " MiB/s) | staged/direct drain | apply s (no limit) |")
	fmt.Println("|---|---|---|---|---|---|---|")
	for i, r := range results {
		ratio := ""
		if r.Mode == "staged" && i > 0 {
			ratio = fmt.Sprintf("%.2f", r.DrainSecs/results[i-1].DrainSecs)
		}
		fmt.Printf("| %s | %s | %.1f | %.2f | %.1f | %s | %.1f |\n", r.Data, r.Mode, float64(r.WireBytes)/(1<<20), r.Compressed, r.DrainSecs, ratio, r.ApplySecs)
	}
	if out != "" {
		j, _ := json.MarshalIndent(results, "", "  ")
		return os.WriteFile(out, j, 0o600)
	}
	return nil
}
