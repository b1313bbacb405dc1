package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/azure/staging"
	"github.com/vhdsync/vhdsync/internal/control"
	"github.com/vhdsync/vhdsync/internal/mountinfo"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/thin"
	"github.com/vhdsync/vhdsync/writeback"
)

// errWrongBlob: the blob's footer is not the one the state directory
// recorded, so the two describe different disks.
var errWrongBlob = errors.New("state directory belongs to another blob")

// errBusy: a mountpoint or state directory is in use.
var errBusy = errors.New("busy")

// busyError is a busy condition whose message stands on its own.
type busyError struct{ msg string }

// Error implements error.
func (e busyError) Error() string { return e.msg }

// Is matches the sentinel it stands for.
func (e busyError) Is(target error) bool { return target == errBusy }

func busyf(format string, args ...any) error { return busyError{fmt.Sprintf(format, args...)} }

// blobFlags are the flags of every command that reaches the blob of an
// existing state directory.
type blobFlags struct {
	sas string
}

func (b *blobFlags) register(cmdFlags interface {
	StringVar(p *string, name, value, usage string)
}) {
	cmdFlags.StringVar(&b.sas, "sas", "", "SAS token for the blob (never stored, never logged); other users can read a command line in ps, so prefer $VHDSYNC_SAS")
}

// connect opens the state directory's blob with the usual credential
// chain plus an optional SAS. flusher selects the client settings the
// flusher wants: no SDK retries (the flusher retries forever itself) and
// a bounded time per attempt.
func connect(g *globals, d *statedir.Dir, bf blobFlags, flusher bool) (*pageblob.Client, error) {
	url := d.State.BlobURL
	sas := bf.sas
	if sas == "" {
		sas = g.env("VHDSYNC_SAS")
	}
	if sas != "" {
		url += "?" + strings.TrimPrefix(sas, "?")
	}
	// Interactive commands give up after one retry, so an unreachable
	// remote is reported in seconds, not after the SDK's long backoff.
	o := &pageblob.Options{Env: g.env, MaxRetries: 1, TryTimeout: 30 * time.Second}
	if flusher {
		o.MaxRetries = -1
		o.TryTimeout = 2 * time.Minute
	}
	return pageblob.Open(url, o)
}

// checkBlob verifies that the blob is a valid fixed VHD and the very disk
// the state directory describes (same footer, so same size and disk id).
func checkBlob(ctx context.Context, c *pageblob.Client, d *statedir.Dir) error {
	if err := pendingResize(d); err != nil {
		return err
	}
	info, err := c.OpenVHD(ctx)
	if err != nil {
		return err
	}
	if info.Raw != d.FooterBytes() {
		return fmt.Errorf("%w: the blob %s has disk id %s and %d bytes, but %s records disk id %s and %d bytes; use the state directory made for this blob",
			errWrongBlob, c.Location().URL(), info.Footer.UniqueID, info.Footer.CurrentSize, d.Path, d.State.DiskID, d.State.VirtualSize)
	}
	return nil
}

// vhdsyncMount is a vhdsync FUSE mount found in /proc/self/mountinfo.
type vhdsyncMount struct {
	Mountpoint string
	StateDir   string
}

// findMount returns the vhdsync mount at mp, if any.
func findMount(mp string) (vhdsyncMount, bool, error) {
	abs, err := filepath.Abs(mp)
	if err != nil {
		return vhdsyncMount{}, false, err
	}
	mounts, err := vhdsyncMounts()
	if err != nil {
		return vhdsyncMount{}, false, err
	}
	for _, m := range mounts {
		if m.Mountpoint == abs {
			return m, true, nil
		}
	}
	return vhdsyncMount{}, false, nil
}

// vhdsyncMounts lists the mounts of type fuse.vhdsync; their source is the
// state directory (fusefs.Options.FsName).
func vhdsyncMounts() ([]vhdsyncMount, error) {
	mounts, err := mountinfo.Read()
	if err != nil {
		return nil, err
	}
	var out []vhdsyncMount
	for _, m := range mounts {
		if m.FSType == "fuse.vhdsync" {
			out = append(out, vhdsyncMount{Mountpoint: m.Mountpoint, StateDir: m.Source})
		}
	}
	return out, nil
}

// loopDevicesOn lists loop devices whose backing file is under dir.
func loopDevicesOn(dir string) []string {
	var out []string
	entries, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range entries {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		backing := strings.TrimSpace(string(b))
		if strings.HasPrefix(backing, dir+"/") {
			dev := filepath.Base(filepath.Dir(filepath.Dir(p)))
			out = append(out, "/dev/"+dev+" ("+backing+")")
		}
	}
	return out
}

// errNotDrained: a stop or unmount ended with writes still in the journal.
var errNotDrained = errors.New("not drained")

// diskOptions are the options of writeback.Open that the state directory
// and the transfer decide, for mount and replay alike: the image, journal
// and size of d, the blob c, the staging store (nil: direct), and the
// lease remembered in d (saved when it changes).
func diskOptions(d *statedir.Dir, c *pageblob.Client, store *staging.Store, breakLease bool) writeback.DiskOptions {
	o := writeback.DiskOptions{
		DiskID:       d.State.DiskID,
		ImagePath:    d.ImagePath(),
		JournalDir:   d.JournalPath(),
		VirtualSize:  int64(d.State.VirtualSize),
		Remote:       pageblob.Remote{C: c},
		LeaseID:      d.State.LeaseID,
		SaveLeaseID:  func(id string) error { d.State.LeaseID = id; return d.Save() },
		BreakLease:   breakLease,
		BaseSequence: d.State.BaseSequence,
	}
	if store != nil {
		o.Staging = store
	}
	return o
}

// thinOptions makes o serve a thin state directory (create --from-blob
// --thin): its record of the chunks present, the blob to fetch the rest
// from, and, once every chunk is local, the state saved as no longer thin
// and the record removed. A state directory that is not thin has nothing
// to do, but a record left by a crash after its state was saved whole.
func thinOptions(d *statedir.Dir, c *pageblob.Client, o *writeback.DiskOptions, log *slog.Logger) error {
	if !d.State.Thin {
		return thin.Remove(d.Path)
	}
	m, err := thin.Open(d.Path, int64(d.State.VirtualSize))
	if err != nil {
		return fmt.Errorf("%s: %w; the blob still holds the chunks not yet local: make a new state directory with `vhdsync create --from-blob`", d.Path, err)
	}
	o.Thin, o.ThinSource = m, c
	o.OnThinComplete = func() error {
		d.State.Thin = false
		if err := d.Save(); err != nil {
			d.State.Thin = true
			return fmt.Errorf("record the disk as complete: %w", err)
		}
		log.Info("thin disk complete: every chunk is local; the state directory is an ordinary one now")
		return thin.Remove(d.Path)
	}
	return nil
}

// refuseThin refuses what a thin state directory cannot do (what is not
// local yet exists only on the blob): why names the operation.
func refuseThin(d *statedir.Dir, what string) error {
	if !d.State.Thin {
		return nil
	}
	return usageError{fmt.Errorf("%s: %s is a thin disk whose chunks are not all local yet (the blob holds the rest); mount it and wait until `vhdsync status --state %s` no longer shows it thin", what, d.Path, d.Path)}
}

// prefetchFlag is mount --prefetch parsed.
type prefetchFlag struct {
	off  bool
	opts thin.PrefetchOptions
}

// parsePrefetch reads --prefetch: on, off, or a cap in MiB/s.
func parsePrefetch(s string) (prefetchFlag, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "on", "":
		return prefetchFlag{}, nil
	case "off", "0":
		return prefetchFlag{off: true}, nil
	}
	v, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(s), "MiB/s"), 64)
	if err != nil || v <= 0 {
		return prefetchFlag{}, usageError{fmt.Errorf("--prefetch %q: give on, off, or a rate in MiB/s such as 20", s)}
	}
	return prefetchFlag{opts: thin.PrefetchOptions{BytesPerSecond: int64(v * (1 << 20))}}, nil
}

// thinStatus is status's view of a thin disk (nil: not thin, or complete
// before this mount).
func thinStatus(s *thin.Stats, err error, prefetch string, since time.Time) *control.Thin {
	if s == nil || (s.MissingChunks == 0 && s.FetchedBytes == 0) {
		return nil
	}
	t := &control.Thin{
		AllocatedBytes: s.AllocatedBytes, PresentBytes: s.PresentBytes, MissingChunks: s.MissingChunks,
		FetchedBytes: s.FetchedBytes, FetchRequests: s.Requests, DemandChunks: s.DemandChunks, PrefetchChunks: s.PrefetchChunks,
		DemandWaitSeconds: s.DemandWait.Seconds(), ReadThroughBytes: s.ReadThroughBytes, Prefetch: prefetch,
	}
	if el := time.Since(since).Seconds(); el > 0 {
		t.FetchBytesPerSec = float64(s.FetchedBytes) / el
	}
	if t.FetchBytesPerSec > 0 && s.MissingChunks > 0 {
		t.CompleteInSeconds = float64(s.AllocatedBytes-s.PresentBytes) / t.FetchBytesPerSec
	}
	if err != nil {
		t.Error = err.Error()
	}
	return t
}

// openLocked opens the state directory for a command that changes it:
// it must be writable, and the command holds its lock (doing is what the
// lock file says, e.g. "replaying") until it calls Unlock.
func openLocked(state, doing string) (*statedir.Dir, *statedir.Lock, error) {
	d, err := statedir.Open(state)
	if err != nil {
		return nil, nil, err
	}
	if err := d.CheckWritable(); err != nil {
		return nil, nil, err
	}
	lock, err := d.TryLock(doing)
	if err != nil {
		return nil, nil, err
	}
	return d, lock, nil
}

// newStateAdvice says how to start over from the blob as it is: a new
// state directory, ready at once when thin.
func newStateAdvice(blobURL string) string {
	return fmt.Sprintf("make a new state directory: `vhdsync create --from-blob %s --state NEWDIR --thin` is ready at once and fetches the data as it is used", blobURL)
}

// blobMovedAdvice adds what to do to writeback.ErrBlobMoved.
func blobMovedAdvice(err error, d *statedir.Dir) error {
	if !errors.Is(err, writeback.ErrBlobMoved) {
		return err
	}
	if d.State.Thin {
		// A thin image is partly the old blob's: nothing can resync it.
		return fmt.Errorf("%w; this state directory is thin, and its chunks not yet local were the old disk's: %s", err, newStateAdvice(d.State.BlobURL))
	}
	return fmt.Errorf("%w; the image holds the older disk: `vhdsync resync --state %s` brings it up to the blob by diff where recovery points allow, else %s", err, d.Path, newStateAdvice(d.State.BlobURL))
}
