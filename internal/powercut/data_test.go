package powercut

import (
	"bytes"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"pgregory.net/rapid"
)

// TestFileDataModel runs random writes, zeroed ranges, truncates, fsyncs
// and cuts on a fileData against the model: live bytes and durable bytes.
// Reads always show the live bytes; an fsync makes the durable bytes the
// live ones (and so the backing file); a cut makes the live bytes the
// durable ones.
func TestFileDataModel(t *testing.T) {
	dir := t.TempDir()
	n := 0
	rapid.Check(t, func(rt *rapid.T) {
		n++
		path := filepath.Join(dir, "f"+string(rune('a'+n%26))+rapid.StringMatching(`[0-9]{6}`).Draw(rt, "name"))
		// Random bytes from a seed: rapid's own byte generator favours zeros,
		// which would hide a zero range that failed to zero.
		bytesOf := func(n int) []byte {
			b := make([]byte, n)
			rand.New(rand.NewSource(rapid.Int64().Draw(rt, "seed"))).Read(b)
			return b
		}
		init := bytesOf(rapid.IntRange(0, 3*pageSize).Draw(rt, "initlen"))
		if err := os.WriteFile(path, init, 0o600); err != nil {
			rt.Fatal(err)
		}
		bf, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			rt.Fatal(err)
		}
		defer func() { bf.Close(); os.Remove(path) }()
		d, err := newFileData(bf)
		if err != nil {
			rt.Fatal(err)
		}
		live, durable := bytes.Clone(init), bytes.Clone(init)
		const maxSize = 6 * pageSize
		offGen := rapid.Int64Range(0, maxSize)
		check := func(what string) {
			got := make([]byte, maxSize+4*pageSize)
			k, err := d.read(got, 0)
			if err != nil {
				rt.Fatal(err)
			}
			if !bytes.Equal(got[:k], live) {
				rt.Fatalf("after %s: reads %d bytes, want %d (first difference at %d)", what, k, len(live), firstDiff(got[:k], live))
			}
			if off := offGen.Draw(rt, "readoff"); off < int64(len(live)) {
				end := min(int64(len(live)), off+rapid.Int64Range(1, 2*pageSize).Draw(rt, "readlen"))
				part := make([]byte, end-off)
				if k, err := d.read(part, off); err != nil || !bytes.Equal(part[:k], live[off:end]) {
					rt.Fatalf("after %s: read %d+%d differs (%v)", what, off, end-off, err)
				}
			}
		}
		for range rapid.IntRange(1, 40).Draw(rt, "ops") {
			switch op := rapid.IntRange(0, 6).Draw(rt, "op"); op {
			case 0, 1: // write
				off := offGen.Draw(rt, "off")
				b := bytesOf(rapid.IntRange(1, 2*pageSize).Draw(rt, "len"))
				if rapid.Bool().Draw(rt, "zeros") {
					clear(b)
				}
				if err := d.write(b, off); err != nil {
					rt.Fatal(err)
				}
				if end := off + int64(len(b)); end > int64(len(live)) {
					live = append(live, make([]byte, end-int64(len(live)))...)
				}
				copy(live[off:], b)
				check("write")
			case 2: // punch or zero a range
				off := offGen.Draw(rt, "off")
				end := off + rapid.Int64Range(1, 3*pageSize).Draw(rt, "len")
				if err := d.zero(off, end); err != nil {
					rt.Fatal(err)
				}
				if off < int64(len(live)) {
					clear(live[off:min(end, int64(len(live)))])
				}
				check("zero")
			case 3: // truncate
				size := offGen.Draw(rt, "size")
				d.truncate(size)
				if size <= int64(len(live)) {
					live = live[:size]
				} else {
					live = append(live, make([]byte, size-int64(len(live)))...)
				}
				check("truncate")
			case 4: // fsync
				if err := d.flush(); err != nil {
					rt.Fatal(err)
				}
				durable = bytes.Clone(live)
				onDisk, err := os.ReadFile(path)
				if err != nil || !bytes.Equal(onDisk, durable) {
					rt.Fatalf("after fsync the backing file differs from the live file (%v), first at %d", err, firstDiff(onDisk, durable))
				}
				if d.dirty() {
					rt.Fatal("dirty after fsync")
				}
				check("fsync")
			case 5: // power cut
				d.drop()
				live = bytes.Clone(durable)
				check("cut")
			case 6: // unsynced figure
				if d.dirty() != (d.unsynced() > 0 || d.size != d.dsize || d.valid != d.dsize) {
					rt.Fatal("dirty and unsynced disagree")
				}
			}
		}
		d.drop()
		live = durable
		check("final cut")
		onDisk, _ := os.ReadFile(path)
		if !bytes.Equal(onDisk, durable) {
			rt.Fatalf("the backing file is not the durable contents, first difference at %d", firstDiff(onDisk, durable))
		}
	})
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
