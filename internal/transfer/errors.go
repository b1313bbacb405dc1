package transfer

import "errors"

// Error classes of this package; the CLI maps each to an exit code.
var (
	// ErrSourceChanged: the source file is not the one an interrupted
	// import began with (size, mtime or footer differ), so what the blob
	// already holds cannot be trusted to match it.
	ErrSourceChanged = errors.New("source changed since the interrupted import began")
	// ErrFileExists: a download's output file exists and overwriting was
	// not asked for.
	ErrFileExists = errors.New("output file exists")
	// ErrBlobChanged: the blob was written to while it was read.
	ErrBlobChanged = errors.New("blob changed while it was read")
	// ErrNotPointCopy: download --since was given a file that is not
	// (or may no longer be) a copy of the recovery point it names.
	ErrNotPointCopy = errors.New("file is not a copy of that recovery point")
	// ErrNotIncremental: the file cannot be brought to the point by
	// rewriting what changed (the disk's size differs); only a full
	// download gives that point.
	ErrNotIncremental = errors.New("an incremental restore is not possible")
)
