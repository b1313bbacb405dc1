package vhdlayer

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/testenv"
)

// requireQemu skips the test when qemu-img or qemu-io is missing (naming
// apt-get install qemu-utils), unless CI=true, where a missing judge is a
// failure: CI must run these tests.
func requireQemu(t testing.TB) {
	t.Helper()
	testenv.QemuImg(t)
	testenv.RequireTool(t, "qemu-io", "make deps (or: apt-get install qemu-utils)")
}

// runCmd runs a command and fails the test with its output if it fails.
func runCmd(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// openDynamicFile opens path with OpenDynamic; the file is closed when the
// test ends.
func openDynamicFile(t testing.TB, path string) (*DynamicDisk, error) {
	t.Helper()
	fh, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fh.Close() })
	st, err := fh.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return OpenDynamic(fh, st.Size())
}

// qemuWrite is one qemu-io "write -P pattern off len".
type qemuWrite struct {
	pattern byte
	off     int64
	length  int64
}

func (w qemuWrite) arg() string {
	return fmt.Sprintf("write -P 0x%02x %d %d", w.pattern, w.off, w.length)
}

// TestDynamicMatchesQemuRaw builds dynamic VHDs with qemu-img, writes
// scattered patterns with qemu-io, converts them to raw with qemu-img and
// checks that OpenDynamic/ReadAt sees exactly the same disk, and that
// Extents covers every non-zero byte while staying close to what was
// written.
//
// What qemu-img 7.2 writes (checked below, so a change shows up):
//   - default (creator "qemu", version 0x00050003): the requested 256 MiB
//     is rounded UP to a whole CHS geometry, 521/16/63 = 525168 sectors =
//     268,886,016 bytes, and the footer's current size is set to that same
//     value. qemu then sizes the disk from CHS (for creator "qemu"), we from
//     the current size; for qemu's own files the two agree, so the raw image
//     is exactly VirtualSize bytes.
//   - force_size=on (creator "qem2"): the current size is the exact 256 MiB
//     and the geometry is the maximum 65535/16/255, which makes qemu use the
//     current size too.
//   - block size 2 MiB; MaxTableEntries = ceil(current size / 2 MiB) (129
//     for 268,886,016 bytes, so the last block is only partly inside the
//     disk); the header at 512, the BAT at 1536 padded to 512 bytes; the
//     first block qemu allocates starts right after the BAT, its data one
//     512-byte bitmap later (offset 3072 for a 256 MiB disk).
//   - blocks are appended in the order they are first written, so the BAT
//     is not monotonic; a newly allocated block gets an all-ones bitmap, so
//     qemu's allocation (and qemu-img map) is block-granular: 2 MiB per
//     block touched, not per sector written.
func TestDynamicMatchesQemuRaw(t *testing.T) {
	requireQemu(t)
	var whole []byte // the whole-disk read's buffer, shared by the cases
	for _, tc := range []struct {
		name    string
		opts    string
		creator string
	}{
		{"chs-sized", "subformat=dynamic", "qemu"},
		{"force_size", "subformat=dynamic,force_size=on", "qem2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			vhd := filepath.Join(dir, "disk.vhd")
			raw := filepath.Join(dir, "disk.raw")
			runCmd(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", tc.opts, vhd, "256M")

			// The virtual size decides where the last write goes.
			d0, err := openDynamicFile(t, vhd)
			if err != nil {
				t.Fatalf("OpenDynamic on a fresh qemu disk: %v", err)
			}
			vs := d0.VirtualSize()
			if ext, err := d0.Extents(); err != nil || len(ext) != 0 {
				t.Fatalf("fresh disk: Extents = %v, %v; want none", ext, err)
			}

			const mib = 1 << 20
			writes := []qemuWrite{
				{0xab, 1 * mib, 64 << 10},            // inside block 0
				{0x11, 100 * mib, 3 << 10},           // sub-block, start of block 50
				{0x22, 4*mib - 4096, 8 << 10},        // straddles the 4 MiB block boundary
				{0x33, 2*mib - 512, 1024},            // straddles the 2 MiB boundary by one sector
				{0x44, 512, 512},                     // a single sector
				{0x55, 200*mib + 1536, 1536},         // sub-block, odd sector offset
				{0x66, 17 * mib, 2 * mib},            // a whole block's worth, unaligned to blocks
				{0x77, vs - 3072, 3072},              // ends exactly at the virtual size
				{0xab, 1*mib + 32<<10, 512},          // overwrite inside an earlier write
				{0x00, 17*mib + 4096, 4096},          // zeros written over data
				{0xc3, 150*mib + 2*mib - 4096, 4096}, // last sectors of block 75
			}
			args := []string{"-f", "vpc"}
			for _, w := range writes {
				args = append(args, "-c", w.arg())
			}
			runCmd(t, "qemu-io", append(args, vhd)...)
			runCmd(t, "qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, raw)

			d, err := openDynamicFile(t, vhd)
			if err != nil {
				t.Fatalf("OpenDynamic: %v", err)
			}
			f, h := d.Footer(), d.Header()
			if got := f.CreatorAppString(); got != tc.creator {
				t.Errorf("creator app = %q, want %q", got, tc.creator)
			}
			if f.DiskType != DiskTypeDynamic || f.DataOffset != 512 {
				t.Errorf("footer disk type %s, data offset %d; want dynamic, 512", f.DiskType, f.DataOffset)
			}
			if h.BlockSize != 2*mib || h.TableOffset != 1536 {
				t.Errorf("header block size %d, table offset %d; want 2 MiB, 1536", h.BlockSize, h.TableOffset)
			}
			if want := uint32((vs + 2*mib - 1) / (2 * mib)); h.MaxTableEntries != want {
				t.Errorf("MaxTableEntries = %d, want ceil(%d / 2 MiB) = %d", h.MaxTableEntries, vs, want)
			}
			chs := int64(f.Geometry.Sectors()) * SectorSize
			switch tc.creator {
			case "qemu":
				if vs != chs || vs != 268886016 {
					t.Errorf("qemu-sized disk: current size %d, CHS %s = %d bytes; want both 268886016", vs, f.Geometry, chs)
				}
			case "qem2":
				if vs != 256*mib || f.Geometry != (Geometry{65535, 16, 255}) {
					t.Errorf("force_size disk: current size %d, CHS %s; want 268435456 and 65535/16/255", vs, f.Geometry)
				}
			}

			// The raw conversion is compared a chunk at a time, never read
			// whole: each 256 MiB buffer costs about 1 GiB under -race.
			rawF, err := os.Open(raw)
			if err != nil {
				t.Fatal(err)
			}
			defer rawF.Close()
			rst, err := rawF.Stat()
			if err != nil {
				t.Fatal(err)
			}
			if rst.Size() != vs {
				t.Errorf("qemu-img convert wrote %d raw bytes, our VirtualSize (footer current size) is %d, CHS size %d; comparing the first %d",
					rst.Size(), vs, chs, min(rst.Size(), vs))
			}
			cmpLen := min(rst.Size(), vs)
			const chunk = 1000003
			want := make([]byte, chunk)
			// sameAsRaw fails the test where b (the disk from off) differs
			// from the raw conversion.
			sameAsRaw := func(what string, b []byte, off int64) {
				t.Helper()
				w := want[:len(b)]
				if _, err := rawF.ReadAt(w, off); err != nil && err != io.EOF {
					t.Fatal(err)
				}
				if i := firstDiff(b, w); i >= 0 {
					t.Fatalf("%s differs from qemu-img's raw conversion at byte %d: got 0x%02x, raw has 0x%02x", what, off+int64(i), b[i], w[i])
				}
			}

			// Whole disk, in chunks that do not line up with blocks.
			got := make([]byte, chunk)
			for off := int64(0); off < cmpLen; off += chunk {
				end := min(off+chunk, cmpLen)
				n, err := d.ReadAt(got[:end-off], off)
				if n != int(end-off) || (err != nil && err != io.EOF) {
					t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", end-off, off, n, err)
				}
				sameAsRaw("virtual disk", got[:end-off], off)
			}
			// One big read of everything (crosses every block) must agree too.
			if int64(cap(whole)) < vs+100 {
				whole = make([]byte, vs+100)
			}
			all := whole[:vs+100]
			n, err := d.ReadAt(all, 0)
			if int64(n) != vs || err != io.EOF {
				t.Fatalf("ReadAt(whole disk + 100) = %d, %v; want %d, io.EOF", n, err, vs)
			}
			for off := int64(0); off < cmpLen; off += chunk {
				sameAsRaw("single whole-disk ReadAt", all[off:min(off+chunk, cmpLen)], off)
			}
			rawData := all[:cmpLen] // the raw conversion, as just compared

			ext, err := d.Extents()
			if err != nil {
				t.Fatal(err)
			}
			checkExtentsWellFormed(t, ext, vs)
			checkExtentsCoverNonZero(t, ext, rawData)

			// qemu marks whole blocks, so the extents are the touched blocks.
			touched := map[int64]bool{}
			for _, w := range writes {
				for b := w.off / (2 * mib); b <= (w.off+w.length-1)/(2*mib); b++ {
					touched[b] = true
				}
			}
			var total int64
			for _, e := range ext {
				total += e.Length
			}
			if maxTotal := int64(len(touched)) * 2 * mib; total > maxTotal || total == 0 {
				t.Errorf("extents total %d bytes; want 0 < total <= %d (%d touched 2 MiB blocks)", total, maxTotal, len(touched))
			}
			t.Logf("virtual size %d, %d extents, %d bytes (%d blocks touched by %d writes)", vs, len(ext), total, len(touched), len(writes))

			// qemu-img map is the outside judge of what is allocated.
			if want := qemuDataExtents(t, vhd); !equalExtents(ext, want) {
				t.Errorf("Extents = %v\nqemu-img map data ranges = %v", ext, want)
			}
		})
	}
}

// TestDynamicPartialBitmaps takes a qemu-made disk, whose bitmaps are all
// ones, and rewrites every bitmap to mark only the sectors that hold
// non-zero data, minus one sector that does hold data, and puts garbage into
// an unmarked sector. Extents must then be sector-granular and ReadAt must
// honour the bitmap (zeros for unmarked sectors, whatever the file holds).
func TestDynamicPartialBitmaps(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	vhd := filepath.Join(dir, "disk.vhd")
	raw := filepath.Join(dir, "disk.raw")
	runCmd(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", vhd, "64M")
	runCmd(t, "qemu-io", "-f", "vpc",
		"-c", "write -P 0xab 1M 64k",
		"-c", "write -P 0x11 40M 3k",
		"-c", "write -P 0x22 4190208 8k",
		"-c", "write -P 0x33 2096640 1k",
		vhd)
	runCmd(t, "qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, raw)
	rawData, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	file, err := os.ReadFile(vhd)
	if err != nil {
		t.Fatal(err)
	}
	d, err := OpenDynamic(bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatal(err)
	}
	h := d.Header()
	bs := int64(h.BlockSize)
	const unmarkData = 1<<20 + 4096 // holds 0xab but will be unmarked
	garbageAt := int64(-1)
	want := bytes.Clone(rawData)
	clear(want[unmarkData : unmarkData+SectorSize])
	var wantSectors int64
	for bi, e := range d.bat {
		if e == BATUnallocated {
			continue
		}
		bm := file[int64(e)*SectorSize : int64(e)*SectorSize+d.bitmapSize]
		clear(bm)
		for s := int64(0); s < bs/SectorSize; s++ {
			v := int64(bi)*bs + s*SectorSize
			if v == unmarkData || v >= int64(len(rawData)) {
				continue
			}
			if !isZero(rawData[v : v+SectorSize]) {
				bm[s/8] |= 0x80 >> (s % 8)
				wantSectors++
			} else if garbageAt < 0 {
				garbageAt = v
				dataOff := int64(e)*SectorSize + d.bitmapSize + s*SectorSize
				copy(file[dataOff:dataOff+SectorSize], bytes.Repeat([]byte{0xEE}, SectorSize))
			}
		}
	}
	if garbageAt < 0 {
		t.Fatal("found no unmarked sector to fill with garbage")
	}
	d, err = OpenDynamic(bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, d.VirtualSize())
	if n, err := d.ReadAt(got, 0); n != len(got) || err != nil {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("byte %d: got 0x%02x, want 0x%02x (unmarked sector at %d, garbage sector at %d)", i, got[i], want[i], unmarkData, garbageAt)
	}
	ext, err := d.Extents()
	if err != nil {
		t.Fatal(err)
	}
	checkExtentsWellFormed(t, ext, d.VirtualSize())
	checkExtentsCoverNonZero(t, ext, want)
	var total int64
	for _, e := range ext {
		total += e.Length
	}
	if total != wantSectors*SectorSize {
		t.Errorf("extents total %d bytes, want %d (the marked sectors): %v", total, wantSectors*SectorSize, ext)
	}
	// 64k + 3k + 8k + 1k written, one 512-byte sector unmarked.
	if wantTotal := int64(64<<10 + 3<<10 + 8<<10 + 1<<10 - 512); total != wantTotal {
		t.Errorf("extents total %d bytes, want %d", total, wantTotal)
	}
	for _, e := range ext {
		if e.Offset <= unmarkData && unmarkData < e.End() {
			t.Errorf("extent %v covers the unmarked sector at %d", e, unmarkData)
		}
	}
}

// TestDynamicDifferencingRefused: qemu-img 7.2 refuses to create a vpc
// differencing disk ("Backing file not supported for file format 'vpc'"),
// so when it does, the child is made by patching a qemu dynamic disk: the
// disk type in both footers set to 4 (checksums fixed with ComputeChecksum),
// the parent name and UUID written into the dynamic header (checksum fixed
// with ComputeDynamicHeaderChecksum). qemu-img opens the result without
// complaint and reads it as if it had no parent, which is why the refusal
// must not suggest qemu-img convert as a way to merge.
func TestDynamicDifferencingRefused(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.vhd")
	child := filepath.Join(dir, "child.vhd")
	runCmd(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", base, "32M")
	out, err := exec.Command("qemu-img", "create", "-q", "-f", "vpc", "-b", base, "-F", "vpc", child).CombinedOutput()
	patched := err != nil
	if patched {
		t.Logf("qemu-img cannot create a vpc differencing disk (%v: %s); building one by patching a dynamic disk", err, bytes.TrimSpace(out))
		runCmd(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", child, "32M")
		runCmd(t, "qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1M 4k", child)
		bd, err := openDynamicFile(t, base)
		if err != nil {
			t.Fatal(err)
		}
		makeDifferencing(t, child, "base.vhd", bd.Footer())
		if out, err := exec.Command("qemu-img", "info", "-f", "vpc", child).CombinedOutput(); err == nil {
			t.Logf("qemu-img info opens the differencing disk as if it were dynamic:\n%s", out)
		}
	}
	_, err = openDynamicFile(t, child)
	if !errors.Is(err, ErrDifferencing) {
		t.Fatalf("OpenDynamic(differencing) = %v, want an error wrapping ErrDifferencing", err)
	}
	msg := err.Error()
	for _, s := range []string{"merge", "differencing"} {
		if !strings.Contains(msg, s) {
			t.Errorf("error %q does not mention %q", msg, s)
		}
	}
	if patched && !strings.Contains(msg, `"base.vhd"`) {
		t.Errorf("error %q does not name the parent base.vhd", msg)
	}
	t.Log(msg)
}

// makeDifferencing turns the dynamic VHD at path into a differencing one
// whose parent is parentName with the parent footer's UUID and timestamp.
func makeDifferencing(t testing.TB, path, parentName string, parent Footer) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int{0, len(b) - FooterSize} {
		binary.BigEndian.PutUint32(b[off+60:], uint32(DiskTypeDifferencing))
		binary.BigEndian.PutUint32(b[off+64:], ComputeChecksum(b[off:off+FooterSize]))
	}
	hoff := int(binary.BigEndian.Uint64(b[16:]))
	h, err := DecodeDynamicHeader(b[hoff:])
	if err != nil {
		t.Fatal(err)
	}
	h.ParentName = parentName
	h.ParentUniqueID = parent.UniqueID
	h.ParentTimestamp = parent.Timestamp
	enc := h.Encode()
	copy(b[hoff:], enc[:])
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestDynamicHeaderChecksumRefused corrupts one byte of a qemu-made
// dynamic header and expects a refusal naming both checksums.
func TestDynamicHeaderChecksumRefused(t *testing.T) {
	requireQemu(t)
	vhd := filepath.Join(t.TempDir(), "disk.vhd")
	runCmd(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "32M")
	b, err := os.ReadFile(vhd)
	if err != nil {
		t.Fatal(err)
	}
	hdr := b[512 : 512+DynamicHeaderSize]
	stored := binary.BigEndian.Uint32(hdr[36:])
	hdr[900] ^= 0x40 // a reserved byte: only the checksum can catch it
	computed := ComputeDynamicHeaderChecksum(hdr)
	if err := os.WriteFile(vhd, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = openDynamicFile(t, vhd)
	if err == nil {
		t.Fatal("OpenDynamic accepted a header with a bad checksum")
	}
	if !errors.Is(err, ErrBadHeader) || !errors.Is(err, ErrBadChecksum) {
		t.Errorf("error %v does not wrap ErrBadHeader and ErrBadChecksum", err)
	}
	for _, sum := range []uint32{stored, computed} {
		if s := fmt.Sprintf("0x%08x", sum); !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not contain checksum %s", err, s)
		}
	}
	t.Log(err)
}

// TestOpenDynamicCommittedQemuDisk opens the empty 20 MiB dynamic disk made
// by qemu-img that lives in testdata, so the reader is exercised against a
// real file even where qemu is not installed.
func TestOpenDynamicCommittedQemuDisk(t *testing.T) {
	d, err := openDynamicFile(t, filepath.Join("testdata", "qemu-dynamic-20M-empty.vhd"))
	if err != nil {
		t.Fatal(err)
	}
	// 20 MiB rounded up to CHS 603/4/17 = 41004 sectors.
	if d.VirtualSize() != 20994048 || d.Footer().Geometry != (Geometry{603, 4, 17}) {
		t.Errorf("virtual size %d, CHS %s; want 20994048, 603/4/17", d.VirtualSize(), d.Footer().Geometry)
	}
	if h := d.Header(); h.MaxTableEntries != 11 || h.BlockSize != 2<<20 || h.ParentName != "" {
		t.Errorf("header %+v", h)
	}
	ext, err := d.Extents()
	if err != nil || len(ext) != 0 {
		t.Errorf("Extents = %v, %v; want none", ext, err)
	}
	buf := bytes.Repeat([]byte{1}, 3<<20)
	if n, err := d.ReadAt(buf, 1<<20); n != len(buf) || err != nil || !isZero(buf) {
		t.Errorf("ReadAt = %d, %v, zero=%v", n, err, isZero(buf))
	}
}

// synthDisk is a dynamic VHD built in memory by the tests, with partial
// bitmaps, garbage in unmarked sectors and blocks in shuffled file order.
type synthDisk struct {
	file   []byte
	want   []byte // the virtual disk as ReadAt must see it
	marked []bool // per sector
}

// buildDynamic makes a dynamic VHD of virtualSize bytes with blockSize
// blocks, in which the sectors with marked[s] hold want's data.
func buildDynamic(t testing.TB, rng *rand.Rand, virtualSize uint64, blockSize uint32, want []byte, marked []bool) []byte {
	t.Helper()
	bs := int64(blockSize)
	nblocks := int((int64(virtualSize) + bs - 1) / bs)
	spb := bs / SectorSize
	bitmapSize := roundUp((spb+7)/8, SectorSize)
	batOff := int64(FooterSize + DynamicHeaderSize)
	batLen := roundUp(4*int64(nblocks), SectorSize)
	bat := make([]uint32, nblocks)
	var blocks []int
	for bi := range bat {
		bat[bi] = BATUnallocated
		any := false
		for s := int64(bi) * spb; s < int64(bi+1)*spb && s < int64(len(marked)); s++ {
			any = any || marked[s]
		}
		// Allocate blocks with data, and now and then one with an empty bitmap.
		if any || rng.IntN(8) == 0 {
			blocks = append(blocks, bi)
		}
	}
	rng.Shuffle(len(blocks), func(i, j int) { blocks[i], blocks[j] = blocks[j], blocks[i] })

	file := make([]byte, batOff+batLen)
	for _, bi := range blocks {
		start := int64(len(file))
		bat[bi] = uint32(start / SectorSize)
		bm := make([]byte, bitmapSize)
		data := bytes.Repeat([]byte{0xEE}, int(bs)) // garbage where unmarked
		for s := int64(0); s < spb; s++ {
			vs := int64(bi)*spb + s
			if vs < int64(len(marked)) && marked[vs] {
				bm[s/8] |= 0x80 >> (s % 8)
				lo := vs * SectorSize
				hi := min(lo+SectorSize, int64(len(want)))
				copy(data[s*SectorSize:], want[lo:hi])
			}
		}
		// The last block may be stored only as far as the disk reaches.
		if used := int64(virtualSize) - int64(bi)*bs; used < bs && rng.IntN(2) == 0 {
			data = data[:roundUp(used, SectorSize)]
		}
		file = append(file, bm...)
		file = append(file, data...)
	}
	for i, e := range bat {
		binary.BigEndian.PutUint32(file[batOff+4*int64(i):], e)
	}
	for i := int64(4 * nblocks); i < batLen; i++ {
		file[batOff+i] = 0xFF // unused BAT space, as qemu leaves it
	}
	h := DynamicHeader{
		DataOffset:      0xFFFFFFFFFFFFFFFF,
		TableOffset:     uint64(batOff),
		HeaderVersion:   DynamicHeaderVersion,
		MaxTableEntries: uint32(nblocks),
		BlockSize:       blockSize,
	}
	copy(h.Cookie[:], DynamicCookie)
	hb := h.Encode()
	copy(file[FooterSize:], hb[:])
	f := NewFixedFooter(virtualSize, time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC))
	f.DiskType = DiskTypeDynamic
	f.DataOffset = FooterSize
	fb := f.Encode()
	copy(file, fb[:])
	return append(file, fb[:]...)
}

// newSynth makes a random disk: random runs of marked sectors with random
// data (some of it zero).
func newSynth(t testing.TB, rng *rand.Rand, virtualSize uint64, blockSize uint32) synthDisk {
	nsec := (int64(virtualSize) + SectorSize - 1) / SectorSize
	marked := make([]bool, nsec)
	want := make([]byte, virtualSize)
	for range 1 + rng.IntN(12) {
		s := rng.Int64N(nsec)
		n := 1 + rng.Int64N(min(nsec-s, 3*int64(blockSize)/SectorSize+1))
		for i := s; i < s+n; i++ {
			marked[i] = true
			lo, hi := i*SectorSize, min((i+1)*SectorSize, int64(virtualSize))
			if rng.IntN(5) != 0 { // leave some marked sectors zero
				k := rng.Uint32()
				for j := lo; j < hi; j++ {
					want[j] = byte(uint32(j)*2654435761>>24^k)%255 + 1
				}
			}
		}
	}
	return synthDisk{file: buildDynamic(t, rng, virtualSize, blockSize, want, marked), want: want, marked: marked}
}

// TestDynamicSynthetic checks ReadAt and Extents against disks whose
// content is known, over block sizes from 512 bytes to 2 MiB and virtual
// sizes that are not multiples of the block (or even the sector) size.
func TestDynamicSynthetic(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, blockSize := range []uint32{512, 2048, 4096, 64 << 10, 2 << 20} {
		for _, vsize := range []uint64{uint64(blockSize) * 7, uint64(blockSize)*5 + 1536, 3<<20 + 777, 5 << 20} {
			for iter := range 3 {
				name := fmt.Sprintf("bs=%d/size=%d/%d", blockSize, vsize, iter)
				t.Run(name, func(t *testing.T) {
					sd := newSynth(t, rng, vsize, blockSize)
					d, err := OpenDynamic(bytes.NewReader(sd.file), int64(len(sd.file)))
					if err != nil {
						t.Fatal(err)
					}
					if d.VirtualSize() != int64(vsize) {
						t.Fatalf("VirtualSize = %d, want %d", d.VirtualSize(), vsize)
					}
					got := make([]byte, vsize)
					if n, err := d.ReadAt(got, 0); n != len(got) || err != nil {
						t.Fatalf("ReadAt(all) = %d, %v", n, err)
					}
					if i := firstDiff(got, sd.want); i >= 0 {
						t.Fatalf("byte %d: got 0x%02x, want 0x%02x", i, got[i], sd.want[i])
					}
					for range 50 {
						off := rng.Int64N(int64(vsize) + 10)
						n := rng.IntN(3*int(blockSize) + 1000)
						buf := make([]byte, n)
						m, err := d.ReadAt(buf, off)
						wantN := int(max(0, min(int64(n), int64(vsize)-off)))
						if m != wantN {
							t.Fatalf("ReadAt(%d at %d) = %d, want %d", n, off, m, wantN)
						}
						if wantN < n && err != io.EOF {
							t.Fatalf("ReadAt(%d at %d) short without io.EOF: %v", n, off, err)
						}
						if wantN == n && err != nil {
							t.Fatalf("ReadAt(%d at %d): %v", n, off, err)
						}
						if m > 0 && !bytes.Equal(buf[:m], sd.want[off:off+int64(m)]) {
							t.Fatalf("ReadAt(%d at %d) content differs", n, off)
						}
					}
					ext, err := d.Extents()
					if err != nil {
						t.Fatal(err)
					}
					checkExtentsWellFormed(t, ext, int64(vsize))
					if want := markedExtents(sd.marked, int64(vsize)); !equalExtents(ext, want) {
						t.Fatalf("Extents = %v\nwant %v", ext, want)
					}
				})
			}
		}
	}
}

// TestDynamicConcurrentReadAt reads one disk from many goroutines (run with
// -race) to check the bitmap cache.
func TestDynamicConcurrentReadAt(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	sd := newSynth(t, rng, 4<<20, 4096)
	d, err := OpenDynamic(bytes.NewReader(sd.file), int64(len(sd.file)))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, 9))
			buf := make([]byte, 20000)
			for range 300 {
				off := r.Int64N(int64(len(sd.want)) - int64(len(buf)))
				if _, err := d.ReadAt(buf, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf, sd.want[off:off+int64(len(buf))]) {
					errs <- fmt.Errorf("content differs at %d", off)
					return
				}
			}
		}(uint64(g))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestDynamicReadAtBounds(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	sd := newSynth(t, rng, 1<<20, 4096)
	d, err := OpenDynamic(bytes.NewReader(sd.file), int64(len(sd.file)))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 10)
	if n, err := d.ReadAt(buf, 1<<20); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end = %d, %v; want 0, io.EOF", n, err)
	}
	if n, err := d.ReadAt(buf, 1<<20-4); n != 4 || err != io.EOF {
		t.Errorf("ReadAt across the end = %d, %v; want 4, io.EOF", n, err)
	}
	if n, err := d.ReadAt(buf, 1<<20-10); n != 10 || err != nil {
		t.Errorf("ReadAt up to the end = %d, %v; want 10, nil", n, err)
	}
	if _, err := d.ReadAt(buf, -1); err == nil || err == io.EOF {
		t.Errorf("ReadAt(-1) = %v, want an error", err)
	}
}

// TestOpenDynamicFooterCopy: a corrupt footer at the end falls back to the
// copy at offset 0; when both are corrupt, the error says so.
func TestOpenDynamicFooterCopy(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	sd := newSynth(t, rng, 3<<20, 64<<10)
	file := bytes.Clone(sd.file)
	file[len(file)-FooterSize+50] ^= 1 // current size, checksum now wrong
	d, err := OpenDynamic(bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatalf("with a corrupt end footer and a good copy: %v", err)
	}
	got := make([]byte, d.VirtualSize())
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, sd.want) {
		t.Fatalf("reading via the footer copy: %v, equal=%v", err, bytes.Equal(got, sd.want))
	}
	file[50] ^= 1
	_, err = OpenDynamic(bytes.NewReader(file), int64(len(file)))
	if !errors.Is(err, ErrBadChecksum) || !strings.Contains(err.Error(), "offset 0") {
		t.Errorf("both footers corrupt: %v; want ErrBadChecksum mentioning the copy at offset 0", err)
	}
}

func TestOpenDynamicRefusals(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	base := newSynth(t, rng, 4<<20, 64<<10).file
	batOff := FooterSize + DynamicHeaderSize

	// patchHeader edits the dynamic header and fixes its checksum.
	patchHeader := func(edit func(h *DynamicHeader)) []byte {
		b := bytes.Clone(base)
		h, err := DecodeDynamicHeader(b[FooterSize:])
		if err != nil {
			t.Fatal(err)
		}
		edit(&h)
		enc := h.Encode()
		copy(b[FooterSize:], enc[:])
		return b
	}
	patchFooters := func(edit func(f *Footer)) []byte {
		b := bytes.Clone(base)
		f, err := DecodeFooter(b[len(b)-FooterSize:])
		if err != nil {
			t.Fatal(err)
		}
		edit(&f)
		enc := f.Encode()
		copy(b, enc[:])
		copy(b[len(b)-FooterSize:], enc[:])
		return b
	}
	setBAT := func(i int, v uint32) []byte {
		b := bytes.Clone(base)
		binary.BigEndian.PutUint32(b[batOff+4*i:], v)
		return b
	}
	fixed := NewFixedFooter(1<<20, time.Now()).Encode()
	fixedFile := append(make([]byte, 1<<20), fixed[:]...)

	for _, tc := range []struct {
		name     string
		file     []byte
		sentinel error
		contains []string
	}{
		{"fixed disk", fixedFile, ErrNotDynamic, []string{"fixed VHD"}},
		{"raw image", make([]byte, 1<<20), ErrNotVHD, []string{"not a VHD"}},
		{"tiny file", make([]byte, 100), ErrTruncated, []string{"100 bytes"}},
		{"BAT entry past the end", setBAT(3, uint32(len(base)/SectorSize)), ErrBadHeader, []string{"BAT entry 3"}},
		{"BAT entry on the footer copy", setBAT(5, 0), ErrBadHeader, []string{"BAT entry 5"}},
		{"BAT too small for the disk", patchHeader(func(h *DynamicHeader) { h.MaxTableEntries = 63 }), ErrBadHeader, []string{"63 entries", "64 entries needed"}},
		{"BAT beyond the file", patchHeader(func(h *DynamicHeader) { h.TableOffset = uint64(len(base)) }), ErrBadHeader, []string{"does not fit"}},
		{"BAT overflowing the file", patchHeader(func(h *DynamicHeader) { h.MaxTableEntries = 0xFFFFFFF0 }), ErrBadHeader, []string{"does not fit"}},
		{"header offset outside", patchFooters(func(f *Footer) { f.DataOffset = uint64(len(base)) }), ErrBadHeader, []string{"outside the file"}},
		{"header version", patchHeader(func(h *DynamicHeader) { h.HeaderVersion = 0x00020000 }), ErrBadHeader, []string{"header version"}},
		{"block size not a power of two", patchHeader(func(h *DynamicHeader) { h.BlockSize = 3 * 512 }), ErrBadHeader, []string{"block size"}},
		{"unknown disk type", patchFooters(func(f *Footer) { f.DiskType = 5 }), ErrNotDynamic, []string{"deprecated(5)"}},
		{"differencing, header unreadable", patchFooters(func(f *Footer) { f.DiskType = DiskTypeDifferencing; f.DataOffset = 1 << 40 }), ErrDifferencing, []string{"unknown parent", "merge"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := OpenDynamic(bytes.NewReader(tc.file), int64(len(tc.file)))
			if !errors.Is(err, tc.sentinel) {
				t.Fatalf("err = %v, want %v", err, tc.sentinel)
			}
			for _, s := range tc.contains {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not contain %q", err, s)
				}
			}
		})
	}
}

func TestDecodeDynamicHeader(t *testing.T) {
	seed, err := os.ReadFile(filepath.Join("testdata", "qemu-dynamic-20M.header"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := DecodeDynamicHeader(seed)
	if err != nil {
		t.Fatalf("qemu's header: %v", err)
	}
	if h.TableOffset != 1536 || h.MaxTableEntries != 11 || h.BlockSize != 2<<20 || h.DataOffset != 0xFFFFFFFFFFFFFFFF {
		t.Errorf("qemu header decoded as %+v", h)
	}
	if enc := h.EncodeRaw(); !bytes.Equal(enc[:], seed) {
		t.Error("EncodeRaw does not reproduce qemu's header")
	}

	if _, err := DecodeDynamicHeader(seed[:1023]); !errors.Is(err, ErrTruncated) {
		t.Errorf("1023 bytes: %v", err)
	}
	bad := bytes.Clone(seed)
	bad[0] = 'X'
	if _, err := DecodeDynamicHeader(bad); !errors.Is(err, ErrBadHeader) || !strings.Contains(err.Error(), "cookie") {
		t.Errorf("bad cookie: %v", err)
	}
	for _, bs := range []uint32{0, 256, 511, 513, 1536, 3 << 20, 512 << 20, 0x80000000} {
		x := h
		x.BlockSize = bs
		enc := x.Encode()
		if _, err := DecodeDynamicHeader(enc[:]); !errors.Is(err, ErrBadHeader) {
			t.Errorf("block size %d accepted (err %v)", bs, err)
		}
	}
	for _, bs := range []uint32{512, 4096, 2 << 20, 256 << 20} {
		x := h
		x.BlockSize = bs
		enc := x.Encode()
		if _, err := DecodeDynamicHeader(enc[:]); err != nil {
			t.Errorf("block size %d refused: %v", bs, err)
		}
	}

	// Parent fields round-trip, including a name outside the BMP (a
	// surrogate pair in UTF-16) and locators.
	x := h
	x.ParentName = `C:\VMs\bäse-𝄞.vhd`
	x.ParentTimestamp = 12345
	x.ParentUniqueID[3] = 7
	copy(x.ParentLocators[0].PlatformCode[:], "W2ku")
	x.ParentLocators[0].PlatformDataSpace = 1
	x.ParentLocators[0].PlatformDataLength = 36
	x.ParentLocators[0].PlatformDataOffset = 0x1234
	enc := x.Encode()
	y, err := DecodeDynamicHeader(enc[:])
	if err != nil {
		t.Fatal(err)
	}
	x.Checksum = y.Checksum
	if x != y {
		t.Errorf("round trip:\n got %+v\nwant %+v", y, x)
	}
	if got := binary.BigEndian.Uint16(enc[parentNameStart:]); got != 'C' {
		t.Errorf("parent name not big-endian UTF-16: first unit 0x%04x", got)
	}
	// A name longer than the field is cut, never inside a surrogate pair.
	x.ParentName = strings.Repeat("a", 255) + "𝄞"
	enc = x.Encode()
	if y, err := DecodeDynamicHeader(enc[:]); err != nil || y.ParentName != strings.Repeat("a", 255) {
		t.Errorf("over-long name: %q, %v", y.ParentName, err)
	}
}

// firstDiff returns the index of the first differing byte, or -1.
func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	const step = 4096
	for off := 0; ; off += step {
		ea, eb := min(off+step, len(a)), min(off+step, len(b))
		if ea-off <= 0 || eb-off <= 0 || !bytes.Equal(a[off:ea], b[off:eb]) {
			for i := off; ; i++ {
				if i >= len(a) || i >= len(b) || a[i] != b[i] {
					return i
				}
			}
		}
	}
}

var zeroSector [SectorSize]byte

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), SectorSize)
		if !bytes.Equal(b[:n], zeroSector[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// checkExtentsWellFormed: sorted, non-empty, non-overlapping, merged
// (never touching), inside [0, size).
func checkExtentsWellFormed(t testing.TB, ext []Extent, size int64) {
	t.Helper()
	for i, e := range ext {
		if e.Length <= 0 || e.Offset < 0 || e.End() > size {
			t.Errorf("extent %d %v is empty or outside [0, %d)", i, e, size)
		}
		if i > 0 && ext[i-1].End() >= e.Offset {
			t.Errorf("extents %v and %v are unsorted, overlapping or not merged", ext[i-1], e)
		}
	}
}

// checkExtentsCoverNonZero: every non-zero byte of data lies in an extent.
func checkExtentsCoverNonZero(t testing.TB, ext []Extent, data []byte) {
	t.Helper()
	pos := int64(0)
	for _, e := range append(ext, Extent{Offset: int64(len(data))}) {
		gap := data[pos:min(e.Offset, int64(len(data)))]
		if !isZero(gap) {
			i := pos + int64(bytes.IndexFunc(gap, func(r rune) bool { return r != 0 }))
			t.Fatalf("non-zero data at about byte %d lies outside every extent (gap %d-%d)", i, pos, e.Offset)
		}
		pos = min(e.End(), int64(len(data)))
	}
}

func markedExtents(marked []bool, size int64) []Extent {
	var out []Extent
	for s, m := range marked {
		if !m {
			continue
		}
		lo, hi := int64(s)*SectorSize, min(int64(s+1)*SectorSize, size)
		if n := len(out); n > 0 && out[n-1].End() == lo {
			out[n-1].Length += hi - lo
		} else {
			out = append(out, Extent{lo, hi - lo})
		}
	}
	return out
}

func equalExtents(a, b []Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// qemuDataExtents returns the merged "data": true ranges of qemu-img map.
func qemuDataExtents(t testing.TB, path string) []Extent {
	t.Helper()
	out := runCmd(t, "qemu-img", "map", "-f", "vpc", "--output=json", path)
	var m []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img map output: %v\n%s", err, out)
	}
	var ext []Extent
	for _, r := range m {
		if !r.Data {
			continue
		}
		if n := len(ext); n > 0 && ext[n-1].End() == r.Start {
			ext[n-1].Length += r.Length
		} else {
			ext = append(ext, Extent{r.Start, r.Length})
		}
	}
	return ext
}
