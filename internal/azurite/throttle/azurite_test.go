package throttle_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/azurite/throttle"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// TestStormThroughAzurite sends a burst of concurrent Put Pages through the
// proxy to a real Azurite: the SharedKey-signed requests the SDK made for
// the proxy's address must be accepted, the excess must be refused with 503
// ServerBusy, and the page blob client must absorb every refusal as
// back-pressure (fewer requests in flight, the same request later): every
// page lands and no caller sees an error.
func TestStormThroughAzurite(t *testing.T) {
	az := azurite.Start(t)
	const rps, pages = 50, 300
	px := throttle.Start(t, az.Endpoint, throttle.Limits{RequestsPerSecond: rps})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := func(string) string { return "" }

	// SDK retries off: the client's back-pressure alone must carry every
	// page through.
	c, err := pageblob.Open(px.BlobURL("disks", "storm.vhd"), &pageblob.Options{MaxRetries: -1, Env: env})
	if err != nil {
		t.Fatal(err)
	}
	size := uint64(pages * vhdlayer.SectorSize)
	// The container create is not limited; the blob create and its footer
	// write take 2 of the blob's 50 tokens.
	if err := c.Create(ctx, size, vhdlayer.NewFixedFooter(size, time.Now()).Encode(), pageblob.CreateOptions{CreateContainer: true}); err != nil {
		t.Fatalf("create through the proxy: %v", err)
	}

	content := func(i int) []byte {
		p := make([]byte, vhdlayer.SectorSize)
		for j := 0; j < len(p); j += 8 {
			binary.LittleEndian.PutUint64(p[j:], uint64(i+1)<<32|uint64(j))
		}
		return p
	}
	errs := make([]error, pages)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := 0; i < pages; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			// PutPagesCond is the flusher's path; it keeps the
			// service's error in the chain (PutPages shortens it).
			errs[i] = c.PutPagesCond(ctx, int64(i*vhdlayer.SectorSize), content(i), "", nil)
		}()
	}
	close(start)
	wg.Wait()

	for i, err := range errs {
		if err != nil {
			t.Fatalf("page %d failed under throttling: %v", i, err)
		}
	}
	st := px.Proxy.Stats()
	key := "/" + azurite.DevAccount + "/disks/storm.vhd"
	got := st.Blobs[key]
	t.Logf("%d pages, %d refused with ServerBusy and sent again; in-flight limit now %d", pages, got.Throttled, c.InFlightLimit())
	if got.Throttled == 0 {
		t.Fatalf("the proxy refused nothing (%+v): the test does not throttle", got)
	}
	if uint64(got.Throttled) != c.Throttled() {
		t.Fatalf("the proxy refused %d requests, the client counted %d", got.Throttled, c.Throttled())
	}
	// Bytes: the footer and every page; Put Blob sends no body.
	if want := (throttle.Counts{Admitted: int64(2 + pages), Throttled: got.Throttled, Bytes: int64(1+pages) * vhdlayer.SectorSize}); got != want {
		t.Fatalf("proxy stats for %s: %+v, want %+v (all: %+v)", key, got, want, st)
	}
	// Adaptive concurrency keeps the refusals to a fraction of what 300
	// callers resending on their own would draw.
	if got.Throttled > 2*pages {
		t.Errorf("%d refusals for %d pages: the client does not back off", got.Throttled, pages)
	}

	// Read the blob straight from Azurite: every page is there.
	direct, err := pageblob.Open(az.BlobURL("disks", "storm.vhd"), &pageblob.Options{Env: env})
	if err != nil {
		t.Fatal(err)
	}
	blob := make([]byte, size)
	if err := direct.ReadAt(ctx, blob, 0); err != nil {
		t.Fatal(err)
	}
	for i := range pages {
		if p := blob[i*vhdlayer.SectorSize : (i+1)*vhdlayer.SectorSize]; !bytes.Equal(p, content(i)) {
			t.Fatalf("page %d does not hold what was written", i)
		}
	}
}
