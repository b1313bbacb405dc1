package segfile

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

const testDisk = "0b7e2f1c-3d0a-4c1e-9f5a-1a2b3c4d5e6f"

func testRanges(rng *rand.Rand) []Range {
	var out []Range
	off := int64(0)
	for i := 0; i < 20; i++ {
		off += int64(rng.IntN(8)) * 512
		l := int64(1+rng.IntN(16)) * 512
		r := Range{Off: off, Len: l, Zero: rng.IntN(4) == 0}
		if !r.Zero {
			r.Data = make([]byte, l)
			if rng.IntN(2) == 0 {
				for j := range r.Data {
					r.Data[j] = byte(rng.IntN(256))
				}
			} else {
				copy(r.Data, bytes.Repeat([]byte("compressible "), int(l)/13+1))
			}
		}
		out = append(out, r)
		off += l
	}
	return out
}

func encodeTest(t testing.TB, ranges []Range) []byte {
	t.Helper()
	enc, err := NewEncoder()
	if err != nil {
		t.Fatal(err)
	}
	b, err := Encode(Header{DiskID: testDisk, PrevEpoch: 4, FirstEpoch: 5, LastEpoch: 9, FirstSeq: 100, LastSeq: 180}, ranges, enc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	ranges := testRanges(rng)
	b := encodeTest(t, ranges)
	dec, _ := NewDecoder()
	h, got, err := Decode(b, dec, testDisk, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if h.PrevEpoch != 4 || h.LastEpoch != 9 || h.FirstSeq != 100 || h.Ranges != len(ranges) {
		t.Fatalf("header %+v", h)
	}
	if len(got) != len(ranges) {
		t.Fatalf("%d ranges, want %d", len(got), len(ranges))
	}
	for i := range got {
		if got[i].Off != ranges[i].Off || got[i].Len != ranges[i].Len || got[i].Zero != ranges[i].Zero || !bytes.Equal(got[i].Data, ranges[i].Data) {
			t.Fatalf("range %d differs", i)
		}
	}
}

// Every single flipped byte anywhere in a segment must be refused.
func TestEveryCorruptionRefused(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	b := encodeTest(t, testRanges(rng))
	dec, _ := NewDecoder()
	step := max(1, len(b)/3000)
	checked := 0
	for i := 0; i < len(b); i += step {
		c := slices.Clone(b)
		c[i] ^= 0x40
		if _, _, err := Decode(c, dec, testDisk, 1<<30); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flipped byte %d of %d: err %v, want ErrCorrupt", i, len(b), err)
		}
		checked++
	}
	for _, n := range []int{0, 5, len(b) / 2, len(b) - 1} {
		if _, _, err := Decode(b[:n], dec, testDisk, 1<<30); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d: err %v", n, err)
		}
	}
	t.Logf("%d corrupted copies refused", checked)
}

func TestOtherDiskAndSize(t *testing.T) {
	b := encodeTest(t, testRanges(rand.New(rand.NewPCG(5, 6))))
	dec, _ := NewDecoder()
	if _, _, err := Decode(b, dec, "another", 1<<30); !errors.Is(err, ErrOtherDisk) {
		t.Fatalf("err %v, want ErrOtherDisk", err)
	}
	if _, _, err := Decode(b, dec, testDisk, 4096); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("ranges beyond a 4 KiB disk: err %v", err)
	}
}

func TestNamesSortInApplyOrder(t *testing.T) {
	pairs := [][2]uint64{{0, 3}, {3, 9}, {3, 12}, {12, 100}, {100, 1000000}, {1000000, 1 << 62}}
	var names []string
	for _, p := range pairs {
		names = append(names, Name(p[0], p[1]))
	}
	if !slices.IsSorted(names) {
		t.Fatalf("names not sorted: %v", names)
	}
	for i, n := range names {
		p, l, ok := ParseName(n)
		if !ok || p != pairs[i][0] || l != pairs[i][1] {
			t.Fatalf("ParseName(%s) = %d %d %v", n, p, l, ok)
		}
	}
	for _, bad := range []string{"seg-1-2.vseg", "x", Name(5, 5), "seg-00000000000000000001-00000000000000000002.vse"} {
		if _, _, ok := ParseName(bad); ok {
			t.Fatalf("ParseName(%q) accepted", bad)
		}
	}
}

func TestCompresses(t *testing.T) {
	r := []Range{{Off: 0, Len: 1 << 20, Data: bytes.Repeat([]byte("ext4 directory block "), (1<<20)/21+1)[:1<<20]}}
	b := encodeTest(t, r)
	if len(b) > 64<<10 {
		t.Fatalf("1 MiB of repeated text packed into %d bytes", len(b))
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(encodeTest(f, testRanges(rand.New(rand.NewPCG(7, 8)))))
	f.Add([]byte(Magic))
	dec, _ := NewDecoder()
	f.Fuzz(func(t *testing.T, b []byte) {
		_, ranges, err := Decode(b, dec, testDisk, 1<<30)
		if err == nil {
			for _, r := range ranges {
				if !r.Zero && int64(len(r.Data)) != r.Len {
					t.Fatalf("range data %d, len %d", len(r.Data), r.Len)
				}
			}
		}
	})
}
