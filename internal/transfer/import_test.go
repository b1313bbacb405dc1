package transfer

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/internal/testenv"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// TestImportDownloadIdentical imports a dynamic VHD and a fixed VHD made
// and written by qemu, and a raw image with holes, downloads each blob and
// has qemu-img compare it with the source. The bytes sent, counted on the
// wire by a per-call policy, must equal the source's non-zero sectors,
// counted from a qemu-img conversion of the source to raw.
func TestImportDownloadIdentical(t *testing.T) {
	qemu := testenv.QemuImg(t)
	az := azurite.Start(t)
	ctx := context.Background()
	dir := t.TempDir()
	rnd := rand.New(rand.NewPCG(7, 8))
	randBytes := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rnd.UintN(255) + 1)
		}
		return b
	}

	// Writes at least 64 KiB apart, so that the default --zero-gap merges
	// nothing and the bytes sent are exactly the non-zero sectors. Among
	// them: 1.5 KiB starting mid-4K (512-byte edges), a run crossing
	// windows and dynamic blocks, zeros written explicitly (allocated,
	// must not be sent), the disk's last sector (past the last whole MiB).
	qemuWrites := func(size int64) []string {
		return []string{
			"write -P 0x5a 1M 300k",
			"write -P 0x11 9438720 1536", // 9 MiB + 1 KiB
			"write -P 0x22 14M 5M",
			"write -z 30M 1M",
			"write -P 0x33 31M 4k",
			"write -P 0x44 " + itoa(size-512) + " 512",
		}
	}
	cases := []struct {
		name, format string
		make         func(path string) int64 // returns the source's data size
		zeroGap      int64
	}{
		{"dynamic", "vpc", func(p string) int64 {
			testenv.Run(t, qemu, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", p, "256M")
			size := vhdSize(t, p)
			qemuIO(t, "vpc", p, qemuWrites(size)...)
			return size
		}, 0},
		{"fixed", "vpc", func(p string) int64 {
			testenv.Run(t, qemu, "create", "-q", "-f", "vpc", "-o", "subformat=fixed", p, "48M")
			size := vhdSize(t, p)
			qemuIO(t, "vpc", p, qemuWrites(size)...)
			return size
		}, 0},
		{"raw", "raw", func(p string) int64 {
			size := int64(40<<20 + 1000) // not even whole sectors
			writeAt(t, p, size-1, []byte{0})
			writeAt(t, p, 0, randBytes(4096))
			writeAt(t, p, 3<<20+512, randBytes(2560)) // sector-aligned, not 4K-aligned
			writeAt(t, p, 8<<20, make([]byte, 1<<20)) // allocated zeros
			// Two data runs 8 KiB apart: one request with the default
			// gap, two with --zero-gap 512 (used here).
			writeAt(t, p, 12<<20, randBytes(8192))
			writeAt(t, p, 12<<20+16384, randBytes(8192))
			writeAt(t, p, 17<<20-4096, randBytes(3<<20)) // across windows
			writeAt(t, p, size-700, []byte("the last, partial sector"))
			return size
		}, 512},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := filepath.Join(dir, c.name+".src")
			dataSize := c.make(src)
			ref := filepath.Join(dir, c.name+".ref.raw")
			testenv.Run(t, qemu, "convert", "-f", c.format, "-O", "raw", src, ref)
			want := nonZeroBytes(t, ref)

			url := az.BlobURL("disks", c.name+".vhd")
			w := &wire{}
			state := filepath.Join(dir, c.name+".state")
			im := mustPrepare(t, ctx, ImportOptions{Source: src, Client: newClient(t, url, w), StateDir: state,
				CreateContainer: true, Workers: 4, ZeroGap: c.zeroGap})
			p := im.Plan()
			if p.DataSize != dataSize || p.VirtualSize%int64(vhdlayer.MiB) != 0 || p.VirtualSize < dataSize || p.VirtualSize-dataSize >= int64(vhdlayer.MiB) {
				t.Fatalf("plan sizes: data %d virtual %d (source %d)", p.DataSize, p.VirtualSize, dataSize)
			}
			if !p.Rounded() {
				t.Fatalf("%d bytes should be rounded up", dataSize)
			}
			res, err := im.Run(ctx)
			if err != nil {
				t.Fatal(err)
			}
			puts, sent := w.putsOK(p.VirtualSize)
			t.Logf("%s: %d bytes, rounded to %d; allocated %s scanned; non-zero %d bytes; sent %d bytes in %d puts (wire), gap bytes %d",
				p.Kind, dataSize, p.VirtualSize, mib(res.Scanned), want, sent, len(puts), res.GapBytes)
			if sent != want || res.Sent != want || res.NonZeroTotal != want || res.GapBytes != 0 {
				t.Fatalf("sent %d on the wire (importer says %d, non-zero %d), want the %d non-zero bytes", sent, res.Sent, res.NonZeroTotal, want)
			}
			if int64(len(puts)) != res.Puts {
				t.Fatalf("%d puts on the wire, importer counted %d", len(puts), res.Puts)
			}
			for _, pc := range puts {
				if pc.end-pc.off > 4<<20 || pc.off%512 != 0 || pc.end%512 != 0 || pc.off/WindowSize != (pc.end-1)/WindowSize {
					t.Fatalf("put %d-%d breaks the 4 MiB / 512-byte / window rules", pc.off, pc.end)
				}
			}

			// The blob, downloaded, is the source.
			dw := &wire{}
			dl, err := PrepareDownload(ctx, newClient(t, url, dw), DownloadOptions{Workers: 4})
			if err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, c.name+".dl.vhd")
			dres, err := dl.Run(ctx, out)
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := dw.readBytes(); dres.Received != want || got != want+2*512 {
				t.Fatalf("download read %d bytes (%d on the wire, with the footer twice), the blob holds %d", dres.Received, got, want)
			}
			qemuCompare(t, qemu, "vpc", out, c.format, src)

			// The state directory is ready for a mount, its image a sparse
			// copy of the data.
			d, err := statedir.Open(state)
			if err != nil {
				t.Fatal(err)
			}
			if d.State.VirtualSize != uint64(p.VirtualSize) || d.State.Name != c.name {
				t.Fatalf("state %+v", d.State)
			}
			if _, err := os.Stat(filepath.Join(state, ProgressFile)); !os.IsNotExist(err) {
				t.Fatalf("progress file left behind: %v", err)
			}
			qemuCompare(t, qemu, "raw", d.ImagePath(), c.format, src)
			if a := allocated(t, d.ImagePath()); a > want+int64(len(puts))*8192 {
				t.Fatalf("local image takes %d bytes for %d bytes of data: not sparse", a, want)
			}
		})
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// vhdSize is the current size in a VHD's footer.
func vhdSize(t *testing.T, path string) int64 {
	t.Helper()
	fh, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	st, _ := fh.Stat()
	b := make([]byte, 512)
	if _, err := fh.ReadAt(b, st.Size()-512); err != nil {
		t.Fatal(err)
	}
	f, err := vhdlayer.DecodeFooter(b)
	if err != nil {
		t.Fatal(err)
	}
	return int64(f.CurrentSize)
}
