package writeback

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/vhdlayer"
	"github.com/vhdsync/vhdsync/writeback/pageblob"
)

// The tests in this file run the write-back path against a real Azurite:
// every claim about what goes over the wire is checked on the requests
// themselves (wireTransport in transport_test.go), and every claim about
// the result is checked by downloading the blob with the official SDK.

const azMiB = 1 << 20

func azNoEnv(string) string { return "" }

// azBlob creates a fixed-VHD page blob of size data bytes on s and returns
// its URL and footer.
func azBlob(t *testing.T, s *azurite.Server, name string, size int64) (string, [vhdlayer.FooterSize]byte) {
	t.Helper()
	url := s.BlobURL("disks", name)
	c, err := pageblob.Open(url, &pageblob.Options{Env: azNoEnv})
	if err != nil {
		t.Fatal(err)
	}
	footer := vhdlayer.NewFixedFooter(uint64(size), time.Now()).Encode()
	if err := c.Create(context.Background(), uint64(size), footer, pageblob.CreateOptions{CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	return url, footer
}

// azClient opens the blob through transport tr with SDK retries off (the
// flusher retries by itself) and the given per-try timeout.
func azClient(t *testing.T, url string, tr policy.Transporter, tryTimeout time.Duration) *pageblob.Client {
	t.Helper()
	c, err := pageblob.Open(url, &pageblob.Options{Env: azNoEnv, Transport: tr, MaxRetries: -1, TryTimeout: tryTimeout})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// azMakeImage creates a sparse local image of size bytes in dir.
func azMakeImage(t *testing.T, dir string, size int64) string {
	t.Helper()
	img := filepath.Join(dir, "disk.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return img
}

// azOpenDisk opens a Disk over the blob client c with its state in dir;
// the Disk is closed (without drain) in t.Cleanup if the test has not.
func azOpenDisk(t *testing.T, dir string, size int64, c *pageblob.Client, o DiskOptions) (*Disk, error) {
	t.Helper()
	img := filepath.Join(dir, "disk.img")
	if _, err := os.Stat(img); err != nil {
		azMakeImage(t, dir, size)
	}
	o.ImagePath = img
	o.JournalDir = filepath.Join(dir, "journal")
	o.VirtualSize = size
	o.Remote = AzureRemote{C: c}
	if o.Flusher.RetryMin == 0 {
		o.Flusher.RetryMin = time.Millisecond
		o.Flusher.RetryMax = 20 * time.Millisecond
	}
	d, err := Open(context.Background(), o)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { d.Close(context.Background(), false) })
	return d, nil
}

func azMustOpenDisk(t *testing.T, dir string, size int64, c *pageblob.Client, o DiskOptions) *Disk {
	t.Helper()
	d, err := azOpenDisk(t, dir, size, c, o)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// azDownload reads the whole blob with the official SDK (not our pageblob
// code), so the judge of convergence is independent of the code judged.
func azDownload(t *testing.T, url string, size int64) []byte {
	t.Helper()
	cred, err := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	bc, err := blob.NewClientWithSharedKeyCredential(url, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, size+vhdlayer.FooterSize)
	n, err := bc.DownloadBuffer(context.Background(), buf, &blob.DownloadBufferOptions{Concurrency: 4, BlockSize: 4 * azMiB})
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(len(buf)) {
		t.Fatalf("downloaded %d bytes, want %d", n, len(buf))
	}
	return buf
}

// azCheckConverged downloads the blob and requires its data part to equal
// the local image in dir and its last 512 bytes to be the footer.
func azCheckConverged(t *testing.T, url, dir string, size int64, footer [vhdlayer.FooterSize]byte) {
	t.Helper()
	got := azDownload(t, url, size)
	img, err := os.ReadFile(filepath.Join(dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(img)) != size {
		t.Fatalf("local image is %d bytes, want %d", len(img), size)
	}
	if i := azFirstDiff(got[:size], img); i >= 0 {
		t.Fatalf("blob differs from the local image at byte %d (sector %d)", i, i/512)
	}
	if !bytes.Equal(got[size:], footer[:]) {
		t.Fatal("the blob's last 512 bytes are no longer the footer")
	}
	if _, err := vhdlayer.DecodeFooter(got[size:]); err != nil {
		t.Fatalf("footer: %v", err)
	}
}

func azFirstDiff(a, b []byte) int64 {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return int64(i)
		}
	}
	return int64(min(len(a), len(b)))
}

func azRandBytes(rng *rand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for k := 0; k < 8 && i+k < n; k++ {
			p[i+k] = byte(v >> (8 * k))
		}
	}
	return p
}

// count returns how many requests of each kind were applied.
func azCountApplied(reqs []wireReq) map[string]int {
	m := map[string]int{}
	for _, r := range reqs {
		if r.applied() {
			m[r.kind()]++
		}
	}
	return m
}

// TestAzuritePutPageRules checks on the wire that what the flusher sends
// follows Azure's rules for a workload with writes larger than 4 MiB (one
// 9 MiB write, twelve contiguous 1 MiB writes coalesced in one epoch):
// no Put Page over 4 MiB, every range 512-aligned at both ends, every
// write with the lease and a sequence-number condition, every Put Page
// with a CRC64 that matches its body, and sequence updates with the lease
// and the "max" action.
func TestAzuritePutPageRules(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 32 * azMiB
	url, footer := azBlob(t, s, "rules.vhd", size)
	tr := newWireTransport()
	c := azClient(t, url, tr, 0)
	dir := t.TempDir()
	// A long linger: epochs close only at Flush, so the contiguous writes
	// below are coalesced before they are sent.
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: FlusherOptions{Linger: time.Hour}})
	lease := d.Stats().LeaseID
	if lease == "" {
		t.Fatal("no lease id")
	}
	rng := rand.New(rand.NewPCG(1, 1))

	// One 9 MiB write, not 4 MiB aligned.
	if err := d.WriteAt(ctx, azRandBytes(rng, 9*azMiB), azMiB+3*512); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	// Twelve contiguous 1 MiB writes in one epoch.
	for i := range 12 {
		if err := d.WriteAt(ctx, azRandBytes(rng, azMiB), 16*azMiB+int64(i)*azMiB); err != nil {
			t.Fatal(err)
		}
	}
	// Unaligned small writes, a zero range and a discard.
	if err := d.WriteAt(ctx, azRandBytes(rng, 1000), 12345); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(ctx, 29*azMiB+100, azMiB, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(ctx, 2*azMiB+7, 300000, true); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	for range 40 {
		if err := d.WriteAt(ctx, azRandBytes(rng, 4096), rng.Int64N(size-4096)); err != nil {
			t.Fatal(err)
		}
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := d.Drain(dctx); err != nil {
		t.Fatal(err)
	}
	st := d.Stats().Flusher

	reqs := tr.requests()
	var puts, clears, seqs, full4, sent int
	for _, r := range reqs {
		k := r.kind()
		if k != "put" && k != "clear" && k != "seq" {
			continue
		}
		if !r.applied() {
			t.Errorf("request %d (%s %s): status %d %s, err %s", r.N, k, r.Range, r.Status, r.ErrCode, r.Err)
		}
		if r.LeaseID != lease {
			t.Errorf("request %d (%s %s) carries lease %q, want %q", r.N, k, r.Range, r.LeaseID, lease)
		}
		switch k {
		case "put", "clear":
			if r.Off < 0 || r.End < r.Off {
				t.Errorf("request %d (%s): no range (%q)", r.N, k, r.Range)
				continue
			}
			if r.Off%512 != 0 || (r.End+1)%512 != 0 {
				t.Errorf("request %d (%s): range %s is not 512-aligned", r.N, k, r.Range)
			}
			if r.IfSeqEq == "" {
				t.Errorf("request %d (%s %s): no x-ms-if-sequence-number-eq", r.N, k, r.Range)
			} else if v, err := strconv.ParseInt(r.IfSeqEq, 10, 64); err != nil || v != r.SeqAtApply || (r.RespSeq >= 0 && r.RespSeq != v) {
				t.Errorf("request %d (%s %s): condition seq == %s, blob's sequence number was %d (service says %d)", r.N, k, r.Range, r.IfSeqEq, r.SeqAtApply, r.RespSeq)
			}
			if r.End >= size {
				t.Errorf("request %d (%s %s) reaches into the footer", r.N, k, r.Range)
			}
		}
		switch k {
		case "put":
			puts++
			sent += int(r.ContentLen)
			if r.ContentLen > MaxPutPage {
				t.Errorf("request %d: Put Page of %d bytes (over 4 MiB)", r.N, r.ContentLen)
			}
			if r.ContentLen != r.End-r.Off+1 {
				t.Errorf("request %d: body %d bytes for range %s", r.N, r.ContentLen, r.Range)
			}
			if r.ContentLen == MaxPutPage {
				full4++
			}
			if r.CRC64 == "" {
				t.Errorf("request %d (put %s): no x-ms-content-crc64", r.N, r.Range)
			} else if !r.CRCOK {
				t.Errorf("request %d (put %s): x-ms-content-crc64 %s is not the CRC64 of the body", r.N, r.Range, r.CRC64)
			}
		case "clear":
			clears++
			if r.ContentLen != 0 {
				t.Errorf("request %d: Clear Pages with a %d-byte body", r.N, r.ContentLen)
			}
		case "seq":
			seqs++
			if !strings.EqualFold(r.SeqAction, "max") {
				t.Errorf("request %d: sequence action %q, want max", r.N, r.SeqAction)
			}
		}
	}
	// 9 MiB -> 4+4+1, 12 MiB contiguous -> 4+4+4: at least five full 4 MiB
	// Put Pages, which shows large writes were split and small ones joined.
	if full4 < 5 {
		t.Errorf("%d Put Pages of exactly 4 MiB, want >= 5 (split and coalesced)", full4)
	}
	if clears == 0 {
		t.Error("the zero range and the discard sent no Clear Pages")
	}
	if uint64(puts) != st.PutCalls || uint64(clears) != st.ClearCalls || uint64(seqs) != st.SequenceCalls || uint64(sent) != st.BytesSent {
		t.Errorf("wire: %d puts, %d clears, %d seq, %d bytes; stats: %+v", puts, clears, seqs, sent, st)
	}
	t.Logf("wire: %d Put Page (%d of 4 MiB), %d Clear Pages, %d sequence updates, %d bytes sent; %d requests in all", puts, full4, clears, seqs, sent, len(reqs))

	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	azCheckConverged(t, url, dir, size, footer)
	p, err := c.Properties(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p.LeaseState != "available" {
		t.Errorf("lease state after a clean close: %q", p.LeaseState)
	}
}
