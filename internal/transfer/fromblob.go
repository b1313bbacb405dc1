package transfer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/vhdsync/vhdsync/internal/durable"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/thin"
)

// FromBlobOptions configure CreateStateFromBlob.
type FromBlobOptions struct {
	// Name of the files the mount shows; default: the blob name without .vhd.
	Name string
	// Sequence is the blob's sequence number, read before its data
	// (State.BaseSequence).
	Sequence int64
	// Thin makes the state directory without downloading: an empty
	// image and the thin record (see package thin) of the blob's page
	// ranges at Sequence, under the lease LeaseID the caller acquired
	// first (so that nothing changes the ranges while they are listed,
	// and until the disk is complete).
	Thin    bool
	LeaseID string
}

// CreateStateFromBlob builds a state directory for the existing page-blob
// VHD that d was prepared for: the blob's data downloaded into a sparse
// disk.img, then vhdsync.json written last, the way statedir.Create leaves
// a directory, so that `vhdsync mount` can use it. A failure removes what
// was made.
func CreateStateFromBlob(ctx context.Context, d *Download, dir string, o FromBlobOptions) (*statedir.Dir, DownloadResult, error) {
	var res DownloadResult
	if err := statedir.CheckNew(dir); err != nil {
		return nil, res, err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, res, err
	}
	loc := d.c.Location()
	name := o.Name
	if name == "" {
		name = strings.TrimSuffix(path.Base(loc.Blob), ".vhd")
	}
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return nil, res, fmt.Errorf("disk name %q: must be a plain file name (choose one with --name)", name)
	}
	_, statErr := os.Stat(abs)
	madeDir := errors.Is(statErr, os.ErrNotExist)
	// Durably: a power loss must not take the directory (and the state
	// file in it) back after the command said it was made.
	if err := durable.MkdirAll(abs, 0o700); err != nil {
		return nil, res, fmt.Errorf("create state directory: %w", err)
	}
	sd := &statedir.Dir{Path: abs}
	lock, err := sd.TryLock("creating from " + loc.URL())
	if err != nil {
		return nil, res, err
	}
	defer lock.Unlock()
	ok := false
	defer func() {
		if !ok {
			for _, n := range []string{statedir.ImageFile, statedir.ImageFile + ".part", statedir.LockFile, statedir.StateFile, thin.RangesFile, thin.PresentFile} {
				_ = os.Remove(filepath.Join(abs, n))
			}
			if madeDir {
				_ = os.Remove(abs)
			}
		}
	}()
	if o.Thin {
		start := time.Now()
		if err := d.makeThin(abs, sd.ImagePath(), o.Sequence); err != nil {
			return nil, res, err
		}
		res = DownloadResult{DownloadPlan: d.plan, Path: sd.ImagePath(), FileSize: d.plan.VirtualSize, Duration: time.Since(start)}
	} else {
		raw := d.o.Raw
		d.o.Raw = true
		res, err = d.Run(ctx, sd.ImagePath())
		d.o.Raw = raw
		if err != nil {
			return nil, res, err
		}
	}
	f := d.info.Footer
	sd.State = statedir.State{
		Version: statedir.FormatVersion, Name: name, BlobURL: loc.URL(), VirtualSize: f.CurrentSize,
		DiskID: f.UniqueID.String(), Geometry: f.Geometry.String(), Footer: d.info.Raw[:], CreatedAt: time.Now().UTC(),
		Thin: o.Thin, LeaseID: o.LeaseID,
	}
	sd.State.SetBase(o.Sequence)
	if err := sd.Save(); err != nil {
		return nil, res, err
	}
	ok = true
	return sd, res, nil
}

// makeThin writes an empty (sparse) image of the disk's size and the thin
// record of the blob's page ranges, all durable.
func (d *Download) makeThin(dir, image string, seq int64) error {
	size := d.plan.VirtualSize
	f, err := os.OpenFile(image, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("create local image: %w", err)
	}
	err = f.Truncate(size)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("create local image: %w", err)
	}
	rs := make([]thin.Range, 0, len(d.ranges))
	for _, r := range d.ranges {
		if n := len(rs); n > 0 && rs[n-1].End == r.Off {
			rs[n-1].End += r.Len
			continue
		}
		rs = append(rs, thin.Range{Off: r.Off, End: r.Off + r.Len})
	}
	if err := thin.Create(dir, size, seq, rs); err != nil {
		return err
	}
	return durable.SyncDir(dir)
}
