package transfer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/vhdsync/vhdsync/internal/durable"
)

// PointRecord is what a file restored from a recovery point records about
// itself, in PointRecordPath(file): which point of which blob it holds, and
// the size and modification time it had then. An incremental restore
// (download --since) reads it to refuse a file that does not hold the
// point it starts from: rewriting only what changed since a point is exact
// only on a file that is that point.
type PointRecord struct {
	// Blob is the base blob's URL, without SAS or snapshot.
	Blob string `json:"blob"`
	// Point is the recovery point (snapshot id) the file holds, and Epoch
	// its epoch.
	Point string `json:"point"`
	Epoch uint64 `json:"epoch"`
	// Raw is true for a raw image (download --raw), false for a VHD.
	Raw bool `json:"raw"`
	// Size and ModTime (Unix nanoseconds) are the file's when it was
	// restored: a file written to since (mounted, copied over) differs.
	Size    int64 `json:"size"`
	ModTime int64 `json:"mtime_ns"`
	// UpdatingTo is set while an incremental restore from Point to this
	// point runs: a file cut short holds neither point, and only the same
	// restore run again (or a full download) makes it whole.
	UpdatingTo string `json:"updating_to,omitempty"`
}

// PointRecordPath is where the record of file lives: next to it, so that
// it goes wherever file goes with mv, and a copy of the file alone (cp)
// has none and is refused rather than trusted.
func PointRecordPath(file string) string { return file + ".vhdsync-point" }

// ReadPointRecord reads file's record; an error wrapping os.ErrNotExist
// means it has none.
func ReadPointRecord(file string) (PointRecord, error) {
	var r PointRecord
	b, err := os.ReadFile(PointRecordPath(file))
	if err != nil {
		return r, fmt.Errorf("read the recovery point record of %s: %w", file, err)
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("the recovery point record %s is damaged: %w", PointRecordPath(file), err)
	}
	return r, nil
}

// WritePointRecord writes file's record, durably (a temporary file
// renamed over the old record). Without UpdatingTo, Size and ModTime are
// taken from file now.
func WritePointRecord(file string, r PointRecord) error {
	if r.UpdatingTo == "" {
		fi, err := os.Stat(file)
		if err != nil {
			return fmt.Errorf("record the recovery point of %s: %w", file, err)
		}
		r.Size, r.ModTime = fi.Size(), fi.ModTime().UnixNano()
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("record the recovery point of %s: %w", file, err)
	}
	if err := durable.WriteFile(PointRecordPath(file), append(b, '\n')); err != nil {
		return fmt.Errorf("record the recovery point of %s: %w", file, err)
	}
	return nil
}

// RemovePointRecord deletes file's record, if any: the file is about to
// hold something else.
func RemovePointRecord(file string) error {
	if err := os.Remove(PointRecordPath(file)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove the stale recovery point record of %s: %w", file, err)
	}
	if err := durable.SyncDir(filepath.Dir(file)); err != nil {
		return fmt.Errorf("remove the stale recovery point record of %s: %w", file, err)
	}
	return nil
}

// CheckPointRecord checks that file holds the recovery point since of the
// blob blob (a URL without SAS), ready to be brought to the point to, and
// returns its record. raw, when not nil, is what the caller asked for
// (--raw given or not); nil takes the file's own kind. Every refusal wraps
// ErrNotPointCopy and says how to go on.
func CheckPointRecord(file, blob, since, to string, raw *bool) (PointRecord, error) {
	full := fmt.Sprintf("download point %s in full instead: vhdsync download --blob %s --point %s --overwrite %s", to, blob, to, file)
	fi, err := os.Stat(file)
	if err != nil {
		return PointRecord{}, fmt.Errorf("%w: %w; --since needs FILE to be a copy of point %s that vhdsync download --point made", ErrNotPointCopy, err, since)
	}
	r, err := ReadPointRecord(file)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return r, fmt.Errorf("%w: %s has no record of the recovery point it holds (%s is missing: it was not made by vhdsync download --point, or was copied without it), so nothing says it is point %s; %s",
			ErrNotPointCopy, file, PointRecordPath(file), since, full)
	case err != nil:
		return r, fmt.Errorf("%w: %w; %s", ErrNotPointCopy, err, full)
	case r.Blob != blob:
		return r, fmt.Errorf("%w: %s is a copy of %s, not of %s; %s", ErrNotPointCopy, file, r.Blob, blob, full)
	case r.UpdatingTo != "" && (r.Point != since || r.UpdatingTo != to):
		return r, fmt.Errorf("%w: an incremental restore of %s from point %s to point %s was cut short, so it holds neither; finish it: vhdsync download --blob %s --point %s --since %s %s, or %s",
			ErrNotPointCopy, file, r.Point, r.UpdatingTo, blob, r.UpdatingTo, r.Point, file, full)
	case r.Point != since:
		return r, fmt.Errorf("%w: %s holds recovery point %s (epoch %d), not %s; pass --since %s, or %s", ErrNotPointCopy, file, r.Point, r.Epoch, since, r.Point, full)
	case raw != nil && *raw != r.Raw:
		kind := map[bool]string{true: "a raw image (made with --raw)", false: "a VHD (made without --raw)"}[r.Raw]
		return r, fmt.Errorf("%w: %s is %s; give --raw as its download did, or %s", ErrNotPointCopy, file, kind, full)
	case r.UpdatingTo == "" && (fi.Size() != r.Size || fi.ModTime().UnixNano() != r.ModTime):
		return r, fmt.Errorf("%w: %s changed since it was restored from point %s (size %d, modified %s; recorded %d, %s): it may have been written to (mounted, losetup), so it may no longer be that point; %s",
			ErrNotPointCopy, file, r.Point, fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano), r.Size, time.Unix(0, r.ModTime).UTC().Format(time.RFC3339Nano), full)
	}
	return r, nil
}
