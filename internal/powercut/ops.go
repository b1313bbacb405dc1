package powercut

import (
	"maps"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// The FUSE operations (go-fuse's RawFileSystem). Each one runs between
// enter and leave; those that change something report an Op to an armed
// CutAfter once applied.

// status maps an error to a FUSE status.
func status(err error) fuse.Status {
	if err == nil {
		return fuse.OK
	}
	return fuse.ToStatus(err)
}

// Init is called once the kernel has answered the mount.
func (f *FS) Init(*fuse.Server) {}

// nodeLocked returns the inode of a node id the kernel sent (f.mu held).
func (f *FS) nodeLocked(id uint64) *inode { return f.inodes[id] }

// Lookup finds name in a directory.
func (f *FS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	if h.NodeId == rootID && name == ControlName {
		out.NodeId, out.Generation = controlID, 1
		controlAttr(&out.Attr)
		return fuse.OK
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	dir := f.nodeLocked(h.NodeId)
	if dir == nil || dir.live == nil {
		return fuse.ENOTDIR
	}
	id, ok := dir.live[name]
	if !ok {
		return fuse.ENOENT
	}
	f.entryLocked(f.inodes[id], out)
	return fuse.OK
}

// Forget is ignored: every inode is kept until unmount (those no name or
// handle refers to without their data).
func (f *FS) Forget(nodeid, nlookup uint64) {}

// GetAttr returns a node's attributes.
func (f *FS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	if in.NodeId == controlID {
		controlAttr(&out.Attr)
		return fuse.OK
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	ino := f.nodeLocked(in.NodeId)
	if ino == nil {
		return fuse.ENOENT
	}
	f.attrLocked(ino, &out.Attr)
	out.SetTimeout(timeout)
	return fuse.OK
}

// SetAttr changes mode, owner, size or times.
func (f *FS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	if in.NodeId == controlID {
		controlAttr(&out.Attr)
		return fuse.OK
	}
	f.mu.Lock()
	ino := f.nodeLocked(in.NodeId)
	if ino == nil {
		f.mu.Unlock()
		return fuse.ENOENT
	}
	ino.mu.Lock()
	now := time.Now()
	var op *Op
	if in.Valid&fuse.FATTR_SIZE != 0 {
		if ino.data == nil {
			ino.mu.Unlock()
			f.mu.Unlock()
			if ino.isDir() {
				return fuse.Status(syscall.EISDIR)
			}
			return fuse.EINVAL
		}
		ino.data.truncate(int64(in.Size))
		ino.mtime = now
		op = &Op{Kind: OpTruncate, Off: int64(in.Size)}
	}
	if in.Valid&fuse.FATTR_MODE != 0 {
		ino.mode = ino.mode&syscall.S_IFMT | in.Mode&^syscall.S_IFMT
	}
	if in.Valid&fuse.FATTR_UID != 0 {
		ino.uid = in.Uid
	}
	if in.Valid&fuse.FATTR_GID != 0 {
		ino.gid = in.Gid
	}
	switch {
	case in.Valid&fuse.FATTR_ATIME_NOW != 0:
		ino.atime = now
	case in.Valid&fuse.FATTR_ATIME != 0:
		ino.atime = time.Unix(int64(in.Atime), int64(in.Atimensec))
	}
	switch {
	case in.Valid&fuse.FATTR_MTIME_NOW != 0:
		ino.mtime = now
	case in.Valid&fuse.FATTR_MTIME != 0:
		ino.mtime = time.Unix(int64(in.Mtime), int64(in.Mtimensec))
	}
	ino.ctime = now
	ino.mu.Unlock()
	f.attrLocked(ino, &out.Attr)
	if op != nil && f.armed() {
		op.Path = f.pathLocked(ino)
	}
	f.mu.Unlock()
	out.SetTimeout(timeout)
	if op != nil {
		f.after(*op)
	}
	return fuse.OK
}

// link adds name -> ino to a directory's live entries (f.mu held).
func (f *FS) linkLocked(dir *inode, name string, ino *inode) {
	dir.live[name] = ino.id
	ino.links++
	ino.parent, ino.name = dir.id, name
	dir.mu.Lock()
	dir.mtime, dir.ctime = time.Now(), time.Now()
	dir.mu.Unlock()
}

// unlinkLocked removes name from a directory's live entries (f.mu held).
func (f *FS) unlinkLocked(dir *inode, name string) {
	id, ok := dir.live[name]
	if !ok {
		return
	}
	delete(dir.live, name)
	dir.mu.Lock()
	dir.mtime, dir.ctime = time.Now(), time.Now()
	dir.mu.Unlock()
	if c := f.inodes[id]; c != nil {
		c.links--
		f.maybeFreeLocked(c)
	}
}

// mknodLocked makes a new node in a directory (f.mu held).
func (f *FS) mknodLocked(h *fuse.InHeader, name string, mode, rdev uint32) (*inode, *inode, fuse.Status) {
	dir := f.nodeLocked(h.NodeId)
	if dir == nil || dir.live == nil || dir.freed {
		return nil, nil, fuse.ENOTDIR
	}
	if _, ok := dir.live[name]; ok || (dir.id == rootID && name == ControlName) {
		return dir, nil, fuse.Status(syscall.EEXIST)
	}
	ino, err := f.newInodeLocked(mode, h.Owner, rdev)
	if err != nil {
		return dir, nil, status(err)
	}
	f.linkLocked(dir, name, ino)
	return dir, ino, fuse.OK
}

// Mknod makes a regular file, socket, fifo or device node.
func (f *FS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return f.makeEntry(&in.InHeader, name, in.Mode, in.Rdev, OpCreate, out)
}

// Mkdir makes a directory.
func (f *FS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return f.makeEntry(&in.InHeader, name, syscall.S_IFDIR|in.Mode&^syscall.S_IFMT, 0, OpMkdir, out)
}

// makeEntry makes name in the directory of hdr (see mknodLocked) and
// reports it to an armed cut as kind.
func (f *FS) makeEntry(hdr *fuse.InHeader, name string, mode, rdev uint32, kind OpKind, out *fuse.EntryOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	_, ino, st := f.mknodLocked(hdr, name, mode, rdev)
	if !st.Ok() {
		f.mu.Unlock()
		return st
	}
	f.entryLocked(ino, out)
	op := Op{Kind: kind}
	if f.armed() {
		op.Path = f.pathLocked(ino)
	}
	f.mu.Unlock()
	f.after(op)
	return fuse.OK
}

// Create makes and opens a regular file.
func (f *FS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	dir, ino, st := f.mknodLocked(&in.InHeader, name, syscall.S_IFREG|in.Mode&^syscall.S_IFMT, 0)
	if st == fuse.Status(syscall.EEXIST) && in.Flags&syscall.O_EXCL == 0 && dir != nil {
		// Made by someone else since the kernel looked: open it.
		if ino = f.inodes[dir.live[name]]; ino != nil && ino.isReg() {
			st = fuse.OK
		}
	}
	if !st.Ok() {
		f.mu.Unlock()
		return st
	}
	f.entryLocked(ino, &out.EntryOut)
	out.OpenOut.Fh = f.openLocked(ino)
	out.OpenOut.OpenFlags = fuse.FOPEN_KEEP_CACHE
	op := Op{Kind: OpCreate}
	if f.armed() {
		op.Path = f.pathLocked(ino)
	}
	f.mu.Unlock()
	f.after(op)
	return fuse.OK
}

// openLocked makes a handle for ino (f.mu held).
func (f *FS) openLocked(ino *inode) uint64 {
	fh := f.nextFh
	f.nextFh++
	f.handles[fh] = &handle{ino: ino}
	ino.opens++
	return fh
}

// Symlink makes a symbolic link.
func (f *FS) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	dir := f.nodeLocked(h.NodeId)
	if dir == nil || dir.live == nil || dir.freed {
		f.mu.Unlock()
		return fuse.ENOTDIR
	}
	if _, ok := dir.live[name]; ok {
		f.mu.Unlock()
		return fuse.Status(syscall.EEXIST)
	}
	ino, err := f.newInodeLocked(syscall.S_IFLNK|0o777, h.Owner, 0)
	if err != nil {
		f.mu.Unlock()
		return status(err)
	}
	ino.target = target
	f.linkLocked(dir, name, ino)
	f.entryLocked(ino, out)
	op := Op{Kind: OpSymlink}
	if f.armed() {
		op.Path = f.pathLocked(ino)
	}
	f.mu.Unlock()
	f.after(op)
	return fuse.OK
}

// Readlink returns a symlink's target.
func (f *FS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	if !f.enter() {
		return nil, fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	defer f.mu.Unlock()
	ino := f.nodeLocked(h.NodeId)
	if ino == nil || ino.mode&syscall.S_IFMT != syscall.S_IFLNK {
		return nil, fuse.EINVAL
	}
	return []byte(ino.target), fuse.OK
}

// Link adds a name for an existing file.
func (f *FS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	dir, ino := f.nodeLocked(in.NodeId), f.nodeLocked(in.Oldnodeid)
	switch {
	case dir == nil || dir.live == nil || dir.freed:
		f.mu.Unlock()
		return fuse.ENOTDIR
	case ino == nil || ino.isDir() || ino.id == controlID:
		f.mu.Unlock()
		return fuse.EPERM
	}
	if _, ok := dir.live[name]; ok {
		f.mu.Unlock()
		return fuse.Status(syscall.EEXIST)
	}
	f.linkLocked(dir, name, ino)
	f.entryLocked(ino, out)
	op := Op{Kind: OpLink}
	if f.armed() {
		op.Path = f.pathLocked(ino)
	}
	f.mu.Unlock()
	f.after(op)
	return fuse.OK
}

// Unlink removes a name of a non-directory.
func (f *FS) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return f.remove(h, name, false)
}

// Rmdir removes an empty directory.
func (f *FS) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return f.remove(h, name, true)
}

func (f *FS) remove(h *fuse.InHeader, name string, isDir bool) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	dir := f.nodeLocked(h.NodeId)
	if dir == nil || dir.live == nil {
		f.mu.Unlock()
		return fuse.ENOTDIR
	}
	id, ok := dir.live[name]
	if !ok {
		f.mu.Unlock()
		return fuse.ENOENT
	}
	ino := f.inodes[id]
	switch {
	case isDir && !ino.isDir():
		f.mu.Unlock()
		return fuse.ENOTDIR
	case !isDir && ino.isDir():
		f.mu.Unlock()
		return fuse.Status(syscall.EISDIR)
	case isDir && len(ino.live) > 0:
		f.mu.Unlock()
		return fuse.Status(syscall.ENOTEMPTY)
	}
	op := Op{Kind: OpUnlink}
	if isDir {
		op.Kind = OpRmdir
	}
	if f.armed() {
		op.Path = f.pathLocked(ino)
	}
	f.unlinkLocked(dir, name)
	f.mu.Unlock()
	f.after(op)
	return fuse.OK
}

// Rename moves a name, replacing the target (flags: RENAME_NOREPLACE,
// RENAME_EXCHANGE).
func (f *FS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	op, st := f.renameLocked(in, oldName, newName)
	f.mu.Unlock()
	if st.Ok() {
		f.after(op)
	}
	return st
}

func (f *FS) renameLocked(in *fuse.RenameIn, oldName, newName string) (Op, fuse.Status) {
	op := Op{Kind: OpRename}
	src, dst := f.nodeLocked(in.NodeId), f.nodeLocked(in.Newdir)
	if src == nil || dst == nil || src.live == nil || dst.live == nil || dst.freed {
		return op, fuse.ENOTDIR
	}
	id, ok := src.live[oldName]
	if !ok {
		return op, fuse.ENOENT
	}
	ino := f.inodes[id]
	if f.armed() {
		op.Path = f.pathLocked(ino)
	}
	tid, exists := dst.live[newName]
	switch {
	case in.Flags&^(unix.RENAME_NOREPLACE|unix.RENAME_EXCHANGE) != 0:
		return op, fuse.EINVAL
	case in.Flags&unix.RENAME_NOREPLACE != 0 && exists:
		return op, fuse.Status(syscall.EEXIST)
	case in.Flags&unix.RENAME_EXCHANGE != 0:
		if !exists {
			return op, fuse.ENOENT
		}
		other := f.inodes[tid]
		src.live[oldName], dst.live[newName] = tid, id
		ino.parent, ino.name = dst.id, newName
		other.parent, other.name = src.id, oldName
	case exists && tid == id:
		return op, fuse.OK // two names of one file: nothing to do
	default:
		if exists {
			target := f.inodes[tid]
			switch {
			case ino.isDir() && !target.isDir():
				return op, fuse.ENOTDIR
			case !ino.isDir() && target.isDir():
				return op, fuse.Status(syscall.EISDIR)
			case target.isDir() && len(target.live) > 0:
				return op, fuse.Status(syscall.ENOTEMPTY)
			}
		}
		ino.links++ // keeps it while its old name goes
		f.unlinkLocked(dst, newName)
		f.unlinkLocked(src, oldName)
		ino.links--
		f.linkLocked(dst, newName, ino)
	}
	f.touchLocked(src, dst)
	if f.armed() {
		op.NewPath = f.pathLocked(ino)
	}
	return op, fuse.OK
}

// touchLocked updates directories' times after a change of entries.
func (f *FS) touchLocked(dirs ...*inode) {
	now := time.Now()
	for _, d := range dirs {
		d.mu.Lock()
		d.mtime, d.ctime = now, now
		d.mu.Unlock()
	}
}

// Open opens a file.
func (f *FS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	if in.NodeId == controlID {
		out.OpenFlags = fuse.FOPEN_DIRECT_IO
		return fuse.OK
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	ino := f.nodeLocked(in.NodeId)
	if ino == nil {
		return fuse.ENOENT
	}
	if ino.isDir() {
		return fuse.Status(syscall.EISDIR)
	}
	// The kernel's page cache may keep what it read: every change comes
	// through it. Never FOPEN_DIRECT_IO: shared writable mappings (badger's
	// tables and logs) need the page cache.
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE
	out.Fh = f.openLocked(ino)
	return fuse.OK
}

// Release closes a handle.
func (f *FS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h := f.handles[in.Fh]
	if h == nil {
		return
	}
	delete(f.handles, in.Fh)
	h.ino.opens--
	if !f.dead.Load() {
		f.maybeFreeLocked(h.ino)
	}
}

// Read reads a file.
func (f *FS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	if !f.enter() {
		return nil, fuse.EIO
	}
	defer f.leave()
	if in.NodeId == controlID {
		s := "alive\n"
		if f.dead.Load() {
			s = "cut\n"
		}
		if in.Offset >= uint64(len(s)) {
			return fuse.ReadResultData(nil), fuse.OK
		}
		return fuse.ReadResultData([]byte(s[in.Offset:])), fuse.OK
	}
	ino := f.fileNode(in.NodeId)
	if ino == nil {
		return nil, fuse.EBADF
	}
	ino.mu.Lock()
	defer ino.mu.Unlock()
	if ino.data == nil {
		return nil, fuse.EBADF
	}
	n, err := ino.data.read(buf[:min(len(buf), int(in.Size))], int64(in.Offset))
	if err != nil {
		return nil, status(err)
	}
	return fuse.ReadResultData(buf[:n]), fuse.OK
}

// fileNode returns a regular file's inode.
func (f *FS) fileNode(id uint64) *inode {
	f.mu.Lock()
	defer f.mu.Unlock()
	ino := f.inodes[id]
	if ino == nil || !ino.isReg() {
		return nil
	}
	return ino
}

// Write writes a file; "cut" written to the control file cuts the power.
func (f *FS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	if !f.enter() {
		return 0, fuse.EIO
	}
	defer f.leave()
	if in.NodeId == controlID {
		if strings.TrimSpace(string(data)) != "cut" {
			return 0, fuse.EINVAL
		}
		f.dead.Store(true)
		go f.doCut(nil)
		return uint32(len(data)), fuse.OK
	}
	ino := f.fileNode(in.NodeId)
	if ino == nil {
		return 0, fuse.EBADF
	}
	ino.mu.Lock()
	if ino.data == nil {
		ino.mu.Unlock()
		return 0, fuse.EBADF
	}
	err := ino.data.write(data, int64(in.Offset))
	ino.mtime = time.Now()
	ino.mu.Unlock()
	if err != nil {
		return 0, status(err)
	}
	if f.armed() {
		f.after(Op{Kind: OpWrite, Path: f.path(ino), Off: int64(in.Offset), Len: int64(len(data))})
	}
	return uint32(len(data)), fuse.OK
}

// path is where ino was last linked.
func (f *FS) path(ino *inode) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pathLocked(ino)
}

// Flush (close) changes nothing durable.
func (f *FS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	f.leave()
	return fuse.OK
}

// Fsync makes a file's data and size durable (fsync, fdatasync, msync).
func (f *FS) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	if in.NodeId == controlID {
		return fuse.OK
	}
	f.mu.Lock()
	ino := f.nodeLocked(in.NodeId)
	f.mu.Unlock()
	if ino == nil {
		return fuse.EBADF
	}
	ino.mu.Lock()
	var err error
	if ino.data != nil {
		err = ino.data.flush()
	}
	ino.mu.Unlock()
	if err != nil {
		f.log.Error("fsync", "err", err)
		return fuse.EIO
	}
	if f.armed() {
		f.after(Op{Kind: OpFsync, Path: f.path(ino)})
	}
	return fuse.OK
}

// Fallocate allocates (a size change only, here), punches holes and zeros
// ranges.
func (f *FS) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	ino := f.fileNode(in.NodeId)
	if ino == nil {
		return fuse.EBADF
	}
	const keep, punch, zero = unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_PUNCH_HOLE, unix.FALLOC_FL_ZERO_RANGE
	off, end := int64(in.Offset), int64(in.Offset+in.Length)
	ino.mu.Lock()
	if ino.data == nil {
		ino.mu.Unlock()
		return fuse.EBADF
	}
	var err error
	switch in.Mode {
	case 0, keep:
	case punch | keep, zero, zero | keep:
		err = ino.data.zero(off, end)
	default:
		ino.mu.Unlock()
		return fuse.Status(syscall.EOPNOTSUPP)
	}
	if err == nil && in.Mode&keep == 0 && end > ino.data.size {
		ino.data.truncate(end)
	}
	ino.mtime = time.Now()
	ino.mu.Unlock()
	if err != nil {
		return status(err)
	}
	if f.armed() {
		f.after(Op{Kind: OpFallocate, Path: f.path(ino), Off: off, Len: end - off})
	}
	return fuse.OK
}

// OpenDir opens a directory: its entries are listed as they are now.
func (f *FS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	defer f.mu.Unlock()
	dir := f.nodeLocked(in.NodeId)
	if dir == nil || dir.live == nil {
		return fuse.ENOTDIR
	}
	ents := []fuse.DirEntry{{Name: ".", Mode: syscall.S_IFDIR, Ino: dir.id}, {Name: "..", Mode: syscall.S_IFDIR, Ino: dir.parent}}
	if dir.id == rootID {
		ents[1].Ino = rootID
	}
	for _, name := range sortedNames(dir.live) {
		c := f.inodes[dir.live[name]]
		c.mu.Lock()
		ents = append(ents, fuse.DirEntry{Name: name, Mode: c.mode, Ino: c.id})
		c.mu.Unlock()
	}
	fh := f.openLocked(dir)
	f.handles[fh].ents = ents
	out.Fh = fh
	return fuse.OK
}

// ReadDir lists a directory from an offset (an index in its listing).
func (f *FS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	h := f.handles[in.Fh]
	f.mu.Unlock()
	if h == nil {
		return fuse.EBADF
	}
	for i := int(in.Offset); i < len(h.ents); i++ {
		e := h.ents[i]
		e.Off = uint64(i + 1)
		if !out.AddDirEntry(e) {
			break
		}
	}
	return fuse.OK
}

// ReleaseDir closes a directory handle.
func (f *FS) ReleaseDir(in *fuse.ReleaseIn) {
	f.Release(nil, in)
}

// FsyncDir makes a directory's entries durable: names created, removed
// and renamed in it since its last fsync.
func (f *FS) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	f.mu.Lock()
	dir := f.nodeLocked(in.NodeId)
	if dir == nil || dir.live == nil {
		f.mu.Unlock()
		return fuse.ENOTDIR
	}
	changed := !maps.Equal(dir.live, dir.durable)
	var err error
	if changed {
		f.syncDirLocked(dir)
		err = f.persistLocked()
	}
	op := Op{Kind: OpFsyncDir}
	if f.armed() {
		op.Path = f.pathLocked(dir)
	}
	f.mu.Unlock()
	if err != nil {
		f.log.Error("fsync directory", "err", err)
		return fuse.EIO
	}
	f.after(op)
	return fuse.OK
}

// StatFs reports the backing file system's figures.
func (f *FS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	defer f.leave()
	var st syscall.Statfs_t
	if err := syscall.Statfs(f.backing, &st); err != nil {
		return status(err)
	}
	out.FromStatfsT(&st)
	return fuse.OK
}

// Access allows everything: the kernel checks permissions itself
// (default_permissions).
func (f *FS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	if !f.enter() {
		return fuse.EIO
	}
	f.leave()
	return fuse.OK
}
