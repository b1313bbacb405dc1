package transfer

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vhdsync/vhdsync/azure/pageblob"
)

// TestSplitChanged: changed ranges are read where the point has valid
// pages and punched where it has none, within the disk.
func TestSplitChanged(t *testing.T) {
	changed := []pageblob.Range{{Off: 0, Len: 4096}, {Off: 8192, Len: 8192}, {Off: 1 << 20, Len: 1 << 20}}
	valid := []pageblob.Range{{Off: 1024, Len: 1024}, {Off: 12288, Len: 8192}, {Off: 1<<20 + 512, Len: 512}, {Off: 3 << 20, Len: 512}}
	reads, holes := splitChanged(changed, valid, 1<<20+4096)
	if want := []span{{1024, 2048}, {12288, 16384}, {1<<20 + 512, 1<<20 + 1024}}; !slices.Equal(reads, want) {
		t.Errorf("reads %v, want %v", reads, want)
	}
	if want := []span{{0, 1024}, {2048, 4096}, {8192, 12288}, {1 << 20, 1<<20 + 512}, {1<<20 + 1024, 1<<20 + 4096}}; !slices.Equal(holes, want) {
		t.Errorf("holes %v, want %v", holes, want)
	}
}

// TestPointRecordChecks: the record's refusals, each ErrNotPointCopy.
func TestPointRecordChecks(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "d.vhd")
	if err := os.WriteFile(file, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	const blob = "http://127.0.0.1:1/acct/c/b.vhd"
	if _, err := CheckPointRecord(file, blob, "A", "B", nil); !errorsIsNotPoint(err) {
		t.Fatalf("no record: %v", err)
	}
	if err := WritePointRecord(file, PointRecord{Blob: blob, Point: "A", Epoch: 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckPointRecord(file, blob, "A", "B", nil); err != nil {
		t.Fatalf("the right point: %v", err)
	}
	raw := true
	for name, err := range map[string]error{
		"other point": func() error { _, err := CheckPointRecord(file, blob, "X", "B", nil); return err }(),
		"other blob":  func() error { _, err := CheckPointRecord(file, blob+"x", "A", "B", nil); return err }(),
		"raw":         func() error { _, err := CheckPointRecord(file, blob, "A", "B", &raw); return err }(),
	} {
		if !errorsIsNotPoint(err) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if err := os.WriteFile(file, make([]byte, 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckPointRecord(file, blob, "A", "B", nil); !errorsIsNotPoint(err) {
		t.Fatalf("file changed: %v", err)
	}
	if err := RemovePointRecord(file); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(PointRecordPath(file)); !os.IsNotExist(err) {
		t.Fatalf("record not removed: %v", err)
	}
}

func errorsIsNotPoint(err error) bool { return err != nil && errors.Is(err, ErrNotPointCopy) }
