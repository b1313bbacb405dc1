// Package segfile is the format of a staged segment: one flusher batch
// (whole epochs of the journal, already coalesced) packed for the staged
// transfer, where the daemon uploads compressed segments to a staging
// container and an apply worker near the storage turns them into Put Page
// and Clear Pages calls.
//
// A segment is
//
//	magic "VHDSSEG1" | u32 header length | header (JSON) | u32 CRC-32C of the header
//	| zstd frame of the payload
//
// and the payload, once decompressed, is
//
//	u32 range count | count × (u64 offset, u64 length | zero flag in bit 63) | data
//
// where data is the bytes of every non-zero range, in table order. The
// header names the disk (the VHD footer's UUID), the journal epochs and
// sequence numbers the segment covers, and carries the payload's length and
// CRC-64 (ECMA), so a corrupt or foreign segment is refused before any of it
// reaches the blob.
//
// Ordering lives in the header too: PrevEpoch is the last epoch the writer
// had staged (or the blob held) before this segment. A worker that has
// applied up to epoch A may apply a segment iff PrevEpoch <= A < LastEpoch;
// a segment with LastEpoch <= A is already on the blob, and one with
// PrevEpoch > A must wait for an earlier segment. Names sort in that order.
package segfile

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"hash/crc64"
	"strconv"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
)

// Magic starts every segment.
const Magic = "VHDSSEG1"

// Version is the header version this code writes and reads.
const Version = 1

// MaxPayload bounds the decompressed payload a reader accepts, so a
// corrupt or hostile header cannot make it allocate without limit.
const MaxPayload = 1 << 30

// ErrCorrupt: the segment's bytes are damaged (magic, checksums, lengths,
// ranges).
var ErrCorrupt = errors.New("staged segment is corrupt")

// ErrOtherDisk: the segment was written for another disk.
var ErrOtherDisk = errors.New("staged segment belongs to another disk")

var (
	crcTable  = crc64.MakeTable(crc64.ECMA)
	castagnol = crc32.MakeTable(crc32.Castagnoli)
)

// Header describes a segment.
type Header struct {
	Version    int    `json:"v"`
	DiskID     string `json:"disk_id"`
	PrevEpoch  uint64 `json:"prev_epoch"`
	FirstEpoch uint64 `json:"first_epoch"`
	LastEpoch  uint64 `json:"last_epoch"`
	FirstSeq   uint64 `json:"first_seq"`
	LastSeq    uint64 `json:"last_seq"`
	// Ranges is the number of ranges; DataBytes and ZeroBytes what they
	// cover.
	Ranges    int   `json:"ranges"`
	DataBytes int64 `json:"data_bytes"`
	ZeroBytes int64 `json:"zero_bytes"`
	// PayloadLen and PayloadCRC64 describe the decompressed payload;
	// Compressed is the length of the zstd frame that follows the header.
	PayloadLen   int64     `json:"payload_len"`
	PayloadCRC64 uint64    `json:"payload_crc64"`
	Compressed   int64     `json:"compressed"`
	Created      time.Time `json:"created"`
}

// Range is one disk range of a segment: Data for a write (len(Data) ==
// Len), or Zero for a range to clear.
type Range struct {
	Off, Len int64
	Zero     bool
	Data     []byte
}

const zeroFlag = uint64(1) << 63

// Name is the blob name of a segment: listing returns names in the order a
// worker applies them (PrevEpoch, then LastEpoch).
func Name(prev, last uint64) string {
	return fmt.Sprintf("seg-%020d-%020d.vseg", prev, last)
}

// ParseName is Name's inverse; ok is false for any other name.
func ParseName(name string) (prev, last uint64, ok bool) {
	s, found := strings.CutPrefix(name, "seg-")
	if !found {
		return 0, 0, false
	}
	s, found = strings.CutSuffix(s, ".vseg")
	if !found || len(s) != 41 || s[20] != '-' {
		return 0, 0, false
	}
	p, err1 := strconv.ParseUint(s[:20], 10, 64)
	l, err2 := strconv.ParseUint(s[21:], 10, 64)
	if err1 != nil || err2 != nil || p >= l {
		return 0, 0, false
	}
	return p, l, true
}

// Encode packs h and ranges into a segment, filling in the header's
// counts, lengths and checksum. enc may be shared between goroutines.
func Encode(h Header, ranges []Range, enc *zstd.Encoder) ([]byte, error) {
	if h.PrevEpoch >= h.LastEpoch || h.FirstEpoch > h.LastEpoch {
		return nil, fmt.Errorf("encode segment: epochs prev %d first %d last %d out of order", h.PrevEpoch, h.FirstEpoch, h.LastEpoch)
	}
	h.Version = Version
	h.Ranges = len(ranges)
	h.DataBytes, h.ZeroBytes = 0, 0
	size := 4 + 16*len(ranges)
	for _, r := range ranges {
		if r.Zero {
			h.ZeroBytes += r.Len
			continue
		}
		if int64(len(r.Data)) != r.Len {
			return nil, fmt.Errorf("encode segment: range %d+%d holds %d bytes", r.Off, r.Len, len(r.Data))
		}
		h.DataBytes += r.Len
		size += len(r.Data)
	}
	if size > MaxPayload {
		return nil, fmt.Errorf("encode segment: payload of %d bytes is above the %d-byte limit", size, MaxPayload)
	}
	payload := make([]byte, 0, size)
	payload = binary.BigEndian.AppendUint32(payload, uint32(len(ranges)))
	for _, r := range ranges {
		l := uint64(r.Len)
		if r.Zero {
			l |= zeroFlag
		}
		payload = binary.BigEndian.AppendUint64(payload, uint64(r.Off))
		payload = binary.BigEndian.AppendUint64(payload, l)
	}
	for _, r := range ranges {
		if !r.Zero {
			payload = append(payload, r.Data...)
		}
	}
	h.PayloadLen = int64(len(payload))
	h.PayloadCRC64 = crc64.Checksum(payload, crcTable)
	compressed := enc.EncodeAll(payload, nil)
	h.Compressed = int64(len(compressed))
	if h.Created.IsZero() {
		h.Created = time.Now().UTC()
	}
	hj, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("encode segment header: %w", err)
	}
	out := make([]byte, 0, len(Magic)+8+len(hj)+len(compressed))
	out = append(out, Magic...)
	out = binary.BigEndian.AppendUint32(out, uint32(len(hj)))
	out = append(out, hj...)
	out = binary.BigEndian.AppendUint32(out, crc32.Checksum(hj, castagnol))
	return append(out, compressed...), nil
}

// DecodeHeader reads and checks a segment's header; it returns the header
// and the offset of the compressed payload.
func DecodeHeader(b []byte) (Header, int, error) {
	var h Header
	if len(b) < len(Magic)+8 || string(b[:len(Magic)]) != Magic {
		return h, 0, fmt.Errorf("%w: no segment magic", ErrCorrupt)
	}
	n := int(binary.BigEndian.Uint32(b[len(Magic):]))
	start := len(Magic) + 4
	if n > len(b)-start-4 {
		return h, 0, fmt.Errorf("%w: header length %d beyond the %d-byte segment", ErrCorrupt, n, len(b))
	}
	hj := b[start : start+n]
	if got, want := crc32.Checksum(hj, castagnol), binary.BigEndian.Uint32(b[start+n:]); got != want {
		return h, 0, fmt.Errorf("%w: header checksum %08x, expected %08x", ErrCorrupt, got, want)
	}
	dec := json.NewDecoder(bytes.NewReader(hj))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return h, 0, fmt.Errorf("%w: header: %w", ErrCorrupt, err)
	}
	if h.Version != Version {
		return h, 0, fmt.Errorf("%w: header version %d, this vhdsync reads %d (upgrade the worker)", ErrCorrupt, h.Version, Version)
	}
	off := start + n + 4
	if h.Compressed != int64(len(b)-off) {
		return h, 0, fmt.Errorf("%w: payload is %d bytes, header says %d (truncated upload?)", ErrCorrupt, len(b)-off, h.Compressed)
	}
	if h.PayloadLen < 4 || h.PayloadLen > MaxPayload || h.PrevEpoch >= h.LastEpoch || h.FirstEpoch > h.LastEpoch {
		return h, 0, fmt.Errorf("%w: header fields out of range (payload %d, epochs %d/%d/%d)", ErrCorrupt, h.PayloadLen, h.PrevEpoch, h.FirstEpoch, h.LastEpoch)
	}
	return h, off, nil
}

// Decode checks a whole segment against diskID and diskSize (the virtual
// size: no range may reach the footer) and returns its header and ranges.
// Range data aliases one decompressed buffer.
func Decode(b []byte, dec *zstd.Decoder, diskID string, diskSize int64) (Header, []Range, error) {
	h, off, err := DecodeHeader(b)
	if err != nil {
		return h, nil, err
	}
	if h.DiskID != diskID {
		return h, nil, fmt.Errorf("%w: it names disk %s, this blob is disk %s (staging container shared, or the wrong --blob?)", ErrOtherDisk, h.DiskID, diskID)
	}
	// The header is checksummed but not trusted with a large allocation.
	payload, err := dec.DecodeAll(b[off:], make([]byte, 0, min(h.PayloadLen, 64<<20)))
	if err != nil {
		return h, nil, fmt.Errorf("%w: decompress: %w", ErrCorrupt, err)
	}
	if int64(len(payload)) != h.PayloadLen {
		return h, nil, fmt.Errorf("%w: payload decompressed to %d bytes, header says %d", ErrCorrupt, len(payload), h.PayloadLen)
	}
	if got := crc64.Checksum(payload, crcTable); got != h.PayloadCRC64 {
		return h, nil, fmt.Errorf("%w: payload CRC-64 %016x, expected %016x", ErrCorrupt, got, h.PayloadCRC64)
	}
	count := int(binary.BigEndian.Uint32(payload))
	if count != h.Ranges || int64(4+16*count) > h.PayloadLen {
		return h, nil, fmt.Errorf("%w: %d ranges in the table, header says %d", ErrCorrupt, count, h.Ranges)
	}
	ranges := make([]Range, count)
	data := payload[4+16*count:]
	var end int64
	for i := range ranges {
		t := payload[4+16*i:]
		off := int64(binary.BigEndian.Uint64(t))
		l := binary.BigEndian.Uint64(t[8:])
		r := Range{Off: off, Len: int64(l &^ zeroFlag), Zero: l&zeroFlag != 0}
		if r.Off < end || r.Len <= 0 || r.Off%512 != 0 || r.Len%512 != 0 || r.Off > diskSize-r.Len {
			return h, nil, fmt.Errorf("%w: range %d (%d+%d) unaligned, overlapping or beyond the %d-byte disk", ErrCorrupt, i, r.Off, r.Len, diskSize)
		}
		end = r.Off + r.Len
		if !r.Zero {
			if int64(len(data)) < r.Len {
				return h, nil, fmt.Errorf("%w: range %d needs %d data bytes, %d left", ErrCorrupt, i, r.Len, len(data))
			}
			r.Data, data = data[:r.Len], data[r.Len:]
		}
		ranges[i] = r
	}
	if len(data) != 0 {
		return h, nil, fmt.Errorf("%w: %d data bytes after the last range", ErrCorrupt, len(data))
	}
	return h, ranges, nil
}

// NewEncoder returns the zstd encoder segments are written with.
func NewEncoder() (*zstd.Encoder, error) {
	return zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderCRC(true))
}

// NewDecoder returns a zstd decoder whose memory use is bounded for
// segments.
func NewDecoder() (*zstd.Decoder, error) {
	return zstd.NewReader(nil, zstd.WithDecoderMaxMemory(MaxPayload+(1<<20)), zstd.WithDecoderConcurrency(0))
}
