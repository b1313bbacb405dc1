package main

import (
	"os"
	"testing"
	"time"
)

var vhdTime = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// writeDisk writes a sparse file of size bytes followed by tail.
func writeDisk(t *testing.T, path string, size uint64, tail []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(tail, int64(size)); err != nil {
		t.Fatal(err)
	}
}
