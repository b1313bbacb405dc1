package journal

import (
	"encoding/binary"
	"fmt"
	"time"
)

// Kind is what a journal record does to its range.
type Kind uint8

// Record kinds. Zero and Discard both read back as zeros and are sent as
// Clear Pages; they differ only in what the local image does (discard
// punches a hole, zero writes zeros without necessarily freeing space).
const (
	KindData    Kind = 1
	KindZero    Kind = 2
	KindDiscard Kind = 3
)

// String names the kind.
func (k Kind) String() string {
	switch k {
	case KindData:
		return "data"
	case KindZero:
		return "zero"
	case KindDiscard:
		return "discard"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// SectorSize is the journal's alignment: every record covers whole
// 512-byte sectors.
const SectorSize = 512

// Record is one journaled change to the disk.
type Record struct {
	Seq    uint64
	Epoch  uint64
	Offset int64
	Length int64
	Kind   Kind
	// Time is when the write was journaled (for the replica-lag metric).
	Time time.Time
	// Data holds Length bytes for KindData, nothing otherwise.
	Data []byte

	// Where the payload of a data record lives: segment file, offset in
	// it, and the CRC-32C of the payload (checked on every read).
	seg    uint64
	segOff int64
	crc    uint32
	// captured: an image-backed record whose bytes a capture copied to
	// the segment (see imagerec.go). Stored as the kind byte's top bit.
	captured bool
}

// End is Offset+Length.
func (r *Record) End() int64 { return r.Offset + r.Length }

// IndexSize is the size of a record's index entry in badger: what a
// pending record costs the journal beyond its payload.
const IndexSize = 8 + 8 + 8 + 1 + 8 + 8 + 8 + 4 // epoch, offset, length, kind, time, seg, segOff, crc

// encode serialises the record's index entry (the seq is the key; the
// payload lives in a segment file).
func (r *Record) encode() []byte {
	b := make([]byte, IndexSize)
	be := binary.BigEndian
	be.PutUint64(b[0:], r.Epoch)
	be.PutUint64(b[8:], uint64(r.Offset))
	be.PutUint64(b[16:], uint64(r.Length))
	b[24] = byte(r.Kind)
	if r.captured {
		b[24] |= capturedFlag
	}
	be.PutUint64(b[25:], uint64(r.Time.UnixNano()))
	be.PutUint64(b[33:], r.seg)
	be.PutUint64(b[41:], uint64(r.segOff))
	be.PutUint32(b[49:], r.crc)
	return b
}

// capturedFlag is the kind byte's bit that marks a captured record.
const capturedFlag = 0x80

// decodeRecord parses an index entry (without the payload).
func decodeRecord(seq uint64, b []byte) (Record, error) {
	if len(b) != IndexSize {
		return Record{}, fmt.Errorf("journal record %d: index entry of %d bytes, want %d", seq, len(b), IndexSize)
	}
	be := binary.BigEndian
	r := Record{
		Seq:    seq,
		Epoch:  be.Uint64(b[0:]),
		Offset: int64(be.Uint64(b[8:])),
		Length: int64(be.Uint64(b[16:])),
		Kind:   Kind(b[24] &^ capturedFlag),
		Time:   time.Unix(0, int64(be.Uint64(b[25:]))),
		seg:    be.Uint64(b[33:]),
		segOff: int64(be.Uint64(b[41:])),
		crc:    be.Uint32(b[49:]),

		captured: b[24]&capturedFlag != 0,
	}
	if err := r.check(); err != nil {
		return Record{}, fmt.Errorf("journal record %d: %w", seq, err)
	}
	return r, nil
}

func (r *Record) check() error {
	switch {
	case r.Kind != KindData && r.Kind != KindZero && r.Kind != KindDiscard:
		return fmt.Errorf("unknown kind %d", r.Kind)
	case r.Offset < 0 || r.Length <= 0:
		return fmt.Errorf("bad range %d+%d", r.Offset, r.Length)
	case r.Offset%SectorSize != 0 || r.Length%SectorSize != 0:
		return fmt.Errorf("range %d+%d is not 512-byte aligned", r.Offset, r.Length)
	}
	return nil
}

// payloadSize is the number of journal bytes the record accounts for in
// the backpressure cap (from Length, so it is right with or without Data).
func (r *Record) payloadSize() int64 {
	if r.Kind == KindData {
		return r.Length + IndexSize
	}
	return IndexSize
}

// InImage reports whether the record's payload lives in the local image
// only, not in a segment, and was written by the removed
// mount --write-once. It stays because a state directory left by a
// binary that had it may still hold pending ones, whose only copy is the
// image: replay must leave that alone rather than ask for a segment that
// does not exist (see legacy.go). This binary's image-backed records
// (ImageBacked, imagerec.go) are captured by recovery instead.
func (r *Record) InImage() bool { return r.Kind == KindData && r.seg == 0 }
