package crashcheck

import (
	"fmt"
	"hash/maphash"
	"math"
	"slices"
	"sort"
	"strings"
)

// hashSeed is fixed for the process: a sector's hash in the stream and in
// a downloaded copy must agree.
var hashSeed = maphash.MakeSeed()

// HashSector returns the 64-bit hash the checker compares sectors by.
func HashSector(sector []byte) uint64 { return maphash.Bytes(hashSeed, sector) }

var zeroHash = HashSector(make([]byte, SectorSize))

// SectorHashes returns the hash of every sector of img (whose length is a
// whole number of sectors).
func SectorHashes(img []byte) []uint64 {
	out := make([]uint64, len(img)/SectorSize)
	for i := range out {
		out[i] = HashSector(img[i*SectorSize : (i+1)*SectorSize])
	}
	return out
}

// version is one value a sector was given: by the initial state (start and
// ack 0) or by an acknowledged write. [lo, hi] are the barriers k at which
// a copy of the disk may hold it (before capping by the copy's time).
type version struct {
	hash   uint64
	start  uint64
	ack    uint64
	lo, hi int32
}

// Stream is the recorded stream, indexed for checking. Barrier 0 is the
// state before any fsync (the new disk, all zeros); barriers 1.. are the
// recorded fsyncs in the order they started.
type Stream struct {
	size    int64
	bars    []Barrier
	thi     []uint64 // thi[k]: the earliest return of a barrier after k
	ops     []op     // in acknowledgement order
	vstart  []int    // versions of sector i: vers[vstart[i]:vstart[i+1]]
	vers    []version
	maxVers int
}

// Stream indexes what has been recorded so far for a disk of the
// recorder's size. Call it once the workload has ended.
func (r *Recorder) Stream() (*Stream, error) {
	r.mu.Lock()
	ops := slices.Clone(r.ops)
	syncs := slices.Clone(r.syncs)
	r.mu.Unlock()
	return newStream(r.d.Size(), ops, syncs)
}

func newStream(size int64, ops []op, syncs []Barrier) (*Stream, error) {
	if size%SectorSize != 0 {
		return nil, fmt.Errorf("disk size %d is not a whole number of sectors", size)
	}
	s := &Stream{size: size, ops: ops}
	slices.SortFunc(s.ops, func(a, b op) int { return cmpU64(a.ack, b.ack) })
	slices.SortFunc(syncs, func(a, b Barrier) int { return cmpU64(a.Start, b.Start) })
	s.bars = append([]Barrier{{Start: firstTick - 1, Done: firstTick - 1}}, syncs...)
	s.thi = make([]uint64, len(s.bars))
	next := uint64(math.MaxUint64)
	for k := len(s.bars) - 1; k >= 0; k-- {
		s.thi[k] = next
		next = min(next, s.bars[k].Done)
	}

	sectors := int(size / SectorSize)
	count := make([]int, sectors+1)
	for i := range count[:sectors] {
		count[i] = 1 // the initial zeros
	}
	for _, o := range s.ops {
		if o.off < 0 || o.off+o.n > size {
			return nil, fmt.Errorf("recorded write %d+%d is beyond the disk's %d bytes", o.off, o.n, size)
		}
		for i := o.off / SectorSize; i < (o.off+o.n)/SectorSize; i++ {
			count[i]++
		}
	}
	s.vstart = make([]int, sectors+1)
	for i := 0; i < sectors; i++ {
		s.vstart[i+1] = s.vstart[i] + count[i]
		s.maxVers = max(s.maxVers, count[i])
	}
	s.vers = make([]version, s.vstart[sectors])
	fill := slices.Clone(s.vstart[:sectors])
	for i := range fill {
		s.vers[fill[i]] = version{hash: zeroHash}
		fill[i]++
	}
	for _, o := range s.ops {
		first := int(o.off / SectorSize)
		for j := 0; j < int(o.n/SectorSize); j++ {
			h := zeroHash
			if o.data != nil {
				h = HashSector(o.data[j*SectorSize : (j+1)*SectorSize])
			}
			s.vers[fill[first+j]] = version{hash: h, start: o.start, ack: o.ack}
			fill[first+j]++
		}
	}
	var byStart []int
	var sufMin []uint64
	for i := 0; i < sectors; i++ {
		vs := s.vers[s.vstart[i]:s.vstart[i+1]]
		// sup[j]: the earliest acknowledgement of a write to this sector
		// that started after j was acknowledged (so certainly replaced
		// it): from then on, j is no longer the sector's value.
		byStart = byStart[:0]
		for j := range vs {
			byStart = append(byStart, j)
		}
		sort.Slice(byStart, func(a, b int) bool { return vs[byStart[a]].start < vs[byStart[b]].start })
		sufMin = append(sufMin[:0], make([]uint64, len(vs)+1)...)
		sufMin[len(vs)] = math.MaxUint64
		for p := len(vs) - 1; p >= 0; p-- {
			sufMin[p] = min(sufMin[p+1], vs[byStart[p]].ack)
		}
		for j := range vs {
			p := sort.Search(len(byStart), func(p int) bool { return vs[byStart[p]].start > vs[j].ack })
			s.setRange(&vs[j], sufMin[p])
		}
	}
	return s, nil
}

// setRange computes the barriers k at which a copy may hold version v,
// which is replaced for certain at tick sup:
//   - as the value at barrier k's start: acknowledged before barrier k
//     started and not yet replaced (ack < start(k) < sup);
//   - as a write after barrier k: it started before any barrier after k
//     returned (start < thi(k)); it need not have been acknowledged.
//
// The two ranges of k are adjacent, so their union is one interval.
func (s *Stream) setRange(v *version, sup uint64) {
	lo1 := sort.Search(len(s.bars), func(k int) bool { return s.bars[k].Start > v.ack })
	hi1 := sort.Search(len(s.bars), func(k int) bool { return s.bars[k].Start >= sup }) - 1
	lo2 := sort.Search(len(s.thi), func(k int) bool { return s.thi[k] > v.start })
	v.lo, v.hi = int32(min(lo1, lo2)), int32(hi1)
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Size is the disk's size in bytes.
func (s *Stream) Size() int64 { return s.size }

// Barriers returns the barriers: [0] is the initial state, then the
// recorded fsyncs in the order they started.
func (s *Stream) Barriers() []Barrier { return s.bars }

// LastBarrierBefore returns the last barrier that started before tick t.
func (s *Stream) LastBarrierBefore(t uint64) int {
	return sort.Search(len(s.bars), func(k int) bool { return s.bars[k].Start >= t }) - 1
}

// Versions returns how many sector values the stream holds (the initial
// zeros included) and the most any one sector has.
func (s *Stream) Versions() (total, maxPerSector int) { return len(s.vers), s.maxVers }

// Verdict is Check's judgement of one copy of the disk.
type Verdict struct {
	// Legal: some barrier k fits every sector.
	Legal bool
	// Lo and Hi are the first and last barrier that fit (Legal only).
	Lo, Hi int
	// Possible is how many barriers the copy could have passed (those that
	// started before it was taken, barrier 0 included).
	Possible int
	// Reason explains an illegal state.
	Reason string
}

// Check judges a copy of the disk, given as the hash of each sector
// (SectorHashes), that was complete by tick taken (a copy cannot hold a
// write that started later, nor have passed a barrier that started later).
func (s *Stream) Check(hashes []uint64, taken uint64) Verdict {
	sectors := len(s.vstart) - 1
	if len(hashes) != sectors {
		return Verdict{Reason: fmt.Sprintf("the copy has %d sectors, the disk %d", len(hashes), sectors)}
	}
	kmax := int32(s.LastBarrierBefore(taken))
	v := Verdict{Possible: int(kmax) + 1, Lo: -1, Hi: -1}
	// diff[k] counts the sectors whose allowed barriers start at k, minus
	// those whose allowed barriers ended before k.
	diff := make([]int32, kmax+2)
	type iv struct{ lo, hi int32 }
	var ivs []iv
	unknown, unknownAt := 0, -1
	needLo, needLoAt := int32(-1), -1            // the sector whose values need the latest barrier
	needHi, needHiAt := int32(math.MaxInt32), -1 // ... the earliest
	for i := 0; i < sectors; i++ {
		ivs = ivs[:0]
		for _, ver := range s.vers[s.vstart[i]:s.vstart[i+1]] {
			if ver.hash != hashes[i] || ver.start >= taken {
				continue
			}
			if hi := min(ver.hi, kmax); ver.lo <= hi {
				ivs = append(ivs, iv{ver.lo, hi})
			}
		}
		if len(ivs) == 0 {
			if unknown == 0 {
				unknownAt = i
			}
			unknown++
			continue
		}
		if len(ivs) > 1 {
			slices.SortFunc(ivs, func(a, b iv) int { return int(a.lo - b.lo) })
			merged := ivs[:1]
			for _, x := range ivs[1:] {
				last := &merged[len(merged)-1]
				if x.lo <= last.hi+1 {
					last.hi = max(last.hi, x.hi)
				} else {
					merged = append(merged, x)
				}
			}
			ivs = merged
		}
		for _, x := range ivs {
			diff[x.lo]++
			diff[x.hi+1]--
		}
		if lo := ivs[0].lo; lo > needLo {
			needLo, needLoAt = lo, i
		}
		if hi := ivs[len(ivs)-1].hi; hi < needHi {
			needHi, needHiAt = hi, i
		}
	}
	if unknown > 0 {
		v.Reason = fmt.Sprintf("%d sectors hold a value no write before the copy gave them (or one already replaced at every barrier it could be at), the first at byte %d", unknown, int64(unknownAt)*SectorSize)
		return v
	}
	run := int32(0)
	for k := int32(0); k <= kmax; k++ {
		run += diff[k]
		if int(run) == sectors {
			if v.Lo < 0 {
				v.Lo = int(k)
			}
			v.Hi = int(k)
		}
	}
	if v.Lo >= 0 {
		v.Legal = true
		return v
	}
	var b strings.Builder
	fmt.Fprintf(&b, "no barrier fits every sector: the sector at byte %d needs barrier >= %d (%s), ", int64(needLoAt)*SectorSize, needLo, s.describe(needLoAt, hashes[needLoAt]))
	fmt.Fprintf(&b, "the sector at byte %d needs barrier <= %d (%s)", int64(needHiAt)*SectorSize, needHi, s.describe(needHiAt, hashes[needHiAt]))
	v.Reason = b.String()
	return v
}

// describe names the writes that gave sector i the value h.
func (s *Stream) describe(i int, h uint64) string {
	var parts []string
	for _, ver := range s.vers[s.vstart[i]:s.vstart[i+1]] {
		if ver.hash != h {
			continue
		}
		if ver.ack == 0 {
			parts = append(parts, fmt.Sprintf("initial zeros, barriers %d..%d", ver.lo, ver.hi))
			continue
		}
		parts = append(parts, fmt.Sprintf("write started at tick %d, acknowledged at %d, barriers %d..%d", ver.start, ver.ack, ver.lo, ver.hi))
	}
	if len(parts) > 3 {
		parts = append(parts[:3], fmt.Sprintf("%d more", len(parts)-3))
	}
	return strings.Join(parts, "; ")
}

// Regressions counts the copies, taken in this order, that could only be
// at an earlier barrier than a copy taken before them (the blob went back
// in time). Illegal verdicts are skipped.
func Regressions(vs []Verdict) int {
	n, floor := 0, 0
	for _, v := range vs {
		if !v.Legal {
			continue
		}
		if v.Hi < floor {
			n++
			continue
		}
		floor = max(floor, v.Lo)
	}
	return n
}

// Extent is a byte range of the disk.
type Extent struct{ Off, Len int64 }

// ImagesAt calls fn with the disk image as of the start of each barrier in
// ks (ascending): every write acknowledged before that barrier started,
// applied in acknowledgement order. img is reused between calls; changed
// lists the ranges written since the previous call (all of img's written
// ranges at the first), so a copy of img elsewhere can be kept up to date.
func (s *Stream) ImagesAt(ks []int, fn func(k int, img []byte, changed []Extent) error) error {
	img := make([]byte, s.size)
	next := 0
	prev := -1
	var changed []Extent
	for _, k := range ks {
		if k < prev || k < 0 || k >= len(s.bars) {
			return fmt.Errorf("barrier %d: out of range or order", k)
		}
		prev = k
		changed = changed[:0]
		for ; next < len(s.ops) && s.ops[next].ack < s.bars[k].Start; next++ {
			o := &s.ops[next]
			apply(img, o)
			changed = append(changed, Extent{o.off, o.n})
		}
		if err := fn(k, img, mergeExtents(changed)); err != nil {
			return err
		}
	}
	return nil
}

// mergeExtents sorts es and merges those that overlap or touch.
func mergeExtents(es []Extent) []Extent {
	if len(es) < 2 {
		return es
	}
	slices.SortFunc(es, func(a, b Extent) int { return cmpU64(uint64(a.Off), uint64(b.Off)) })
	out := es[:1]
	for _, e := range es[1:] {
		last := &out[len(out)-1]
		if e.Off <= last.Off+last.Len {
			last.Len = max(last.Len, e.Off+e.Len-last.Off)
			continue
		}
		out = append(out, e)
	}
	return out
}

// Final returns the image with every recorded write applied in
// acknowledgement order: what the disk (and, once drained, the blob)
// must hold at the end. Writes to one sector that were in flight together
// may have reached the disk in the other order; a workload without such
// writes (a filesystem on a loop device, fio) has one final image.
func (s *Stream) Final() []byte {
	img := make([]byte, s.size)
	for i := range s.ops {
		apply(img, &s.ops[i])
	}
	return img
}

func apply(img []byte, o *op) {
	dst := img[o.off : o.off+o.n]
	if o.data == nil {
		clear(dst)
		return
	}
	copy(dst, o.data)
}
