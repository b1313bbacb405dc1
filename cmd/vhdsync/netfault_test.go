package main

// Network faults: the daemon reaches Azurite through a
// toxiproxy in this test process. During each fault a writer keeps writing
// and fsync'ing through the mount; when the fault ends the test measures
// the time until the journal is empty, then counts the bytes in which the
// blob and the image differ. Writes failed to the user and bytes differing
// must both be 0. VHDSYNC_FAULT_WINDOW (default 3s) sets how long each
// fault lasts: `make soak` runs the long form (the proxy down for 60 s).

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

// netFault is one fault: begin starts it, end removes it.
type netFault struct {
	name  string
	toxic string // toxiproxy toxic JSON; "" : the proxy is stopped
}

func TestE2ENetworkFaults(t *testing.T) {
	e := newE2E(t)
	window := faultWindow(t)

	// The proxy, in process, in front of Azurite. Its toxics log through
	// zerolog's global logger (a line per interrupted write): quiet it.
	zerolog.SetGlobalLevel(zerolog.WarnLevel)
	u, err := url.Parse(e.az.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", u.Host)
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)

	// The disk's blob URL names the proxy: the daemon goes through it.
	const sizeMiB = 32
	blobURL := strings.Replace(e.az.BlobURL("disks", "net.vhd"), u.Host, proxy.Listen, 1)
	state := e.path("state-net")
	e.mustVhdsync("create", "--blob", blobURL, "--size", fmt.Sprintf("%dMiB", sizeMiB), "--state", state, "--create-container")
	directURL := e.az.BlobURL("disks", "net.vhd")
	mp := e.path("mnt")
	d := e.mount(state, mp, "--linger", "50ms")
	img := filepath.Join(mp, "net.img")

	faults := []netFault{
		{"latency 300 ms ± 100", `{"name":"f","type":"latency","stream":"downstream","attributes":{"latency":300,"jitter":100}}`},
		{"bandwidth 64 KB/s", `{"name":"f","type":"bandwidth","stream":"upstream","attributes":{"rate":64}}`},
		{"reset_peer after 50 ms", `{"name":"f","type":"reset_peer","stream":"upstream","attributes":{"timeout":50}}`},
		{"timeout (no data, closed after 2 s)", `{"name":"f","type":"timeout","stream":"upstream","attributes":{"timeout":2000}}`},
		{"proxy down", ""},
	}
	// The soak repeats the faults for half of VHDSYNC_SOAK_DURATION (the
	// kill -9 loop takes the other half).
	soak := soakDuration(t) / 2
	start := time.Now()
	var rows []string
	for round := 0; round == 0 || time.Since(start) < soak; round++ {
		rows = append(rows, faultRound(t, e, proxy, faults, window, round, state, img, directURL, sizeMiB)...)
	}
	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)
	e.mustVhdsync("verify", "--state", state)
	t.Logf("network faults:\n| fault | lasted | writes+fsyncs during it | journal records at its end | failed to the user | converged after its end | bytes differing |\n|---|---|---|---|---|---|---|\n%s", strings.Join(rows, "\n"))
}

// soakDuration is VHDSYNC_SOAK_DURATION (0 outside `make soak`).
func soakDuration(t *testing.T) time.Duration {
	t.Helper()
	s := os.Getenv("VHDSYNC_SOAK_DURATION")
	if s == "" {
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("VHDSYNC_SOAK_DURATION: %v", err)
	}
	return d
}

// faultRound runs every fault once, a writer busy during each, and returns
// a table row per fault.
func faultRound(t *testing.T, e *e2e, proxy *toxiproxy.Proxy, faults []netFault, window time.Duration, round int, state, img, directURL string, sizeMiB int64) []string {
	t.Helper()
	var rows []string
	for i, f := range faults {
		i := i + 100*round
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
				off := rng.Int63n(sizeMiB<<20-64<<10) &^ 511
				_, err := fh.WriteAt(pattern(fmt.Sprintf("%d-%d", i, n), 64<<10), off)
				if err == nil {
					err = fh.Sync()
				}
				writes.Add(1)
				if err != nil {
					failed.Add(1)
					wmu.Lock()
					werrs = append(werrs, err.Error())
					wmu.Unlock()
				}
			}
		}()

		if f.toxic == "" {
			proxy.Stop()
		} else if _, err := proxy.Toxics.AddToxicJson(strings.NewReader(f.toxic)); err != nil {
			t.Fatalf("%s: %v", f.name, err)
		}
		<-time.After(window) // the fault's duration
		if f.toxic == "" {
			if err := proxy.Start(); err != nil {
				t.Fatalf("restart the proxy: %v", err)
			}
		} else if err := proxy.Toxics.RemoveToxic(t.Context(), "f"); err != nil {
			t.Fatalf("%s: remove: %v", f.name, err)
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
		diff := blobImageDiff(t, e, directURL, filepath.Join(state, "disk.img"), sizeMiB<<20)
		row := fmt.Sprintf("| %s | %v | %d | %d | %d | %.1f s | %d |", f.name, window, writes.Load(), pending, failed.Load(), converge.Seconds(), diff)
		rows = append(rows, row)
		t.Logf("RELIABILITY %s", row)
		if failed.Load() != 0 {
			t.Errorf("%s: %d writes failed to the user: %v", f.name, failed.Load(), werrs)
		}
		if diff != 0 {
			t.Errorf("%s: blob and image differ in %d bytes after the drain", f.name, diff)
		}
	}
	return rows
}

// blobImageDiff downloads the blob directly (not through the proxy) and
// counts the bytes of its data region that differ from the image, plus
// 512 if its footer is not the state's.
func blobImageDiff(t *testing.T, e *e2e, url, image string, size int64) int64 {
	t.Helper()
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
	var n int64
	a, b := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < size; off += 1 << 20 {
		if _, err := io.ReadFull(io.NewSectionReader(bf, off, 1<<20), a); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(io.NewSectionReader(imf, off, 1<<20), b); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			for i := range a {
				if a[i] != b[i] {
					n++
				}
			}
		}
	}
	foot := make([]byte, 512)
	if _, err := bf.ReadAt(foot, size); err != nil || !bytes.Equal(foot, stateFooter(t, filepath.Dir(image))) {
		n += 512
	}
	return n
}
