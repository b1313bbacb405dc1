package main

import (
	"errors"
	"strings"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/azure/staging"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/internal/transfer"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/staged"
	"github.com/vhdsync/vhdsync/thin"
	"github.com/vhdsync/vhdsync/vhdlayer"
	"github.com/vhdsync/vhdsync/writeback"
)

// Exit codes: one per class of failure, so scripts can react without
// parsing messages. The table is part of the user interface (README).
const (
	ExitOK          = 0  // success
	ExitFailure     = 1  // any other failure; for verify: the blob differs
	ExitUsage       = 2  // bad command line or flag value
	ExitAuth        = 3  // authentication or authorization failed
	ExitNotFound    = 4  // container, blob or recovery point (snapshot) does not exist
	ExitExists      = 5  // blob (or download's output file) exists and --overwrite was not given
	ExitNotVHD      = 6  // not a page blob, not a (valid fixed) VHD, corrupt footer
	ExitBadSize     = 7  // size unparseable or not acceptable to Azure
	ExitState       = 8  // state directory missing, damaged (journal included), not writable, not empty or of another blob; staged segments in the way
	ExitLeased      = 9  // blob leased by another writer, or the staging lock held by another mount/apply
	ExitBusy        = 10 // state directory or mountpoint in use, mount busy
	ExitNotDrained  = 11 // stopped with writes not yet on the blob (kept in the journal)
	ExitSrcChanged  = 12 // a local FILE is not what the command needs: import resume refused (it changed since the import began), download --since refused (not a copy of that point)
	ExitBadSegment  = 13 // apply: a staged segment is corrupt or of another disk; nothing after it was applied
	ExitUnreachable = 14 // the storage endpoint could not be reached (connection refused, host name unknown, no answer)
	ExitUnhealthy   = 15 // status: the flusher is retrying or failed, or the daemon died and left its mount
	ExitInterrupted = 130
)

// usageError marks errors in the command line itself.
type usageError struct{ error }

// Unwrap returns the wrapped error(s).
func (e usageError) Unwrap() error { return e.error }

// exitCode maps an error to its exit code. The order matters where an error
// wraps several classes: the most specific cause wins.
func exitCode(err error) int {
	var ue usageError
	var ee exitError
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &ee):
		return ee.code
	case errors.Is(err, errBusy), errors.Is(err, statedir.ErrBusy):
		return ExitBusy
	case errors.Is(err, errNotDrained), errors.Is(err, errResizePending):
		return ExitNotDrained
	case errors.Is(err, staged.ErrBadSegment):
		return ExitBadSegment
	case errors.Is(err, staging.ErrLocked):
		return ExitLeased
	case errors.Is(err, errWrongBlob), errors.Is(err, transfer.ErrBlobReplaced), errors.Is(err, errStagedPending), errors.Is(err, writeback.ErrStagingAhead),
		errors.Is(err, errBlobMidBatch), errors.Is(err, writeback.ErrBlobMoved), errors.Is(err, thin.ErrDamaged):
		return ExitState
	case errors.Is(err, transfer.ErrSourceChanged), errors.Is(err, transfer.ErrNotPointCopy):
		return ExitSrcChanged
	case errors.As(err, &ue), isCobraUsage(err), errors.Is(err, pageblob.ErrBadURL), errors.Is(err, writeback.ErrResizeRefused),
		errors.Is(err, writeback.ErrThinStaged), errors.Is(err, writeback.ErrThinBreakLease):
		return ExitUsage
	case errors.Is(err, pageblob.ErrAuth):
		return ExitAuth
	case errors.Is(err, pageblob.ErrUnreachable):
		return ExitUnreachable
	case errors.Is(err, pageblob.ErrContainerNotFound), errors.Is(err, pageblob.ErrBlobNotFound), errors.Is(err, pageblob.ErrSnapshotNotFound), errors.Is(err, errNoResyncPoint):
		return ExitNotFound
	case errors.Is(err, pageblob.ErrBlobExists), errors.Is(err, transfer.ErrFileExists):
		return ExitExists
	case errors.Is(err, pageblob.ErrLeased):
		return ExitLeased
	case errors.Is(err, statedir.ErrExists), errors.Is(err, statedir.ErrNotState), errors.Is(err, statedir.ErrNotWritable),
		errors.Is(err, journal.ErrJournalDamaged):
		return ExitState
	case errors.Is(err, pageblob.ErrNotPageBlob), errors.Is(err, pageblob.ErrNotFixedVHD), errors.Is(err, errInvalidVHD),
		errors.Is(err, vhdlayer.ErrNotVHD), errors.Is(err, vhdlayer.ErrBadChecksum), errors.Is(err, vhdlayer.ErrNotFixed),
		errors.Is(err, vhdlayer.ErrDifferencing), errors.Is(err, vhdlayer.ErrSizeMismatch), errors.Is(err, vhdlayer.ErrTruncated):
		// A file or blob that is not a usable VHD, whatever the detail
		// (its size rules included).
		return ExitNotVHD
	case errors.Is(err, vhdlayer.ErrBadSize), errors.Is(err, vhdlayer.ErrSizeNotMiB),
		errors.Is(err, vhdlayer.ErrSizeTooSmall), errors.Is(err, vhdlayer.ErrSizeTooLarge):
		return ExitBadSize
	case errors.Is(err, errInterrupted):
		return ExitInterrupted
	}
	return ExitFailure
}

var errInterrupted = errors.New("interrupted")

// errInvalidVHD marks an inspected file or blob that fails validation.
var errInvalidVHD = errors.New("invalid VHD")

// isCobraUsage recognises cobra's own flag and argument errors, which are
// plain errors without a type.
func isCobraUsage(err error) bool {
	m := err.Error()
	for _, p := range []string{"unknown flag", "unknown shorthand flag", "unknown command", "required flag", "accepts ", "requires at least", "invalid argument", "flag needs an argument", "bad flag syntax",
		"at least one of the flags in the group", "none of the others can be"} {
		if strings.Contains(m, p) {
			return true
		}
	}
	return false
}
