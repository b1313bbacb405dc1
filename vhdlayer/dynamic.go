package vhdlayer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"sync"
	"unicode/utf16"

	"github.com/google/uuid"
)

// DynamicHeaderSize is the size of the dynamic disk header ("cxsparse") that
// a dynamic or differencing VHD keeps at the footer's DataOffset.
const DynamicHeaderSize = 1024

// DynamicCookie is the magic at the start of a dynamic disk header.
const DynamicCookie = "cxsparse"

// DynamicHeaderVersion is the only dynamic-header version the specification
// defines (1.0).
const DynamicHeaderVersion uint32 = 0x00010000

// BATUnallocated is the value of a block allocation table entry whose block
// has no data in the file; the whole block reads as zeros.
const BATUnallocated uint32 = 0xFFFFFFFF

// Block sizes DecodeDynamicHeader accepts. The specification's default is
// 2 MiB, which is also what qemu and Hyper-V write; anything outside this
// range is treated as corruption.
const (
	MinBlockSize uint32 = SectorSize
	MaxBlockSize uint32 = 256 << 20
)

// ErrNotDynamic: a valid VHD that is not a dynamic disk, handed to the
// dynamic-disk reader (a fixed disk is read directly; callers dispatch on
// Footer.DiskType).
var ErrNotDynamic = errors.New("not a dynamic VHD")

const (
	headerChecksumStart = 36
	parentNameStart     = 64
	parentNameLen       = 512
	parentLocatorStart  = 576
	parentLocatorSize   = 24
	parentLocatorCount  = 8
)

// ParentLocator is one of the eight parent-locator entries of a dynamic disk
// header. Only differencing disks use them: they say where in the file a
// platform-specific path to the parent is stored.
type ParentLocator struct {
	// PlatformCode names the path format, e.g. "W2ku" (absolute UTF-16LE
	// Windows path) or "W2ru" (relative); zero for an unused entry.
	PlatformCode [4]byte
	// PlatformDataSpace is the space reserved for the path, in sectors
	// (some writers store bytes here).
	PlatformDataSpace uint32
	// PlatformDataLength is the length of the path in bytes.
	PlatformDataLength uint32
	// PlatformDataOffset is the absolute file offset of the path.
	PlatformDataOffset uint64
}

// DynamicHeader is the decoded 1024-byte dynamic disk header. Field names
// follow the specification. The reserved areas (bytes 60-63, the 4 reserved
// bytes of each parent locator and bytes 768-1023) are not kept: EncodeRaw
// writes them as zero.
type DynamicHeader struct {
	// Cookie is "cxsparse".
	Cookie [8]byte
	// DataOffset is the offset of the next structure; unused, all ones.
	DataOffset uint64
	// TableOffset is the absolute file offset of the block allocation table.
	TableOffset uint64
	// HeaderVersion is 0x00010000.
	HeaderVersion uint32
	// MaxTableEntries is the number of BAT entries; it must cover the
	// footer's current size.
	MaxTableEntries uint32
	// BlockSize is the number of data bytes per block (2 MiB by default),
	// not counting the sector bitmap in front of each block.
	BlockSize uint32
	// Checksum is the one's complement of the byte sum of the header with
	// the checksum field counted as zero.
	Checksum uint32
	// ParentUniqueID is the parent's footer UUID (differencing disks only).
	ParentUniqueID uuid.UUID
	// ParentTimestamp is the parent's modification time, in seconds since
	// 2000-01-01 UTC (differencing disks only).
	ParentTimestamp uint32
	// ParentName is the parent's file name, decoded from the 512-byte
	// UTF-16BE field up to its first NUL (differencing disks only).
	ParentName string
	// ParentLocators are the eight parent-locator entries.
	ParentLocators [parentLocatorCount]ParentLocator
}

// ComputeDynamicHeaderChecksum returns the checksum of a 1024-byte dynamic
// disk header: the one's complement of the sum of all its bytes, the
// checksum field (bytes 36-39) counted as zero. b must hold at least
// DynamicHeaderSize bytes.
func ComputeDynamicHeaderChecksum(b []byte) uint32 {
	var sum uint32
	for i, c := range b[:DynamicHeaderSize] {
		if i >= headerChecksumStart && i < headerChecksumStart+4 {
			continue
		}
		sum += uint32(c)
	}
	return ^sum
}

// DecodeDynamicHeader parses a dynamic disk header from the first
// DynamicHeaderSize bytes of b. It checks the cookie, the checksum, the
// header version and that the block size is a power of two between
// MinBlockSize and MaxBlockSize. Whether the BAT covers the disk and fits
// in the file is checked by OpenDynamic, which knows the footer and the file
// size. Errors wrap ErrTruncated or ErrBadHeader (and ErrBadChecksum for a
// checksum mismatch).
func DecodeDynamicHeader(b []byte) (DynamicHeader, error) {
	if len(b) < DynamicHeaderSize {
		return DynamicHeader{}, fmt.Errorf("%w: dynamic disk header is %d bytes, want %d", ErrTruncated, len(b), DynamicHeaderSize)
	}
	b = b[:DynamicHeaderSize]
	be := binary.BigEndian
	var h DynamicHeader
	copy(h.Cookie[:], b[0:8])
	if string(h.Cookie[:]) != DynamicCookie {
		return DynamicHeader{}, fmt.Errorf("%w: cookie is %q, want %q", ErrBadHeader, printable(h.Cookie[:]), DynamicCookie)
	}
	h.DataOffset = be.Uint64(b[8:])
	h.TableOffset = be.Uint64(b[16:])
	h.HeaderVersion = be.Uint32(b[24:])
	h.MaxTableEntries = be.Uint32(b[28:])
	h.BlockSize = be.Uint32(b[32:])
	h.Checksum = be.Uint32(b[36:])
	copy(h.ParentUniqueID[:], b[40:56])
	h.ParentTimestamp = be.Uint32(b[56:])
	h.ParentName = decodeUTF16BE(b[parentNameStart : parentNameStart+parentNameLen])
	for i := range h.ParentLocators {
		e := b[parentLocatorStart+i*parentLocatorSize:]
		l := &h.ParentLocators[i]
		copy(l.PlatformCode[:], e[0:4])
		l.PlatformDataSpace = be.Uint32(e[4:])
		l.PlatformDataLength = be.Uint32(e[8:])
		l.PlatformDataOffset = be.Uint64(e[16:])
	}
	if want := ComputeDynamicHeaderChecksum(b); want != h.Checksum {
		return DynamicHeader{}, fmt.Errorf("%w: checksum is 0x%08x, expected 0x%08x from its contents (%w)",
			ErrBadHeader, h.Checksum, want, ErrBadChecksum)
	}
	if h.HeaderVersion != DynamicHeaderVersion {
		return DynamicHeader{}, fmt.Errorf("%w: header version is 0x%08x, want 0x%08x", ErrBadHeader, h.HeaderVersion, DynamicHeaderVersion)
	}
	if h.BlockSize < MinBlockSize || h.BlockSize > MaxBlockSize || bits.OnesCount32(h.BlockSize) != 1 {
		return DynamicHeader{}, fmt.Errorf("%w: block size is %d bytes, want a power of two from %d bytes to %s",
			ErrBadHeader, h.BlockSize, MinBlockSize, FormatSize(uint64(MaxBlockSize)))
	}
	return h, nil
}

// Encode serialises the header, computing and storing its checksum. The
// Checksum field of h is ignored.
func (h DynamicHeader) Encode() [DynamicHeaderSize]byte {
	var b [DynamicHeaderSize]byte
	h.put(b[:])
	binary.BigEndian.PutUint32(b[headerChecksumStart:], ComputeDynamicHeaderChecksum(b[:]))
	return b
}

// EncodeRaw serialises the header with the Checksum field exactly as stored
// in h. A ParentName longer than the field's 256 UTF-16 code units is cut.
func (h DynamicHeader) EncodeRaw() [DynamicHeaderSize]byte {
	var b [DynamicHeaderSize]byte
	h.put(b[:])
	binary.BigEndian.PutUint32(b[headerChecksumStart:], h.Checksum)
	return b
}

func (h DynamicHeader) put(b []byte) {
	be := binary.BigEndian
	copy(b[0:8], h.Cookie[:])
	be.PutUint64(b[8:], h.DataOffset)
	be.PutUint64(b[16:], h.TableOffset)
	be.PutUint32(b[24:], h.HeaderVersion)
	be.PutUint32(b[28:], h.MaxTableEntries)
	be.PutUint32(b[32:], h.BlockSize)
	copy(b[40:56], h.ParentUniqueID[:])
	be.PutUint32(b[56:], h.ParentTimestamp)
	encodeUTF16BE(b[parentNameStart:parentNameStart+parentNameLen], h.ParentName)
	for i, l := range h.ParentLocators {
		e := b[parentLocatorStart+i*parentLocatorSize:]
		copy(e[0:4], l.PlatformCode[:])
		be.PutUint32(e[4:], l.PlatformDataSpace)
		be.PutUint32(e[8:], l.PlatformDataLength)
		be.PutUint64(e[16:], l.PlatformDataOffset)
	}
}

// decodeUTF16BE decodes big-endian UTF-16 up to the first NUL code unit.
// Unpaired surrogates become U+FFFD.
func decodeUTF16BE(b []byte) string {
	units := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		u := binary.BigEndian.Uint16(b[i:])
		if u == 0 {
			break
		}
		units = append(units, u)
	}
	return string(utf16.Decode(units))
}

// encodeUTF16BE writes s as big-endian UTF-16 into dst, NUL-padded, cutting
// it (never inside a surrogate pair) if it does not fit.
func encodeUTF16BE(dst []byte, s string) {
	clear(dst)
	i := 0
	for _, r := range s {
		units := utf16.AppendRune(nil, r)
		if i+2*len(units) > len(dst) {
			return
		}
		for _, u := range units {
			binary.BigEndian.PutUint16(dst[i:], u)
			i += 2
		}
	}
}

// Extent is a byte range [Offset, Offset+Length) of the virtual disk.
type Extent struct {
	Offset int64
	Length int64
}

// End returns Offset + Length.
func (e Extent) End() int64 { return e.Offset + e.Length }

// DynamicDisk reads a dynamic VHD: it maps virtual-disk offsets through the
// block allocation table and the per-block sector bitmaps onto the file.
// It is safe for concurrent use, as io.ReaderAt requires.
//
// A sector reads as data only if its block is allocated in the BAT and its
// bit in the block's sector bitmap is 1; every other sector reads as zeros.
// (qemu's vpc driver ignores the bitmap on read and returns whatever the
// block holds; the two agree on every file whose unmarked sectors hold
// zeros, which includes every file qemu writes, since qemu marks all
// sectors of a block it allocates.) Honouring the bitmap keeps ReadAt and
// Extents consistent: uploading only the extents reproduces ReadAt exactly.
type DynamicDisk struct {
	r           io.ReaderAt
	size        int64 // file size
	footer      Footer
	header      DynamicHeader
	bat         []uint32 // entries covering the virtual size only
	virtualSize int64
	blockSize   int64
	bitmapSize  int64 // bytes on disk, a multiple of 512
	sectorsPerB int64 // sectors per block

	cache bitmapCache
}

// OpenDynamic opens the dynamic VHD held by r, a file of size bytes. It
// reads the footer from the end of the file (falling back to the copy at
// offset 0 if the one at the end is corrupt, as the specification allows),
// the dynamic disk header at the footer's DataOffset and the BAT, and checks
// that they are consistent with each other and with the file size.
//
// A fixed VHD is refused with an error wrapping ErrNotDynamic (read its
// first CurrentSize bytes directly instead); a differencing VHD with one
// wrapping ErrDifferencing that names the parent. Structural problems wrap
// ErrBadHeader or ErrTruncated; a file that is not a VHD at all gives
// ErrNotVHD.
func OpenDynamic(r io.ReaderAt, size int64) (*DynamicDisk, error) {
	f, err := readDynamicFooter(r, size)
	if err != nil {
		return nil, err
	}
	switch f.DiskType {
	case DiskTypeDynamic:
	case DiskTypeDifferencing:
		return nil, differencingError(r, size, f)
	case DiskTypeFixed:
		return nil, fmt.Errorf("%w: this is a fixed VHD (disk type 2), not a dynamic one: its disk data is the first %d bytes of the file and needs no BAT; read it as a fixed disk",
			ErrNotDynamic, f.CurrentSize)
	default:
		return nil, fmt.Errorf("%w: disk type is %s, want dynamic (3)", ErrNotDynamic, f.DiskType)
	}
	h, err := readDynamicHeader(r, size, f)
	if err != nil {
		return nil, err
	}

	d := &DynamicDisk{
		r:           r,
		size:        size,
		footer:      f,
		header:      h,
		blockSize:   int64(h.BlockSize),
		sectorsPerB: int64(h.BlockSize) / SectorSize,
	}
	d.bitmapSize = roundUp((d.sectorsPerB+7)/8, SectorSize)

	// The BAT must cover the whole virtual disk. needed <= MaxTableEntries
	// < 2^32 and BlockSize <= 2^28 bound the virtual size below 2^60, so it
	// fits an int64 from here on.
	needed := f.CurrentSize / uint64(h.BlockSize)
	if f.CurrentSize%uint64(h.BlockSize) != 0 {
		needed++
	}
	if needed > uint64(h.MaxTableEntries) {
		return nil, fmt.Errorf("%w: the BAT has %d entries of %s, which cover %d bytes, but the footer's current size is %d bytes (%d entries needed)",
			ErrBadHeader, h.MaxTableEntries, FormatSize(uint64(h.BlockSize)), uint64(h.MaxTableEntries)*uint64(h.BlockSize), f.CurrentSize, needed)
	}
	d.virtualSize = int64(f.CurrentSize)

	dataEnd := uint64(size) - FooterSize // where the trailing footer starts
	batBytes := 4 * uint64(h.MaxTableEntries)
	if h.TableOffset < FooterSize || h.TableOffset > dataEnd || batBytes > dataEnd-h.TableOffset {
		return nil, fmt.Errorf("%w: the BAT (%d entries, %d bytes at offset %d) does not fit in the file: it must lie between the footer copy (ends at 512) and the footer (starts at %d)",
			ErrBadHeader, h.MaxTableEntries, batBytes, h.TableOffset, dataEnd)
	}
	if err := d.readBAT(int(needed)); err != nil {
		return nil, err
	}
	return d, nil
}

// readDynamicFooter reads the footer at the end of the file, or the copy at
// offset 0 if the end one does not decode.
func readDynamicFooter(r io.ReaderAt, size int64) (Footer, error) {
	if size < FooterSize {
		return Footer{}, fmt.Errorf("%w: file is %d bytes, smaller than a %d-byte VHD footer", ErrTruncated, size, FooterSize)
	}
	var buf [FooterSize]byte
	if err := readFullAt(r, buf[:], size-FooterSize); err != nil {
		return Footer{}, fmt.Errorf("read VHD footer at offset %d: %w", size-FooterSize, err)
	}
	f, endErr := DecodeFooter(buf[:])
	if endErr == nil {
		return f, nil
	}
	// Dynamic and differencing disks carry a copy of the footer at offset 0;
	// the specification says to use it when the one at the end is corrupt.
	// A fixed disk has no copy (offset 0 is disk data), so only a copy that
	// claims a dynamic or differencing disk is trusted.
	if size >= 2*FooterSize+DynamicHeaderSize {
		if err := readFullAt(r, buf[:], 0); err != nil {
			return Footer{}, fmt.Errorf("VHD footer at offset %d: %w; reading the footer copy at offset 0: %w", size-FooterSize, endErr, err)
		}
		c, copyErr := DecodeFooter(buf[:])
		if copyErr == nil && (c.DiskType == DiskTypeDynamic || c.DiskType == DiskTypeDifferencing) {
			return c, nil
		}
		if copyErr == nil {
			copyErr = fmt.Errorf("it describes a %s disk, which has no footer copy", c.DiskType)
		}
		return Footer{}, fmt.Errorf("VHD footer at offset %d: %w (the footer copy at offset 0 is not usable either: %v)", size-FooterSize, endErr, copyErr)
	}
	return Footer{}, fmt.Errorf("VHD footer at offset %d: %w", size-FooterSize, endErr)
}

// readDynamicHeader reads and decodes the dynamic disk header at the
// footer's DataOffset.
func readDynamicHeader(r io.ReaderAt, size int64, f Footer) (DynamicHeader, error) {
	dataEnd := uint64(size) - FooterSize
	if f.DataOffset < FooterSize || f.DataOffset > dataEnd || dataEnd-f.DataOffset < DynamicHeaderSize {
		return DynamicHeader{}, fmt.Errorf("%w: the footer puts the %d-byte dynamic disk header at offset %d (0x%x), outside the file's %d bytes before the footer",
			ErrBadHeader, DynamicHeaderSize, f.DataOffset, f.DataOffset, dataEnd)
	}
	var buf [DynamicHeaderSize]byte
	if err := readFullAt(r, buf[:], int64(f.DataOffset)); err != nil {
		return DynamicHeader{}, fmt.Errorf("read dynamic disk header at offset %d: %w", f.DataOffset, err)
	}
	h, err := DecodeDynamicHeader(buf[:])
	if err != nil {
		return DynamicHeader{}, fmt.Errorf("dynamic disk header at offset %d: %w", f.DataOffset, err)
	}
	return h, nil
}

// differencingError builds the refusal for a differencing disk, naming the
// parent from the dynamic header when it can be read.
func differencingError(r io.ReaderAt, size int64, f Footer) error {
	parent := "an unknown parent (its dynamic disk header is unreadable)"
	if h, err := readDynamicHeader(r, size, f); err == nil {
		name := h.ParentName
		if name == "" {
			name = "(no name recorded)"
		}
		parent = fmt.Sprintf("parent %q (parent UUID %s)", name, h.ParentUniqueID)
	}
	// qemu-img is deliberately not suggested: qemu's vpc driver (7.2) opens
	// a differencing VHD as if it were a plain dynamic one and ignores the
	// parent, so "qemu-img convert" would silently drop the parent's data.
	return fmt.Errorf("%w: this is a differencing VHD that holds only the changes made on top of %s; "+
		"merge it into its parent first and import the merged disk "+
		"(Hyper-V: Merge-VHD -Path child.vhd -DestinationPath parent.vhd; Xen blktap: vhd-util coalesce -n child.vhd). "+
		"Note that qemu-img reads a differencing VHD without its parent, so qemu-img convert does not merge it",
		ErrDifferencing, parent)
}

// readBAT reads the first n BAT entries and checks that every allocated one
// points to a block that lies inside the file.
func (d *DynamicDisk) readBAT(n int) error {
	d.bat = make([]uint32, n)
	const chunkEntries = 256 << 10 // 1 MiB of BAT per read
	buf := make([]byte, 4*min(n, chunkEntries))
	for start := 0; start < n; start += chunkEntries {
		cnt := min(n-start, chunkEntries)
		off := int64(d.header.TableOffset) + 4*int64(start)
		if err := readFullAt(d.r, buf[:4*cnt], off); err != nil {
			return fmt.Errorf("read BAT entries %d-%d at offset %d: %w", start, start+cnt-1, off, err)
		}
		for i := 0; i < cnt; i++ {
			d.bat[start+i] = binary.BigEndian.Uint32(buf[4*i:])
		}
	}
	dataEnd := d.size - FooterSize
	for i, e := range d.bat {
		if e == BATUnallocated {
			continue
		}
		vStart := int64(i) * d.blockSize
		used := min(d.blockSize, d.virtualSize-vStart) // the last block may be cut by the virtual size
		start := int64(e) * SectorSize
		end := start + d.bitmapSize + used
		if start < FooterSize || end > dataEnd {
			return fmt.Errorf("%w: BAT entry %d (virtual bytes %d-%d) points to sector %d: its bitmap and data occupy file bytes %d-%d, outside the %d bytes between the footer copy and the footer",
				ErrBadHeader, i, vStart, vStart+used-1, e, start, end-1, dataEnd)
		}
	}
	return nil
}

// Footer returns the disk's footer.
func (d *DynamicDisk) Footer() Footer { return d.footer }

// Header returns the disk's dynamic disk header.
func (d *DynamicDisk) Header() DynamicHeader { return d.header }

// VirtualSize returns the size of the virtual disk in bytes: the footer's
// current size (not the CHS geometry).
func (d *DynamicDisk) VirtualSize() int64 { return d.virtualSize }

// Extents returns the allocated byte ranges of the virtual disk, sorted,
// merged and clipped to VirtualSize: the sectors whose block is allocated in
// the BAT and whose bit is set in that block's sector bitmap. Every byte
// outside the extents reads as zero. It reads each allocated block's bitmap
// once.
func (d *DynamicDisk) Extents() ([]Extent, error) {
	var out []Extent
	add := func(off, end int64) {
		end = min(end, d.virtualSize)
		if off >= end {
			return
		}
		if n := len(out); n > 0 && out[n-1].End() == off {
			out[n-1].Length += end - off
			return
		}
		out = append(out, Extent{Offset: off, Length: end - off})
	}
	bm := make([]byte, d.bitmapSize)
	for i, e := range d.bat {
		if e == BATUnallocated {
			continue
		}
		if err := readFullAt(d.r, bm, int64(e)*SectorSize); err != nil {
			return nil, fmt.Errorf("read sector bitmap of block %d (BAT entry %d) at offset %d: %w", i, i, int64(e)*SectorSize, err)
		}
		base := int64(i) * d.blockSize
		forEachRun(bm, d.sectorsPerB, 0, d.sectorsPerB, func(s0, s1 int64, set bool) {
			if set {
				add(base+s0*SectorSize, base+s1*SectorSize)
			}
		})
	}
	return out, nil
}

// ReadAt reads len(p) bytes of the virtual disk starting at off. Unallocated
// sectors read as zeros. At or past VirtualSize it returns io.EOF, like a
// file of that size.
func (d *DynamicDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read dynamic VHD at offset %d: negative offset", off)
	}
	if off >= d.virtualSize {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := len(p)
	var tailErr error
	if int64(n) > d.virtualSize-off {
		n = int(d.virtualSize - off)
		tailErr = io.EOF
	}
	for done := 0; done < n; {
		pos := off + int64(done)
		bi := pos / d.blockSize
		inBlock := pos - bi*d.blockSize
		chunk := int(min(int64(n-done), d.blockSize-inBlock))
		if err := d.readBlock(p[done:done+chunk], bi, inBlock); err != nil {
			return done, err
		}
		done += chunk
	}
	return n, tailErr
}

// readBlock fills dst with the bytes of block bi starting inBlock bytes into
// it; dst does not cross the block's end.
func (d *DynamicDisk) readBlock(dst []byte, bi, inBlock int64) error {
	e := d.bat[bi]
	if e == BATUnallocated {
		clear(dst)
		return nil
	}
	bm, err := d.bitmap(bi)
	if err != nil {
		return err
	}
	if bm.state == bitmapEmpty {
		clear(dst)
		return nil
	}
	dataOff := int64(e)*SectorSize + d.bitmapSize
	if bm.state == bitmapFull {
		if err := readFullAt(d.r, dst, dataOff+inBlock); err != nil {
			return fmt.Errorf("read block %d data at file offset %d: %w", bi, dataOff+inBlock, err)
		}
		return nil
	}
	// A partly marked block: read each run of marked sectors in one call,
	// zero the unmarked ones.
	end := inBlock + int64(len(dst))
	s0 := inBlock / SectorSize
	s1 := (end + SectorSize - 1) / SectorSize
	var rerr error
	forEachRun(bm.bits, d.sectorsPerB, s0, s1, func(a, b int64, set bool) {
		if rerr != nil {
			return
		}
		lo := max(a*SectorSize, inBlock)
		hi := min(b*SectorSize, end)
		part := dst[lo-inBlock : hi-inBlock]
		if !set {
			clear(part)
			return
		}
		if err := readFullAt(d.r, part, dataOff+lo); err != nil {
			rerr = fmt.Errorf("read block %d data at file offset %d: %w", bi, dataOff+lo, err)
		}
	})
	return rerr
}

// forEachRun calls fn for each maximal run [a, b) of sectors in [s0, s1)
// whose bitmap bits are equal. Bit i is bit 7-(i%8) of byte i/8: the most
// significant bit of the first byte is the block's first sector, the
// convention of Hyper-V and Xen's libvhd. Bits past nbits are ignored.
func forEachRun(bm []byte, nbits, s0, s1 int64, fn func(a, b int64, set bool)) {
	s1 = min(s1, nbits)
	for s := s0; s < s1; {
		set := bitAt(bm, s)
		e := s + 1
		for e < s1 {
			// Skip whole bytes that match the run.
			if e%8 == 0 && e+8 <= s1 {
				if c := bm[e/8]; (set && c == 0xFF) || (!set && c == 0) {
					e += 8
					continue
				}
			}
			if bitAt(bm, e) != set {
				break
			}
			e++
		}
		fn(s, e, set)
		s = e
	}
}

func bitAt(bm []byte, i int64) bool { return bm[i/8]&(0x80>>(i%8)) != 0 }

type bitmapState uint8

const (
	bitmapPartial bitmapState = iota
	bitmapFull                // every sector of the block is marked
	bitmapEmpty               // no sector is marked
)

type cachedBitmap struct {
	block int64
	state bitmapState
	bits  []byte // nil unless partial; read-only once cached
}

// bitmapCache keeps the sector bitmaps of recently read blocks so that
// sequential reads fetch each bitmap once, not once per ReadAt call.
// It is direct-mapped by block index.
type bitmapCache struct {
	mu    sync.Mutex
	slots [64]*cachedBitmap
}

// bitmap returns the (cached) sector bitmap of allocated block bi.
func (d *DynamicDisk) bitmap(bi int64) (*cachedBitmap, error) {
	slot := &d.cache.slots[bi%int64(len(d.cache.slots))]
	d.cache.mu.Lock()
	c := *slot
	d.cache.mu.Unlock()
	if c != nil && c.block == bi {
		return c, nil
	}
	off := int64(d.bat[bi]) * SectorSize
	raw := make([]byte, d.bitmapSize)
	if err := readFullAt(d.r, raw, off); err != nil {
		return nil, fmt.Errorf("read sector bitmap of block %d at offset %d: %w", bi, off, err)
	}
	c = &cachedBitmap{block: bi, state: bitmapPartial, bits: raw}
	full, empty := true, true
	forEachRun(raw, d.sectorsPerB, 0, d.sectorsPerB, func(_, _ int64, set bool) {
		if set {
			empty = false
		} else {
			full = false
		}
	})
	switch {
	case full:
		c.state, c.bits = bitmapFull, nil
	case empty:
		c.state, c.bits = bitmapEmpty, nil
	}
	d.cache.mu.Lock()
	*slot = c
	d.cache.mu.Unlock()
	return c, nil
}

// readFullAt reads exactly len(p) bytes at off; a short read is
// io.ErrUnexpectedEOF.
func readFullAt(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("short read, %d of %d bytes: %w", n, len(p), err)
}

func roundUp(n, m int64) int64 { return (n + m - 1) / m * m }
