package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/pflag"
	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/azure/staging"
	"github.com/vhdsync/vhdsync/internal/control"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
)

// Transfer modes.
const (
	transferDirect = "direct"
	transferStaged = "staged"
)

// stagingEnv carries the staging URL (it may hold a SAS) to the daemon,
// which must not have it on its command line.
const stagingEnv = "VHDSYNC_STAGING"

// errStagedPending: a direct mount would overtake segments not applied yet.
var errStagedPending = errors.New("staged segments are not applied yet")

type stagingFlags struct {
	transfer string
	staging  string
}

func (s *stagingFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&s.transfer, "transfer", "", "`MODE` of sending writes to the blob: direct (Put Page from this host) or staged (compressed segments in --staging, applied by vhdsync apply near the storage); default: what the last mount of DIR used, else direct")
	fl.StringVar(&s.staging, "staging", "", "staging container `URL` for --transfer staged, e.g. https://ACCOUNT.blob.core.windows.net/staging (a SAS may follow; prefer $"+stagingEnv+" for that); remembered in DIR without the SAS")
}

// stagingURL is the staging container to use: the flag, the environment,
// or the one DIR remembers.
func (s stagingFlags) url(g *globals, d *statedir.Dir) string {
	switch {
	case s.staging != "":
		return s.staging
	case g.env(stagingEnv) != "":
		return g.env(stagingEnv)
	}
	return d.State.StagingURL
}

// mode resolves --transfer against what DIR remembers.
func (s stagingFlags) mode(d *statedir.Dir) (string, error) {
	m := s.transfer
	if m == "" {
		m = d.State.Transfer
	}
	if m == "" {
		m = transferDirect
	}
	if m != transferDirect && m != transferStaged {
		return "", usageError{fmt.Errorf("--transfer %q: use direct or staged", s.transfer)}
	}
	return m, nil
}

// openStaging opens DIR's disk in the staging container at raw.
func openStaging(g *globals, d *statedir.Dir, raw string) (*staging.Store, error) {
	return staging.Open(raw, d.State.DiskID, &pageblob.Options{Env: g.env, MaxRetries: -1, TryTimeout: 2 * time.Minute})
}

// setupTransfer prepares the mount's transfer: for staged, the staging
// store with the writer lock held (release gives it up); for direct, a
// check that no segment of an earlier staged mount waits to be applied,
// which the direct flusher would overtake. The mode is remembered in DIR.
func setupTransfer(ctx context.Context, g *globals, d *statedir.Dir, sf stagingFlags, breakLock bool, log *slog.Logger) (store *staging.Store, release func(), err error) {
	mode, err := sf.mode(d)
	if err != nil {
		return nil, nil, err
	}
	release = func() {}
	raw := sf.url(g, d)
	switch mode {
	case transferDirect:
		if d.State.Transfer == transferStaged && raw != "" {
			s, err := openStaging(g, d, raw)
			if err != nil {
				return nil, nil, err
			}
			names, err := s.ListSegments(ctx)
			if err != nil {
				return nil, nil, fmt.Errorf("check the staging container before a direct mount: %w (pass --staging URL with credentials, or --transfer staged)", err)
			}
			if len(names) > 0 {
				return nil, nil, fmt.Errorf("%w: %d segments of this disk wait in %s; a direct mount would write newer data under them. Run `vhdsync apply --once --staging %s --blob %s` first, or mount with --transfer staged", errStagedPending, len(names), s.URL(), s.URL(), d.State.BlobURL)
			}
		}
		if d.State.Transfer != "" && d.State.Transfer != transferDirect {
			d.State.Transfer = transferDirect
			if err := d.Save(); err != nil {
				return nil, nil, err
			}
		}
		return nil, release, nil
	}
	if raw == "" {
		return nil, nil, usageError{errors.New("--transfer staged needs --staging URL (a container; $" + stagingEnv + " also works)")}
	}
	s, err := openStaging(g, d, raw)
	if err != nil {
		return nil, nil, err
	}
	if err := s.EnsureContainer(ctx); err != nil {
		return nil, nil, err
	}
	id := d.State.LeaseID
	if id == "" {
		id = newLeaseID()
		d.State.LeaseID = id
	}
	if err := s.AcquireLock(ctx, staging.Writer, id, breakLock); err != nil {
		return nil, nil, err
	}
	plain, _, _ := strings.Cut(raw, "?")
	if d.State.Transfer != transferStaged || d.State.StagingURL != plain {
		d.State.Transfer, d.State.StagingURL = transferStaged, plain
		if err := d.Save(); err != nil {
			return nil, nil, err
		}
	}
	log.Info("staged transfer", "staging", s.URL(), "prefix", s.Prefix())
	release = func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := s.ReleaseLock(rctx, staging.Writer, id); err != nil {
			log.Warn("release the staging writer lock", "err", err)
		}
	}
	return s, release, nil
}

// appliedSequence reads the blob's sequence number, which says how far the
// worker has applied, for status; it answers within a second or says why
// not.
func appliedSequence(ctx context.Context, r remote.Remote) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	return r.Sequence(ctx)
}

func newLeaseID() string { return uuid.NewString() }

// stagedStatus fills the staged transfer's part of status: what the
// daemon staged, and how far the worker has applied (read from the blob).
func stagedStatus(ctx context.Context, out *control.Status, stagingURL string, r remote.Remote, s replicate.FlusherStats) {
	out.Transfer = transferStaged
	out.StagingURL = stagingURL
	out.StagedEpoch = s.RemoteEpoch
	out.Segments = s.Segments
	out.StagedDataBytes = s.StagedDataBytes
	seq, err := appliedSequence(ctx, r)
	if err != nil {
		out.AppliedError = fmt.Sprintf("read the blob's sequence number: %v", err)
		return
	}
	out.RemoteSequence = seq
	out.AppliedEpoch = remote.Sequence(seq).Epoch()
	out.RemoteEpoch = out.AppliedEpoch
}
