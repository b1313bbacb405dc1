package durable

import (
	"os"
	"path/filepath"
	"testing"
)

// TestWriteFileReplaces: WriteFile creates and then replaces the file
// whole, mode 0600, leaving no temporary file; MkdirAll makes missing
// parents.
func TestWriteFileReplaces(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	if err := MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "f.json")
	for _, want := range []string{"first, longer contents\n", "second\n"} {
		if err := WriteFile(p, []byte(want)); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != want {
			t.Fatalf("read back %q (%v), want %q", got, err, want)
		}
	}
	if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v (%v), want 0600", st.Mode().Perm(), err)
	}
	if _, err := os.Stat(p + ".tmp"); !os.IsNotExist(err) {
		t.Fatalf("the temporary file is left: %v", err)
	}
	if err := WriteFile(filepath.Join(dir, "missing", "f"), []byte("x")); err == nil {
		t.Fatal("WriteFile into a missing directory succeeded")
	}
}
