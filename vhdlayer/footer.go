package vhdlayer

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/google/uuid"
)

// FooterSize is the size of a VHD footer in bytes. A fixed VHD is the raw
// disk data followed by exactly one footer.
const FooterSize = 512

// SectorSize is the VHD (and page-blob) sector granularity.
const SectorSize = 512

// Cookie is the magic at the start of every VHD footer.
const Cookie = "conectix"

// CreatorApp is the creator-application tag vhdsync writes: "win ", the tag
// of Hyper-V and of the VHDs Azure itself makes.
//
// Why not a tag of vhdsync's own: qemu's vpc driver (7.2, and later
// releases) sizes a VHD from its CHS geometry unless the tag is one it knows
// to mean "use the current-size field" ("win ", "qem2", "d2v ", "CTXS",
// "tap\0"). CHS cannot describe most sizes exactly (1 GiB becomes
// 1,073,479,680 bytes), so with any other tag qemu-img, qemu-nbd -f vpc and
// everything built on them would see a disk 256 KiB short of the real one.
// Measured with qemu-img 7.2 in TestQemuSizesOurFooterExactly. vhdsync
// identifies itself through CreatorVersion instead.
const CreatorApp = "win "

// CreatorVersion is written into the footer's creator-version field. Its
// high 16 bits spell "vs" (vhdsync), the low 16 bits the footer layout
// revision, so a vhdsync disk can be told from a Hyper-V one.
const CreatorVersion uint32 = 0x76730001

// CreatorHostWindows is the creator-host-OS value Azure expects ("Wi2k").
const CreatorHostWindows = "Wi2k"

const (
	featuresReserved   uint32 = 0x00000002 // must always be set
	fileFormatVersion  uint32 = 0x00010000
	fixedDataOffset    uint64 = 0xFFFFFFFFFFFFFFFF
	checksumFieldStart        = 64
)

// DiskType is the footer's disk-type field.
type DiskType uint32

// Disk types defined by the specification.
const (
	DiskTypeNone         DiskType = 0
	DiskTypeFixed        DiskType = 2
	DiskTypeDynamic      DiskType = 3
	DiskTypeDifferencing DiskType = 4
)

// String names the disk type as the specification does.
func (t DiskType) String() string {
	switch t {
	case DiskTypeNone:
		return "none"
	case DiskTypeFixed:
		return "fixed"
	case DiskTypeDynamic:
		return "dynamic"
	case DiskTypeDifferencing:
		return "differencing"
	case 1, 5, 6:
		return fmt.Sprintf("deprecated(%d)", uint32(t))
	default:
		return fmt.Sprintf("unknown(%d)", uint32(t))
	}
}

// vhdEpoch is the VHD timestamp origin: 2000-01-01 00:00:00 UTC.
var vhdEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// TimestampFromTime converts t into seconds since 2000-01-01 UTC, clamped to
// the 32-bit field.
func TimestampFromTime(t time.Time) uint32 {
	s := t.Unix() - vhdEpoch.Unix()
	if s < 0 {
		return 0
	}
	if s > 0xFFFFFFFF {
		return 0xFFFFFFFF
	}
	return uint32(s)
}

// TimeFromTimestamp converts a VHD timestamp back to a time.Time (UTC).
func TimeFromTimestamp(ts uint32) time.Time {
	return vhdEpoch.Add(time.Duration(ts) * time.Second)
}

// Footer is the decoded 512-byte VHD footer. Field names follow the
// specification.
type Footer struct {
	Cookie         [8]byte
	Features       uint32
	FormatVersion  uint32
	DataOffset     uint64
	Timestamp      uint32
	CreatorApp     [4]byte
	CreatorVersion uint32
	CreatorHostOS  [4]byte
	OriginalSize   uint64
	CurrentSize    uint64
	Geometry       Geometry
	DiskType       DiskType
	Checksum       uint32
	UniqueID       uuid.UUID
	SavedState     uint8
}

// NewFixedFooter returns the footer of a new fixed disk of virtualSize bytes
// with a random UUID and the current time. It does not validate the size
// against Azure's rules; call ValidateVirtualSize first.
func NewFixedFooter(virtualSize uint64, now time.Time) Footer {
	f := Footer{
		Features:       featuresReserved,
		FormatVersion:  fileFormatVersion,
		DataOffset:     fixedDataOffset,
		Timestamp:      TimestampFromTime(now),
		CreatorVersion: CreatorVersion,
		OriginalSize:   virtualSize,
		CurrentSize:    virtualSize,
		Geometry:       GeometryForSize(virtualSize),
		DiskType:       DiskTypeFixed,
		UniqueID:       uuid.New(),
	}
	copy(f.Cookie[:], Cookie)
	copy(f.CreatorApp[:], CreatorApp)
	copy(f.CreatorHostOS[:], CreatorHostWindows)
	return f
}

// Encode serialises the footer, computing and storing its checksum. The
// Checksum field of f is ignored and the returned footer carries the
// computed one.
func (f Footer) Encode() [FooterSize]byte {
	var b [FooterSize]byte
	f.put(b[:])
	sum := ComputeChecksum(b[:])
	binary.BigEndian.PutUint32(b[checksumFieldStart:], sum)
	return b
}

// EncodeRaw serialises the footer with the Checksum field exactly as stored
// in f, which lets tests build footers with a wrong checksum.
func (f Footer) EncodeRaw() [FooterSize]byte {
	var b [FooterSize]byte
	f.put(b[:])
	binary.BigEndian.PutUint32(b[checksumFieldStart:], f.Checksum)
	return b
}

func (f Footer) put(b []byte) {
	be := binary.BigEndian
	copy(b[0:8], f.Cookie[:])
	be.PutUint32(b[8:], f.Features)
	be.PutUint32(b[12:], f.FormatVersion)
	be.PutUint64(b[16:], f.DataOffset)
	be.PutUint32(b[24:], f.Timestamp)
	copy(b[28:32], f.CreatorApp[:])
	be.PutUint32(b[32:], f.CreatorVersion)
	copy(b[36:40], f.CreatorHostOS[:])
	be.PutUint64(b[40:], f.OriginalSize)
	be.PutUint64(b[48:], f.CurrentSize)
	be.PutUint16(b[56:], f.Geometry.Cylinders)
	b[58] = f.Geometry.Heads
	b[59] = f.Geometry.SectorsPerTrack
	be.PutUint32(b[60:], uint32(f.DiskType))
	copy(b[68:84], f.UniqueID[:])
	b[84] = f.SavedState
	// bytes 85..511 are reserved and stay zero
}

// ComputeChecksum returns the VHD checksum of a 512-byte footer: the one's
// complement of the sum of all bytes, the checksum field counted as zero.
func ComputeChecksum(b []byte) uint32 {
	var sum uint32
	for i, c := range b[:FooterSize] {
		if i >= checksumFieldStart && i < checksumFieldStart+4 {
			continue
		}
		sum += uint32(c)
	}
	return ^sum
}

// DecodeFooter parses a 512-byte footer. It checks only what is needed to
// trust the rest of the fields: the cookie and the checksum. Use Validate
// for the rules a fixed disk in Azure must follow.
func DecodeFooter(b []byte) (Footer, error) {
	f, err := DecodeFooterUnchecked(b)
	if err != nil {
		return Footer{}, err
	}
	if string(f.Cookie[:]) != Cookie {
		return Footer{}, &CookieError{Got: f.Cookie}
	}
	if want := ComputeChecksum(b); want != f.Checksum {
		return Footer{}, &ChecksumError{Stored: f.Checksum, Computed: want}
	}
	return f, nil
}

// DecodeFooterUnchecked parses the fields of a 512-byte footer without
// checking the cookie or the checksum, so that a damaged footer can still
// be shown to the user. Never trust its result for anything else.
func DecodeFooterUnchecked(b []byte) (Footer, error) {
	if len(b) < FooterSize {
		return Footer{}, fmt.Errorf("%w: footer is %d bytes, want %d", ErrTruncated, len(b), FooterSize)
	}
	b = b[:FooterSize]
	var f Footer
	be := binary.BigEndian
	copy(f.Cookie[:], b[0:8])
	f.Features = be.Uint32(b[8:])
	f.FormatVersion = be.Uint32(b[12:])
	f.DataOffset = be.Uint64(b[16:])
	f.Timestamp = be.Uint32(b[24:])
	copy(f.CreatorApp[:], b[28:32])
	f.CreatorVersion = be.Uint32(b[32:])
	copy(f.CreatorHostOS[:], b[36:40])
	f.OriginalSize = be.Uint64(b[40:])
	f.CurrentSize = be.Uint64(b[48:])
	f.Geometry = Geometry{Cylinders: be.Uint16(b[56:]), Heads: b[58], SectorsPerTrack: b[59]}
	f.DiskType = DiskType(be.Uint32(b[60:]))
	f.Checksum = be.Uint32(b[64:])
	copy(f.UniqueID[:], b[68:84])
	f.SavedState = b[84]
	return f, nil
}

// CookieError reports a footer whose first 8 bytes are not "conectix".
type CookieError struct{ Got [8]byte }

// Error implements error.
func (e *CookieError) Error() string {
	if bytes.Equal(e.Got[:], make([]byte, 8)) {
		return "not a VHD: the last 512 bytes are zero, where the footer cookie \"conectix\" should be (is this a raw image? use import)"
	}
	return fmt.Sprintf("not a VHD: footer cookie is %q (hex %s), want %q", printable(e.Got[:]), hex.EncodeToString(e.Got[:]), Cookie)
}

// Is makes errors.Is(err, ErrNotVHD) true for a cookie mismatch.
func (e *CookieError) Is(target error) bool { return target == ErrNotVHD }

// ChecksumError reports a footer whose stored checksum does not match its
// contents.
type ChecksumError struct{ Stored, Computed uint32 }

// Error implements error.
func (e *ChecksumError) Error() string {
	return fmt.Sprintf("corrupt VHD footer: checksum is 0x%08x, expected 0x%08x from its contents", e.Stored, e.Computed)
}

// Is makes errors.Is(err, ErrBadChecksum) true.
func (e *ChecksumError) Is(target error) bool { return target == ErrBadChecksum }

func printable(b []byte) string {
	out := make([]byte, len(b))
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			c = '.'
		}
		out[i] = c
	}
	return string(out)
}

// CreatorAppString returns the creator application tag, trimmed of NULs.
func (f Footer) CreatorAppString() string { return string(bytes.TrimRight(f.CreatorApp[:], "\x00")) }

// CreatorHostString returns the creator host OS tag, trimmed of NULs.
func (f Footer) CreatorHostString() string {
	return string(bytes.TrimRight(f.CreatorHostOS[:], "\x00"))
}

// Resized returns the footer of the same disk at virtualSize bytes: the
// same UUID, creator and timestamp, the current and original size set to
// virtualSize (vhdsync keeps them equal, as for a new disk) and the CHS
// geometry recomputed for it. It does not validate the size against
// Azure's rules; call ValidateVirtualSize first.
func (f Footer) Resized(virtualSize uint64) Footer {
	f.OriginalSize = virtualSize
	f.CurrentSize = virtualSize
	f.Geometry = GeometryForSize(virtualSize)
	return f
}
