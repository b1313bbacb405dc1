package transfer

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// TestDownloadSparse8GiB downloads an 8 GiB blob holding 10 MiB of data:
// only those pages are read (bytes received counted on the wire), the
// file is sparse, its data and footer right; --raw leaves the footer out.
func TestDownloadSparse8GiB(t *testing.T) {
	az := azurite.Start(t)
	ctx := context.Background()
	const size = 8 << 30
	url := az.BlobURL("disks", "big.vhd")
	c := newClient(t, url, nil)
	footer := vhdlayer.NewFixedFooter(size, time.Now())
	raw := footer.Encode()
	if err := c.Create(ctx, size, raw, pageblob.CreateOptions{CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	// 10 MiB: 1 MiB at the start, 2 MiB across a 4 MiB boundary, 4 MiB in
	// the middle, 4 KiB in 256 places (one a 512-byte page alone), the rest
	// just before the end.
	type piece struct {
		off  int64
		data []byte
	}
	rnd := func(n int) []byte { b := make([]byte, n); _, _ = crand.Read(b); return b }
	pieces := []piece{{0, rnd(1 << 20)}, {3 << 30, rnd(2 << 20)}, {4<<30 + 12<<20, rnd(4 << 20)}}
	for i := int64(0); i < 255; i++ { // 4 KiB pieces, 7 MiB + 512 bytes apart
		pieces = append(pieces, piece{5<<30 + i*(7<<20+512), rnd(4096)})
	}
	pieces = append(pieces, piece{6<<30 + 512, rnd(512)}, piece{6<<30 + 2048, rnd(3584)})
	pieces = append(pieces, piece{size - 2<<20 - 4096, rnd(2 << 20)})
	var total int64
	for _, p := range pieces {
		for o := 0; o < len(p.data); o += pageblob.MaxPutPage {
			if err := c.PutPages(ctx, p.off+int64(o), p.data[o:min(len(p.data), o+pageblob.MaxPutPage)], ""); err != nil {
				t.Fatal(err)
			}
		}
		total += int64(len(p.data))
	}
	if total != 10<<20 {
		t.Fatalf("test data is %d bytes", total)
	}

	dir := t.TempDir()
	for _, rawMode := range []bool{false, true} {
		w := &wire{}
		start := time.Now()
		dl, err := PrepareDownload(ctx, newClient(t, url, w), DownloadOptions{Raw: rawMode, Workers: 8})
		if err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(dir, "big.vhd")
		if rawMode {
			out = filepath.Join(dir, "big.raw")
		}
		res, err := dl.Run(ctx, out)
		if err != nil {
			t.Fatal(err)
		}
		got, reads := w.readBytes()
		t.Logf("raw=%v: %d page ranges, received %d bytes in %d reads (%d data + 2 footer reads), file %d bytes taking %d on disk, %v",
			rawMode, res.Ranges, got, reads, res.Received, res.FileSize, allocated(t, out), time.Since(start).Round(time.Millisecond))
		if res.Received != total || got != total+2*512 {
			t.Fatalf("received %d bytes (%d on the wire), the blob holds %d", res.Received, got, total)
		}
		want := int64(size)
		if !rawMode {
			want += 512
		}
		st, err := os.Stat(out)
		if err != nil || st.Size() != want || res.FileSize != want {
			t.Fatalf("file size %v %v, want %d", st, err, want)
		}
		if a := allocated(t, out); a > total+int64(len(pieces))*8192 {
			t.Fatalf("%d bytes allocated for %d of data: not sparse", a, total)
		}
		f, err := os.Open(out)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pieces {
			b := make([]byte, len(p.data))
			if _, err := f.ReadAt(b, p.off); err != nil || !bytes.Equal(b, p.data) {
				t.Fatalf("data at %d differs (%v)", p.off, err)
			}
		}
		ext, err := FileExtents(f, want)
		if err != nil {
			t.Fatal(err)
		}
		var extBytes int64
		for _, e := range ext {
			extBytes += e.Length
		}
		if extBytes > total+int64(len(pieces))*8192 {
			t.Fatalf("%d bytes of data extents for %d bytes of data", extBytes, total)
		}
		if !rawMode {
			b := make([]byte, 512)
			if _, err := f.ReadAt(b, size); err != nil || !bytes.Equal(b, raw[:]) {
				t.Fatalf("footer differs (%v)", err)
			}
		}
		f.Close()
	}

	// An existing file is refused without Overwrite; a leased blob unless
	// AllowLeased.
	dl, err := PrepareDownload(ctx, c, DownloadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dl.Run(ctx, filepath.Join(dir, "big.vhd")); !errors.Is(err, ErrFileExists) {
		t.Fatalf("existing file: %v", err)
	}
	if _, err := c.AcquireLease(ctx, "00000000-0000-0000-0000-000000000001"); err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareDownload(ctx, c, DownloadOptions{}); !errors.Is(err, pageblob.ErrLeased) {
		t.Fatalf("leased blob: %v", err)
	}
}
