package vhdlayer

import (
	"errors"
	"fmt"
)

// Validate checks that f describes a fixed VHD that Azure accepts as a page
// blob of containerLen bytes (the file or blob that holds the footer in its
// last 512 bytes). Pass containerLen < 0 to skip the length check. Every
// rule that fails is reported; the result wraps the matching sentinels
// (errors.Is works for each).
func Validate(f Footer, containerLen int64) error {
	var errs []error
	switch f.DiskType {
	case DiskTypeFixed:
	case DiskTypeDifferencing:
		errs = append(errs, fmt.Errorf("%w: this is a differencing disk (it needs its parent); merge it into its parent first with a tool that really merges (Hyper-V Merge-VHD, Xen vhd-util coalesce); qemu-img does not: it reads a differencing VHD without its parent", ErrDifferencing))
	case DiskTypeDynamic:
		errs = append(errs, fmt.Errorf("%w: disk type is dynamic; Azure needs a fixed VHD (vhdsync import converts dynamic VHDs)", ErrNotFixed))
	default:
		errs = append(errs, fmt.Errorf("%w: disk type is %s, want fixed (2)", ErrNotFixed, f.DiskType))
	}
	if f.DiskType == DiskTypeFixed && f.DataOffset != fixedDataOffset {
		errs = append(errs, fmt.Errorf("%w: data offset is 0x%x, a fixed disk has 0xFFFFFFFFFFFFFFFF", ErrNotFixed, f.DataOffset))
	}
	if containerLen >= 0 {
		if uint64(containerLen) != f.CurrentSize+FooterSize {
			errs = append(errs, fmt.Errorf("%w: footer says %d bytes of disk, so the file or blob should be %d bytes (disk + 512-byte footer), but it is %d",
				ErrSizeMismatch, f.CurrentSize, f.CurrentSize+FooterSize, containerLen))
		}
	}
	if err := ValidateVirtualSize(f.CurrentSize); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
