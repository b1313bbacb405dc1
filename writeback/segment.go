package writeback

import (
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Payloads live in segment files, not in badger: badger keeps only the
// ordered index (seq -> epoch, range, kind, segment, offset, CRC). A queue
// whose entries are deleted soon after they are written is badger's worst
// case: its value log is reclaimed only from compaction statistics, which
// tiny, short-lived keys never produce, so a 1 GiB write left 1 GiB of
// value log behind after the drain (measured). A segment file is deleted as
// a whole once every record in it is drained, which bounds the journal's
// disk use by the pending bytes plus one segment per writer stream.

// defaultSegmentSize is the size at which the current segment is closed
// and a new one started.
const defaultSegmentSize = 64 << 20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc32c(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// segment is one append-only payload file.
type segment struct {
	id   uint64
	f    *os.File
	size int64 // bytes reserved so far (guarded by segments.mu)
	// lastSeq is the highest seq whose payload is in this segment; inflight
	// counts appends that reserved space but have not committed their index
	// entry yet. A segment may be deleted only when inflight is 0 and every
	// seq up to lastSeq is drained.
	lastSeq  atomic.Uint64
	inflight atomic.Int64
	dirty    atomic.Bool // written since the last sync
}

// keep makes the segment outlive record seq (lastSeq only rises).
func (seg *segment) keep(seq uint64) {
	for {
		last := seg.lastSeq.Load()
		if last >= seq || seg.lastSeq.CompareAndSwap(last, seq) {
			return
		}
	}
}

// segments manages the segment files of a journal directory.
type segments struct {
	dir     string
	maxSize int64
	mu      sync.Mutex
	cur     *segment
	all     map[uint64]*segment
	next    uint64
	// created: a segment file was made since the last sync, whose name
	// the directory's fsync must make durable.
	created atomic.Bool
}

func segName(id uint64) string { return fmt.Sprintf("seg-%016x.dat", id) }

// listNumbered returns, sorted, the ids of the files in dir named
// prefix + 16 hex digits + ".dat" (segments, intent logs).
func listNumbered(dir, prefix string) ([]uint64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var ids []uint64
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) || !strings.HasSuffix(name, ".dat") {
			continue
		}
		id, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(name, prefix), ".dat"), 16, 64)
		if err != nil {
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// openSegments opens every segment file in dir for reading; new payloads
// go to a fresh segment.
func openSegments(dir string, maxSize int64) (*segments, error) {
	if maxSize <= 0 {
		maxSize = defaultSegmentSize
	}
	s := &segments{dir: dir, maxSize: maxSize, all: map[uint64]*segment{}, next: 1}
	ids, err := listNumbered(dir, "seg-")
	if err != nil {
		return nil, fmt.Errorf("list journal segments: %w", err)
	}
	for _, id := range ids {
		name := segName(id)
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open journal segment %s: %w", name, err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("open journal segment %s: %w", name, err)
		}
		seg := &segment{id: id, f: f, size: st.Size()}
		s.all[id] = seg
		if id >= s.next {
			s.next = id + 1
		}
	}
	return s, nil
}

// reserve finds room for n payload bytes: the segment and offset to write
// them at. The caller writes them, commits the index entry, then calls
// committed.
func (s *segments) reserve(n int64) (*segment, int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil || (s.cur.size > 0 && s.cur.size+n > s.maxSize) {
		id := s.next
		f, err := os.OpenFile(filepath.Join(s.dir, segName(id)), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
		if err != nil {
			return nil, 0, fmt.Errorf("create journal segment: %w", err)
		}
		s.next++
		s.created.Store(true)
		s.cur = &segment{id: id, f: f}
		s.all[id] = s.cur
	}
	seg := s.cur
	off := seg.size
	seg.size += n
	seg.inflight.Add(1)
	return seg, off, nil
}

// get returns segment id for reading.
func (s *segments) get(id uint64) (*segment, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seg := s.all[id]
	if seg == nil {
		return nil, fmt.Errorf("journal segment %s is missing", segName(id))
	}
	return seg, nil
}

// read returns r's payload, checked against its CRC.
func (s *segments) read(r *Record) ([]byte, error) {
	seg, err := s.get(r.seg)
	if err != nil {
		return nil, fmt.Errorf("journal record %d: %w", r.Seq, err)
	}
	buf := make([]byte, r.Length)
	if _, err := seg.f.ReadAt(buf, r.segOff); err != nil {
		return nil, fmt.Errorf("journal record %d: read %s at %d: %w", r.Seq, segName(r.seg), r.segOff, err)
	}
	if got := crc32c(buf); got != r.crc {
		return nil, fmt.Errorf("journal record %d: payload CRC-32C is 0x%08x, the index says 0x%08x (%s at %d)", r.Seq, got, r.crc, segName(r.seg), r.segOff)
	}
	return buf, nil
}

// sync makes every segment written since the last sync durable, and the
// names of the segments made since.
func (s *segments) sync() error {
	s.mu.Lock()
	list := make([]*segment, 0, len(s.all))
	for _, seg := range s.all {
		if seg.dirty.Load() {
			list = append(list, seg)
		}
	}
	s.mu.Unlock()
	created := s.created.Swap(false)
	for _, seg := range list {
		seg.dirty.Store(false)
		if err := datasync(seg.f); err != nil {
			seg.dirty.Store(true)
			if created {
				s.created.Store(true)
			}
			return fmt.Errorf("sync journal segment %s: %w", segName(seg.id), err)
		}
	}
	if created {
		if err := syncDir(s.dir); err != nil {
			s.created.Store(true)
			return fmt.Errorf("sync journal directory: %w", err)
		}
	}
	return nil
}

// reclaim deletes the segments whose records are all drained (the current
// one too, once it is fully drained: the next append starts a new one), i.e. every seq in them is <= drained. before, if not
// nil, runs first when there is anything to delete.
func (s *segments) reclaim(drained uint64, before func() error) (int, error) {
	s.mu.Lock()
	var victims []*segment
	for id, seg := range s.all {
		if seg.inflight.Load() != 0 || seg.lastSeq.Load() > drained {
			continue
		}
		if seg == s.cur {
			if seg.lastSeq.Load() == 0 {
				continue // fresh, nothing committed in it yet
			}
			s.cur = nil // the next append starts a new segment
		}
		victims = append(victims, seg)
		delete(s.all, id)
	}
	s.mu.Unlock()
	if len(victims) > 0 && before != nil {
		if err := before(); err != nil {
			s.mu.Lock()
			for _, seg := range victims {
				s.all[seg.id] = seg
			}
			s.mu.Unlock()
			return 0, err
		}
	}
	var errs []error
	for _, seg := range victims {
		seg.f.Close()
		if err := os.Remove(filepath.Join(s.dir, segName(seg.id))); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("delete drained journal segment: %w", err))
		}
	}
	return len(victims), errors.Join(errs...)
}

// ids lists the segment ids, sorted (tests and recovery).
func (s *segments) ids() []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]uint64, 0, len(s.all))
	for id := range s.all {
		out = append(out, id)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func (s *segments) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, seg := range s.all {
		seg.f.Close()
	}
}
