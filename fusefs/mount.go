package fusefs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vhdsync/vhdsync/vhdlayer"
)

// Options configure Mount.
type Options struct {
	// Name is the base name of the two files (NAME.vhd, NAME.img).
	Name string
	// FsName appears as the mount's source in /proc/mounts; vhdsync puts
	// the state directory there so `vhdsync unmount MOUNTPOINT` finds it.
	FsName string
	// Footer is the VHD footer shown at the end of NAME.vhd.
	Footer [vhdlayer.FooterSize]byte
	// AllowOther lets other users than the mounting one reach the files
	// (their mode still applies). Off by default.
	AllowOther bool
	// Mode is the files' permission bits (default 0600).
	Mode uint32
	// MaxWrite is the largest write the kernel sends (default 256 KiB,
	// chosen by measurement: with fio on the .img view, remote detached,
	// 256 KiB gave 1.1-1.4 GiB/s for 1 MiB sequential writes and 22-24k
	// IOPS for 4 KiB random writes, against 0.45-1.0 GiB/s and 16-17k at
	// 1 MiB and 0.42-0.45 GiB/s at 512 KiB: go-fuse sizes its request
	// buffers by MaxWrite, and a 1 MiB write split into four runs in
	// parallel with FOPEN_PARALLEL_DIRECT_WRITES).
	MaxWrite int
	// NoDirectIO serves files through the kernel page cache instead of
	// FOPEN_DIRECT_IO; NoParallelWrites drops FOPEN_PARALLEL_DIRECT_WRITES.
	// Both exist to measure the defaults against.
	NoDirectIO       bool
	NoParallelWrites bool
	// MaxBackground is the kernel's limit of outstanding async requests
	// (default 64).
	MaxBackground int
	// Debug logs every FUSE request.
	Debug  bool
	Logger *slog.Logger
	// Views, if set, is filled in by Mount: the handle through which the
	// daemon changes the files' size while mounted (Views.Resize).
	Views *Views
	// Latency, if set, is told how long each write (OpWrite) and fsync
	// (OpFsync) took to answer, refused ones included: the latency
	// histograms of `mount --metrics`. Nil costs nothing.
	Latency func(op string, d time.Duration)
}

// The operations Options.Latency is told about.
const (
	OpWrite = "write"
	OpFsync = "fsync"
)

// Mount serves disk at dir and returns once the kernel has the mount.
// Counters count the FUSE operations. Unmount with server.Unmount (or
// umount); server.Wait returns when the mount is gone.
func Mount(dir string, disk Disk, o Options) (*fuse.Server, *Counters, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Mode == 0 {
		o.Mode = 0o600
	}
	if o.MaxWrite == 0 {
		o.MaxWrite = 256 << 10
	}
	cnt := &Counters{}
	now := time.Now()
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	views := o.Views
	if views == nil {
		views = &Views{}
	}
	views.dir, views.name = dir, o.Name
	views.shape.Store(&shape{layout: vhdlayer.Layout{VirtualSize: disk.Size()}, footer: o.Footer})
	if o.MaxBackground == 0 {
		o.MaxBackground = 64
	}
	var openFlags uint32
	if !o.NoDirectIO {
		openFlags |= fuse.FOPEN_DIRECT_IO
		if !o.NoParallelWrites {
			openFlags |= fuse.FOPEN_PARALLEL_DIRECT_WRITES
		}
	}
	newFile := func(withFooter bool) *diskFile {
		return &diskFile{disk: disk, vhd: withFooter, shape: &views.shape, uid: uid, gid: gid, mode: o.Mode, mtime: now, log: o.Logger, cnt: cnt, openFlags: openFlags, latency: o.Latency}
	}
	root := &fs.Inode{}
	long := time.Hour
	opts := &fs.Options{
		// Names never change while mounted, sizes only by a resize,
		// which tells the kernel (Views.Resize): cache them.
		EntryTimeout: &long,
		AttrTimeout:  &long,
		UID:          uid,
		GID:          gid,
		OnAdd: func(ctx context.Context) {
			vhdFile, imgFile := newFile(true), newFile(false)
			views.files = []*diskFile{vhdFile, imgFile}
			vhd := root.NewPersistentInode(ctx, vhdFile, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
			img := root.NewPersistentInode(ctx, imgFile, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 3})
			root.AddChild(o.Name+".vhd", vhd, true)
			root.AddChild(o.Name+".img", img, true)
		},
		MountOptions: fuse.MountOptions{
			FsName:        o.FsName,
			Name:          "vhdsync",
			AllowOther:    o.AllowOther,
			MaxWrite:      o.MaxWrite,
			MaxBackground: o.MaxBackground,
			DisableXAttrs: true,
			// As root, mount(2) directly: no fusermount binary needed.
			DirectMount:       os.Geteuid() == 0,
			DirectMountStrict: os.Geteuid() == 0,
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
			Debug:             o.Debug,
		},
	}
	server, err := fs.Mount(dir, root, opts)
	if err != nil {
		return nil, nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	return server, cnt, nil
}

// Views is the mounted files' size and footer, changed while mounted by
// a resize. Fill one in through Options.Views.
type Views struct {
	shape atomic.Pointer[shape]
	files []*diskFile // the .vhd and .img views, once mounted
	dir   string
	name  string
}

// Resize shows the disk at size bytes with footer (the disk must have that
// size already), then tells the kernel: the files' cached attributes (and
// any cached pages) are invalidated, and both files are stat'ed so that
// the kernel's inode size, which the loop driver reads at `losetup -c`,
// is the new one when Resize returns.
func (v *Views) Resize(size int64, footer [vhdlayer.FooterSize]byte) error {
	v.shape.Store(&shape{layout: vhdlayer.Layout{VirtualSize: size}, footer: footer})
	var errs []error
	for _, f := range v.files {
		if errno := f.NotifyContent(0, 0); errno != 0 && errno != syscall.ENOENT {
			// ENOENT: the kernel has not looked the file up yet, so it
			// caches nothing about it.
			errs = append(errs, fmt.Errorf("tell the kernel %s changed size: %w", f.Path(nil), errno))
		}
	}
	for _, ext := range []string{".vhd", ".img"} {
		p := filepath.Join(v.dir, v.name+ext)
		st, err := os.Stat(p)
		if err != nil {
			errs = append(errs, fmt.Errorf("stat %s after the resize: %w", p, err))
			continue
		}
		want := size
		if ext == ".vhd" {
			want += vhdlayer.FooterSize
		}
		if st.Size() != want {
			errs = append(errs, fmt.Errorf("%s shows %d bytes after the resize, want %d: the kernel kept the old size", p, st.Size(), want))
		}
	}
	return errors.Join(errs...)
}
