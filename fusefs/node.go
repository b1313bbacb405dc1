package fusefs

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vhdsync/vhdsync/vhdlayer"
	"github.com/vhdsync/vhdsync/writeback"
)

// Disk is what the files are views of; *writeback.Disk implements it.
type Disk interface {
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(ctx context.Context, p []byte, off int64) error
	Zero(ctx context.Context, off, n int64, discard bool) error
	Flush() error
}

var _ Disk = (*writeback.Disk)(nil)

// Counters are the FUSE-level operation counts (status and benchmarks).
type Counters struct {
	Reads, Writes, Fsyncs, Discards, ZeroRanges, Refused atomic.Uint64
	BytesRead, BytesWritten                              atomic.Uint64
}

// shape is the views' size and footer. It is replaced whole when the disk
// is resized (Views.Resize), so one operation sees one shape.
type shape struct {
	layout vhdlayer.Layout
	footer [vhdlayer.FooterSize]byte
}

// diskFile is one view of the disk. With vhd set it is the .vhd view: the
// data region followed by the footer.
type diskFile struct {
	fs.Inode
	disk  Disk
	vhd   bool
	shape *atomic.Pointer[shape]
	uid   uint32
	gid   uint32
	mode  uint32
	mtime time.Time
	log   *slog.Logger
	cnt   *Counters
	// openFlags are the FOPEN_* flags every handle gets.
	openFlags uint32
	// latency is Options.Latency (nil: not measured).
	latency func(op string, d time.Duration)
}

// since tells latency how long op has taken since start (deferred in the
// handlers it times).
func (f *diskFile) since(op string, start time.Time) {
	if f.latency != nil {
		f.latency(op, time.Since(start))
	}
}

// startClock is the start of a measured operation: the zero time when
// nothing measures, so an unmeasured mount does not read the clock.
func (f *diskFile) startClock() time.Time {
	if f.latency == nil {
		return time.Time{}
	}
	return time.Now()
}

var (
	_ = (fs.NodeGetattrer)((*diskFile)(nil))
	_ = (fs.NodeSetattrer)((*diskFile)(nil))
	_ = (fs.NodeOpener)((*diskFile)(nil))
	_ = (fs.NodeReader)((*diskFile)(nil))
	_ = (fs.NodeWriter)((*diskFile)(nil))
	_ = (fs.NodeFsyncer)((*diskFile)(nil))
	_ = (fs.NodeFlusher)((*diskFile)(nil))
	_ = (fs.NodeAllocater)((*diskFile)(nil))
)

// size is the view's length in sh.
func (f *diskFile) size(sh *shape) int64 {
	if f.vhd {
		return sh.layout.VHDSize()
	}
	return sh.layout.VirtualSize
}

// split cuts [off, off+n) of the view into its data and footer parts.
func (f *diskFile) split(sh *shape, off, n int64) (dataLen, footOff, footLen int64) {
	if f.vhd {
		return sh.layout.Split(off, n)
	}
	return n, 0, 0
}

func (f *diskFile) fill(out *fuse.Attr) {
	out.Mode = syscall.S_IFREG | f.mode
	out.Size = uint64(f.size(f.shape.Load()))
	out.Blocks = (out.Size + 511) / 512
	out.Blksize = 4096
	out.Nlink = 1
	out.Uid, out.Gid = f.uid, f.gid
	out.SetTimes(&f.mtime, &f.mtime, &f.mtime)
}

// Getattr reports a regular file of the view's fixed size.
func (f *diskFile) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.fill(&out.Attr)
	return 0
}

// Setattr refuses size changes (truncate: a disk changes size only through
// `vhdsync resize`, which orders it with the journal) and accepts time
// updates as no-ops.
func (f *diskFile) Setattr(_ context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != f.size(f.shape.Load()) {
		f.cnt.Refused.Add(1)
		f.log.Warn("refused a size change: truncate cannot resize the disk; use `vhdsync resize`", "file", f.Path(nil), "size", sz)
		return syscall.EPERM
	}
	if _, ok := in.GetMode(); ok {
		return syscall.EPERM
	}
	if _, ok := in.GetUID(); ok {
		return syscall.EPERM
	}
	if _, ok := in.GetGID(); ok {
		return syscall.EPERM
	}
	f.fill(&out.Attr)
	return 0
}

// Open serves every handle with direct I/O (no page cache in front of the
// journal: each write reaches it, and reads see the newest state) and
// parallel direct writes (the range lock orders overlapping ones).
func (f *diskFile) Open(_ context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_TRUNC != 0 {
		// A disk cannot be truncated. Accepting O_TRUNC as a no-op is not
		// an option: the kernel would then take the file's size as 0.
		f.cnt.Refused.Add(1)
		f.log.Warn("refused an open with O_TRUNC: a disk cannot be truncated (with dd, add conv=notrunc)", "file", f.Path(nil))
		return nil, 0, syscall.EPERM
	}
	return nil, f.openFlags, 0
}

// Read reads the data region from the disk and the footer from memory.
func (f *diskFile) Read(_ context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	sh := f.shape.Load()
	if off >= f.size(sh) || len(dest) == 0 {
		return fuse.ReadResultData(nil), 0
	}
	n := min(int64(len(dest)), f.size(sh)-off)
	dest = dest[:n]
	dataLen, footOff, footLen := f.split(sh, off, n)
	if dataLen > 0 {
		if _, err := f.disk.ReadAt(dest[:dataLen], off); err != nil {
			f.log.Error("read failed", "off", off, "len", dataLen, "err", err)
			return nil, syscall.EIO
		}
	}
	if footLen > 0 {
		copy(dest[dataLen:], sh.footer[footOff:footOff+footLen])
	}
	f.cnt.Reads.Add(1)
	f.cnt.BytesRead.Add(uint64(n))
	return fuse.ReadResultData(dest), 0
}

// Write journals data-region bytes. Bytes that fall in the footer must
// equal it (tools that rewrite the whole file are allowed); any change to
// the footer is refused with EPERM before anything is written.
func (f *diskFile) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	defer f.since(OpWrite, f.startClock())
	n := int64(len(data))
	sh := f.shape.Load()
	if off < 0 || off+n > f.size(sh) {
		f.cnt.Refused.Add(1)
		return 0, syscall.ENOSPC
	}
	dataLen, footOff, footLen := f.split(sh, off, n)
	if footLen > 0 && !bytes.Equal(data[dataLen:], sh.footer[footOff:footOff+footLen]) {
		f.cnt.Refused.Add(1)
		f.log.Warn("refused a write that would change the VHD footer", "off", off, "len", n)
		return 0, syscall.EPERM
	}
	if dataLen > 0 {
		if err := f.disk.WriteAt(ctx, data[:dataLen], off); err != nil {
			return 0, f.errno("write", off, dataLen, err)
		}
	}
	f.cnt.Writes.Add(1)
	f.cnt.BytesWritten.Add(uint64(n))
	return uint32(n), 0
}

func (f *diskFile) errno(op string, off, n int64, err error) syscall.Errno {
	switch {
	case errors.Is(err, writeback.ErrOutOfRange):
		return syscall.ENOSPC
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return syscall.EINTR
	}
	f.log.Error(op+" failed", "off", off, "len", n, "err", err)
	if errors.Is(err, syscall.ENOSPC) {
		// The state directory's filesystem is full: the journal or the
		// image could not grow (the daemon's log says which).
		return syscall.ENOSPC
	}
	return syscall.EIO
}

// Fsync is the barrier: the loop driver turns a block-layer flush (and
// FUA) into fsync, so it must succeed, and it closes the journal epoch.
func (f *diskFile) Fsync(_ context.Context, _ fs.FileHandle, _ uint32) syscall.Errno {
	defer f.since(OpFsync, f.startClock())
	f.cnt.Fsyncs.Add(1)
	if err := f.disk.Flush(); err != nil {
		f.log.Error("fsync failed", "err", err)
		return syscall.EIO
	}
	return 0
}

// Flush (close of a descriptor) needs nothing: writes are journaled as
// they arrive.
func (f *diskFile) Flush(context.Context, fs.FileHandle) syscall.Errno { return 0 }

// fallocate modes (linux/falloc.h).
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// Allocate handles what discard and write-zeroes become: PUNCH_HOLE (a
// discard: fstrim, mkfs) and ZERO_RANGE (write-zeroes), both replicated as
// Clear Pages. Plain allocation inside the disk is a no-op (a disk is
// always fully allocated); anything that would grow the file is refused.
// Never ENOSYS: that disables fallocate for the whole mount.
func (f *diskFile) Allocate(ctx context.Context, _ fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	o, n := int64(off), int64(size)
	sh := f.shape.Load()
	if o < 0 || n < 0 || o+n > f.size(sh) {
		if mode&fallocKeepSize == 0 {
			return syscall.EFBIG
		}
		n = max(0, f.size(sh)-o)
	}
	dataLen, _, footLen := f.split(sh, o, n)
	switch {
	case mode&fallocPunchHole != 0:
		// Discard is advisory: the footer part, if any, is left alone.
		f.cnt.Discards.Add(1)
		if dataLen > 0 {
			if err := f.disk.Zero(ctx, o, dataLen, true); err != nil {
				return f.errno("discard", o, dataLen, err)
			}
		}
	case mode&fallocZeroRange != 0:
		if footLen > 0 {
			f.cnt.Refused.Add(1)
			return syscall.EPERM
		}
		f.cnt.ZeroRanges.Add(1)
		if dataLen > 0 {
			if err := f.disk.Zero(ctx, o, dataLen, false); err != nil {
				return f.errno("zero range", o, dataLen, err)
			}
		}
	case mode&^fallocKeepSize == 0:
		// Preallocation of a range that exists: nothing to do.
	default:
		return syscall.EOPNOTSUPP
	}
	return 0
}
