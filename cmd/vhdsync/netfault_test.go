package main

// Network faults: the daemon reaches Azurite through a toxiproxy and then
// the Azure-limits proxy (internal/azurite/throttle), both in this test
// process. The toxiproxy breaks the connection (latency, bandwidth, resets,
// stalls, down); the throttle proxy, unlimited between faults, plays
// Azure's throttling storms (503 ServerBusy, 500 OperationTimedOut). During
// each fault a writer keeps writing and fsync'ing through the mount; when
// the fault ends the test measures the time until the journal is empty,
// then compares the blob with the image and with a model of every
// acknowledged write. Writes failed to the user, acknowledged bytes lost
// and bytes differing must all be 0, and the daemon must count exactly the
// throttled answers the proxy gave. VHDSYNC_FAULT_WINDOW (default 3s) sets
// how long each fault lasts: `make soak` runs the long form (the proxy down
// for 60 s, a storm of 60 s).

import (
	"bytes"
	"fmt"
	"io"
	"math/rand"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/vhdsync/vhdsync/internal/azurite/throttle"
)

// faultWindow is how long each fault lasts.
func faultWindow(t *testing.T) time.Duration {
	t.Helper()
	w := 3 * time.Second
	if s := os.Getenv("VHDSYNC_FAULT_WINDOW"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("VHDSYNC_FAULT_WINDOW: %v", err)
		}
		w = d
	}
	return w
}

// netFault is one fault: a toxic of the toxiproxy, the toxiproxy stopped,
// or a throttling storm.
type netFault struct {
	name  string
	toxic string // toxiproxy toxic JSON; "" and no storm: the proxy is stopped
	// storm, if set, is the throttle proxy's limits while the fault lasts
	// (unlimited before and after).
	storm *throttle.Limits
}

// The storms' limits: a fifth of the writer's request rate (50 write+fsync
// pairs/s) and about a third of its 3.2 MiB/s, so most of the flusher's
// requests are refused while a storm lasts. Azure's own targets for a
// standard page blob (500 requests/s, 60 MiB/s) are far above this test's
// load; the proxy lowers them to make the load a storm.
const (
	stormRequestsPerSecond = 10
	stormBytesPerSecond    = 1 << 20
)

// storm returns the limits of a storm in which timeoutFraction of the
// refusals are 500 OperationTimedOut and the rest 503 ServerBusy.
func storm(timeoutFraction float64) *throttle.Limits {
	return &throttle.Limits{RequestsPerSecond: stormRequestsPerSecond, BytesPerSecond: stormBytesPerSecond, TimeoutFraction: timeoutFraction}
}

// netFaultHeader is the table header of the rows faultRound returns.
const netFaultHeader = "| fault | lasted | writes+fsyncs during it | journal records at its end | throttled answers (503 / 500) | failed to the user | converged after its end | acknowledged bytes lost | bytes differing |\n|---|---|---|---|---|---|---|---|---|"

func TestE2ENetworkFaults(t *testing.T) {
	e := newE2E(t)
	window := faultWindow(t)

	// The proxies, in process: the daemon reaches the toxiproxy, the
	// toxiproxy the throttle proxy (unlimited until a storm), the throttle
	// proxy Azurite. The toxics log through zerolog's global logger (a line
	// per interrupted write): quiet it.
	zerolog.SetGlobalLevel(zerolog.WarnLevel)
	px := throttle.Start(t, e.az.Endpoint, throttle.Limits{})
	u, err := url.Parse(px.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", u.Host)
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)

	// The disk's blob URL names the toxiproxy: the daemon goes through
	// both proxies.
	const sizeMiB = 32
	blobURL := strings.Replace(px.BlobURL("disks", "net.vhd"), u.Host, proxy.Listen, 1)
	state := e.path("state-net")
	e.mustVhdsync("create", "--blob", blobURL, "--size", fmt.Sprintf("%dMiB", sizeMiB), "--state", state, "--create-container")
	directURL := e.az.BlobURL("disks", "net.vhd")
	mp := e.path("mnt")
	d := e.mount(state, mp, "--linger", "50ms")
	img := filepath.Join(mp, "net.img")

	faults := []netFault{
		{name: "latency 300 ms ± 100", toxic: `{"name":"f","type":"latency","stream":"downstream","attributes":{"latency":300,"jitter":100}}`},
		{name: "bandwidth 64 KB/s", toxic: `{"name":"f","type":"bandwidth","stream":"upstream","attributes":{"rate":64}}`},
		{name: "reset_peer after 50 ms", toxic: `{"name":"f","type":"reset_peer","stream":"upstream","attributes":{"timeout":50}}`},
		{name: "timeout (no data, closed after 2 s)", toxic: `{"name":"f","type":"timeout","stream":"upstream","attributes":{"timeout":2000}}`},
		{name: "proxy down"},
	}
	// The soak repeats the faults for half of VHDSYNC_SOAK_DURATION (the
	// kill -9 loop takes the other half), with a storm of each kind; the
	// short form has one storm mixing both.
	soak := envDuration(t, "VHDSYNC_SOAK_DURATION") / 2
	if soak > 0 {
		faults = append(faults,
			netFault{name: "503 ServerBusy storm", storm: storm(0)},
			netFault{name: "500 OperationTimedOut storm", storm: storm(1)})
	} else {
		faults = append(faults, netFault{name: "storm, 1 in 4 refusals 500 OperationTimedOut, the rest 503 ServerBusy", storm: storm(0.25)})
	}
	model := make([]byte, sizeMiB<<20) // every acknowledged write, applied in order
	start := time.Now()
	var rows []string
	for round := 0; round == 0 || time.Since(start) < soak; round++ {
		rows = append(rows, faultRound(t, e, proxy, px.Proxy, faults, window, round, state, img, directURL, model)...)
	}
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	e.mustVhdsync("verify", "--state", state)
	t.Logf("network faults:\n%s\n%s", netFaultHeader, strings.Join(rows, "\n"))
}

// envDuration is the duration in environment variable name, the length
// of a test's long form (0 when unset: the short form of make test).
func envDuration(t *testing.T, name string) time.Duration {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return d
}

// faultRound runs every fault once, a writer busy during each, and returns
// a table row per fault. model is the disk as the acknowledged writes made
// it; the writer applies each write to it once its fsync returned.
func faultRound(t *testing.T, e *e2e, proxy *toxiproxy.Proxy, px *throttle.Proxy, faults []netFault, window time.Duration, round int, state, img, directURL string, model []byte) []string {
	t.Helper()
	size := int64(len(model))
	var rows []string
	for i, f := range faults {
		i := i + 100*round
		throttled0, px0 := e.mustStatus(state).Throttled, px.Stats().Total
		// A writer: 64 KiB at random sectors, an fsync after each.
		var failed, writes atomic.Int64
		var wmu sync.Mutex
		var werrs []string
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			rng := rand.New(rand.NewSource(int64(i)))
			fh, err := os.OpenFile(img, os.O_WRONLY, 0)
			if err != nil {
				failed.Add(1)
				return
			}
			defer fh.Close()
			pace := time.NewTicker(20 * time.Millisecond) // the workload's rate
			defer pace.Stop()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				case <-pace.C:
				}
				off := rng.Int63n(size-64<<10) &^ 511
				p := pattern(fmt.Sprintf("%d-%d", i, n), 64<<10)
				_, err := fh.WriteAt(p, off)
				if err == nil {
					err = fh.Sync()
				}
				writes.Add(1)
				if err == nil {
					copy(model[off:], p)
				} else {
					failed.Add(1)
					wmu.Lock()
					werrs = append(werrs, err.Error())
					wmu.Unlock()
				}
			}
		}()

		switch {
		case f.storm != nil:
			if err := px.SetLimits(*f.storm); err != nil {
				t.Fatalf("%s: %v", f.name, err)
			}
		case f.toxic == "":
			proxy.Stop()
		default:
			if _, err := proxy.Toxics.AddToxicJson(strings.NewReader(f.toxic)); err != nil {
				t.Fatalf("%s: %v", f.name, err)
			}
		}
		<-time.After(window) // the fault's duration
		switch {
		case f.storm != nil:
			if err := px.SetLimits(throttle.Limits{}); err != nil {
				t.Fatalf("%s: end: %v", f.name, err)
			}
		case f.toxic == "":
			if err := proxy.Start(); err != nil {
				t.Fatalf("restart the proxy: %v", err)
			}
		default:
			if err := proxy.Toxics.RemoveToxic(t.Context(), "f"); err != nil {
				t.Fatalf("%s: remove: %v", f.name, err)
			}
		}
		ended := time.Now()
		close(stop)
		<-done

		var pending int64
		st := e.mustStatus(state)
		pending = st.JournalRecords
		waitFor(t, 3*time.Minute, "the journal to drain after "+f.name, func() (bool, error) {
			s, err := e.status(state)
			return err == nil && s.JournalRecords == 0, err
		})
		converge := time.Since(ended)
		diff, lost := blobDiff(t, e, directURL, filepath.Join(state, "disk.img"), model)
		daemonThrottled := e.mustStatus(state).Throttled - throttled0
		px1 := px.Stats().Total
		busy, timedOut := px1.Throttled-px0.Throttled, px1.TimedOut-px0.TimedOut
		row := fmt.Sprintf("| %s | %v | %d | %d | %d / %d | %d | %.1f s | %d | %d |", f.name, window, writes.Load(), pending, busy, timedOut, failed.Load(), converge.Seconds(), lost, diff)
		rows = append(rows, row)
		t.Logf("RELIABILITY %s", row)
		if failed.Load() != 0 {
			t.Errorf("%s: %d writes failed to the user: %v", f.name, failed.Load(), werrs)
		}
		if lost != 0 {
			t.Errorf("%s: the blob lacks %d bytes of acknowledged writes after the drain", f.name, lost)
		}
		if diff != 0 {
			t.Errorf("%s: blob and image differ in %d bytes after the drain", f.name, diff)
		}
		if daemonThrottled != uint64(busy+timedOut) {
			t.Errorf("%s: the daemon counted %d throttled answers (status --json throttled), the proxy gave %d (%d 503, %d 500)", f.name, daemonThrottled, busy+timedOut, busy, timedOut)
		}
		if s := f.storm; s != nil {
			if busy+timedOut == 0 {
				t.Errorf("%s: the proxy refused nothing: the load did not make a storm", f.name)
			}
			if s.TimeoutFraction > 0 && timedOut == 0 || s.TimeoutFraction < 1 && busy == 0 {
				t.Errorf("%s: %d 503 ServerBusy and %d 500 OperationTimedOut, want both kinds the storm gives (timeout fraction %v)", f.name, busy, timedOut, s.TimeoutFraction)
			}
		}
	}
	return rows
}

// blobDiff downloads the blob directly (not through the proxies) and
// counts the bytes of its data region that differ from the image (diff,
// plus 512 if its footer is not the state's) and from model, the
// acknowledged writes (lost).
func blobDiff(t *testing.T, e *e2e, url, image string, model []byte) (diff, lost int64) {
	t.Helper()
	size := int64(len(model))
	local := e.path(fmt.Sprintf("blob-%d.vhd", time.Now().UnixNano()))
	download(t, url, local)
	defer os.Remove(local)
	bf, err := os.Open(local)
	if err != nil {
		t.Fatal(err)
	}
	defer bf.Close()
	imf, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer imf.Close()
	differing := func(a, b []byte) (n int64) {
		if bytes.Equal(a, b) {
			return 0
		}
		for i := range a {
			if a[i] != b[i] {
				n++
			}
		}
		return n
	}
	a, b := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < size; off += 1 << 20 {
		if _, err := io.ReadFull(io.NewSectionReader(bf, off, 1<<20), a); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(io.NewSectionReader(imf, off, 1<<20), b); err != nil {
			t.Fatal(err)
		}
		diff += differing(a, b)
		lost += differing(a, model[off:off+1<<20])
	}
	foot := make([]byte, 512)
	if _, err := bf.ReadAt(foot, size); err != nil || !bytes.Equal(foot, stateFooter(t, filepath.Dir(image))) {
		diff += 512
	}
	return diff, lost
}
