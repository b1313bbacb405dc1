package transfer

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/durable"
)

// ProgressFile is the name of the importer's bookkeeping file inside the
// state directory. It exists only while an import is unfinished.
const ProgressFile = "import-progress.json"

// progressVersion is the format of ProgressFile this code reads and writes.
const progressVersion = 1

// progress is the content of ProgressFile.
type progress struct {
	Version     int      `json:"version"`
	Source      Identity `json:"source"`
	Kind        Kind     `json:"kind"`
	DataSize    int64    `json:"data_size"`
	BlobURL     string   `json:"blob_url"`
	VirtualSize int64    `json:"virtual_size"`
	Footer      []byte   `json:"footer"`
	LeaseID     string   `json:"lease_id"`
	Name        string   `json:"name"`
	WindowSize  int64    `json:"window_size"`
	// Overwrite records that the first run was allowed to replace an
	// existing blob; BlobCreated that the blob has been made.
	Overwrite   bool `json:"overwrite,omitempty"`
	BlobCreated bool `json:"blob_created"`
	// Every window below DoneBelow is done, and so is every window in Done.
	DoneBelow int64   `json:"done_below"`
	Done      []int64 `json:"done,omitempty"`
	// BlobBytesDone is the size of the Put Page ranges of the done windows
	// (sent by any run, or found on the blob); NonZeroDone the bytes of
	// non-zero sectors in them.
	BlobBytesDone int64 `json:"blob_bytes_done"`
	NonZeroDone   int64 `json:"nonzero_bytes_done"`
	// SentTotal and PutsTotal add up every run, including what a killed
	// run sent after its last save.
	SentTotal int64     `json:"sent_bytes_total"`
	PutsTotal int64     `json:"puts_total"`
	Runs      int       `json:"runs"`
	StartedAt time.Time `json:"started_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

func loadProgress(dir string) (*progress, error) {
	b, err := os.ReadFile(filepath.Join(dir, ProgressFile))
	if err != nil {
		return nil, err
	}
	var p progress
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("%s/%s is damaged (%v); remove the state directory and import again", dir, ProgressFile, err)
	}
	if p.Version != progressVersion {
		return nil, fmt.Errorf("%s/%s has format version %d; this vhdsync reads version %d", dir, ProgressFile, p.Version, progressVersion)
	}
	if p.WindowSize != WindowSize {
		return nil, fmt.Errorf("%s/%s was written with %d-byte windows; this vhdsync uses %d", dir, ProgressFile, p.WindowSize, WindowSize)
	}
	return &p, nil
}

// save writes the progress atomically (temporary file, rename). The saves
// made while the import runs do not fsync: a process kill keeps the page
// cache, and after a power loss an older record only means rescanning
// more of the source (nothing the blob holds is sent again either way).
// With sync, the record and its name are durable when save returns: the
// first record must survive a power loss once the blob it announces is
// made, or a rerun would find that blob in its way and refuse.
func (p *progress) save(dir string, sync bool) error {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(dir, ProgressFile)
	if sync {
		err = durable.WriteFile(path, append(b, '\n'))
	} else {
		err = writeUnsynced(path, append(b, '\n'))
	}
	if err != nil {
		return fmt.Errorf("save import progress: %w", err)
	}
	return nil
}

// writeUnsynced replaces path with b atomically (temporary file, rename),
// without fsync.
func writeUnsynced(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// isDone reports whether window idx is recorded as done.
func (p *progress) isDone(idx int64) bool {
	if idx < p.DoneBelow {
		return true
	}
	_, ok := slices.BinarySearch(p.Done, idx)
	return ok
}

// tracker follows which windows are done while workers finish them out of
// order, and condenses that into a frontier plus the done windows above it.
type tracker struct {
	mu        sync.Mutex
	inflight  map[int64]struct{}
	next      int64 // every window below next was dispatched or skipped
	doneAbove map[int64]struct{}
	blobBytes int64
	nonZero   int64
	completed int64 // windows finished in this run
}

func newTracker(p *progress) *tracker {
	t := &tracker{inflight: map[int64]struct{}{}, doneAbove: map[int64]struct{}{}, next: p.DoneBelow,
		blobBytes: p.BlobBytesDone, nonZero: p.NonZeroDone}
	for _, d := range p.Done {
		t.doneAbove[d] = struct{}{}
	}
	return t
}

// passed records that the dispatcher reached window idx; inflight says
// whether it is handed to a worker (false: it was done already).
func (t *tracker) passed(idx int64, inflight bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if inflight {
		t.inflight[idx] = struct{}{}
	}
	t.next = max(t.next, idx+1)
}

// finishedAll records that the dispatcher handed out every window.
func (t *tracker) finishedAll() {
	t.mu.Lock()
	t.next = math.MaxInt64
	t.mu.Unlock()
}

func (t *tracker) done(idx, blobBytes, nonZero int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.inflight, idx)
	t.doneAbove[idx] = struct{}{}
	t.blobBytes += blobBytes
	t.nonZero += nonZero
	t.completed++
}

// record copies the tracker's state into p.
func (t *tracker) record(p *progress) {
	t.mu.Lock()
	defer t.mu.Unlock()
	frontier := t.next
	for idx := range t.inflight {
		frontier = min(frontier, idx)
	}
	done := make([]int64, 0, len(t.doneAbove))
	for idx := range t.doneAbove {
		if idx < frontier {
			delete(t.doneAbove, idx)
			continue
		}
		done = append(done, idx)
	}
	slices.Sort(done)
	if frontier == math.MaxInt64 {
		frontier = math.MaxInt64 / 2 // JSON-safe "everything"
	}
	p.DoneBelow, p.Done = frontier, done
	p.BlobBytesDone, p.NonZeroDone = t.blobBytes, t.nonZero
}

// heldSet is the blob's valid page ranges, sorted and merged.
type heldSet []pageblob.Range

func newHeldSet(rs []pageblob.Range) heldSet {
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(a, b pageblob.Range) int {
		switch {
		case a.Off < b.Off:
			return -1
		case a.Off > b.Off:
			return 1
		}
		return 0
	})
	var out heldSet
	for _, r := range rs {
		if n := len(out); n > 0 && r.Off <= out[n-1].Off+out[n-1].Len {
			out[n-1].Len = max(out[n-1].Len, r.Off+r.Len-out[n-1].Off)
			continue
		}
		out = append(out, r)
	}
	return out
}

// missing returns the parts of [off, end) the set does not cover.
func (h heldSet) missing(off, end int64) []span {
	i, _ := slices.BinarySearchFunc(h, off, func(r pageblob.Range, x int64) int {
		if r.Off+r.Len <= x {
			return -1
		}
		return 1
	})
	var out []span
	pos := off
	for ; i < len(h) && h[i].Off < end; i++ {
		if h[i].Off > pos {
			out = append(out, span{pos, h[i].Off})
		}
		pos = max(pos, h[i].Off+h[i].Len)
		if pos >= end {
			break
		}
	}
	if pos < end {
		out = append(out, span{pos, end})
	}
	return out
}

// bytesIn counts the held bytes inside [off, end).
func (h heldSet) bytesIn(off, end int64) int64 {
	var n int64
	for _, r := range h {
		lo, hi := max(r.Off, off), min(r.Off+r.Len, end)
		if lo < hi {
			n += hi - lo
		}
	}
	return n
}

// total is the number of bytes held.
func (h heldSet) total() int64 {
	var n int64
	for _, r := range h {
		n += r.Len
	}
	return n
}
