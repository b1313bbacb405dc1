package intentlog

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"

	"github.com/vhdsync/vhdsync/journal/internal/files"
)

// The file format (see the package comment).
const (
	// SlotSize is the size of a slot: an entry, or a part of an inline
	// payload.
	SlotSize = 128
	// HeaderSize is the size of a file's header block; slot i starts at
	// HeaderSize + i*SlotSize.
	HeaderSize = 4096
	// InlineHeader is the payload length and CRC-32C that come before an
	// inline payload, in the slot after its entry's.
	InlineHeader = 8
	// DefaultSlots is the number of slots of a file when New is given 0:
	// 8 MiB of slots.
	DefaultSlots = 64 << 10

	ilogMagic      = 0x766c6f67 // "vlog"
	slotMagic      = 0x76736c74 // "vslt"
	ilogHeaderUsed = 40         // the bytes of the header block in use
	slotKeyOff     = 32
	slotKeyMax     = 24
	slotValOff     = slotKeyOff + slotKeyMax
	slotValMax     = SlotSize - slotValOff
)

// Entry is one index change the journal logs: set Key to Val, or delete
// Key (Del). Key must fit 24 bytes and Val 72, the room in a slot.
// Inline, if set, is a payload carried with the entry.
type Entry struct {
	Key, Val []byte
	Del      bool
	Inline   *Inline
}

// Inline is a payload carried in the log with its entry (see the package
// comment). Write points Data at the log's own copy, which stays valid
// after the caller reuses its buffer: the journal writes that copy to the
// payload's segment later.
type Inline struct {
	Data []byte
	CRC  uint32 // CRC-32C of Data, checked by Read: a torn payload voids its entry
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc32c(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// Name is the file name of intent log file id.
func Name(id uint64) string { return fmt.Sprintf("ilog-%016x.dat", id) }

// MaxInline is the largest inline payload Write takes in files of slots
// slots (0 means DefaultSlots): with its entry it must fit a quarter of a
// file.
func MaxInline(slots int64) int64 {
	if slots <= 0 {
		slots = DefaultSlots
	}
	return (slots/4-1)*SlotSize - InlineHeader
}

// inlineSlots is how many slots an n-byte inline payload takes.
func inlineSlots(n int) int64 { return int64(InlineHeader+n+SlotSize-1) / SlotSize }

// entrySlots is how many slots e takes: its own and its payload's.
func entrySlots(e Entry) int64 {
	if e.Inline == nil {
		return 1
	}
	return 1 + inlineSlots(len(e.Inline.Data))
}

// header is lf's header block (its used part).
func (lf *File) header() []byte {
	h := make([]byte, ilogHeaderUsed)
	binary.LittleEndian.PutUint32(h[0:], ilogMagic)
	binary.LittleEndian.PutUint64(h[8:], lf.id)
	binary.LittleEndian.PutUint64(h[16:], lf.gen)
	binary.LittleEndian.PutUint64(h[24:], lf.inc)
	binary.LittleEndian.PutUint64(h[32:], uint64(lf.slots))
	binary.LittleEndian.PutUint32(h[4:], crc32c(h[8:]))
	return h
}

// encodeSlot fills slot b (index of a file of incarnation inc) with e,
// followed by data payload slots.
func encodeSlot(b []byte, inc, index uint64, e Entry, data int64) {
	clear(b)
	binary.LittleEndian.PutUint32(b[0:], slotMagic)
	binary.LittleEndian.PutUint64(b[8:], inc)
	binary.LittleEndian.PutUint64(b[16:], index)
	if e.Del {
		b[24] = 1
	}
	b[25], b[26] = byte(len(e.Key)), byte(len(e.Val))
	if data > 0 {
		b[27] = 1
		binary.LittleEndian.PutUint32(b[28:], uint32(data))
	}
	copy(b[slotKeyOff:], e.Key)
	copy(b[slotValOff:], e.Val)
	binary.LittleEndian.PutUint32(b[4:], crc32c(b[8:]))
}

// decodeSlot returns the entry of slot index of a file of incarnation
// inc and how many payload slots follow it, or ok false if the slot does
// not hold one.
func decodeSlot(b []byte, inc, index uint64) (e Entry, data int64, ok bool) {
	if binary.LittleEndian.Uint32(b[0:]) != slotMagic || binary.LittleEndian.Uint32(b[4:]) != crc32c(b[8:SlotSize]) ||
		binary.LittleEndian.Uint64(b[8:]) != inc || binary.LittleEndian.Uint64(b[16:]) != index ||
		b[24] > 1 || b[25] > slotKeyMax || b[26] > slotValMax || b[27] > 1 {
		return Entry{}, 0, false
	}
	e.Del = b[24] == 1
	e.Key = append([]byte(nil), b[slotKeyOff:slotKeyOff+int(b[25])]...)
	if b[26] > 0 {
		e.Val = append([]byte(nil), b[slotValOff:slotValOff+int(b[26])]...)
	}
	if b[27] == 1 {
		data = int64(binary.LittleEndian.Uint32(b[28:]))
		if data == 0 {
			return Entry{}, 0, false
		}
	}
	return e, data, true
}

// putInline writes in's length, CRC and payload into its slots p, and
// points in.Data at that copy.
func putInline(p []byte, in *Inline) {
	binary.LittleEndian.PutUint32(p[0:], uint32(len(in.Data)))
	binary.LittleEndian.PutUint32(p[4:], in.CRC)
	copy(p[InlineHeader:], in.Data)
	in.Data = p[InlineHeader : InlineHeader+len(in.Data)]
}

// decodeInline returns the payload in slots p (written by putInline), or
// ok false if its length or CRC does not check (a torn write).
func decodeInline(p []byte) ([]byte, uint32, bool) {
	n := int64(binary.LittleEndian.Uint32(p[0:]))
	if inlineSlots(int(n)) != int64(len(p))/SlotSize {
		return nil, 0, false
	}
	data := p[InlineHeader : InlineHeader+n]
	crc := binary.LittleEndian.Uint32(p[4:])
	if crc32c(data) != crc {
		return nil, 0, false
	}
	return data, crc, true
}

// List returns the ids of the intent log files in dir, sorted.
func List(dir string) ([]uint64, error) {
	ids, err := files.ListNumbered(dir, "ilog-")
	if err != nil {
		return nil, fmt.Errorf("list intent logs: %w", err)
	}
	return ids, nil
}

// Read returns the generation of file id in dir and its valid entries, in
// slot order. A file whose header does not check (a kill while it was
// being made), or never started (generation 0), holds none. Replaying
// files in generation order replays entries in the order they were
// written.
func Read(dir string, id uint64) (gen uint64, entries []Entry, err error) {
	b, err := os.ReadFile(filepath.Join(dir, Name(id)))
	if err != nil {
		return 0, nil, fmt.Errorf("read intent log: %w", err)
	}
	if len(b) < HeaderSize || binary.LittleEndian.Uint32(b[0:]) != ilogMagic ||
		binary.LittleEndian.Uint32(b[4:]) != crc32c(b[8:ilogHeaderUsed]) || binary.LittleEndian.Uint64(b[8:]) != id {
		return 0, nil, nil
	}
	gen = binary.LittleEndian.Uint64(b[16:])
	inc := binary.LittleEndian.Uint64(b[24:])
	slots := int64(binary.LittleEndian.Uint64(b[32:]))
	slots = min(slots, int64(len(b)-HeaderSize)/SlotSize)
	if gen == 0 {
		return 0, nil, nil
	}
	for i := int64(0); i < slots; i++ {
		off := HeaderSize + i*SlotSize
		e, data, ok := decodeSlot(b[off:off+SlotSize], inc, uint64(i))
		if !ok {
			continue
		}
		if data > 0 {
			// The payload's slots are skipped whether it checks or not:
			// they were written with the entry, in one pwrite.
			end := i + 1 + data
			if end > slots {
				break
			}
			payload, crc, ok := decodeInline(b[off+SlotSize : HeaderSize+end*SlotSize])
			i = end - 1
			if !ok {
				continue
			}
			e.Inline = &Inline{Data: payload, CRC: crc}
		}
		entries = append(entries, e)
	}
	return gen, entries, nil
}
