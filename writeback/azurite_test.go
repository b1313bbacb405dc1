package writeback

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	neturl "net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
	"github.com/google/uuid"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/azurite/throttle"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/vhdlayer"
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
	o.Remote = pageblob.Remote{C: c}
	if o.Sender.RetryMin == 0 {
		o.Sender.RetryMin = time.Millisecond
		o.Sender.RetryMax = 20 * time.Millisecond
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
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: replicate.FlusherOptions{Linger: time.Hour}})
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
			if r.ContentLen > remote.MaxPutPage {
				t.Errorf("request %d: Put Page of %d bytes (over 4 MiB)", r.N, r.ContentLen)
			}
			if r.ContentLen != r.End-r.Off+1 {
				t.Errorf("request %d: body %d bytes for range %s", r.N, r.ContentLen, r.Range)
			}
			if r.ContentLen == remote.MaxPutPage {
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

// azWaitFor polls cond until it holds or the deadline passes.
func azWaitFor(t *testing.T, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestAzuriteTransientClassification sends real requests through the
// pageblob client with each injected failure and checks how remote.IsTransient
// classifies what comes back: throttling, server errors, timeouts (also
// the per-try deadline), resets and refused connections are retried;
// a refused sequence condition and a foreign lease are final.
func TestAzuriteTransientClassification(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 20 * azMiB
	url, _ := azBlob(t, s, "classify.vhd", size)
	tr := newWireTransport()
	c := azClient(t, url, tr, 300*time.Millisecond)
	r := pageblob.Remote{C: c}
	lease, err := r.AcquireLease(ctx, uuid.NewString())
	if err != nil {
		t.Fatal(err)
	}
	seq := int64(0)
	page := bytes.Repeat([]byte{7}, 4096)
	for _, f := range []wireFault{wire503, wire500, wireTimeout, wireHang, wireLost, wireRefused} {
		tr.setChoose(func(*wireReq) wireFault { return f })
		errs := map[string]error{
			"put":   r.PutPages(ctx, 0, remote.Pages{page}, remote.Cond{LeaseID: lease, IfSequenceEq: &seq}),
			"clear": r.ClearPages(ctx, 8192, 4096, remote.Cond{LeaseID: lease, IfSequenceEq: &seq}),
			"seq":   r.RaiseSequence(ctx, 0, lease),
		}
		for op, err := range errs {
			if err == nil {
				t.Errorf("%s with fault %v: no error", op, f)
			} else if !remote.IsTransient(err) {
				t.Errorf("%s with fault %v: classified permanent: %v", op, f, err)
			}
		}
	}
	tr.setChoose(nil)
	// Real refusals from Azurite are final.
	wrong := int64(5)
	err = r.PutPages(ctx, 0, remote.Pages{page}, remote.Cond{LeaseID: lease, IfSequenceEq: &wrong})
	if err == nil || remote.IsTransient(err) || !errors.Is(err, pageblob.ErrConditionNotMet) {
		t.Errorf("put with a sequence condition not met: %v (transient %v)", err, remote.IsTransient(err))
	}
	err = r.PutPages(ctx, 0, remote.Pages{page}, remote.Cond{LeaseID: uuid.NewString(), IfSequenceEq: &seq})
	if err == nil || remote.IsTransient(err) || !errors.Is(err, pageblob.ErrLeased) {
		t.Errorf("put with a foreign lease id: %v (transient %v)", err, remote.IsTransient(err))
	}
	err = r.RaiseSequence(ctx, 10, "")
	if err == nil || remote.IsTransient(err) || !errors.Is(err, pageblob.ErrLeased) {
		t.Errorf("sequence update without the lease: %v (transient %v)", err, remote.IsTransient(err))
	}
	// And a clean request goes through.
	if err := r.PutPages(ctx, 0, remote.Pages{page}, remote.Cond{LeaseID: lease, IfSequenceEq: &seq}); err != nil {
		t.Fatal(err)
	}
}

// TestAzuriteLeaseSecondWriter: a second writer (another state directory,
// another lease id) is refused with ErrLeased and advice; with BreakLease
// it takes the blob over, and the first Disk's next write to the remote is
// refused by the service, which stops its flusher with a lease error.
func TestAzuriteLeaseSecondWriter(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 20 * azMiB
	url, footer := azBlob(t, s, "lease.vhd", size)
	tr1 := newWireTransport()
	c1 := azClient(t, url, tr1, 0)
	dir1 := t.TempDir()
	fo := replicate.FlusherOptions{Linger: 10 * time.Millisecond}
	d1 := azMustOpenDisk(t, dir1, size, c1, DiskOptions{Flusher: fo})
	rng := rand.New(rand.NewPCG(2, 2))
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := d1.WriteAt(dctx, azRandBytes(rng, 64<<10), 0); err != nil {
		t.Fatal(err)
	}
	if err := d1.Drain(dctx); err != nil {
		t.Fatal(err)
	}
	lease1 := d1.Stats().LeaseID

	// A second writer is refused, and says how to proceed.
	c2 := azClient(t, url, newWireTransport(), 0)
	dir2 := t.TempDir()
	_, err := azOpenDisk(t, dir2, size, c2, DiskOptions{LeaseID: uuid.NewString(), Flusher: fo})
	if !errors.Is(err, pageblob.ErrLeased) || !strings.Contains(err.Error(), "--break-lease") {
		t.Fatalf("second writer: want ErrLeased naming --break-lease, got %v", err)
	}
	t.Logf("second writer refused: %v", err)
	// The first writer is not disturbed by the attempt.
	if err := d1.WriteAt(dctx, azRandBytes(rng, 64<<10), azMiB); err != nil {
		t.Fatal(err)
	}
	if err := d1.Drain(dctx); err != nil {
		t.Fatalf("first writer after a refused second one: %v", err)
	}

	// The second writer's state starts from the blob as it is now.
	blobNow := azDownload(t, url, size)
	if err := os.WriteFile(filepath.Join(dir2, "disk.img"), blobNow[:size], 0o600); err != nil {
		t.Fatal(err)
	}
	var saved string
	d2, err := azOpenDisk(t, dir2, size, c2, DiskOptions{BreakLease: true, Flusher: fo, SaveLeaseID: func(id string) error { saved = id; return nil }})
	if err != nil {
		t.Fatalf("second writer with BreakLease: %v", err)
	}
	lease2 := d2.Stats().LeaseID
	if lease2 == "" || lease2 == lease1 || saved != lease2 {
		t.Fatalf("lease ids: first %q, second %q, saved %q", lease1, lease2, saved)
	}

	// The first Disk still acknowledges writes (they go to its journal and
	// image), but its flusher's next request is refused by the service.
	n1 := len(tr1.requests())
	if err := d1.WriteAt(dctx, azRandBytes(rng, 64<<10), 2*azMiB); err != nil {
		t.Fatalf("a write to the first Disk after the takeover: %v", err)
	}
	err = d1.Drain(dctx)
	if !errors.Is(err, pageblob.ErrLeased) {
		t.Fatalf("first Disk's drain after the takeover: want ErrLeased, got %v", err)
	}
	st := d1.Stats()
	if st.Flusher.State != replicate.StateFailed || !strings.Contains(st.Flusher.LastError, "lease") {
		t.Fatalf("first flusher: state %q, last error %q", st.Flusher.State, st.Flusher.LastError)
	}
	azWaitFor(t, "the first flusher to stop", 10*time.Second, func() bool { return d1.FlusherErr() != nil })
	if !errors.Is(d1.FlusherErr(), pageblob.ErrLeased) {
		t.Fatalf("FlusherErr: %v", d1.FlusherErr())
	}
	refused := 0
	for _, r := range tr1.requests()[n1:] {
		if r.applied() && (r.kind() == "put" || r.kind() == "clear" || r.kind() == "seq") {
			t.Errorf("request %d (%s %s) of the first writer was applied after the takeover", r.N, r.kind(), r.Range)
		}
		if r.Status == 412 {
			refused++
			t.Logf("first writer refused: %s %s -> %d %s", r.kind(), r.Range, r.Status, r.ErrCode)
		}
	}
	if refused == 0 {
		t.Error("no 412 seen for the first writer")
	}
	// Later writes are still accepted locally: the journal keeps them
	// (nothing reaches the blob while the flusher is stopped).
	if err := d1.WriteAt(dctx, azRandBytes(rng, 4096), 3*azMiB); err != nil {
		t.Fatalf("write after the flusher failed: %v", err)
	}
	if p := d1.Stats().Journal.PendingRecords; p < 2 {
		t.Fatalf("first Disk's journal holds %d records, want its unsent writes", p)
	}
	// Closing the first Disk with drain fails and must not touch the
	// second writer's lease.
	if err := d1.Close(ctx, true); err == nil {
		t.Fatal("closing the fenced-off Disk with drain succeeded")
	}
	if p, err := c2.Properties(ctx); err != nil || p.LeaseState != "leased" {
		t.Fatalf("after the first Disk closed: lease state %q (%v)", p.LeaseState, err)
	}

	// The second writer works and converges; the first writer's refused
	// write is not on the blob.
	if err := d2.WriteAt(dctx, azRandBytes(rng, 128<<10), 5*azMiB+512); err != nil {
		t.Fatal(err)
	}
	if err := d2.Close(dctx, true); err != nil {
		t.Fatal(err)
	}
	azCheckConverged(t, url, dir2, size, footer)
}

// TestAzuriteSequenceOnlyRises records every sequence number the service
// reports (responses to the flusher's requests, and a poller reading the
// blob's properties while the workload runs) and checks it never falls,
// that a merged batch is marked odd while in flight, and that it ends
// even after a clean drain.
func TestAzuriteSequenceOnlyRises(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 20 * azMiB
	url, footer := azBlob(t, s, "seq.vhd", size)
	tr := newWireTransport()
	c := azClient(t, url, tr, 0)
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: replicate.FlusherOptions{Linger: time.Hour}})
	poll := azClient(t, url, nil, 0)
	rng := rand.New(rand.NewPCG(3, 3))
	dctx, cancel := context.WithTimeout(ctx, 40*time.Second)
	defer cancel()

	// Poll the blob's sequence number until the workload ends.
	var polled []int64
	var pollErr error
	stop := make(chan struct{})
	pollDone := make(chan struct{})
	go func() {
		defer close(pollDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			v, err := poll.Sequence(dctx)
			if err != nil {
				pollErr = err
				return
			}
			polled = append(polled, v)
			if len(polled) > 5000 {
				return
			}
		}
	}()
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-pollDone
	})

	write := func(n int) {
		t.Helper()
		if err := d.WriteAt(dctx, azRandBytes(rng, n), rng.Int64N(size-int64(n))); err != nil {
			t.Fatal(err)
		}
	}
	// Hold the writes of the first batch, so that epochs 2..6 pile up
	// behind it and the flusher merges them into one batch.
	tr.setHold(isWrite)
	write(32 << 10)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	first := d.Stats().Journal.ClosedEpoch
	azWaitFor(t, "the first batch to reach the transport", 10*time.Second, func() bool { return tr.waitingCount(nil) > 0 })
	for range 5 {
		write(16 << 10)
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	last := d.Stats().Journal.ClosedEpoch
	// Let everything through except the merged batch's pages (they carry
	// the odd in-progress mark as their condition).
	oddFence := func(r *wireReq) bool {
		if r.kind() != "put" && r.kind() != "clear" {
			return false
		}
		v, err := strconv.ParseInt(r.IfSeqEq, 10, 64)
		return err == nil && v%2 == 1
	}
	tr.setHold(oddFence)
	azWaitFor(t, "the merged batch's pages to reach the transport", 10*time.Second, func() bool { return tr.waitingCount(oddFence) > 0 })
	mark, err := poll.Sequence(dctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(2*last - 1); mark != want {
		t.Fatalf("while epochs %d..%d are in flight the blob's sequence number is %d, want %d (odd: in progress)", first+1, last, mark, want)
	}
	tr.setHold(nil)

	// Then a free-running workload with barriers.
	for i := range 60 {
		write(4096 * (1 + rng.IntN(16)))
		if i%4 == 3 {
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := d.Drain(dctx); err != nil {
		t.Fatal(err)
	}
	close(stop)
	<-pollDone
	if pollErr != nil {
		t.Fatal(pollErr)
	}
	st := d.Stats().Flusher

	// Every value the service reported to the flusher, in the order the
	// responses arrived (the flusher waits for a batch's pages before it
	// moves the sequence number, so this order is the service's order).
	var wire []int64
	odd := 0
	for _, r := range tr.requests() {
		if r.RespSeq >= 0 && r.Status < 300 {
			wire = append(wire, r.RespSeq)
			if r.kind() == "seq" && r.RespSeq%2 == 1 {
				odd++
			}
		}
	}
	for name, vals := range map[string][]int64{"wire": wire, "poll": polled} {
		for i := 1; i < len(vals); i++ {
			if vals[i] < vals[i-1] {
				t.Errorf("%s: sequence number fell from %d to %d (value %d of %d)", name, vals[i-1], vals[i], i, len(vals))
			}
		}
	}
	if len(wire) == 0 || len(polled) == 0 {
		t.Fatalf("%d wire values, %d polled", len(wire), len(polled))
	}
	if odd == 0 {
		t.Error("no sequence update reported an odd (in-progress) number")
	}
	final, err := poll.Sequence(dctx)
	if err != nil {
		t.Fatal(err)
	}
	if final%2 != 0 || final != st.RemoteSequence || final != int64(2*st.RemoteEpoch) || final != wire[len(wire)-1] {
		t.Errorf("after drain: blob sequence %d, flusher %d (epoch %d), last on the wire %d", final, st.RemoteSequence, st.RemoteEpoch, wire[len(wire)-1])
	}
	t.Logf("sequence numbers: %d reported on the wire (%d odd marks), %d polled, %d..%d; final %d after %d batches",
		len(wire), odd, len(polled), polled[0], polled[len(polled)-1], final, st.Batches)
	if err := d.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	azCheckConverged(t, url, dir, size, footer)
}

// TestAzuriteConverges64MiB runs a mixed workload over a 64 MiB disk
// (large sequential writes, a 9 MiB write, random 4 KiB writes from two
// goroutines, unaligned overlapping rewrites, zero ranges and discards,
// barriers) and requires the blob, downloaded with the official SDK, to
// equal the local image after a clean close, footer included.
func TestAzuriteConverges64MiB(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 64 * azMiB
	url, footer := azBlob(t, s, "big.vhd", size)
	tr := newWireTransport()
	c := azClient(t, url, tr, 0)
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: replicate.FlusherOptions{Linger: 20 * time.Millisecond}})
	dctx, cancel := context.WithTimeout(ctx, 50*time.Second)
	defer cancel()
	start := time.Now()
	rng := rand.New(rand.NewPCG(4, 4))
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// Sequential 1 MiB writes over the first 40 MiB, a barrier every 8.
	for i := range 40 {
		must(d.WriteAt(dctx, azRandBytes(rng, azMiB), int64(i)*azMiB))
		if i%8 == 7 {
			must(d.Flush())
		}
	}
	// One 9 MiB write, sector aligned but not MiB aligned.
	must(d.WriteAt(dctx, azRandBytes(rng, 9*azMiB), 44*azMiB+512))
	// Random 4 KiB writes from two goroutines on the two halves, with
	// barriers, while unaligned rewrites overlap a hot region.
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for g := range 2 {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(40, uint64(g)))
			for i := range 150 {
				off := int64(g)*(size/2) + r.Int64N(size/2-4096)
				if err := d.WriteAt(dctx, azRandBytes(r, 4096), off&^4095); err != nil {
					errs <- err
					return
				}
				if i%30 == 29 {
					if err := d.Flush(); err != nil {
						errs <- err
						return
					}
				}
			}
		}(g)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(41, 0))
		for i := range 80 {
			n := 1 + r.IntN(256<<10)
			off := 10*azMiB + r.Int64N(2*azMiB)
			if err := d.WriteAt(dctx, azRandBytes(r, n), off); err != nil {
				errs <- err
				return
			}
			if i%20 == 19 {
				if err := d.Flush(); err != nil {
					errs <- err
					return
				}
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// Zero ranges and discards, some over written data, some unaligned,
	// one large, then writes on top of part of a cleared range.
	must(d.Zero(dctx, 20*azMiB+100, 3*azMiB+1000, false))
	must(d.Zero(dctx, 30*azMiB, 8*azMiB, true))
	for range 8 {
		must(d.Zero(dctx, rng.Int64N(size-azMiB), 1+rng.Int64N(azMiB), rng.IntN(2) == 0))
	}
	must(d.Flush())
	must(d.WriteAt(dctx, azRandBytes(rng, 300000), 31*azMiB+77))
	must(d.Zero(dctx, 0, 64<<10, false))
	must(d.Drain(dctx))
	st := d.Stats()
	wrote := time.Since(start)
	must(d.Close(dctx, true))

	azCheckConverged(t, url, dir, size, footer)
	n := azCountApplied(tr.requests())
	if uint64(n["put"]) != st.Flusher.PutCalls || uint64(n["clear"]) != st.Flusher.ClearCalls {
		t.Errorf("wire counts %v, flusher stats %+v", n, st.Flusher)
	}
	t.Logf("64 MiB workload in %v: %d batches, %d Put Page (%.1f MiB), %d Clear Pages (%.1f MiB), %d sequence updates, %d retries; %d epochs closed",
		wrote.Round(time.Millisecond), st.Flusher.Batches, st.Flusher.PutCalls, float64(st.Flusher.BytesSent)/azMiB,
		st.Flusher.ClearCalls, float64(st.Flusher.BytesCleared)/azMiB, st.Flusher.SequenceCalls, st.Flusher.Retries, st.Journal.EpochsClosed)
}

// TestAzuriteFaults injects failures between the flusher and Azurite.
func TestAzuriteFaults(t *testing.T) {
	s := azurite.Start(t)
	t.Run("Random", func(t *testing.T) { azFaultsRandom(t, s) })
	t.Run("DelayedDuplicate", func(t *testing.T) { azDelayedDuplicate(t, s) })
}

// azFaultsRandom: with a seeded RNG the transport answers writes with
// 503 ServerBusy or 500 OperationTimedOut, times them out (at once, or
// by hanging past the per-try deadline) or forwards them and drops the
// response ("applied, but the response was lost"). The writer sees no
// error, the blob converges, and nothing lands out of order: every applied
// write carried a condition equal to the blob's sequence number then, and
// each time the blob's sequence number became even (2e: epoch e complete)
// the blob, as rebuilt from the applied requests, was exactly the disk at
// barrier e.
func azFaultsRandom(t *testing.T, s *azurite.Server) {
	ctx := context.Background()
	const size = 20 * azMiB
	url, footer := azBlob(t, s, "faults.vhd", size)
	tr := newWireTransport().withShadow(size + vhdlayer.FooterSize)
	copy(tr.shadow[size:], footer[:])
	c := azClient(t, url, tr, time.Second)

	var mu sync.Mutex
	snaps := map[uint64][32]byte{} // epoch -> hash of the disk at its barrier
	var orderErrs []string
	checked := 0
	tr.onSeq = func(shadow []byte, seq int64) {
		if seq == 0 || seq%2 == 1 {
			return
		}
		e := uint64(seq / 2)
		mu.Lock()
		defer mu.Unlock()
		want, ok := snaps[e]
		switch {
		case !ok:
			orderErrs = append(orderErrs, fmt.Sprintf("sequence %d: epoch %d complete, but no barrier closed epoch %d", seq, e, e))
		case sha256.Sum256(shadow[:size]) != want:
			orderErrs = append(orderErrs, fmt.Sprintf("sequence %d: the blob is not the disk at barrier %d", seq, e))
		default:
			checked++
		}
	}
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{
		Flusher: replicate.FlusherOptions{Linger: time.Hour},
		Sender:  replicate.SenderOptions{RetryMin: time.Millisecond, RetryMax: 10 * time.Millisecond, Workers: 4},
	})

	frng := rand.New(rand.NewPCG(5, 5))
	hangs := 0
	// The first writes get one fault of each kind, so every kind is
	// certainly seen; after that the RNG decides.
	first := []wireFault{wire503, wireLost, wire500, wireTimeout, wireHang, wireLost}
	tr.setChoose(func(r *wireReq) wireFault {
		if !isWrite(r) {
			return wireOK
		}
		if len(first) > 0 {
			f := first[0]
			first = first[1:]
			if f == wireHang {
				hangs++
			}
			return f
		}
		switch x := frng.Float64(); {
		case x < 0.08:
			return wire503
		case x < 0.12:
			return wire500
		case x < 0.20:
			return wireTimeout
		case x < 0.30:
			return wireLost
		case x < 0.33 && hangs < 2:
			hangs++
			return wireHang
		}
		return wireOK
	})

	dctx, cancel := context.WithTimeout(ctx, 40*time.Second)
	defer cancel()
	rng := rand.New(rand.NewPCG(6, 6))
	img := make([]byte, size)
	const region = 8 * azMiB
	for round := range 40 {
		if round%5 == 4 {
			// Now and then wait for the blob, so that single-epoch
			// batches are checked as well as merged ones.
			if err := d.Drain(dctx); err != nil {
				t.Fatal(err)
			}
		}
		ops := 1 + rng.IntN(5)
		for k := range ops {
			if k > 0 && rng.IntN(6) == 0 {
				if err := d.Zero(dctx, rng.Int64N(region), 1+rng.Int64N(256<<10), rng.IntN(2) == 0); err != nil {
					t.Fatal(err)
				}
				continue
			}
			n := 1 + rng.IntN(200<<10)
			if err := d.WriteAt(dctx, azRandBytes(rng, n), rng.Int64N(region)); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := d.ReadAt(img, 0); err != nil {
			t.Fatal(err)
		}
		e := d.Stats().Journal.OpenEpoch
		mu.Lock()
		snaps[e] = sha256.Sum256(img)
		mu.Unlock()
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Drain(dctx); err != nil {
		t.Fatal(err)
	}
	tr.setChoose(nil)
	st := d.Stats().Flusher
	if err := d.Close(dctx, true); err != nil {
		t.Fatal(err)
	}
	azCheckConverged(t, url, dir, size, footer)

	tr.mu.Lock()
	shadow := append([]byte(nil), tr.shadow...)
	tr.mu.Unlock()
	if i := azFirstDiff(shadow, azDownload(t, url, size)); i >= 0 {
		t.Fatalf("the blob rebuilt from the applied requests differs from the real one at byte %d", i)
	}
	mu.Lock()
	for _, e := range orderErrs {
		t.Error(e)
	}
	if checked == 0 {
		t.Error("no complete epoch was checked")
	}
	mu.Unlock()

	injected := map[wireFault]int{}
	var status412, lostApplied, appliedWrites int
	for _, r := range tr.requests() {
		if r.Fault != wireOK {
			injected[r.Fault]++
		}
		if r.Status == 412 {
			status412++
			t.Errorf("request %d (%s %s) refused: %d %s", r.N, r.kind(), r.Range, r.Status, r.ErrCode)
		}
		if r.Fault == wireLost && r.applied() {
			lostApplied++
		}
		if k := r.kind(); r.applied() && (k == "put" || k == "clear") {
			appliedWrites++
			v, err := strconv.ParseInt(r.IfSeqEq, 10, 64)
			if err != nil || v != r.SeqAtApply || (r.RespSeq >= 0 && r.RespSeq != v) {
				t.Errorf("request %d (%s %s) applied with condition %q while the blob's sequence number was %d (service says %d)", r.N, k, r.Range, r.IfSeqEq, r.SeqAtApply, r.RespSeq)
			}
		}
	}
	total := 0
	for f, n := range injected {
		total += n
		_ = f
	}
	for _, f := range []wireFault{wire503, wire500, wireTimeout, wireLost, wireHang} {
		if injected[f] == 0 {
			t.Errorf("no %v fault was injected", f)
		}
	}
	if lostApplied == 0 {
		t.Error("no request was applied with its response lost")
	}
	// 503 ServerBusy and 500 OperationTimedOut are back-pressure: the page
	// blob client sends the request again itself and counts it as
	// throttled; the other faults are the flusher's retries.
	if throttledFaults := uint64(injected[wire503] + injected[wire500]); st.Throttled < throttledFaults {
		t.Errorf("%d throttled answers counted for %d injected 503s and 500s", st.Throttled, throttledFaults)
	}
	if st.Retries+st.Throttled < uint64(total) {
		t.Errorf("%d retries and %d throttled answers for %d injected faults", st.Retries, st.Throttled, total)
	}
	t.Logf("faults injected: %v (%d in all; %d applied with the response lost); %d retries, %d throttled; %d 412s; %d writes applied, %d complete epochs checked against the disk; flusher: %d batches, %d puts, %d clears, %d sequence updates, %d bytes",
		injected, total, lostApplied, st.Retries, st.Throttled, status412, appliedWrites, checked, st.Batches, st.PutCalls, st.ClearCalls, st.SequenceCalls, st.BytesSent)
}

// azDelayedDuplicate: the transport keeps a copy of a Put Page, answers
// the flusher with a timeout (the flusher sends it again and moves on),
// and re-sends the copy, exactly as signed, after a later batch rewrote
// the same range. Azurite refuses it (412) and the blob keeps the newer
// data.
func azDelayedDuplicate(t *testing.T, s *azurite.Server) {
	ctx := context.Background()
	const size = 20 * azMiB
	url, footer := azBlob(t, s, "dup.vhd", size)
	tr := newWireTransport()
	c := azClient(t, url, tr, 0)
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: replicate.FlusherOptions{Linger: time.Hour}})
	lease := d.Stats().LeaseID
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	const x = azMiB
	var held atomic.Bool
	tr.setChoose(func(r *wireReq) wireFault {
		if !held.Load() && r.kind() == "put" && r.Off <= x && r.End >= x {
			held.Store(true)
			return wireHold
		}
		return wireOK
	})
	rng := rand.New(rand.NewPCG(7, 7))
	a, b := azRandBytes(rng, 64<<10), azRandBytes(rng, 64<<10)
	if err := d.WriteAt(dctx, a, x); err != nil {
		t.Fatal(err)
	}
	if err := d.Drain(dctx); err != nil {
		t.Fatal(err)
	}
	if !held.Load() {
		t.Fatal("no Put Page was held")
	}
	if err := d.WriteAt(dctx, b, x); err != nil {
		t.Fatal(err)
	}
	if err := d.Drain(dctx); err != nil {
		t.Fatal(err)
	}
	st := d.Stats().Flusher
	if st.Retries == 0 {
		t.Error("the held Put Page was not retried")
	}
	out, err := tr.resendHeld(dctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 1 {
		t.Fatalf("%d held requests re-sent, want 1", len(out))
	}
	dup := out[0]
	t.Logf("delayed duplicate: put %s with lease and condition seq == %s, blob at %d: %d %s", dup.Range, dup.IfSeqEq, st.RemoteSequence, dup.Status, dup.ErrCode)
	if dup.LeaseID != lease || dup.IfSeqEq == "" {
		t.Errorf("held request: lease %q condition %q", dup.LeaseID, dup.IfSeqEq)
	}
	if dup.Status != 412 || dup.ErrCode != "SequenceNumberConditionNotMet" {
		t.Fatalf("delayed duplicate answered %d %s, want 412 SequenceNumberConditionNotMet", dup.Status, dup.ErrCode)
	}
	got := azDownload(t, url, size)
	if !bytes.Equal(got[x:x+len(b)], b) {
		t.Fatal("the delayed duplicate changed the blob")
	}
	if err := d.Close(dctx, true); err != nil {
		t.Fatal(err)
	}
	azCheckConverged(t, url, dir, size, footer)
	// Control: the same old bytes sent without the sequence condition do
	// land, so the check above would have seen it.
	if err := c.PutPages(dctx, x, a, ""); err != nil {
		t.Fatal(err)
	}
	if got := azDownload(t, url, size); !bytes.Equal(got[x:x+len(a)], a) {
		t.Fatal("control: an unfenced Put Page did not land")
	}
}

// TestAzuriteBackpressure: with a 1 MiB journal cap and every request
// refused at the connection, several writers writing far more than the cap
// block (no error), the flusher shows "retrying"; once requests go through
// again every write completes and the blob converges.
func TestAzuriteBackpressure(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 20 * azMiB
	url, footer := azBlob(t, s, "bp.vhd", size)
	tr := newWireTransport()
	c := azClient(t, url, tr, 0)
	dir := t.TempDir()
	const limit = azMiB
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{
		Journal: journal.Options{MaxPendingBytes: limit},
		Flusher: replicate.FlusherOptions{Linger: 10 * time.Millisecond},
		Sender:  replicate.SenderOptions{RetryMin: time.Millisecond, RetryMax: 20 * time.Millisecond},
	})
	var down atomic.Bool
	down.Store(true)
	tr.setChoose(func(*wireReq) wireFault {
		if down.Load() {
			return wireRefused
		}
		return wireOK
	})

	wctx, wcancel := context.WithCancel(ctx)
	t.Cleanup(wcancel) // unblocks the writers if the test fails early
	const writers, perWriter, chunk = 4, 24, 64 << 10
	var done atomic.Int64
	errs := make(chan error, writers)
	var wg sync.WaitGroup
	for g := range writers {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(8, uint64(g)))
			for i := range perWriter {
				off := int64(g)*4*azMiB + int64(i)*chunk + int64(r.IntN(512))
				if err := d.WriteAt(wctx, azRandBytes(r, chunk), off); err != nil {
					errs <- fmt.Errorf("writer %d, write %d: %w", g, i, err)
					return
				}
				done.Add(1)
			}
		}(g)
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()

	azWaitFor(t, "writers blocked on the journal cap with the flusher retrying", 20*time.Second, func() bool {
		st := d.Stats()
		return st.Journal.BlockedWriters == writers && st.Flusher.State == replicate.StateRetrying
	})
	blockedAt := done.Load()
	// They stay blocked while the flusher keeps failing.
	retries0 := d.Stats().Flusher.Retries
	azWaitFor(t, "ten more retries", 20*time.Second, func() bool { return d.Stats().Flusher.Retries >= retries0+10 })
	st := d.Stats()
	if n := done.Load(); n != blockedAt || st.Journal.BlockedWriters != writers {
		t.Fatalf("while the remote was down, writes went from %d to %d done, %d writers blocked", blockedAt, n, st.Journal.BlockedWriters)
	}
	select {
	case err := <-errs:
		t.Fatalf("a writer got an error while the remote was down: %v", err)
	default:
	}
	if n := done.Load(); n >= writers*perWriter {
		t.Fatalf("all %d writes completed while the remote was down", n)
	}
	// A record may be admitted above the cap only when nothing is pending,
	// and a widened write is at most chunk+1 KiB.
	if st.Journal.PendingBytes > limit+chunk+2048 {
		t.Errorf("journal holds %d pending bytes, cap %d", st.Journal.PendingBytes, limit)
	}
	if !strings.Contains(st.Flusher.LastError, "refused") {
		t.Errorf("flusher's last error: %q", st.Flusher.LastError)
	}
	for _, r := range tr.requests() {
		if r.Forwarded && isWrite(&r) {
			t.Errorf("request %d (%s) reached Azurite while it was down", r.N, r.kind())
		}
	}
	t.Logf("remote down: %d of %d writes done, %d writers blocked, %d bytes pending (cap %d), flusher %s after %d retries: %s",
		blockedAt, writers*perWriter, st.Journal.BlockedWriters, st.Journal.PendingBytes, limit, st.Flusher.State, st.Flusher.Retries, st.Flusher.LastError)

	down.Store(false)
	select {
	case <-allDone:
	case <-time.After(30 * time.Second):
		t.Fatalf("writers still blocked 30 s after the remote came back (%d done)", done.Load())
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := d.Drain(dctx); err != nil {
		t.Fatal(err)
	}
	st = d.Stats()
	if err := d.Close(dctx, true); err != nil {
		t.Fatal(err)
	}
	azCheckConverged(t, url, dir, size, footer)
	t.Logf("remote back: %d writes done; flusher: %d batches, %d puts, %d bytes, %d retries in all", done.Load(), st.Flusher.Batches, st.Flusher.PutCalls, st.Flusher.BytesSent, st.Flusher.Retries)
}

// TestAzuriteNoSASInErrors opens the Disk with a SAS URL and makes the
// connection fail for real (the request goes to a port nobody listens
// on): the flusher retries, and neither its last error (what status
// shows) nor its log may hold the SAS signature.
func TestAzuriteNoSASInErrors(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 20 * azMiB
	url, footer := azBlob(t, s, "sas.vhd", size)
	cred, err := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	perms := sas.BlobPermissions{Read: true, Add: true, Create: true, Write: true}
	qp, err := sas.BlobSignatureValues{
		Protocol: sas.ProtocolHTTPSandHTTP, ExpiryTime: time.Now().Add(time.Hour),
		ContainerName: "disks", BlobName: "sas.vhd", Permissions: perms.String(),
	}.SignWithSharedKey(cred)
	if err != nil {
		t.Fatal(err)
	}
	sig := qp.Signature()
	tr := newWireTransport()
	c := azClient(t, url+"?"+qp.Encode(), tr, 0)
	if !strings.Contains(c.AuthMethod(), "SAS") {
		t.Fatalf("auth method %q", c.AuthMethod())
	}
	var logMu sync.Mutex
	var logBuf bytes.Buffer
	logger := slog.New(slog.NewTextHandler(lockedWriter{&logMu, &logBuf}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Logger: logger, Flusher: replicate.FlusherOptions{Linger: 10 * time.Millisecond}})
	var down atomic.Bool
	down.Store(true)
	tr.setChoose(func(r *wireReq) wireFault {
		if down.Load() && isWrite(r) {
			return wireDeadPort
		}
		return wireOK
	})
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := d.WriteAt(dctx, bytes.Repeat([]byte{9}, 8192), 4096); err != nil {
		t.Fatal(err)
	}
	azWaitFor(t, "the flusher to retry a refused connection", 20*time.Second, func() bool {
		st := d.Stats().Flusher
		return st.State == replicate.StateRetrying && st.Retries >= 2
	})
	st := d.Stats().Flusher
	leaks := func(what, text string) {
		t.Helper()
		for _, v := range []string{sig, neturl.QueryEscape(sig)} {
			if strings.Contains(text, v) {
				t.Errorf("%s holds the SAS signature: %s", what, text)
				return
			}
		}
	}
	leaks("the flusher's last error", st.LastError)
	logMu.Lock()
	leaks("the log", logBuf.String())
	logMu.Unlock()
	t.Logf("last error while the connection is refused: %s", st.LastError)

	down.Store(false)
	if err := d.Close(dctx, true); err != nil {
		t.Fatal(err)
	}
	azCheckConverged(t, url, dir, size, footer)
}

// lockedWriter serializes writes to w.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestAzuriteThrottledConverges runs the disk against Azurite behind a
// proxy that enforces a page blob's request and byte rates as Azure does
// (503 ServerBusy beyond them, some 500 OperationTimedOut), at a tenth of
// a standard blob's: scattered small writes with barriers, zero ranges and
// discards. Every throttled answer must be absorbed (sent again, counted),
// no writer and no flusher request may fail, and the blob must end equal
// to the image.
func TestAzuriteThrottledConverges(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	const size = 16 * azMiB
	url, footer := azBlob(t, s, "throttled.vhd", size)
	px := throttle.Start(t, s.Endpoint, throttle.Limits{RequestsPerSecond: 50, BytesPerSecond: 6 << 20, TimeoutFraction: 0.2})
	c := azClient(t, px.BlobURL("disks", "throttled.vhd"), nil, 30*time.Second)
	dir := t.TempDir()
	d := azMustOpenDisk(t, dir, size, c, DiskOptions{Flusher: replicate.FlusherOptions{Linger: 5 * time.Millisecond}})
	dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	rng := rand.New(rand.NewPCG(7, 7))
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for i := range 1500 {
		// A hot 4 MiB region and the rest of the disk, 4-16 KiB each.
		off := rng.Int64N(4*azMiB) &^ 511
		if i%3 == 0 {
			off = rng.Int64N(size-16<<10) &^ 511
		}
		must(d.WriteAt(dctx, azRandBytes(rng, 4096*(1+rng.IntN(4))), off))
		if i%200 == 199 {
			must(d.Zero(dctx, rng.Int64N(size-azMiB), 1+rng.Int64N(256<<10), rng.IntN(2) == 0))
		}
		if i%50 == 49 {
			must(d.Flush())
		}
	}
	must(d.Drain(dctx))
	st := d.Stats()
	if err := d.FlusherErr(); err != nil {
		t.Fatalf("the flusher failed: %v", err)
	}
	must(d.Close(dctx, true))
	azCheckConverged(t, url, dir, size, footer)
	ps := px.Proxy.Stats().Total
	t.Logf("throttled: %d Put Page, %d Clear Pages, %d sequence updates, %s filled; the proxy refused %d (503) and timed out %d (500) of %d admitted; in-flight limit %d",
		st.Flusher.PutCalls, st.Flusher.ClearCalls, st.Flusher.SequenceCalls, humanMiB(st.Flusher.FilledBytes), ps.Throttled, ps.TimedOut, ps.Admitted, st.Flusher.InFlightLimit)
	if st.Flusher.ClearCalls == 0 {
		t.Errorf("no Clear Pages: the zero ranges and discards were not exercised")
	}
	if ps.Throttled == 0 || ps.TimedOut == 0 {
		t.Fatalf("the proxy refused %d and timed out %d requests: the test does not throttle", ps.Throttled, ps.TimedOut)
	}
	if st.Flusher.Throttled != uint64(ps.Throttled+ps.TimedOut) {
		t.Errorf("the flusher counted %d throttled answers, the proxy gave %d", st.Flusher.Throttled, ps.Throttled+ps.TimedOut)
	}
}

func humanMiB(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/azMiB) }
