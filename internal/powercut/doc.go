// Package powercut is a FUSE file system for tests that cuts the power:
// it keeps every change in memory until the strict POSIX model makes it
// durable, and on command drops whatever is not, so that a process killed
// at the same instant finds, when it starts again, exactly what a power
// cut would have left. It is modelled on LazyFS (github.com/dsrhaslab/lazyfs),
// which drops unsynced file data; this one also drops directory changes.
//
// # The model
//
//   - A file's data and size become durable by fsync or fdatasync of that
//     file (msync of a shared mapping sends the same request), never by a
//     write alone, O_DIRECT or not.
//   - A directory entry (a name created by create, mknod, mkdir, symlink or
//     link; removed by unlink or rmdir; moved by rename) becomes durable
//     only by an fsync of that directory. A file created and fsynced in a
//     directory that is not is lost at a cut; a rename reverts to the old
//     name; an unlinked file comes back with its durable contents. A
//     rename between two directories is durable in each as each is synced.
//   - fallocate punching holes or zeroing ranges, and truncation, are data
//     changes of the file: durable at its fsync. Allocation changes only
//     the size (space is not modelled).
//   - Everything else (times, modes, owners) is kept as the file system
//     last saw it; nothing checks it.
//
// A cut drops every change not made durable, all at once. Real file
// systems often keep more (pages written back early, ext4's ordered
// journal); what they never do is keep less than what was synced, so a
// program that survives this model survives them.
//
// # Using it
//
// Mount serves a backing directory at a mount point. The backing directory
// holds the durable state only: namespace.json (the durable tree) and one
// data file per regular file (see persist.go); mounting it again after a
// cut shows what survived. Cut (or CutAfter, which fires after a chosen
// operation) drops the rest and fails every later operation with EIO; the
// test then kills the processes that used the mount (kill -9), unmounts
// (Unmount detaches a busy dead mount lazily) and mounts the backing
// directory again, which also starts the kernel's caches afresh. Another
// process can cut with `echo cut > MOUNTPOINT/.powercut` (ControlName).
// Unmount without a cut is a clean shutdown: everything becomes durable.
//
// To cut at a moment of another process's run without letting it see the
// EIO (or talk to the network after the cut), stop it first (SIGSTOP),
// cut, then SIGKILL it: requests it had in flight finish before the cut.
//
// # Memory maps and direct I/O
//
// Files are served through the kernel's page cache (never FOPEN_DIRECT_IO,
// which refuses shared writable mappings): badger maps its memtable logs
// and tables with MAP_SHARED and writes through the mapping; those pages
// reach the file system when the kernel writes them back (msync, fsync,
// munmap, or background writeback) and are durable only at the fsync that
// msync and fsync send. Pages still dirty in the kernel at a cut are lost
// with it, as at a real power cut. Opens with O_DIRECT work (the kernel
// sends such writes straight to the file system, past its cache); they are
// volatile until fsync, as on a disk with a write cache. The kernel may
// cache data and attributes without limit (FOPEN_KEEP_CACHE, explicit
// invalidation): every change goes through it, and a cut ends the mount.
//
// The process that serves a mount must not map its files (badger does):
// a page fault waits for the server, whose goroutines the Go garbage
// collector may be stopping while it waits for the faulting thread. Run
// such programs in another process, as the tests do. Likewise, a test
// process that dies with files of its own mount open hangs in the kernel
// (close waits for the server that died with it): unmount before exiting.
//
// Changes are held in 4 KiB pages, in memory, until their fsync: a test's
// memory grows with what its processes leave unsynced.
package powercut
