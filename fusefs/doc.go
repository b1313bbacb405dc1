// Package fusefs serves one vhdsync disk through FUSE as two files, two
// views of the same disk: NAME.vhd, the whole fixed VHD (data followed by
// its 512-byte footer) for VHD-aware tools such as qemu-nbd -f vpc, and
// NAME.img, the data region alone, for losetup, so that a filesystem can
// never overwrite the footer.
//
// The files map FUSE operations onto a Disk (package writeback): write ->
// journaled write, fsync -> barrier, fallocate PUNCH_HOLE -> discard,
// ZERO_RANGE -> zero range, read -> the local image.
package fusefs
