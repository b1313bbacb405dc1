// Package thin keeps a thin-attached disk's record of which 4 MiB chunks
// of the local image hold the blob's data, and fetches the others from the
// blob: on demand, before a write touches them or behind a first read
// served from the blob (ReadThrough), and in the background (prefetch)
// until every chunk is local.
//
// A state directory made by `vhdsync create --from-blob --thin` holds an
// empty (sparse) image, the blob's page ranges as they were then
// (thin.ranges) and a bitmap of the chunks present (thin.present). A chunk
// none of whose pages the blob held is present from the start: its image
// is a hole, as the blob is. Any other chunk becomes present once its data
// is durable in the image (the image synced, see Map.Bind); only then is
// its bit written and synced, and only then may a write touch it. So after
// a crash at any point a chunk is either marked present and holds the
// blob's data plus every write made since (replayed from the journal), or
// unmarked with no write in it, and fetched whole again. Bits only go from
// 0 to 1, so a torn write of the bitmap loses at most a mark, never data:
// the chunk is fetched again, and no write can be in it.
//
// The blob is the source of truth for every chunk not present: nothing
// but this package's fetches may touch those chunks of the image, and
// nothing may send them to the blob (the flusher's fills check Present).
// The blob must not change under a thin disk either: its state directory
// keeps the blob's lease across unmounts until every chunk is local.
package thin

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/internal/durable"
)

// ChunkSize is the unit in which a thin disk is fetched and recorded.
const ChunkSize = 4 << 20

// File names inside a state directory.
const (
	RangesFile  = "thin.ranges"
	PresentFile = "thin.present"
)

// ErrDamaged: the thin files are unreadable or do not fit the disk.
var ErrDamaged = errors.New("thin-attach record damaged")

// Range is a byte range [Off, End) of the disk.
type Range struct{ Off, End int64 }

// Source reads the blob's data region.
type Source interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

var rangesMagic = [8]byte{'V', 'H', 'D', 'S', 'T', 'H', 'N', '1'}

// Create writes the thin record of a disk of size bytes whose blob holds
// ranges (sorted, not overlapping) at sequence number seq: the ranges file
// and an empty bitmap, both durable, with their directory entries, when it
// returns.
func Create(dir string, size, seq int64, ranges []Range) error {
	if size <= 0 {
		return fmt.Errorf("thin record: disk size %d", size)
	}
	buf := make([]byte, 0, hdrLen+16*len(ranges)+4)
	buf = append(buf, rangesMagic[:]...)
	buf = binary.LittleEndian.AppendUint64(buf, uint64(size))
	buf = binary.LittleEndian.AppendUint64(buf, uint64(seq))
	buf = binary.LittleEndian.AppendUint64(buf, uint64(len(ranges)))
	prev := int64(0)
	for _, r := range ranges {
		if r.Off < prev || r.End <= r.Off || r.End > size {
			return fmt.Errorf("thin record: page range %d-%d out of order or outside the %d-byte disk", r.Off, r.End, size)
		}
		buf = binary.LittleEndian.AppendUint64(buf, uint64(r.Off))
		buf = binary.LittleEndian.AppendUint64(buf, uint64(r.End))
		prev = r.End
	}
	buf = binary.LittleEndian.AppendUint32(buf, crc32.Checksum(buf, castagnoli))
	if err := durable.WriteFile(filepath.Join(dir, RangesFile), buf); err != nil {
		return fmt.Errorf("thin record: %w", err)
	}
	bitmap := make([]byte, bitmapLen(size))
	if err := durable.WriteFile(filepath.Join(dir, PresentFile), bitmap); err != nil {
		return fmt.Errorf("thin record: %w", err)
	}
	return nil
}

// Remove deletes the thin record (once every chunk is present and the
// state no longer says thin), durably.
func Remove(dir string) error {
	removed := false
	for _, n := range []string{PresentFile, RangesFile} {
		err := os.Remove(filepath.Join(dir, n))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove the thin record: %w", err)
		}
		removed = removed || err == nil
	}
	if !removed {
		return nil
	}
	if err := durable.SyncDir(dir); err != nil {
		return fmt.Errorf("remove the thin record: %w", err)
	}
	return nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// hdrLen is the ranges file's header: magic, disk size, the blob's
// sequence number, the count of ranges.
const hdrLen = 32

func chunks(size int64) int64 { return (size + ChunkSize - 1) / ChunkSize }

func bitmapLen(size int64) int64 { return (chunks(size) + 7) / 8 }

// Map is an open thin record. All methods are safe for concurrent use.
type Map struct {
	size   int64
	seq    int64
	ranges []Range
	// present has a bit per chunk, set once the chunk is durably present
	// (its bit in the file synced); chunks without data are set at Open.
	present []atomic.Uint64
	// chunkBytes is the blob's data in each chunk (0: none).
	chunkBytes []int64
	allocated  int64
	presentB   atomic.Int64 // data bytes in present chunks
	file       *os.File     // the bitmap
	fileMu     sync.Mutex   // writes of the bitmap
	disk       []byte       // the bitmap as written; under fileMu
	missing    atomic.Int64 // chunks not yet present

	mu       sync.Mutex
	inflight map[int64]*call

	src  Source
	img  *os.File
	sync func() error

	// bg counts the fetches ReadThrough started in the background.
	bg sync.WaitGroup

	fetchedBytes, requests, demandChunks, prefetchChunks atomic.Int64
	readThroughBytes, bgFailures                         atomic.Int64
	demandWait                                           atomic.Int64 // ns readers and writers waited
	done                                                 chan struct{}
	doneOnce                                             sync.Once
}

type call struct {
	done chan struct{}
	err  error
}

// Open reads the thin record in dir for a disk of size bytes.
func Open(dir string, size int64) (*Map, error) {
	b, err := os.ReadFile(filepath.Join(dir, RangesFile))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDamaged, err)
	}
	ranges, seq, err := decodeRanges(b, size)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, PresentFile), os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDamaged, err)
	}
	bitmap, err := io.ReadAll(f)
	if err == nil && int64(len(bitmap)) != bitmapLen(size) {
		err = fmt.Errorf("%s is %d bytes, want %d", PresentFile, len(bitmap), bitmapLen(size))
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%w: %w", ErrDamaged, err)
	}
	n := chunks(size)
	m := &Map{size: size, seq: seq, ranges: ranges, present: make([]atomic.Uint64, (n+63)/64), chunkBytes: make([]int64, n),
		file: f, disk: bitmap, inflight: map[int64]*call{}, done: make(chan struct{})}
	for _, r := range ranges {
		for c := r.Off / ChunkSize; c*ChunkSize < r.End; c++ {
			m.chunkBytes[c] += min(r.End, (c+1)*ChunkSize) - max(r.Off, c*ChunkSize)
		}
		m.allocated += r.End - r.Off
	}
	for c := range n {
		if m.chunkBytes[c] == 0 || bitmap[c/8]&(1<<(c%8)) != 0 {
			m.present[c/64].Or(1 << (c % 64))
			m.presentB.Add(m.chunkBytes[c])
		} else {
			m.missing.Add(1)
		}
	}
	if m.missing.Load() == 0 {
		m.doneOnce.Do(func() { close(m.done) })
	}
	return m, nil
}

func decodeRanges(b []byte, size int64) ([]Range, int64, error) {
	if len(b) < hdrLen+4 || [8]byte(b[:8]) != rangesMagic {
		return nil, 0, fmt.Errorf("%w: %s is not a thin ranges file", ErrDamaged, RangesFile)
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, 0, fmt.Errorf("%w: %s fails its checksum", ErrDamaged, RangesFile)
	}
	if got := int64(binary.LittleEndian.Uint64(b[8:])); got != size {
		return nil, 0, fmt.Errorf("%w: %s is for a %d-byte disk, this one has %d", ErrDamaged, RangesFile, got, size)
	}
	seq := int64(binary.LittleEndian.Uint64(b[16:]))
	n := binary.LittleEndian.Uint64(b[24:])
	if uint64(len(body)-hdrLen) != n*16 {
		return nil, 0, fmt.Errorf("%w: %s holds %d bytes of ranges, want %d", ErrDamaged, RangesFile, len(body)-hdrLen, n*16)
	}
	rs := make([]Range, n)
	for i := range rs {
		p := body[hdrLen+16*i:]
		rs[i] = Range{int64(binary.LittleEndian.Uint64(p)), int64(binary.LittleEndian.Uint64(p[8:]))}
		if rs[i].End <= rs[i].Off || rs[i].End > size || (i > 0 && rs[i].Off < rs[i-1].End) {
			return nil, 0, fmt.Errorf("%w: %s: page range %d-%d out of order or outside the disk", ErrDamaged, RangesFile, rs[i].Off, rs[i].End)
		}
	}
	return rs, seq, nil
}

// BaseSequence is the blob's sequence number when the disk was attached.
func (m *Map) BaseSequence() int64 { return m.seq }

// Bind gives the map what fetching needs: the blob, the local image, and
// syncImage, which makes the image's writes durable (the disk's own image
// sync, which must also keep the journal's rules; see
// journal.Journal.SyncApplied).
func (m *Map) Bind(src Source, img *os.File, syncImage func() error) {
	m.src, m.img, m.sync = src, img, syncImage
}

// Close closes the bitmap file.
func (m *Map) Close() error { return m.file.Close() }

func (m *Map) has(c int64) bool { return m.present[c/64].Load()&(1<<(c%64)) != 0 }

// Present reports whether every chunk touching [off, end) is present: its
// image bytes are the disk's, and may be read and sent to the blob.
func (m *Map) Present(off, end int64) bool {
	if end <= off {
		return true
	}
	for c := off / ChunkSize; c <= (end-1)/ChunkSize; c++ {
		if !m.has(c) {
			return false
		}
	}
	return true
}

// Complete reports whether every chunk is present.
func (m *Map) Complete() bool { return m.missing.Load() == 0 }

// Done is closed once every chunk is present.
func (m *Map) Done() <-chan struct{} { return m.done }

// Ensure makes every chunk touching [off, end) present, fetching those that
// are not (or waiting for a fetch already under way). Reads and writes of
// the disk call it first; it costs a bitmap check once they are present.
func (m *Map) Ensure(ctx context.Context, off, end int64) error {
	if m.Present(off, end) {
		return nil
	}
	start := time.Now()
	defer func() { m.demandWait.Add(int64(time.Since(start))) }()
	var want []int64
	for c := off / ChunkSize; c <= (end-1)/ChunkSize; c++ {
		if !m.has(c) {
			want = append(want, c)
		}
	}
	return m.fetch(ctx, want, &m.demandChunks)
}

// fetch makes chunks present: those already being fetched are waited for,
// the rest fetched together (one image sync, one bitmap sync).
func (m *Map) fetch(ctx context.Context, want []int64, counter *atomic.Int64) error {
	var mine []int64
	var wait []*call
	cl := &call{done: make(chan struct{})}
	m.mu.Lock()
	for _, c := range want {
		if m.has(c) {
			continue
		}
		if other, ok := m.inflight[c]; ok {
			wait = append(wait, other)
			continue
		}
		m.inflight[c] = cl
		mine = append(mine, c)
	}
	m.mu.Unlock()
	if len(mine) > 0 {
		cl.err = m.load(ctx, mine)
		if cl.err == nil {
			counter.Add(int64(len(mine)))
		}
		m.mu.Lock()
		for _, c := range mine {
			delete(m.inflight, c)
		}
		m.mu.Unlock()
		close(cl.done)
		if cl.err != nil {
			return cl.err
		}
	}
	for _, w := range wait {
		select {
		case <-w.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		// A fetch cut short by its own context (the prefetch's, at
		// unmount) is retried below for this one's.
		if w.err != nil && !errors.Is(w.err, context.Canceled) && !errors.Is(w.err, context.DeadlineExceeded) {
			return w.err
		}
	}
	for _, c := range want {
		if !m.has(c) {
			return m.fetch(ctx, want, counter)
		}
	}
	return nil
}

// ReadThrough serves a read that lies inside one chunk not yet present
// straight from the blob, and starts that chunk's fetch in the background:
// a first read then waits for its own bytes, not for the whole chunk. The
// blob's data of a chunk not present is the disk's (nothing writes the
// chunk before it is present, invariant 8), so the bytes are right; a
// write that completes meanwhile is concurrent with the read. ok is false
// when it does not apply (the chunk is present, or the read spans chunks):
// the caller then uses Ensure and the image. A background fetch that
// fails leaves the chunk as it was; the next access fetches it again and
// reports the error (Stats.BackgroundFailures counts them).
func (m *Map) ReadThrough(ctx context.Context, p []byte, off int64) (ok bool, err error) {
	if len(p) == 0 || m.src == nil {
		return false, nil
	}
	c := off / ChunkSize
	if (off+int64(len(p))-1)/ChunkSize != c || m.has(c) {
		return false, nil
	}
	m.bg.Add(1)
	go func() {
		defer m.bg.Done()
		if err := m.fetch(ctx, []int64{c}, &m.demandChunks); err != nil {
			m.bgFailures.Add(1)
		}
	}()
	start := time.Now()
	defer func() { m.demandWait.Add(int64(time.Since(start))) }()
	if err := m.src.ReadAt(ctx, p, off); err != nil {
		return true, fmt.Errorf("read %d+%d from the blob: %w", off, len(p), err)
	}
	m.requests.Add(1)
	m.readThroughBytes.Add(int64(len(p)))
	return true, nil
}

// Wait waits for the fetches ReadThrough started (cancel their context
// first to have them stop).
func (m *Map) Wait() { m.bg.Wait() }

// load reads chunks from the blob into the image, makes them durable, then
// records them present. One read per chunk (from its first to its last
// page range; what lies between reads as zeros on the blob and is not
// written, so the image's holes stay holes).
func (m *Map) load(ctx context.Context, cs []int64) error {
	if m.src == nil {
		return errors.New("thin disk: no blob to fetch from (Bind was not called)")
	}
	buf := make([]byte, ChunkSize)
	for _, c := range cs {
		rs := m.rangesIn(c)
		if len(rs) == 0 {
			continue
		}
		lo, hi := rs[0].Off, rs[len(rs)-1].End
		if err := m.src.ReadAt(ctx, buf[:hi-lo], lo); err != nil {
			return fmt.Errorf("fetch %d-%d from the blob: %w", lo, hi, err)
		}
		m.requests.Add(1)
		for _, r := range rs {
			if _, err := m.img.WriteAt(buf[r.Off-lo:r.End-lo], r.Off); err != nil {
				return fmt.Errorf("write fetched data to the local image at %d: %w", r.Off, err)
			}
			m.fetchedBytes.Add(r.End - r.Off)
		}
	}
	if err := m.sync(); err != nil {
		return fmt.Errorf("sync fetched data: %w", err)
	}
	return m.mark(cs)
}

// rangesIn returns the blob's page ranges clipped to chunk c.
func (m *Map) rangesIn(c int64) []Range {
	lo, hi := c*ChunkSize, min((c+1)*ChunkSize, m.size)
	i, _ := slices.BinarySearchFunc(m.ranges, lo, func(r Range, off int64) int {
		switch {
		case r.End <= off:
			return -1
		case r.Off > off:
			return 1
		}
		return 0
	})
	var out []Range
	for ; i < len(m.ranges) && m.ranges[i].Off < hi; i++ {
		r := m.ranges[i]
		if r.End > lo {
			out = append(out, Range{max(r.Off, lo), min(r.End, hi)})
		}
	}
	return out
}

// mark writes the chunks' bits and syncs the bitmap, then sets them in
// memory: a write may touch a chunk only once its mark is durable, or a
// crash could leave the write replayed into a chunk the next mount fetches
// again over it.
func (m *Map) mark(cs []int64) error {
	m.fileMu.Lock()
	defer m.fileMu.Unlock()
	lo, hi := int64(len(m.disk)), int64(0)
	for _, c := range cs {
		m.disk[c/8] |= 1 << (c % 8)
		lo, hi = min(lo, c/8), max(hi, c/8+1)
	}
	if _, err := m.file.WriteAt(m.disk[lo:hi], lo); err != nil {
		return fmt.Errorf("record fetched chunks: %w", err)
	}
	if err := unix.Fdatasync(int(m.file.Fd())); err != nil {
		return fmt.Errorf("record fetched chunks: %w", err)
	}
	for _, c := range cs {
		if m.present[c/64].Load()&(1<<(c%64)) == 0 {
			m.present[c/64].Or(1 << (c % 64))
			m.presentB.Add(m.chunkBytes[c])
			if m.missing.Add(-1) == 0 {
				m.doneOnce.Do(func() { close(m.done) })
			}
		}
	}
	return nil
}

// PrefetchOptions configure Prefetch.
type PrefetchOptions struct {
	// BytesPerSecond caps the fetch rate (0: no cap).
	BytesPerSecond int64
	// Workers is how many reads run at once (default 8, as a download).
	Workers int
	// Group is how many chunks a worker fetches per image sync (default 4,
	// 1 under a cap below 64 MiB/s).
	Group int
}

// Prefetch fetches every chunk not yet present, in disk order, until all
// are or ctx ends (its error then is ctx's). Reads and writes that need a
// chunk fetch it themselves meanwhile, ahead of the prefetch.
func (m *Map) Prefetch(ctx context.Context, o PrefetchOptions) error {
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.Group <= 0 {
		o.Group = 4
		// A group goes at once and the cap spaces the next: under a low
		// cap, a chunk at a time keeps the rate near it.
		if o.BytesPerSecond > 0 && o.BytesPerSecond < 16*ChunkSize {
			o.Group = 1
		}
	}
	next := make(chan []int64)
	errc := make(chan error, o.Workers)
	var wg sync.WaitGroup
	for range o.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for g := range next {
				if err := m.fetch(ctx, g, &m.prefetchChunks); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	pace := newPacer(o.BytesPerSecond)
	var err error
	var group []int64
	var groupBytes int64
	send := func() bool {
		if len(group) == 0 {
			return true
		}
		if err = pace.wait(ctx, groupBytes); err != nil {
			return false
		}
		select {
		case next <- group:
		case err = <-errc:
			return false
		case <-ctx.Done():
			err = ctx.Err()
			return false
		}
		group, groupBytes = nil, 0
		return true
	}
	for c := int64(0); c < int64(len(m.chunkBytes)); c++ {
		if m.has(c) {
			continue
		}
		group = append(group, c)
		groupBytes += m.chunkBytes[c]
		if len(group) == o.Group && !send() {
			break
		}
	}
	if err == nil {
		send()
	}
	close(next)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errc:
		default:
		}
	}
	if err != nil {
		return fmt.Errorf("prefetch: %w", err)
	}
	return nil
}

// pacer spaces sends so that bytes go at most at rate per second.
type pacer struct {
	rate int64
	next time.Time
}

func newPacer(rate int64) *pacer { return &pacer{rate: rate, next: time.Now()} }

func (p *pacer) wait(ctx context.Context, n int64) error {
	if p.rate <= 0 {
		return ctx.Err()
	}
	if d := time.Until(p.next); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if now := time.Now(); now.After(p.next) {
		p.next = now
	}
	p.next = p.next.Add(time.Duration(float64(n) / float64(p.rate) * float64(time.Second)))
	return nil
}

// Stats is what status shows of a thin disk.
type Stats struct {
	// AllocatedBytes is the blob's data when the disk was attached;
	// PresentBytes how much of it is local.
	AllocatedBytes, PresentBytes int64
	// MissingChunks is how many 4 MiB chunks holding data are not local.
	MissingChunks int64
	// FetchedBytes and Requests count this run's fetches; DemandChunks
	// the chunks a read or write fetched, PrefetchChunks the background's.
	FetchedBytes, Requests, DemandChunks, PrefetchChunks int64
	// DemandWait is the time reads and writes spent waiting for fetches
	// (or for the blob's answer to a read served from it).
	DemandWait time.Duration
	// ReadThroughBytes is what first reads took straight from the blob
	// (ReadThrough); BackgroundFailures the fetches they started that
	// failed.
	ReadThroughBytes, BackgroundFailures int64
}

// Stats returns the current counters.
func (m *Map) Stats() Stats {
	return Stats{
		AllocatedBytes: m.allocated, PresentBytes: m.presentB.Load(), MissingChunks: m.missing.Load(),
		FetchedBytes: m.fetchedBytes.Load(), Requests: m.requests.Load(),
		DemandChunks: m.demandChunks.Load(), PrefetchChunks: m.prefetchChunks.Load(),
		DemandWait:       time.Duration(m.demandWait.Load()),
		ReadThroughBytes: m.readThroughBytes.Load(), BackgroundFailures: m.bgFailures.Load(),
	}
}

// PresentChunk reports whether the chunk holding byte off is present.
func (m *Map) PresentChunk(off int64) bool { return m.has(off / ChunkSize) }
