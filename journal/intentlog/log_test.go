package intentlog

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// key is a 9-byte index key ending in seq, as the journal's record keys.
func key(seq uint64) []byte {
	k := make([]byte, 9)
	k[0] = 'r'
	binary.BigEndian.PutUint64(k[1:], seq)
	return k
}

// TestIntentLogSlots: a recycled file's earlier slots, a torn slot and a
// slot copied to another index are all ignored; replay follows the
// generations, not the file names.
func TestIntentLogSlots(t *testing.T) {
	dir := t.TempDir()
	l := New(dir, 4, 1, 0)
	defer l.Close(false)
	kv := func(i int) Entry { return Entry{Key: key(uint64(i)), Val: []byte{byte(i)}} }
	if _, err := l.Write([]Entry{kv(1), kv(2), kv(3), kv(4)}); err != nil {
		t.Fatal(err)
	}
	first := l.cur
	if _, err := l.Write([]Entry{kv(5)}); err != nil { // rotates to a second file
		t.Fatal(err)
	}
	if l.cur == first {
		t.Fatal("no rotation after 4 slots")
	}
	// The first file is full and, say, in badger: recycle it; it becomes
	// the third file (generation 3) with one entry.
	first.resolved.Store(first.used)
	if err := l.Recycle(l.Done()); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Write([]Entry{kv(6), kv(7), kv(8)}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Write([]Entry{kv(9)}); err != nil {
		t.Fatal(err)
	}
	if l.cur != first {
		t.Fatalf("the recycled file was not reused (current %s)", Name(l.cur.id))
	}
	type result struct {
		gen  uint64
		keys []byte
	}
	read := func() map[uint64]result {
		ids, err := List(dir)
		if err != nil {
			t.Fatal(err)
		}
		out := map[uint64]result{}
		for _, id := range ids {
			gen, kvs, err := Read(dir, id)
			if err != nil {
				t.Fatal(err)
			}
			var keys []byte
			for _, e := range kvs {
				keys = append(keys, byte(e.Key[8]))
			}
			out[id] = result{gen, keys}
		}
		return out
	}
	got := read()
	if r := got[first.id]; r.gen != 3 || !bytes.Equal(r.keys, []byte{9}) {
		t.Fatalf("recycled file: generation %d entries %v, want 3 [9] (its first use's slots void)", r.gen, r.keys)
	}
	second := got[first.id+1]
	if second.gen != 2 || !bytes.Equal(second.keys, []byte{5, 6, 7, 8}) {
		t.Fatalf("second file: generation %d entries %v, want 2 [5 6 7 8]", second.gen, second.keys)
	}
	// A torn slot, and a valid slot copied to another index, are ignored.
	f := l.files[first.id+1].f
	b := make([]byte, SlotSize)
	if _, err := f.ReadAt(b, HeaderSize+SlotSize); err != nil {
		t.Fatal(err)
	}
	b[slotValOff] ^= 0xff
	if _, err := f.WriteAt(b, HeaderSize+SlotSize); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(b, HeaderSize); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, HeaderSize+3*SlotSize); err != nil {
		t.Fatal(err)
	}
	if r := read()[first.id+1]; !bytes.Equal(r.keys, []byte{5, 7}) {
		t.Fatalf("after tearing slot 1 and copying slot 0 over slot 3: entries %v, want [5 7]", r.keys)
	}
}
