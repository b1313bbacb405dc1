package powercut

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/internal/fuseconn"
)

// Options tune a mount.
type Options struct {
	// Logger receives the mount's messages (nil: none).
	Logger *slog.Logger
	// Debug logs every FUSE request (go-fuse's debug output).
	Debug bool
}

// FS is one mount of a power-cut file system. Its methods may be called
// from any goroutine.
type FS struct {
	fuse.RawFileSystem // ENOSYS for what is not implemented below

	backing string
	mp      string
	server  *fuse.Server
	log     *slog.Logger

	// gate is held for reading by every operation and for writing by a
	// cut, which therefore falls between operations; dead, set first,
	// fails every operation that starts after it with EIO.
	gate sync.RWMutex
	dead atomic.Bool

	// mu guards the namespace: inodes, directory entries (live and
	// durable), link and handle counts, handles. It is taken before an
	// inode's own lock, never after.
	mu      sync.Mutex
	inodes  map[uint64]*inode
	nextID  uint64
	handles map[uint64]*handle
	nextFh  uint64

	trigger atomic.Pointer[trigger]
	cutMu   sync.Mutex
	cut     *CutStats // the cut, once made
	done    chan struct{}
	// conn is the kernel's FUSE connection (package fuseconn), aborted by
	// Unmount after a cut; hasConn once it is known.
	conn    uint32
	hasConn bool
}

// inode is a file, directory, symlink or special file.
type inode struct {
	id uint64
	// parent and name are where it was last linked (for Op paths).
	parent uint64
	name   string
	// links are its names in the live tree; drefs its names in durable
	// directory entries; opens its open handles (guarded by FS.mu).
	links, drefs, opens int
	freed               bool
	// live and durable are a directory's entries: as readers see them,
	// and as the last fsync of the directory left them (FS.mu).
	live, durable map[string]uint64
	target        string // a symlink's (immutable)

	mu             sync.Mutex // the fields below
	mode           uint32     // type and permission bits
	uid, gid, rdev uint32
	atime, mtime   time.Time
	ctime          time.Time
	data           *fileData // regular files
}

// handle is an open file or directory.
type handle struct {
	ino  *inode
	ents []fuse.DirEntry // a directory's entries as of its opendir
}

func (i *inode) isDir() bool { return i.mode&syscall.S_IFMT == syscall.S_IFDIR }
func (i *inode) isReg() bool { return i.mode&syscall.S_IFMT == syscall.S_IFREG }

// rootID is the root directory's inode (FUSE's root node id); controlID
// the control file's.
const (
	rootID    = fuse.FUSE_ROOT_ID
	controlID = 1 << 62
)

// ControlName is the control file in the root directory (not listed): a
// write of "cut" to it cuts the power, as FS.Cut does; reading it says
// whether the power was cut. Any process can use it, e.g.
// `echo cut > MOUNTPOINT/.powercut`.
const ControlName = ".powercut"

// timeout is how long the kernel may cache entries and attributes. Every
// change goes through the kernel, so its caches never go stale while the
// mount is alive; a cut ends the mount, and the next mount starts with
// none.
const timeout = time.Second

// Mount mounts the power-cut file system of backing at mountpoint. backing
// holds the durable state (see the package comment); an empty directory
// starts an empty file system, and a directory a cut mount left holds
// exactly what survived the cut.
func Mount(backing, mountpoint string, o Options) (*FS, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f := &FS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		backing:       backing,
		mp:            mountpoint,
		log:           log,
		handles:       map[uint64]*handle{},
		nextFh:        1,
		done:          make(chan struct{}),
	}
	if err := f.load(); err != nil {
		return nil, err
	}
	mo := &fuse.MountOptions{
		FsName:                   backing,
		Name:                     "powercut",
		MaxWrite:                 1 << 20,
		DisableXAttrs:            true,
		DisableReadDirPlus:       true,
		ExplicitDataCacheControl: true,
		DirectMount:              true,
		Options:                  []string{"default_permissions"},
		Debug:                    o.Debug,
	}
	// go-fuse's direct mount opens /dev/fuse without O_CLOEXEC: a process
	// the test starts meanwhile (a daemon, mkfs, losetup, from another
	// goroutine) would inherit the server's end of this mount, keep the
	// connection alive after a cut or after the test, and, once killed,
	// wait for ever on a request of its own that nobody answers (a daemon
	// left in D state in request_wait_answer). So the open and the flag
	// are made under syscall.ForkLock, read-locked as the standard library
	// does around creating a descriptor: no exec comes in between. Only
	// for the direct mount (root), made strict: the fusermount fallback
	// execs a helper, which would wait for this very lock.
	root := os.Geteuid() == 0
	mo.DirectMountStrict = root
	if root {
		syscall.ForkLock.RLock()
	}
	server, err := fuse.NewServer(f, mountpoint, mo)
	if err == nil && root {
		err = cloexecFuseFds()
		if err != nil {
			_ = server.Unmount()
		}
	}
	if root {
		syscall.ForkLock.RUnlock()
	}
	if err != nil {
		f.closeFiles()
		return nil, fmt.Errorf("mount power-cut file system at %s: %w", mountpoint, err)
	}
	f.server = server
	go func() {
		server.Serve()
		f.cutMu.Lock()
		cut := f.cut != nil
		f.cutMu.Unlock()
		if cut {
			// No request comes any more: a cut mount's files can go (a
			// clean Unmount closes them itself).
			f.closeFiles()
		}
		close(f.done)
	}()
	if err := server.WaitMount(); err != nil {
		_ = server.Unmount()
		f.closeFiles()
		return nil, fmt.Errorf("mount power-cut file system at %s: %w", mountpoint, err)
	}
	// Not root: the descriptor came from fusermount, already close-on-exec;
	// for root, done above. Checked again all the same.
	if err := cloexecFuseFds(); err != nil {
		_ = server.Unmount()
		return nil, err
	}
	if id, err := fuseconn.ID(mountpoint); err == nil {
		f.conn, f.hasConn = id, true
	}
	return f, nil
}

// cloexecFuseFds sets FD_CLOEXEC on every /dev/fuse descriptor of this
// process.
func cloexecFuseFds() error {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("list file descriptors: %w", err)
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err != nil || target != "/dev/fuse" {
			continue
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
			return fmt.Errorf("set close-on-exec on /dev/fuse (fd %d): %w", fd, err)
		}
	}
	return nil
}

// abortConn aborts the kernel's connection of this mount, if it is still
// there (a mount detached lazily while a killed process's request was in
// flight): the requests still waiting fail, and their processes can exit.
func (f *FS) abortConn() {
	if !f.hasConn {
		return
	}
	if err := fuseconn.Abort(f.conn); err != nil {
		f.log.Warn("abort the power-cut mount's FUSE connection", "conn", f.conn, "err", err)
	}
}

// Mountpoint is where the file system is mounted.
func (f *FS) Mountpoint() string { return f.mp }

// String names the file system (go-fuse's RawFileSystem).
func (f *FS) String() string { return "powercut(" + f.backing + ")" }

// enter starts an operation: false (the caller answers EIO) once the
// power was cut.
func (f *FS) enter() bool {
	f.gate.RLock()
	if f.dead.Load() {
		f.gate.RUnlock()
		return false
	}
	return true
}

func (f *FS) leave() { f.gate.RUnlock() }

// Dead reports whether the power was cut.
func (f *FS) Dead() bool { return f.dead.Load() }

// CutStats is what a cut dropped.
type CutStats struct {
	// Files is how many files had unsynced data or size; Bytes how many
	// bytes of unsynced pages they lost (size changes not counted).
	Files int
	Bytes int64
	// Entries is how many directory entries reverted: names created,
	// removed or renamed since their directory's last fsync.
	Entries int
	// After is the operation a CutAfter trigger fired after (nil for Cut).
	After *Op
}

// Cut cuts the power: every change not made durable is dropped, and every
// operation from now on fails with EIO, until the file system is
// unmounted and mounted again (which shows what survived). Operations in
// flight finish first (a cut falls between operations); it returns what
// was dropped. The caller kills what used the file system at once (kill
// -9): a process that goes on would only see EIO.
//
// To cut at a precise point of another process's run, stop it first
// (SIGSTOP), cut, then kill it: it then makes no request after the cut.
func (f *FS) Cut() CutStats {
	f.dead.Store(true)
	return f.doCut(nil)
}

// doCut drops everything unsynced (once; later calls return the first
// cut's figures).
func (f *FS) doCut(after *Op) CutStats {
	f.cutMu.Lock()
	defer f.cutMu.Unlock()
	if f.cut != nil {
		return *f.cut
	}
	f.gate.Lock()
	defer f.gate.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	s := CutStats{After: after}
	for _, ino := range f.inodes {
		if ino.live != nil && !ino.freed {
			s.Entries += entryChanges(ino.durable, ino.live)
		}
		ino.mu.Lock()
		if ino.data != nil && ino.data.dirty() {
			s.Files++
			s.Bytes += ino.data.unsynced()
			ino.data.drop()
		}
		ino.mu.Unlock()
	}
	f.cut = &s
	f.log.Info("power cut", "files", s.Files, "bytes", s.Bytes, "entries", s.Entries)
	return s
}

// entryChanges counts the names that differ between two directory
// listings.
func entryChanges(a, b map[string]uint64) int {
	n := 0
	for name, id := range a {
		if b[name] != id {
			n++
		}
	}
	for name := range b {
		if _, ok := a[name]; !ok {
			n++
		}
	}
	return n
}

// Sync makes everything durable, as sync(2) would: every file's data and
// size, every directory's entries. Pages a process dirtied through a
// shared mapping reach the file system only when the kernel writes them
// back (msync, fsync, munmap, writeback), so they are not included.
func (f *FS) Sync() error {
	if !f.enter() {
		return syscall.EIO
	}
	defer f.leave()
	return f.syncAll()
}

func (f *FS) syncAll() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var errs []error
	for _, ino := range f.inodes {
		if ino.data == nil {
			continue
		}
		ino.mu.Lock()
		errs = append(errs, ino.data.flush())
		ino.mu.Unlock()
	}
	for _, ino := range f.inodes {
		if ino.live != nil && !ino.freed {
			f.syncDirLocked(ino)
		}
	}
	errs = append(errs, f.persistLocked())
	return errors.Join(errs...)
}

// Unmount unmounts the file system. Unless the power was cut, everything
// is made durable first, as at a clean shutdown. After a cut a busy mount
// (the killed process's files are not closed yet) is detached lazily.
func (f *FS) Unmount() error {
	err := f.server.Unmount()
	if err != nil && f.dead.Load() {
		err = syscall.Unmount(f.mp, syscall.MNT_DETACH)
		if err != nil {
			err = fmt.Errorf("detach %s: %w", f.mp, err)
		}
	} else if err != nil {
		return fmt.Errorf("unmount %s: %w", f.mp, err)
	}
	if !f.dead.Load() {
		f.dead.Store(true) // no request comes any more; nothing may start
		f.gate.Lock()
		err = errors.Join(err, f.syncAll())
		f.gate.Unlock()
		f.closeFiles()
	} else {
		// Cut, and perhaps detached while a request of the killed
		// process was in flight: nothing is served any more.
		f.abortConn()
	}
	return err
}

// Done is closed once the kernel has let go of the mount (after Unmount,
// or after the last user of a lazily detached mount).
func (f *FS) Done() <-chan struct{} { return f.done }

// closeFiles closes the backing files.
func (f *FS) closeFiles() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ino := range f.inodes {
		ino.mu.Lock()
		if ino.data != nil {
			ino.data.f.Close()
		}
		ino.mu.Unlock()
	}
}

// syncDirLocked makes a directory's live entries durable (f.mu held).
func (f *FS) syncDirLocked(d *inode) {
	if maps.Equal(d.live, d.durable) {
		return
	}
	old := d.durable
	d.durable = maps.Clone(d.live)
	for _, id := range d.durable {
		if c := f.inodes[id]; c != nil {
			c.drefs++
		}
	}
	for _, id := range old {
		if c := f.inodes[id]; c != nil {
			c.drefs--
			f.maybeFreeLocked(c)
		}
	}
}

// maybeFreeLocked frees an inode no name (live or durable) and no handle
// refers to: its backing file goes, and a directory's durable entries stop
// counting (f.mu held). The node stays known, empty, for the kernel.
func (f *FS) maybeFreeLocked(ino *inode) {
	if ino.freed || ino.id == rootID || ino.links > 0 || ino.drefs > 0 || ino.opens > 0 {
		return
	}
	ino.freed = true
	ino.mu.Lock()
	if ino.data != nil {
		ino.data.f.Close()
		_ = os.Remove(f.dataPath(ino.id))
		ino.data = nil
	}
	ino.mu.Unlock()
	if ino.durable != nil {
		old := ino.durable
		ino.durable = map[string]uint64{}
		for _, id := range old {
			if c := f.inodes[id]; c != nil {
				c.drefs--
				f.maybeFreeLocked(c)
			}
		}
	}
}

// pathLocked is where ino was last linked, relative to the root (f.mu
// held).
func (f *FS) pathLocked(ino *inode) string {
	var parts []string
	for n := ino; n != nil && n.id != rootID && len(parts) < 64; n = f.inodes[n.parent] {
		parts = append(parts, n.name)
	}
	for i, j := 0, len(parts)-1; i < j; i, j = i+1, j-1 {
		parts[i], parts[j] = parts[j], parts[i]
	}
	return strings.Join(parts, "/")
}

// dataPath is the backing file of inode id.
func (f *FS) dataPath(id uint64) string {
	return filepath.Join(f.backing, dataDir, fmt.Sprintf("%x", id))
}

// newInode makes an inode of mode for the caller (f.mu held); a regular
// file gets an empty backing file.
func (f *FS) newInodeLocked(mode uint32, owner fuse.Owner, rdev uint32) (*inode, error) {
	id := f.nextID
	now := time.Now()
	ino := &inode{id: id, mode: mode, uid: owner.Uid, gid: owner.Gid, rdev: rdev, atime: now, mtime: now, ctime: now}
	switch mode & syscall.S_IFMT {
	case syscall.S_IFDIR:
		ino.live, ino.durable = map[string]uint64{}, map[string]uint64{}
	case syscall.S_IFREG:
		bf, err := os.OpenFile(f.dataPath(id), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
		if err != nil {
			return nil, err
		}
		if ino.data, err = newFileData(bf); err != nil {
			bf.Close()
			return nil, err
		}
	}
	f.nextID++
	f.inodes[id] = ino
	return ino, nil
}

// fillAttr writes ino's attributes (ino.mu held by the caller or not
// needed: a fresh inode).
func (f *FS) fillAttr(ino *inode, a *fuse.Attr) {
	a.Ino = ino.id
	a.Mode = ino.mode
	a.Owner = fuse.Owner{Uid: ino.uid, Gid: ino.gid}
	a.Rdev = ino.rdev
	a.Blksize = pageSize
	switch {
	case ino.data != nil:
		a.Size = uint64(ino.data.size)
	case ino.target != "":
		a.Size = uint64(len(ino.target))
	}
	a.Blocks = (a.Size + 511) / 512
	a.SetTimes(&ino.atime, &ino.mtime, &ino.ctime)
}

// attr fills a with ino's attributes; the link count comes from the
// namespace (f.mu held).
func (f *FS) attrLocked(ino *inode, a *fuse.Attr) {
	ino.mu.Lock()
	f.fillAttr(ino, a)
	ino.mu.Unlock()
	a.Nlink = uint32(ino.links)
	if ino.isDir() {
		a.Nlink = 2
		for _, id := range ino.live {
			if c := f.inodes[id]; c != nil && c.isDir() {
				a.Nlink++
			}
		}
	}
}

func (f *FS) entryLocked(ino *inode, out *fuse.EntryOut) {
	out.NodeId = ino.id
	out.Generation = 1
	out.SetEntryTimeout(timeout)
	out.SetAttrTimeout(timeout)
	f.attrLocked(ino, &out.Attr)
}

// controlAttr is the control file's attributes.
func controlAttr(a *fuse.Attr) {
	a.Ino = controlID
	a.Mode = syscall.S_IFREG | 0o600
	a.Nlink = 1
	a.Size = 0
}

// sortedNames returns a directory's live entries in name order.
func sortedNames(m map[string]uint64) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
