// Command flushbench measures the flush path: how fast the
// flusher drains 1 GiB of random data from the journal to Azurite with 1..16
// workers, against two baselines measured in the same run: the
// single-threaded loop of 4 MiB Put Pages a straightforward replication
// would be, and parallel raw 4 MiB Put Page uploaders (the best of several
// concurrencies: the server's ceiling). With --rtt, a round-trip time is
// added by toxiproxy in process (half on each direction).
//
//	flushbench --dir DIR --size 1GiB --workers 1,2,4,8,16 --reps 3 --rtt 0,20ms --out flush.json
//
// The journal is filled while the remote is gated (the flusher waits on its
// first request), then the gate opens and the time to an empty journal is
// taken. Repetitions alternate between all configurations; every
// measurement runs on a fresh Azurite, removed afterwards.
//
// flushbench --scan IMAGE prints the distinct non-zero bytes of a disk image
// and the ideal number of Put Page calls for them (sum of ceil(run/4 MiB)).
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/collectors"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/vhdlayer"
	"github.com/vhdsync/vhdsync/writeback"
)

const page = 4 << 20

// gated holds every write until open is closed.
type gated struct {
	pageblob.Remote
	open chan struct{}
}

func (g gated) wait(ctx context.Context) error {
	select {
	case <-g.open:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (g gated) PutPages(ctx context.Context, off int64, data remote.Pages, c remote.Cond) error {
	if err := g.wait(ctx); err != nil {
		return err
	}
	return g.Remote.PutPages(ctx, off, data, c)
}

func (g gated) ClearPages(ctx context.Context, off, n int64, c remote.Cond) error {
	if err := g.wait(ctx); err != nil {
		return err
	}
	return g.Remote.ClearPages(ctx, off, n, c)
}

func (g gated) RaiseSequence(ctx context.Context, n int64, lease string) error {
	if err := g.wait(ctx); err != nil {
		return err
	}
	return g.Remote.RaiseSequence(ctx, n, lease)
}

type result struct {
	RTT     string    `json:"rtt"`
	Config  string    `json:"config"`
	MiBs    []float64 `json:"mibs"`
	Median  float64   `json:"median_mibs"`
	Puts    uint64    `json:"put_calls,omitempty"`
	Batches uint64    `json:"batches,omitempty"`
}

type bench struct {
	dir      string
	size     int64
	data     []byte // size bytes of random data
	endpoint string
	n        int
}

func (b *bench) newBlob(ctx context.Context) (*pageblob.Client, string, error) {
	b.n++
	u := fmt.Sprintf("%s/flush/b%d.vhd", b.endpoint, b.n)
	c, err := pageblob.Open(u, nil)
	if err != nil {
		return nil, "", err
	}
	footer := vhdlayer.NewFixedFooter(uint64(b.size), time.Now())
	err = c.Create(ctx, uint64(b.size), footer.Encode(), pageblob.CreateOptions{CreateContainer: true})
	return c, u, err
}

// raw uploads b.data in 4 MiB Put Pages with conc goroutines.
func (b *bench) raw(ctx context.Context, conc int) (float64, error) {
	c, _, err := b.newBlob(ctx)
	if err != nil {
		return 0, err
	}
	defer c.Delete(context.WithoutCancel(ctx))
	next := make(chan int64)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	t0 := time.Now()
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := range next {
				if err := c.PutPages(ctx, off, b.data[off:off+page], ""); err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
				}
			}
		}()
	}
	for off := int64(0); off < b.size; off += page {
		next <- off
	}
	close(next)
	wg.Wait()
	return mib(b.size, time.Since(t0)), firstErr
}

// flush fills a journal with b.data (256 KiB writes, the FUSE max write)
// behind a gated remote, then times the drain with the given workers.
func (b *bench) flush(ctx context.Context, workers int) (float64, replicate.FlusherStats, error) {
	var st replicate.FlusherStats
	c, _, err := b.newBlob(ctx)
	if err != nil {
		return 0, st, err
	}
	defer c.Delete(context.WithoutCancel(ctx))
	d := filepath.Join(b.dir, fmt.Sprintf("disk%d", b.n))
	defer os.RemoveAll(d)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return 0, st, err
	}
	img := filepath.Join(d, "image")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		return 0, st, err
	}
	if err := os.Truncate(img, b.size); err != nil {
		return 0, st, err
	}
	g := gated{Remote: pageblob.Remote{C: c}, open: make(chan struct{})}
	disk, err := writeback.Open(ctx, writeback.DiskOptions{
		ImagePath: img, JournalDir: filepath.Join(d, "journal"), VirtualSize: b.size,
		Remote: g, SaveLeaseID: func(string) error { return nil },
		Sender: replicate.SenderOptions{Workers: workers},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		return 0, st, err
	}
	const w = 256 << 10
	for off := int64(0); off < b.size; off += w {
		if err := disk.WriteAt(ctx, b.data[off:off+w], off); err != nil {
			close(g.open)
			disk.Close(ctx, false)
			return 0, st, err
		}
	}
	if err := disk.Flush(); err != nil {
		return 0, st, err
	}
	t0 := time.Now()
	close(g.open)
	if err := disk.Drain(ctx); err != nil {
		return 0, st, err
	}
	el := time.Since(t0)
	st = disk.Stats().Flusher
	return mib(b.size, el), st, disk.Close(ctx, false)
}

func mib(n int64, d time.Duration) float64 { return float64(n) / (1 << 20) / d.Seconds() }

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// withLatency starts a toxiproxy in front of endpoint adding rtt (half per
// direction) and returns the endpoint through it.
func withLatency(endpoint string, rtt time.Duration) (string, func(), error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return "", nil, err
	}
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	srv.Metrics.ProxyMetrics = collectors.NewProxyMetricCollectors()
	p := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", u.Host)
	if err := p.Start(); err != nil {
		return "", nil, err
	}
	half := rtt.Milliseconds() / 2
	for _, s := range []string{"upstream", "downstream"} {
		js := fmt.Sprintf(`{"name":"lat_%s","type":"latency","stream":%q,"attributes":{"latency":%d}}`, s, s, half)
		if _, err := p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
			p.Stop()
			return "", nil, err
		}
	}
	u.Host = p.Listen
	return u.String(), p.Stop, nil
}

func parseSize(s string) int64 {
	mult := int64(1)
	for suf, m := range map[string]int64{"GiB": 1 << 30, "MiB": 1 << 20} {
		if strings.HasSuffix(s, suf) {
			mult, s = m, strings.TrimSuffix(s, suf)
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad size:", s)
		os.Exit(2)
	}
	return n * mult
}

func ints(s string) []int {
	var r []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bad list:", s)
			os.Exit(2)
		}
		r = append(r, n)
	}
	return r
}

// scan prints the distinct non-zero bytes of an image (512-byte sectors)
// and the ideal Put Page calls: sum over non-zero runs of ceil(run/4 MiB).
func scan(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var nonzero, calls, run int64
	end := func() {
		if run > 0 {
			calls += (run + page - 1) / page
			nonzero += run
			run = 0
		}
	}
	var off int64
	for {
		n, err := f.ReadAt(buf, off)
		for s := 0; s+512 <= n; s += 512 {
			zero := true
			for _, c := range buf[s : s+512] {
				if c != 0 {
					zero = false
					break
				}
			}
			if zero {
				end()
			} else {
				run += 512
			}
		}
		off += int64(n)
		if err == io.EOF || n == 0 {
			break
		}
		if err != nil {
			return err
		}
	}
	end()
	return json.NewEncoder(os.Stdout).Encode(map[string]int64{"nonzero_bytes": nonzero, "ideal_put_calls": calls})
}

func main() {
	dir := flag.String("dir", "", "work directory (Azurite data and journals; removed)")
	size := flag.String("size", "1GiB", "bytes to drain")
	workers := flag.String("workers", "1,2,4,8,16", "flusher worker counts")
	rawConc := flag.String("raw", "4,8,16,32", "concurrencies of the raw parallel uploader (best is the ceiling)")
	reps := flag.Int("reps", 3, "repetitions (alternating)")
	rtts := flag.String("rtt", "0,20ms", "added round-trip times")
	out := flag.String("out", "", "JSON output (default stdout)")
	scanImg := flag.String("scan", "", "scan an image instead (see doc)")
	cpuProf := flag.String("cpuprofile", "", "write a Go CPU profile of the whole run to `FILE` (the flusher's share of the CPU Azurite competes for)")
	flag.Parse()
	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err != nil {
			fmt.Fprintln(os.Stderr, "flushbench:", err)
			os.Exit(1)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "flushbench:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	if *scanImg != "" {
		if err := scan(*scanImg); err != nil {
			fmt.Fprintln(os.Stderr, "flushbench:", err)
			os.Exit(1)
		}
		return
	}
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "flushbench: --dir is required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "flushbench:", err)
		os.Exit(1)
	}
	b := &bench{dir: *dir, size: parseSize(*size)}
	b.data = make([]byte, b.size)
	_, _ = rand.Read(b.data)
	results := map[string]*result{}
	get := func(rtt, cfg string) *result {
		k := rtt + "/" + cfg
		if results[k] == nil {
			results[k] = &result{RTT: rtt, Config: cfg}
		}
		return results[k]
	}
	var order []string
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "flushbench:", err)
		os.Exit(1)
	}
	for _, rs := range strings.Split(*rtts, ",") {
		rtt := time.Duration(0)
		if rs != "0" {
			var err error
			if rtt, err = time.ParseDuration(rs); err != nil {
				fail(err)
			}
		}
		for rep := 1; rep <= *reps; rep++ {
			// Every measurement gets a fresh Azurite: one instance slows
			// down as data goes through it (raw-16 six times in a row on
			// one instance: 69, 67, 64, 52, 56, 53 MiB/s), which favoured
			// whatever ran first in a pass.
			run := func(cfg string, f func() (float64, error)) {
				if ctx.Err() != nil {
					return
				}
				loc := filepath.Join(*dir, fmt.Sprintf("az-%s-%d", rs, rep))
				srv, err := azurite.Launch(ctx, loc, filepath.Join(*dir, "azurite.log"))
				if err != nil {
					fail(err)
				}
				ep, stopProxy := srv.Endpoint, func() {}
				if rtt > 0 {
					if ep, stopProxy, err = withLatency(srv.Endpoint, rtt); err != nil {
						srv.Stop()
						fail(err)
					}
				}
				b.endpoint = ep
				v, err := f()
				stopProxy()
				srv.Stop()
				os.RemoveAll(loc)
				if err != nil {
					fmt.Fprintf(os.Stderr, "flushbench: rtt %s %s: %v\n", rs, cfg, err)
					return
				}
				r := get(rs, cfg)
				if len(r.MiBs) == 0 {
					order = append(order, rs+"/"+cfg)
				}
				r.MiBs = append(r.MiBs, v)
				fmt.Fprintf(os.Stderr, "flush rtt=%s rep=%d %-12s %8.1f MiB/s\n", rs, rep, cfg, v)
			}
			// alternate: a different starting point each repetition
			var cfgs []func()
			cfgs = append(cfgs, func() { run("single-4MiB", func() (float64, error) { return b.raw(ctx, 1) }) })
			for _, cc := range ints(*rawConc) {
				cfgs = append(cfgs, func() { run(fmt.Sprintf("raw-%d", cc), func() (float64, error) { return b.raw(ctx, cc) }) })
			}
			for _, w := range ints(*workers) {
				cfgs = append(cfgs, func() {
					run(fmt.Sprintf("vhdsync-w%d", w), func() (float64, error) {
						v, st, err := b.flush(ctx, w)
						r := get(rs, fmt.Sprintf("vhdsync-w%d", w))
						r.Puts, r.Batches = st.PutCalls, st.Batches
						return v, err
					})
				})
			}
			for i := range cfgs {
				cfgs[(i+rep-1)%len(cfgs)]()
			}
			if ctx.Err() != nil {
				fail(ctx.Err())
			}
		}
	}
	var list []*result
	for _, k := range order {
		r := results[k]
		r.Median = median(r.MiBs)
		list = append(list, r)
	}
	w := os.Stdout
	if *out != "" {
		f, err := os.Create(*out)
		if err != nil {
			fail(err)
		}
		defer f.Close()
		w = f
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(map[string]any{"size_bytes": b.size, "results": list}); err != nil {
		fail(err)
	}
}
