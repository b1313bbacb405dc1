package throttle_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/azurite/throttle"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// TestStormThroughAzurite sends a burst of concurrent Put Pages through the
// proxy to a real Azurite: the SharedKey-signed requests the SDK made for
// the proxy's address must be accepted, the excess must reach the client as
// 503 ServerBusy, and exactly the admitted pages must land.
func TestStormThroughAzurite(t *testing.T) {
	az := azurite.Start(t)
	const rps, pages = 50, 300
	px := throttle.Start(t, az.Endpoint, throttle.Limits{RequestsPerSecond: rps})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := func(string) string { return "" }

	// SDK retries off: every 503 reaches the caller, and each admitted
	// request is one the proxy counted.
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

	var ok, busy int
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
		case bloberror.HasCode(err, bloberror.ServerBusy):
			var re *azcore.ResponseError
			if !errors.As(err, &re) || re.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("page %d: ServerBusy without a 503 response error: %v", i, err)
			}
			if !strings.Contains(re.Error(), "Operations per second is over the account limit.") {
				t.Errorf("page %d: the client does not show Azure's message: %v", i, err)
			}
			busy++
		default:
			t.Fatalf("page %d: %v", i, err)
		}
	}
	t.Logf("%d pages admitted, %d refused with ServerBusy", ok, busy)
	if busy == 0 || ok == 0 {
		t.Fatalf("%d admitted, %d ServerBusy: want both", ok, busy)
	}

	st := px.Proxy.Stats()
	key := "/" + azurite.DevAccount + "/disks/storm.vhd"
	// Bytes: the footer and the admitted pages; Put Blob sends no body.
	want := throttle.Counts{Admitted: int64(2 + ok), Throttled: int64(busy), Bytes: int64(1+ok) * vhdlayer.SectorSize}
	if got := st.Blobs[key]; got != want {
		t.Fatalf("proxy stats for %s: %+v, want %+v (all: %+v)", key, got, want, st)
	}

	// Read the blob straight from Azurite: every admitted page is there,
	// no refused one is.
	direct, err := pageblob.Open(az.BlobURL("disks", "storm.vhd"), &pageblob.Options{Env: env})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if err := direct.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	zero := make([]byte, vhdlayer.SectorSize)
	for i, err := range errs {
		want := zero
		if err == nil {
			want = content(i)
		}
		if p := got[i*vhdlayer.SectorSize : (i+1)*vhdlayer.SectorSize]; !bytes.Equal(p, want) {
			t.Fatalf("page %d (admitted %v) does not hold what was expected", i, err == nil)
		}
	}
}
