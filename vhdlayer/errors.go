package vhdlayer

import "errors"

// Sentinel errors; the concrete errors returned wrap one of these so callers
// (and the exit-code table in cmd/vhdsync) can classify them with errors.Is.
var (
	// ErrNotVHD: the footer cookie is not "conectix".
	ErrNotVHD = errors.New("not a VHD")
	// ErrBadChecksum: the footer checksum does not match its contents.
	ErrBadChecksum = errors.New("bad VHD checksum")
	// ErrTruncated: fewer bytes than a footer or header needs.
	ErrTruncated = errors.New("truncated VHD structure")
	// ErrNotFixed: a valid VHD that is not a fixed disk where one is required.
	ErrNotFixed = errors.New("not a fixed VHD")
	// ErrDifferencing: a differencing disk, which vhdsync does not read.
	ErrDifferencing = errors.New("differencing VHD not supported")
	// ErrSizeMismatch: the footer's current size does not match the
	// length of the file or blob that holds it.
	ErrSizeMismatch = errors.New("VHD size does not match its container")
	// ErrSizeNotMiB: Azure accepts only virtual sizes that are whole MiB.
	ErrSizeNotMiB = errors.New("virtual size is not a whole number of MiB")
	// ErrSizeTooSmall: below Azure's 20 MiB minimum.
	ErrSizeTooSmall = errors.New("virtual size below the 20 MiB minimum")
	// ErrSizeTooLarge: above the page-blob limit.
	ErrSizeTooLarge = errors.New("virtual size above the page-blob limit")
	// ErrBadSize: a size string the user typed that cannot be parsed.
	ErrBadSize = errors.New("invalid size")
	// ErrBadHeader: a dynamic-disk header or BAT that is inconsistent.
	ErrBadHeader = errors.New("corrupt dynamic VHD header")
)
