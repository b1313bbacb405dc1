package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"
	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/azure/staging"
	"github.com/vhdsync/vhdsync/staged"
)

type applyFlags struct {
	staging    string
	blob       string
	once       bool
	poll       time.Duration
	workers    int
	breakLease bool
	workerID   string
	points     time.Duration // --recovery-points (points.go)
	keep       int
}

func newApplyCmd(g *globals) *cobra.Command {
	var f applyFlags
	cmd := &cobra.Command{
		Use:   "apply --staging URL --blob URL",
		Short: "The apply worker of the staged transfer: staged segments -> Put Page on the blob",
		Long: `Apply the segments that ` + "`vhdsync mount --transfer staged`" + ` stores in the staging
container to the page blob, strictly in order, then delete them. Run it near
the storage (an Azure VM or container in the blob's region): the daemon then
sends compressed segments over the slow link, and this worker sends the
pages over the fast one.

The worker holds a lease on the blob and on the disk's worker lock in the
staging container (one worker per disk). Progress lives in the blob's
sequence number, exactly as in the direct transfer (odd while a segment is
being applied, 2*epoch when the blob is the disk as of that epoch), so a
worker killed at any point resumes where it stopped and never applies an
older segment over a newer one. A segment with a bad checksum or of another
disk stops it (exit 13) before anything after it is applied.

The blob's lease is released when the worker stops, so a managed disk can
be made from the blob then (az disk create; between runs: while segments
wait, the blob lags the disk).`,
		Example: `  vhdsync apply --staging https://acct.blob.core.windows.net/staging --blob https://acct.blob.core.windows.net/vhds/data.vhd
  vhdsync apply --once --staging http://127.0.0.1:10000/devstoreaccount1/staging --blob http://127.0.0.1:10000/devstoreaccount1/vhds/data.vhd`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkPointFlags(cmd, f.points, f.keep); err != nil {
				return err
			}
			return runApply(cmd.Context(), g, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.staging, "staging", "", "staging container `URL` (required; a SAS may follow)")
	fl.StringVar(&f.blob, "blob", "", "page blob `URL` of the disk (required; a SAS may follow)")
	fl.BoolVar(&f.once, "once", false, "apply what is staged, then exit (default: keep polling)")
	fl.DurationVar(&f.poll, "poll", 2*time.Second, "wait between listings when nothing is staged")
	fl.IntVar(&f.workers, "workers", 8, "parallel Put Page / Clear Pages requests within a segment")
	fl.BoolVar(&f.breakLease, "break-lease", false, "break another holder's lease on the blob and the worker lock (only if you are sure it is gone)")
	fl.StringVar(&f.workerID, "worker-id", "", "lease id of this worker (default: derived from the host name and the disk, so a restarted worker on the same host takes its leases back)")
	registerPointFlags(fl, &f.points, &f.keep)
	_ = cmd.MarkFlagRequired("staging")
	_ = cmd.MarkFlagRequired("blob")
	return cmd
}

func runApply(ctx context.Context, g *globals, f applyFlags) (err error) {
	log := g.logger()
	if f.workers < 1 || f.poll <= 0 {
		return usageError{errors.New("--workers must be at least 1 and --poll positive")}
	}
	client, err := pageblob.Open(f.blob, &pageblob.Options{Env: g.env, MaxRetries: -1, TryTimeout: 2 * time.Minute})
	if err != nil {
		return err
	}
	info, err := client.OpenVHD(ctx)
	if err != nil {
		return err
	}
	diskID := info.Footer.UniqueID.String()
	store, err := staging.Open(f.staging, diskID, &pageblob.Options{Env: g.env, MaxRetries: -1, TryTimeout: 2 * time.Minute})
	if err != nil {
		return err
	}
	id := f.workerID
	if id == "" {
		host, _ := os.Hostname()
		id = uuid.NewSHA1(uuid.NameSpaceOID, []byte("vhdsync-apply/"+host+"/"+diskID)).String()
	} else if _, perr := uuid.Parse(id); perr != nil {
		return usageError{fmt.Errorf("--worker-id %q: a lease id must be a UUID", id)}
	}
	if err := store.AcquireLock(ctx, staging.Worker, id, f.breakLease); err != nil {
		return err
	}
	remote := pageblob.Remote{C: client}
	held, err := remote.AcquireLease(ctx, id)
	if err != nil && f.breakLease {
		log.Warn("breaking the blob's lease (--break-lease)")
		if berr := remote.BreakLease(ctx); berr != nil {
			return fmt.Errorf("break lease: %w", berr)
		}
		held, err = remote.AcquireLease(ctx, id)
	}
	if err != nil {
		_ = store.ReleaseLock(context.WithoutCancel(ctx), staging.Worker, id)
		return fmt.Errorf("%w (a direct `vhdsync mount` of this blob is running? stop it first)", err)
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		err = errors.Join(err, remote.ReleaseLease(rctx, held), store.ReleaseLock(rctx, staging.Worker, id))
	}()

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	go func() {
		select {
		case s := <-sigs:
			log.Info("signal: stopping after the request in flight", "signal", s.String())
			cancel()
		case <-runCtx.Done():
		}
	}()
	points, err := newRecoveryPoints(client, f.points, f.keep, log)
	if err != nil {
		return err
	}
	a, err := staged.NewApplier(remote, store, held, staged.ApplierOptions{
		DiskID: diskID, DiskSize: int64(info.Footer.CurrentSize), Workers: f.workers,
		Poll: f.poll, Once: f.once, Logger: log, AfterApply: afterBatchHook(points), OnSend: onSendHook(points),
	})
	if err != nil {
		return err
	}
	log.Info("apply worker started", "blob", client.Location().URL(), "staging", store.URL(), "prefix", store.Prefix(), "once", f.once)
	started := time.Now()
	runErr := a.Run(runCtx)
	st := a.Stats()
	fmt.Fprintf(g.stdout, "applied %d segments (%s read from staging) in %.1f s: %s in %d Put Page, %s cleared in %d Clear Pages; %d stale segments deleted\n",
		st.Segments, humanBytes(int64(st.SegmentBytes)), time.Since(started).Seconds(), humanBytes(int64(st.BytesSent)), st.PutCalls, humanBytes(int64(st.BytesCleared)), st.ClearCalls, st.Stale)
	fmt.Fprintf(g.stdout, "blob sequence %d: epoch %d complete", st.RemoteSequence, st.AppliedEpoch)
	if st.Waiting > 0 {
		fmt.Fprintf(g.stdout, "; %d segments wait for an earlier one not staged yet", st.Waiting)
	}
	fmt.Fprintln(g.stdout)
	// A signal is a normal end for a polling worker: Run returns nil then.
	return runErr
}
