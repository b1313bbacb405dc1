package vhdlayer

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
	"unicode/utf16"
)

// Seeds made by qemu-img 7.2 and committed under testdata:
//   - qemu-fixed-20M.footer: the last 512 bytes of
//     qemu-img create -f vpc -o subformat=fixed,force_size=on x.vhd 20M
//   - qemu-dynamic-20M.header: the 1024 bytes at offset 512 of
//     qemu-img create -f vpc -o subformat=dynamic x.vhd 20M
//   - qemu-dynamic-20M-empty.vhd: that whole dynamic file (2560 bytes).
func readSeed(f *testing.F, name string) []byte {
	f.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// qemuSeedDisk makes a small dynamic VHD with qemu-img and one write, for
// fresh seeds; it returns nil when qemu-img is not installed (the committed
// seeds still cover qemu's layout).
func qemuSeedDisk(f *testing.F) []byte {
	f.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return nil
	}
	p := filepath.Join(f.TempDir(), "seed.vhd")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", p, "24M").CombinedOutput(); err != nil {
		f.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	if _, err := exec.LookPath("qemu-io"); err == nil {
		if out, err := exec.Command("qemu-io", "-f", "vpc", "-c", "write -P 0x42 3M 4k", p).CombinedOutput(); err != nil {
			f.Fatalf("qemu-io: %v\n%s", err, out)
		}
	}
	b, err := os.ReadFile(p)
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// FuzzDecodeFooter checks DecodeFooter on arbitrary bytes:
//   - it never panics, and fails only with ErrTruncated, ErrNotVHD or
//     ErrBadChecksum;
//   - it never accepts 512+ bytes whose checksum field differs from
//     ComputeChecksum;
//   - when it succeeds, EncodeRaw reproduces bytes 0-84 (every defined
//     field, the checksum included). The reserved bytes 85-511 are not kept:
//     EncodeRaw writes zeros there. So the whole 512 bytes come back only if
//     the input's reserved bytes were zero; otherwise the re-encoded footer
//     no longer matches its stored checksum (the sum of the reserved bytes,
//     at most 427*255, can never wrap to zero), and Encode gives a checksum
//     exactly that sum higher (one's complement: ^(a) = ^(a+r) + r).
//
// Each input is also decoded a second time with its checksum fixed up, so
// the fuzzer reaches the success path instead of stopping at the checksum.
func FuzzDecodeFooter(f *testing.F) {
	now := time.Date(2025, 6, 7, 8, 9, 10, 0, time.UTC)
	for _, size := range []uint64{MinVirtualSize, GiB, MaxVirtualSize, 127 * GiB, 3 * 512} {
		b := NewFixedFooter(size, now).Encode()
		f.Add(b[:])
	}
	dyn := NewFixedFooter(GiB, now)
	dyn.DiskType, dyn.DataOffset = DiskTypeDynamic, 512
	db := dyn.Encode()
	f.Add(db[:])
	f.Add(readSeed(f, "qemu-fixed-20M.footer"))
	f.Add(readSeed(f, "qemu-dynamic-20M-empty.vhd")[:FooterSize])
	if disk := qemuSeedDisk(f); disk != nil {
		f.Add(disk[len(disk)-FooterSize:])
	}
	reserved := NewFixedFooter(GiB, now).Encode()
	reserved[300] = 7 // non-zero reserved byte, checksum fixed below
	binary.BigEndian.PutUint32(reserved[64:], ComputeChecksum(reserved[:]))
	f.Add(reserved[:])
	f.Add(make([]byte, FooterSize))
	f.Add([]byte("conectix"))

	f.Fuzz(func(t *testing.T, b []byte) {
		checkFooterDecode(t, b)
		if len(b) >= FooterSize {
			fixed := bytes.Clone(b[:FooterSize])
			binary.BigEndian.PutUint32(fixed[64:], ComputeChecksum(fixed))
			_, err := DecodeFooter(fixed)
			if string(fixed[:8]) == Cookie && err != nil {
				t.Fatalf("footer with cookie and correct checksum refused: %v", err)
			}
			checkFooterDecode(t, fixed)
		}
	})
}

func checkFooterDecode(t *testing.T, b []byte) {
	t.Helper()
	ft, err := DecodeFooter(b)
	if err != nil {
		if !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrNotVHD) && !errors.Is(err, ErrBadChecksum) {
			t.Fatalf("unclassified error: %v", err)
		}
		if err.Error() == "" {
			t.Fatal("empty error message")
		}
		return
	}
	if len(b) < FooterSize {
		t.Fatalf("decoded %d bytes", len(b))
	}
	in := b[:FooterSize]
	if stored := binary.BigEndian.Uint32(in[64:]); stored != ComputeChecksum(in) {
		t.Fatalf("accepted checksum 0x%08x, computed 0x%08x", stored, ComputeChecksum(in))
	}
	enc := ft.EncodeRaw()
	const defined = 85 // cookie .. saved state
	if !bytes.Equal(enc[:defined], in[:defined]) {
		t.Fatalf("EncodeRaw changed the defined fields:\n got %x\nwant %x", enc[:defined], in[:defined])
	}
	var resSum uint32
	for _, c := range in[defined:] {
		resSum += uint32(c)
	}
	if resSum == 0 {
		if !bytes.Equal(enc[:], in) {
			t.Fatal("EncodeRaw did not reproduce a footer with zero reserved bytes")
		}
	} else {
		if _, err := DecodeFooter(enc[:]); !errors.Is(err, ErrBadChecksum) {
			t.Fatalf("re-encoding dropped non-zero reserved bytes but the checksum still matched: %v", err)
		}
		if got, want := ft.Encode(), ft.Checksum+resSum; binary.BigEndian.Uint32(got[64:]) != want {
			t.Fatalf("Encode checksum 0x%08x, want stored 0x%08x + reserved sum %d", binary.BigEndian.Uint32(got[64:]), ft.Checksum, resSum)
		}
	}
	// Encode always yields a footer that decodes back to the same fields.
	canon := ft.Encode()
	back, err := DecodeFooter(canon[:])
	if err != nil {
		t.Fatalf("Encode output does not decode: %v", err)
	}
	back.Checksum = ft.Checksum
	if back != ft {
		t.Fatalf("Encode/Decode changed fields:\n got %+v\nwant %+v", back, ft)
	}
}

// FuzzDecodeDynamicHeader checks DecodeDynamicHeader on arbitrary bytes:
//   - it never panics, and fails only with ErrTruncated or ErrBadHeader;
//   - it never accepts 1024+ bytes whose checksum field differs from
//     ComputeDynamicHeaderChecksum;
//   - when it succeeds, EncodeRaw reproduces every fixed-width defined field
//     byte for byte (bytes 0-59 and each parent locator but its 4 reserved
//     bytes); the parent name comes back byte for byte when the input's
//     name field is well-formed (valid UTF-16 up to its first NUL, zeros
//     after it), since decoding to a Go string cannot keep unpaired
//     surrogates (they become U+FFFD) or bytes after the NUL; and the whole
//     1024 bytes come back when, in addition, every reserved byte is zero;
//   - Encode always yields a header that decodes to the same fields.
//
// As for footers, each input is also tried with its checksum fixed up.
func FuzzDecodeDynamicHeader(f *testing.F) {
	h := DynamicHeader{
		DataOffset:      0xFFFFFFFFFFFFFFFF,
		TableOffset:     1536,
		HeaderVersion:   DynamicHeaderVersion,
		MaxTableEntries: 10240,
		BlockSize:       2 << 20,
	}
	copy(h.Cookie[:], DynamicCookie)
	b := h.Encode()
	f.Add(b[:])
	h.ParentName = "parent-𝄞.vhd"
	h.ParentTimestamp = 0x12345678
	copy(h.ParentLocators[1].PlatformCode[:], "W2ru")
	h.ParentLocators[1].PlatformDataLength = 40
	h.ParentLocators[1].PlatformDataOffset = 0x1000
	b = h.Encode()
	f.Add(b[:])
	f.Add(readSeed(f, "qemu-dynamic-20M.header"))
	if disk := qemuSeedDisk(f); disk != nil {
		f.Add(disk[FooterSize : FooterSize+DynamicHeaderSize])
	}
	f.Add([]byte(DynamicCookie))

	f.Fuzz(func(t *testing.T, b []byte) {
		checkHeaderDecode(t, b)
		if len(b) >= DynamicHeaderSize {
			fixed := bytes.Clone(b[:DynamicHeaderSize])
			binary.BigEndian.PutUint32(fixed[headerChecksumStart:], ComputeDynamicHeaderChecksum(fixed))
			checkHeaderDecode(t, fixed)
		}
	})
}

func checkHeaderDecode(t *testing.T, b []byte) {
	t.Helper()
	h, err := DecodeDynamicHeader(b)
	if err != nil {
		if !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrBadHeader) {
			t.Fatalf("unclassified error: %v", err)
		}
		return
	}
	if len(b) < DynamicHeaderSize {
		t.Fatalf("decoded %d bytes", len(b))
	}
	in := b[:DynamicHeaderSize]
	if stored := binary.BigEndian.Uint32(in[headerChecksumStart:]); stored != ComputeDynamicHeaderChecksum(in) {
		t.Fatalf("accepted checksum 0x%08x, computed 0x%08x", stored, ComputeDynamicHeaderChecksum(in))
	}
	enc := h.EncodeRaw()
	if !bytes.Equal(enc[:60], in[:60]) {
		t.Fatalf("EncodeRaw changed bytes 0-59:\n got %x\nwant %x", enc[:60], in[:60])
	}
	for i := range parentLocatorCount {
		o := parentLocatorStart + i*parentLocatorSize
		if !bytes.Equal(enc[o:o+12], in[o:o+12]) || !bytes.Equal(enc[o+16:o+24], in[o+16:o+24]) {
			t.Fatalf("EncodeRaw changed parent locator %d", i)
		}
	}
	name := in[parentNameStart : parentNameStart+parentNameLen]
	if wellFormedUTF16Name(name) && !bytes.Equal(enc[parentNameStart:parentNameStart+parentNameLen], name) {
		t.Fatalf("EncodeRaw changed a well-formed parent name %q", h.ParentName)
	}
	reservedZero := isZero(in[60:64]) && isZero(in[768:])
	for i := range parentLocatorCount {
		o := parentLocatorStart + i*parentLocatorSize
		reservedZero = reservedZero && isZero(in[o+12:o+16])
	}
	if reservedZero && wellFormedUTF16Name(name) && !bytes.Equal(enc[:], in) {
		t.Fatal("EncodeRaw did not reproduce a header with zero reserved bytes and a well-formed name")
	}
	canon := h.Encode()
	back, err := DecodeDynamicHeader(canon[:])
	if err != nil {
		t.Fatalf("Encode output does not decode: %v", err)
	}
	back.Checksum = h.Checksum
	if back != h {
		t.Fatalf("Encode/Decode changed fields:\n got %+v\nwant %+v", back, h)
	}
}

// wellFormedUTF16Name reports whether a parent-name field is big-endian
// UTF-16 without unpaired surrogates up to its first NUL code unit, with
// only zero bytes after it: the fields that survive decoding to a string.
func wellFormedUTF16Name(b []byte) bool {
	var units []uint16
	i := 0
	for ; i+1 < len(b); i += 2 {
		u := binary.BigEndian.Uint16(b[i:])
		if u == 0 {
			break
		}
		units = append(units, u)
	}
	if !isZero(b[i:]) {
		return false
	}
	for j := 0; j < len(units); j++ {
		switch u := rune(units[j]); {
		case utf16.IsSurrogate(u) && u < 0xDC00: // high surrogate
			if j+1 >= len(units) || units[j+1] < 0xDC00 || units[j+1] > 0xDFFF {
				return false
			}
			j++
		case utf16.IsSurrogate(u): // low surrogate without a high one
			return false
		}
	}
	return true
}

// FuzzOpenDynamic feeds whole files to OpenDynamic. The footer and header
// are checksummed, so most mutations that survive land where the format has
// no checksum: the BAT, the sector bitmaps and the data. Properties: no
// panic; errors are classified; when the disk opens, Extents is well formed
// and every non-zero byte ReadAt returns lies inside an extent.
func FuzzOpenDynamic(f *testing.F) {
	f.Add(readSeed(f, "qemu-dynamic-20M-empty.vhd"))
	rng := rand.New(rand.NewPCG(11, 12))
	for _, tc := range []struct {
		size      uint64
		blockSize uint32
	}{{8 * 512, 512}, {20*512 + 100, 1024}, {3*4096 + 1000, 4096}} {
		f.Add(newSynth(f, rng, tc.size, tc.blockSize).file)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := OpenDynamic(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			for _, s := range []error{ErrTruncated, ErrNotVHD, ErrBadChecksum, ErrBadHeader, ErrNotDynamic, ErrDifferencing} {
				if errors.Is(err, s) {
					return
				}
			}
			t.Fatalf("unclassified error: %v", err)
		}
		ext, err := d.Extents()
		if err != nil {
			t.Fatalf("Extents after a successful open: %v", err)
		}
		vs := d.VirtualSize()
		checkExtentsWellFormed(t, ext, vs)
		if vs > 4<<20 {
			return
		}
		all := make([]byte, vs)
		if n, err := d.ReadAt(all, 0); n != len(all) || err != nil {
			t.Fatalf("ReadAt(all) = %d, %v", n, err)
		}
		checkExtentsCoverNonZero(t, ext, all)
	})
}
