// Package statedir owns vhdsync's local state directory: the description of
// the disk (blob URL, size, geometry, UUID, footer) in vhdsync.json and the
// sparse local image that always holds the newest state of the disk. The
// journal lives beside them (see package writeback).
//
// The directory and its files are private to the user (0700/0600): the
// image holds the disk's data. The blob URL is stored without any SAS.
package statedir

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vhdsync/vhdsync/internal/durable"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// File names inside a state directory.
const (
	StateFile  = "vhdsync.json"
	ImageFile  = "disk.img"
	JournalDir = "journal"
	LogFile    = "vhdsync.log"
)

// FormatVersion is the version of vhdsync.json this code writes and reads.
const FormatVersion = 1

// ErrExists: the directory already holds something; vhdsync never reuses it.
var ErrExists = errors.New("state directory is not empty")

// ErrNotState: the directory is not a vhdsync state directory, or is damaged.
var ErrNotState = errors.New("not a vhdsync state directory")

// ErrNotWritable: the directory cannot be written (read-only file system,
// permissions), so the journal cannot be kept there.
var ErrNotWritable = errors.New("state directory is not writable")

// CheckWritable refuses a state directory this process cannot write to,
// before anything (the log, the lock, the journal) tries to.
func (d *Dir) CheckWritable() error {
	if err := syscall.Access(d.Path, 2 /* W_OK */); err != nil {
		return fmt.Errorf("%w: %s: %v; vhdsync keeps the journal, the image and its log there, so it must be writable (a read-only mount or missing permissions?)", ErrNotWritable, d.Path, err)
	}
	return nil
}

// State is the content of vhdsync.json.
type State struct {
	Version     int       `json:"version"`
	Name        string    `json:"name"`
	BlobURL     string    `json:"blob_url"`
	VirtualSize uint64    `json:"virtual_size"`
	DiskID      string    `json:"disk_id"`
	Geometry    string    `json:"geometry"`
	Footer      []byte    `json:"footer"`
	CreatedAt   time.Time `json:"created_at"`
	// LeaseID is the Azure lease this state directory holds on the blob,
	// kept so that the same host re-acquires it after a crash.
	LeaseID string `json:"lease_id,omitempty"`
	// Transfer is how the last mount replicated: "" or "direct" (Put Page
	// to the blob) or "staged" (segments in StagingURL, applied by
	// `vhdsync apply`). StagingURL is kept without any SAS.
	Transfer   string `json:"transfer,omitempty"`
	StagingURL string `json:"staging_url,omitempty"`
	// RecoveryPoints is the last mount's --recovery-points interval (a Go
	// duration; "" for none) and Keep its --keep: a mount without the
	// flag takes recovery points as the last one did, so that a restart
	// after a crash does not silently stop them.
	RecoveryPoints string `json:"recovery_points,omitempty"`
	Keep           int    `json:"keep,omitempty"`
	// Resize, when set, is a resize that was begun and not finished (a
	// crash cut it): the next mount or replay finishes it before anything
	// else touches the blob (see writeback.ResizeBlob). VirtualSize and
	// Footer stay the old disk's until it is finished.
	Resize *ResizeIntent `json:"resize,omitempty"`
	// Thin says the disk was attached thin (create --from-blob --thin) and
	// not every chunk is local yet: the blob holds the rest, and the thin
	// record beside the image says which (see package thin).
	Thin bool `json:"thin,omitempty"`
	// BaseSequence is the blob's sequence number when this state
	// directory last took the blob as its own: made it or attached it
	// (create, import), changed its size (resize) or caught up with
	// another writer's changes (resync). A mount refuses a blob beyond it
	// and beyond everything the journal wrote (another writer wrote it
	// since). Absent in state directories made before it was recorded:
	// then nothing is checked.
	BaseSequence *int64 `json:"base_sequence,omitempty"`
}

// SetBase records the blob's sequence number n as the one this state
// directory took it at (see State.BaseSequence); the caller saves.
func (s *State) SetBase(n int64) { s.BaseSequence = &n }

// ResizeIntent records a resize of the disk from From to To bytes, made an
// ordered step at epoch Epoch of the journal: the blob is marked
// remote.Started(Epoch) while its size and footer change and
// remote.Complete(Epoch) once the new footer is in place. Footer is the new
// size's footer (same disk id).
type ResizeIntent struct {
	From   uint64 `json:"from"`
	To     uint64 `json:"to"`
	Epoch  uint64 `json:"epoch"`
	Footer []byte `json:"footer"`
}

// BeginResize records r durably before the blob or the image changes.
func (d *Dir) BeginResize(r ResizeIntent) error {
	d.State.Resize = &r
	if err := d.Save(); err != nil {
		d.State.Resize = nil
		return fmt.Errorf("record the resize: %w", err)
	}
	return nil
}

// FinishResize records the new size and footer and drops the intent, once
// the blob and the image have the new size.
func (d *Dir) FinishResize() error {
	r := d.State.Resize
	if r == nil {
		return nil
	}
	f, err := vhdlayer.DecodeFooter(r.Footer)
	if err != nil {
		return fmt.Errorf("%w: the footer of the recorded resize: %w", ErrNotState, err)
	}
	// Field by field, not the whole State: a daemon reads other fields
	// (the blob URL) while it serves.
	size, footer, geometry := d.State.VirtualSize, d.State.Footer, d.State.Geometry
	base := d.State.BaseSequence
	d.State.VirtualSize = r.To
	d.State.Footer = append([]byte(nil), r.Footer...)
	d.State.Geometry = f.Geometry.String()
	d.State.Resize = nil
	// The resize's own epoch is on the blob, and in no journal record.
	d.State.SetBase(2 * int64(r.Epoch))
	if err := d.Save(); err != nil {
		d.State.VirtualSize, d.State.Footer, d.State.Geometry, d.State.Resize, d.State.BaseSequence = size, footer, geometry, r, base
		return fmt.Errorf("record the new size: %w", err)
	}
	return nil
}

// Dir is an open state directory.
type Dir struct {
	Path  string
	State State
}

// ImagePath is the local image's path.
func (d *Dir) ImagePath() string { return filepath.Join(d.Path, ImageFile) }

// JournalPath is the journal directory's path.
func (d *Dir) JournalPath() string { return filepath.Join(d.Path, JournalDir) }

// CheckNew returns nil if path does not exist or is an empty directory,
// the only places Create will use.
func CheckNew(path string) error {
	if st, err := os.Stat(path); err == nil && !st.IsDir() {
		return fmt.Errorf("%w: %s is a file, not a directory; give --state a new or empty directory", ErrNotState, path)
	}
	entries, err := os.ReadDir(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w: state directory %s cannot be used: %w", ErrNotState, path, err)
	}
	if len(entries) > 0 {
		if _, err := os.Stat(filepath.Join(path, StateFile)); err == nil {
			return fmt.Errorf("%w: %s already holds a vhdsync disk; choose another --state, or remove it first if that disk is no longer needed", ErrExists, path)
		}
		return fmt.Errorf("%w: %s has %d entries; choose a new or empty directory for --state", ErrExists, path, len(entries))
	}
	return nil
}

// Create makes a new state directory at path for st: the directory, a
// sparse image of st.VirtualSize bytes and vhdsync.json, written last and
// atomically so that a directory with a state file is always complete.
func Create(path string, st State) (*Dir, error) {
	if err := CheckNew(path); err != nil {
		return nil, err
	}
	st.Version = FormatVersion
	if err := durable.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	d := &Dir{Path: path, State: st}
	img, err := os.OpenFile(d.ImagePath(), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create local image: %w", err)
	}
	if err := img.Truncate(int64(st.VirtualSize)); err != nil {
		img.Close()
		return nil, fmt.Errorf("size local image to %d bytes: %w", st.VirtualSize, err)
	}
	if err := img.Sync(); err != nil {
		img.Close()
		return nil, fmt.Errorf("sync local image: %w", err)
	}
	if err := img.Close(); err != nil {
		return nil, fmt.Errorf("close local image: %w", err)
	}
	if err := d.Save(); err != nil {
		return nil, err
	}
	return d, nil
}

// Save writes vhdsync.json atomically (temporary file, fsync, rename,
// fsync of the directory).
func (d *Dir) Save() error {
	b, err := json.MarshalIndent(d.State, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	if err := durable.WriteFile(filepath.Join(d.Path, StateFile), append(b, '\n')); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	return nil
}

func syncDir(path string) error { return durable.SyncDir(path) }

// Open reads an existing state directory and checks that it is whole: the
// state file parses, the footer in it is valid for the recorded size, and
// the image has the recorded size. Path is made absolute: it is recorded
// where other processes in other directories read it (the mount's source
// in /proc/mounts, which `vhdsync unmount` follows to the control socket).
func Open(path string) (*Dir, error) {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	if st, err := os.Stat(path); err == nil && !st.IsDir() {
		return nil, fmt.Errorf("%w: %s is a file, not a state directory; give --state the directory `vhdsync create` made", ErrNotState, path)
	}
	b, err := os.ReadFile(filepath.Join(path, StateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s has no %s; create one with `vhdsync create`", ErrNotState, path, StateFile)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: read %s: %w", ErrNotState, filepath.Join(path, StateFile), err)
	}
	d := &Dir{Path: path}
	if err := json.Unmarshal(b, &d.State); err != nil {
		return nil, fmt.Errorf("%w: %s/%s is damaged: %v", ErrNotState, path, StateFile, err)
	}
	if d.State.Version != FormatVersion {
		return nil, fmt.Errorf("%w: %s/%s has format version %d; this vhdsync reads version %d", ErrNotState, path, StateFile, d.State.Version, FormatVersion)
	}
	f, err := vhdlayer.DecodeFooter(d.State.Footer)
	if err != nil {
		return nil, fmt.Errorf("%w: the footer recorded in %s/%s: %w", ErrNotState, path, StateFile, err)
	}
	if f.CurrentSize != d.State.VirtualSize {
		return nil, fmt.Errorf("%w: %s records %d bytes but its footer says %d", ErrNotState, path, d.State.VirtualSize, f.CurrentSize)
	}
	st, err := os.Stat(d.ImagePath())
	if err != nil {
		return nil, fmt.Errorf("%w: local image: %w", ErrNotState, err)
	}
	if r := d.State.Resize; r != nil && (uint64(st.Size()) == r.From || uint64(st.Size()) == r.To) {
		// A resize was cut between the image's truncate and the state
		// file: either size is the one it left; finishing it sets the new.
		return d, nil
	}
	if uint64(st.Size()) != d.State.VirtualSize {
		return nil, fmt.Errorf("%w: local image %s is %d bytes, want %d", ErrNotState, d.ImagePath(), st.Size(), d.State.VirtualSize)
	}
	return d, nil
}

// FooterBytes returns the recorded footer as a fixed-size array.
func (d *Dir) FooterBytes() [vhdlayer.FooterSize]byte {
	var b [vhdlayer.FooterSize]byte
	copy(b[:], d.State.Footer)
	return b
}
