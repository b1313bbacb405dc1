package pageblob

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"
)

// TestVecReader: the buffers read back to back as one body, whatever the
// read sizes, empty buffers included, and again after any seek (the SDK
// seeks to the end to measure the body and to the start to retry it).
func TestVecReader(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		var bufs [][]byte
		var want []byte
		for range rng.IntN(6) {
			b := make([]byte, rng.IntN(3)*rng.IntN(700))
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			bufs = append(bufs, b)
			want = append(want, b...)
		}
		r := newVecReader(bufs)
		if n, err := r.Seek(0, io.SeekEnd); err != nil || n != int64(len(want)) {
			t.Fatalf("seek to end: %d, %v; want %d", n, err, len(want))
		}
		start := rng.Int64N(int64(len(want)) + 1)
		if n, err := r.Seek(start, io.SeekStart); err != nil || n != start {
			t.Fatalf("seek to %d: %d, %v", start, n, err)
		}
		var got []byte
		for {
			p := make([]byte, 1+rng.IntN(500))
			n, err := r.Read(p)
			got = append(got, p[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(got, want[start:]) {
			t.Fatalf("read from %d of %d bytes in %d buffers: got %d bytes, differing", start, len(want), len(bufs), len(got))
		}
		if n, err := r.Seek(-int64(len(want))+start, io.SeekCurrent); err != nil || n != start {
			t.Fatalf("seek back to %d: %d, %v", start, n, err)
		}
	}
}
