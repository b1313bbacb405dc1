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

	"github.com/vhdsync/vhdsync/internal/statedir"
)

// FromBlobOptions configure CreateStateFromBlob.
type FromBlobOptions struct {
	// Name of the files the mount shows; default: the blob name without .vhd.
	Name string
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
	if err := os.MkdirAll(abs, 0o700); err != nil {
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
			for _, n := range []string{statedir.ImageFile, statedir.ImageFile + ".part", statedir.LockFile, statedir.StateFile} {
				_ = os.Remove(filepath.Join(abs, n))
			}
			if madeDir {
				_ = os.Remove(abs)
			}
		}
	}()
	raw := d.o.Raw
	d.o.Raw = true
	res, err = d.Run(ctx, sd.ImagePath())
	d.o.Raw = raw
	if err != nil {
		return nil, res, err
	}
	f := d.info.Footer
	sd.State = statedir.State{
		Version: statedir.FormatVersion, Name: name, BlobURL: loc.URL(), VirtualSize: f.CurrentSize,
		DiskID: f.UniqueID.String(), Geometry: f.Geometry.String(), Footer: d.info.Raw[:], CreatedAt: time.Now().UTC(),
	}
	if err := sd.Save(); err != nil {
		return nil, res, err
	}
	ok = true
	return sd, res, nil
}
