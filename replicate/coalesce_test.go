package replicate

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/vhdsync/vhdsync/internal/bytediff"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/remote"
	"pgregory.net/rapid"
)

// coalesceCase is a batch of records over a space of sectors.
type coalesceCase struct {
	sectors int64
	recs    []journal.Record
}

func genCoalesceCase(t *rapid.T) coalesceCase {
	c := coalesceCase{sectors: rapid.Int64Range(1, 4096).Draw(t, "sectors")}
	n := rapid.IntRange(1, 30).Draw(t, "records")
	for i := 0; i < n; i++ {
		var secs int64
		if rapid.IntRange(0, 3).Draw(t, "big") == 0 {
			secs = rapid.Int64Range(1, 1024).Draw(t, "bigLen")
		} else {
			secs = rapid.Int64Range(1, 16).Draw(t, "smallLen")
		}
		secs = min(secs, c.sectors)
		off := rapid.Int64Range(0, c.sectors-secs).Draw(t, "off")
		r := journal.Record{Offset: off * journal.SectorSize, Length: secs * journal.SectorSize}
		switch rapid.IntRange(0, 5).Draw(t, "kind") {
		case 0:
			r.Kind = journal.KindZero
		case 1:
			r.Kind = journal.KindDiscard
		default:
			r.Kind = journal.KindData
			r.Data = fillData(int(r.Length), rapid.IntRange(0, 3).Draw(t, "fill"), rapid.Uint64().Draw(t, "seed"), uint64(i))
		}
		c.recs = append(c.recs, r)
	}
	return c
}

// testZeroRun is the zero run fillData puts in the middle of data (fill 2).
const testZeroRun = 64 << 10

// fillData makes n bytes: 0 random, 1 all zero, 2 random with a zero run
// of at least testZeroRun (or half of n) in the middle when n allows, 3
// random with every third sector zero.
func fillData(n, fill int, seed, salt uint64) []byte {
	p := make([]byte, n)
	if fill == 1 {
		return p
	}
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	binary.LittleEndian.PutUint64(key[8:], salt)
	rand.NewChaCha8(key).Read(p)
	rng := rand.New(rand.NewPCG(seed, salt+1))
	switch fill {
	case 2:
		z := max(int64(n)/2, testZeroRun) &^ (journal.SectorSize - 1)
		if int64(n) > z {
			start := (int64(n)/4 + int64(rng.IntN(journal.SectorSize))) &^ (journal.SectorSize - 1)
			start = min(start, int64(n)-z)
			clear(p[start : start+z])
		} else {
			clear(p[n/2:])
		}
	case 3:
		for k := 0; k+journal.SectorSize <= n; k += 3 * journal.SectorSize {
			clear(p[k : k+journal.SectorSize])
		}
	}
	return p
}

// checkSpans checks the spans of a coalesced batch against a brute-force
// model of the sectors.
func checkSpans(c coalesceCase, spans []Span, maxPut int64) error {
	size := c.sectors * journal.SectorSize
	// The model: bytes start as a pattern no record writes; each sector
	// remembers the last record that wrote it.
	model := bytes.Repeat([]byte{0xEE}, int(size))
	last := make([]int, c.sectors)
	for i := range last {
		last[i] = -1
	}
	for i, r := range c.recs {
		if r.Kind == journal.KindData {
			copy(model[r.Offset:], r.Data)
		} else {
			clear(model[r.Offset:r.End()])
		}
		for s := r.Offset / journal.SectorSize; s < r.End()/journal.SectorSize; s++ {
			last[s] = i
		}
	}
	got := bytes.Repeat([]byte{0xEE}, int(size))
	cleared := make([]bool, c.sectors)
	covered := make([]bool, c.sectors)
	for k, s := range spans {
		switch {
		case s.Off < 0 || s.End > size || s.End <= s.Off:
			return fmt.Errorf("span %d: bad range %d-%d", k, s.Off, s.End)
		case s.Off%journal.SectorSize != 0 || s.End%journal.SectorSize != 0:
			return fmt.Errorf("span %d: %d-%d not 512-aligned", k, s.Off, s.End)
		case k > 0 && spans[k-1].End > s.Off:
			return fmt.Errorf("spans %d and %d overlap or are out of order: %d-%d, %d-%d", k-1, k, spans[k-1].Off, spans[k-1].End, s.Off, s.End)
		}
		if s.Clear {
			if s.Data != nil {
				return fmt.Errorf("span %d: clear with data", k)
			}
			clear(got[s.Off:s.End])
		} else {
			if s.Data.Len() != s.End-s.Off {
				return fmt.Errorf("span %d: %d data bytes for %d-%d", k, s.Data.Len(), s.Off, s.End)
			}
			if s.End-s.Off > maxPut || s.End-s.Off > remote.MaxPutPage {
				return fmt.Errorf("span %d: Put Page of %d bytes, cap %d", k, s.End-s.Off, maxPut)
			}
			copy(got[s.Off:], s.Data.Bytes())
		}
		for x := s.Off / journal.SectorSize; x < s.End/journal.SectorSize; x++ {
			covered[x] = true
			cleared[x] = s.Clear
		}
	}
	for x := int64(0); x < c.sectors; x++ {
		if covered[x] != (last[x] >= 0) {
			return fmt.Errorf("sector %d: covered by a span %v, written by a record %v", x, covered[x], last[x] >= 0)
		}
		if last[x] >= 0 && c.recs[last[x]].Kind != journal.KindData && !cleared[x] {
			return fmt.Errorf("sector %d: last written by a %s record but sent as data", x, c.recs[last[x]].Kind)
		}
	}
	if i := bytediff.First(got, model); i >= 0 {
		return fmt.Errorf("spans applied to the blob differ from last-write-wins at byte %d (sector %d, last written by record %d)", i, i/journal.SectorSize, last[i/journal.SectorSize])
	}
	return nil
}

// spansCostOf is what spans cost at reqCost bytes per request: the bytes
// sent plus reqCost per request.
func spansCostOf(spans []Span, reqCost int64) int64 {
	var c int64
	for _, s := range spans {
		c += reqCost
		if !s.Clear {
			c += s.End - s.Off
		}
	}
	return c
}

// checkZeroRuns checks the choices about zero sectors inside data: with a
// request costing nothing every zero sector is cleared, never sent; at any
// cost the spans cost no more than either extreme (every zero run sent
// with its data, every one cleared), when no Put Page needs cutting at
// maxPut (the cuts are outside the cost model).
func checkZeroRuns(c coalesceCase, spans []Span, maxPut, reqCost int64) error {
	if reqCost == 0 {
		for k, s := range spans {
			if s.Clear {
				continue
			}
			d := s.Data.Bytes()
			for x := int64(0); x < int64(len(d)); x += journal.SectorSize {
				if isZero(d[x : x+journal.SectorSize]) {
					return fmt.Errorf("span %d: zero sector at %d sent as data with requests free", k, s.Off+x)
				}
			}
		}
	}
	if c.sectors*journal.SectorSize > maxPut {
		return nil
	}
	got := spansCostOf(spans, reqCost)
	for _, other := range []int64{0, 1 << 50} {
		alt := coalesceCost(c.recs, maxPut, other)
		if altCost := spansCostOf(alt, reqCost); got > altCost {
			return fmt.Errorf("spans at request cost %d cost %d, those chosen at request cost %d cost %d: %s vs %s", reqCost, got, other, altCost, spanList(spans), spanList(alt))
		}
	}
	return nil
}

func coalesce(recs []journal.Record, maxPut int64) []Span {
	return coalesceCost(recs, maxPut, requestCost)
}

func coalesceCost(recs []journal.Record, maxPut, reqCost int64) []Span {
	var c coalescer
	for i := range recs {
		c.add(&recs[i])
	}
	return c.spansCost(maxPut, reqCost)
}

// TestCoalesceProperty: random overlapping data, zero and discard records
// against a brute-force per-sector model: last write wins, spans are
// sorted, disjoint, 512-aligned and cover exactly the written sectors,
// Put Pages respect the cap, zero and discard become Clear Pages, the
// spans applied to the blob reproduce the model exactly (zero sectors of
// data reach the blob, cleared or sent), and zero runs inside data are
// cleared or sent by the cost rule (checkZeroRuns), for several costs of
// a request.
func TestCoalesceProperty(t *testing.T) {
	spans, clears := 0, 0
	rapid.Check(t, func(t *rapid.T) {
		c := genCoalesceCase(t)
		maxPut := rapid.SampledFrom([]int64{journal.SectorSize, 4 << 10, 64 << 10, remote.MaxPutPage}).Draw(t, "maxPut")
		reqCost := rapid.SampledFrom([]int64{0, journal.SectorSize, 4 << 10, requestCost, 1 << 50}).Draw(t, "reqCost")
		out := coalesceCost(c.recs, maxPut, reqCost)
		if err := checkSpans(c, out, maxPut); err != nil {
			t.Fatal(err)
		}
		if err := checkZeroRuns(c, out, maxPut, reqCost); err != nil {
			t.Fatal(err)
		}
		spans += len(out)
		for _, s := range out {
			if s.Clear {
				clears++
			}
		}
	})
	t.Logf("coalesce: %d spans checked, %d of them Clear Pages", spans, clears)
}

// TestCoalesceSplitsAtMaxPutPage: one write larger than 4 MiB, and
// adjacent writes adding up to more, are cut into Put Pages of at most
// remote.MaxPutPage; adjacent zero and discard ranges become one Clear Pages.
func TestCoalesceSplitsAtMaxPutPage(t *testing.T) {
	big := int64(remote.MaxPutPage*2 + 3*journal.SectorSize)
	c := coalesceCase{sectors: (big + 24<<20) / journal.SectorSize}
	c.recs = []journal.Record{
		{Offset: journal.SectorSize, Length: big, Kind: journal.KindData, Data: fillData(int(big), 0, 1, 1)},
		// Three adjacent 3 MiB writes: 9 MiB of data in a row.
		{Offset: 10 << 20, Length: 3 << 20, Kind: journal.KindData, Data: fillData(3<<20, 0, 2, 2)},
		{Offset: 13 << 20, Length: 3 << 20, Kind: journal.KindData, Data: fillData(3<<20, 0, 3, 3)},
		{Offset: 16 << 20, Length: 3 << 20, Kind: journal.KindData, Data: fillData(3<<20, 0, 4, 4)},
		// A zero range and a discard next to each other.
		{Offset: 20 << 20, Length: 1 << 20, Kind: journal.KindZero},
		{Offset: 21 << 20, Length: 3 << 20, Kind: journal.KindDiscard},
	}
	out := coalesce(c.recs, remote.MaxPutPage)
	if err := checkSpans(c, out, remote.MaxPutPage); err != nil {
		t.Fatal(err)
	}
	puts, clears := 0, 0
	for _, s := range out {
		if s.Clear {
			clears++
		} else {
			puts++
		}
	}
	// 8 MiB+1.5 KiB -> 3 puts; 9 MiB -> 3 puts; 4 MiB of zeros -> 1 clear.
	if puts != 6 || clears != 1 {
		t.Fatalf("%d puts and %d clears, want 6 and 1: %v", puts, clears, spanList(out))
	}
}

// TestCoalesceSpansReferencePayloads: a Put Page joined from several
// records references their payloads instead of a copy (the copy cost a
// memmove of every byte drained and held a batch twice), pieces of one
// payload cut around a zero run sent with them are one buffer again, and
// zeros no single payload holds come from zeroPages.
func TestCoalesceSpansReferencePayloads(t *testing.T) {
	var recs []journal.Record
	for i := range 16 {
		d := fillData(256<<10, 0, uint64(i+1), uint64(i+1))
		recs = append(recs, journal.Record{Offset: int64(i) << 18, Length: 256 << 10, Kind: journal.KindData, Data: d})
	}
	clear(recs[3].Data[8<<10 : 12<<10]) // a short zero run inside one payload: sent with it
	out := coalesce(recs, remote.MaxPutPage)
	if len(out) != 1 || out[0].Data.Len() != remote.MaxPutPage {
		t.Fatalf("16 sequential 256 KiB records: spans %s, want one 4 MiB Put Page", spanList(out))
	}
	if len(out[0].Data) != 16 {
		t.Fatalf("the Put Page has %d buffers, want the 16 payloads", len(out[0].Data))
	}
	for i, b := range out[0].Data {
		if len(b) != len(recs[i].Data) || &b[0] != &recs[i].Data[0] {
			t.Fatalf("buffer %d (%d bytes) is not record %d's payload: copied", i, len(b), i)
		}
	}
	// Two records whose zero tail and zero head meet: the joined zero run
	// is sent (too short to clear) from zeroPages.
	a := fillData(64<<10, 0, 1, 1)
	clear(a[60<<10:])
	b := fillData(64<<10, 0, 2, 2)
	clear(b[:4<<10])
	out = coalesce([]journal.Record{{Offset: 0, Length: 64 << 10, Kind: journal.KindData, Data: a}, {Offset: 64 << 10, Length: 64 << 10, Kind: journal.KindData, Data: b}}, remote.MaxPutPage)
	if len(out) != 1 || len(out[0].Data) != 3 {
		t.Fatalf("spans %s with %d buffers, want one Put Page of 3", spanList(out), len(out[0].Data))
	}
	if z := out[0].Data[1]; len(z) != 8<<10 || &z[0] != &zeroPages[0] {
		t.Fatalf("the joined zero run is not a slice of zeroPages")
	}
	if &out[0].Data[0][0] != &a[0] || &out[0].Data[2][0] != &b[4<<10] {
		t.Fatalf("the data around the zero run is copied")
	}
}

// TestCoalesceZeroRunsInData: zero runs inside data are cleared when the
// bytes saved outweigh the requests added (requestCost bytes each): a long
// zero run in the middle of data becomes put, clear, put; a write entirely
// of zeros with nothing around it becomes a clear; a short zero run inside
// data stays in the Put Page; a short zero tail next to a cleared range
// joins that Clear Pages; a zero tail next to nothing is cleared only when
// longer than one request's worth of bytes.
func TestCoalesceZeroRunsInData(t *testing.T) {
	p := fillData(1<<20, 0, 5, 5)
	clear(p[100<<10 : 400<<10]) // 300 KiB: more than two requests' worth
	q := fillData(64<<10, 0, 6, 6)
	clear(q[8<<10 : 16<<10])
	tail := fillData(16<<10, 0, 7, 7)
	clear(tail[12<<10:]) // 4 KiB of zeros, then a discard
	short := fillData(16<<10, 0, 8, 8)
	clear(short[12<<10:]) // 4 KiB of zeros, then nothing
	long := fillData(256<<10, 0, 9, 9)
	clear(long[64<<10:]) // 192 KiB of zeros, then nothing
	recs := []journal.Record{
		{Offset: 0, Length: int64(len(p)), Kind: journal.KindData, Data: p},
		{Offset: 2 << 20, Length: 256 << 10, Kind: journal.KindData, Data: make([]byte, 256<<10)},
		{Offset: 3 << 20, Length: int64(len(q)), Kind: journal.KindData, Data: q},
		{Offset: 4 << 20, Length: int64(len(tail)), Kind: journal.KindData, Data: tail},
		{Offset: 4<<20 + 16<<10, Length: 8 << 10, Kind: journal.KindDiscard},
		{Offset: 5 << 20, Length: int64(len(short)), Kind: journal.KindData, Data: short},
		{Offset: 6 << 20, Length: int64(len(long)), Kind: journal.KindData, Data: long},
	}
	out := coalesce(recs, remote.MaxPutPage)
	want := "put 0-102400 clear 102400-409600 put 409600-1048576 clear 2097152-2359296 put 3145728-3211264" +
		" put 4194304-4206592 clear 4206592-4218880 put 5242880-5259264 put 6291456-6356992 clear 6356992-6553600"
	if got := spanList(out); got != want {
		t.Fatalf("spans\n got %s\nwant %s", got, want)
	}
	c := coalesceCase{sectors: 7 << 20 / journal.SectorSize, recs: recs}
	if err := checkSpans(c, out, remote.MaxPutPage); err != nil {
		t.Fatal(err)
	}
}

// TestZeroRunCost: the request arithmetic behind the choice, case by case.
func TestZeroRunCost(t *testing.T) {
	for _, c := range []struct {
		left, right pieceKind
		want        int64
	}{
		{pieceData, pieceData, 2},    // put | put clear put
		{pieceData, pieceGap, 1},     // put | put clear
		{pieceGap, pieceData, 1},     // put | clear put
		{pieceData, pieceClear, 0},   // put clear | put clear
		{pieceGap, pieceGap, 0},      // put | clear
		{pieceClear, pieceGap, -1},   // clear put | clear
		{pieceClear, pieceClear, -2}, // clear put clear | clear
	} {
		if got := zeroRunCost(c.left, c.right); got != c.want {
			t.Errorf("zeroRunCost(%d, %d) = %d, want %d", c.left, c.right, got, c.want)
		}
	}
}

func spanList(spans []Span) string {
	var b bytes.Buffer
	for i, s := range spans {
		if i > 0 {
			b.WriteByte(' ')
		}
		kind := "put"
		if s.Clear {
			kind = "clear"
		}
		fmt.Fprintf(&b, "%s %d-%d", kind, s.Off, s.End)
	}
	return b.String()
}

// BenchmarkCoalesceRandom4K coalesces a 64 MiB batch of 4 KiB writes at
// random offsets of 2 GiB (16 k records), as the flusher does per batch.
func BenchmarkCoalesceRandom4K(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	data := fillData(4<<10, 0, 1, 1)
	recs := make([]journal.Record, 16<<10)
	for i := range recs {
		recs[i] = journal.Record{Offset: rng.Int64N(2<<30/(4<<10)) * (4 << 10), Length: 4 << 10, Kind: journal.KindData, Data: data}
	}
	b.ResetTimer()
	for range b.N {
		var c coalescer
		for i := range recs {
			c.add(&recs[i])
		}
		if len(c.spans(remote.MaxPutPage)) == 0 {
			b.Fatal("no spans")
		}
	}
}
