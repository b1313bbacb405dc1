package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/azurite/throttle"
)

// TestRunWritesEndpointAndStats runs the command's body against a stand-in
// for Azurite: it must publish its endpoint in the target's form, refuse
// the excess, and leave its counters and a wire log when stopped.
func TestRunWritesEndpointAndStats(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/devstoreaccount1/") {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(http.StatusCreated)
	}))
	defer backend.Close()
	dir := t.TempDir()
	endpointFile, statsFile, wireLog := filepath.Join(dir, "proxy.url"), filepath.Join(dir, "stats.json"), filepath.Join(dir, "wire.log")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, backend.URL+"/devstoreaccount1", "127.0.0.1:0", endpointFile, wireLog, statsFile,
			throttle.Limits{RequestsPerSecond: 1})
	}()

	// Wait for the endpoint file, as a benchmark script does.
	var endpoint string
	deadline := time.Now().Add(10 * time.Second)
	for tick := time.NewTicker(10 * time.Millisecond); ; <-tick.C {
		if b, err := os.ReadFile(endpointFile); err == nil {
			endpoint = strings.TrimSpace(string(b))
			tick.Stop()
			break
		}
		select {
		case err := <-done:
			t.Fatalf("run ended before listening: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no endpoint file after 10 s")
		}
	}
	if !strings.HasPrefix(endpoint, "http://127.0.0.1:") || !strings.HasSuffix(endpoint, "/devstoreaccount1") || endpoint == backend.URL+"/devstoreaccount1" {
		t.Fatalf("endpoint %q: want the proxy's own http://127.0.0.1:PORT/devstoreaccount1", endpoint)
	}

	// One request per second: unless the 10 requests take over 4 s, at
	// least 5 are refused.
	var codes []int
	for i := 0; i < 10; i++ {
		resp, err := http.Post(endpoint+"/c/b?comp=page&sig=SECRET", "application/octet-stream", strings.NewReader("x"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		codes = append(codes, resp.StatusCode)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}

	var st throttle.Stats
	b, err := os.ReadFile(statsFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("stats file %q: %v", b, err)
	}
	var admitted, refused int64
	for _, c := range codes {
		switch c {
		case http.StatusCreated:
			admitted++
		case http.StatusServiceUnavailable:
			refused++
		default:
			t.Fatalf("status %d", c)
		}
	}
	if refused < 5 || st.Blobs["/devstoreaccount1/c/b"].Admitted != admitted || st.Total.Throttled != refused {
		t.Fatalf("answers %v, stats %+v", codes, st)
	}

	f, err := os.Open(wireLog)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lines := 0
	for sc := bufio.NewScanner(f); sc.Scan(); lines++ {
		if strings.Contains(sc.Text(), "SECRET") {
			t.Fatalf("wire log holds the query: %s", sc.Text())
		}
	}
	if lines != 10 {
		t.Fatalf("wire log has %d lines, want 10", lines)
	}
	if _, err := os.Stat(endpointFile + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the endpoint file's temporary copy is left: %v", err)
	}
}
