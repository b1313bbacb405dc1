package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/fusefs"
	"github.com/vhdsync/vhdsync/internal/control"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/journal"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/vhdlayer"
	"github.com/vhdsync/vhdsync/writeback"
)

// readyFDEnv names the descriptor on which a background daemon tells the
// `vhdsync mount` that started it whether the mount is up.
const readyFDEnv = "VHDSYNC_READY_FD"

// lastStopFile records how the daemon last stopped (read by unmount).
const lastStopFile = "last-stop.json"

type mountFlags struct {
	blob       blobFlags
	state      string
	foreground bool
	breakLease bool
	allowOther bool
	journalCap string
	workers    int
	linger     time.Duration
	fuseDebug  bool
	// Catching up (docs/DESIGN.md): the blob's limits for the cost model,
	// the longest odd window of a backlog batch, the merge wait.
	blobLimits string
	oddWindow  time.Duration
	mergeWait  time.Duration
	noFills    bool
	// Synchronous replication: a barrier waits for the blob, at most
	// syncTimeout (0: for ever).
	sync        bool
	syncTimeout time.Duration
	// Recovery points (points.go): interval (0: off) and how many to keep;
	// pointsSet: --recovery-points was given (else DIR's are used).
	points    time.Duration
	keep      int
	pointsSet bool
	// Hidden knobs, for measuring the FUSE defaults against alternatives.
	fuseNoDirectIO bool
	fuseNoParallel bool
	fuseMaxWrite   int
	fuseMaxBg      int
	pprofAddr      string
	staged         stagingFlags
	metrics        string // --metrics ADDR (metrics.go)
	// prefetch: a thin disk's background fetch, "on", "off" or MiB/s.
	prefetch string
}

func newMountCmd(g *globals) *cobra.Command {
	var f mountFlags
	cmd := &cobra.Command{
		Use:   "mount --state DIR MOUNTPOINT",
		Short: "Mount the disk: MOUNTPOINT/<name>.vhd and <name>.img, replicated live to the blob",
		Long: `Mount the disk of state directory DIR at MOUNTPOINT, which then holds two
views of the same disk:

  MOUNTPOINT/<name>.img  the raw disk (virtual size), for losetup
  MOUNTPOINT/<name>.vhd  the whole fixed VHD (data + footer), for qemu-nbd -f vpc;
                         writes that would change the footer are refused (EPERM)

Every write is journaled in DIR before it is acknowledged and replicated in
order to the page blob; fsync (a flush from the loop device) is a barrier.
Discards (fstrim, mkfs) become Clear Pages. The blob is leased while mounted.

A journal left by a crash is replayed first. The command returns once the
mount answers; the daemon stays in the background and logs to DIR/vhdsync.log
(--foreground keeps it attached and logs to standard error). Unmount with
` + "`vhdsync unmount MOUNTPOINT`" + ` (or umount, or SIGTERM): the journal is drained first.

As a service: dist/systemd/vhdsync@.service (Type=notify, secrets through
LoadCredential=), or an /etc/fstab line of type fuse.vhdsync; secrets may
come from files in $CREDENTIALS_DIRECTORY (README: Run it as a service).`,
		Example: `  vhdsync mount --state /var/lib/vhdsync/data /mnt/vhd
  losetup --find --show /mnt/vhd/data.img
  qemu-nbd -f vpc --socket /tmp/nbd.sock /mnt/vhd/data.vhd`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := parseBlobLimits(f.blobLimits); err != nil {
				return err
			}
			if f.oddWindow < time.Second {
				return usageError{fmt.Errorf("--max-odd-window %v: give at least 1s", f.oddWindow)}
			}
			if err := checkPointFlags(cmd, f.points, f.keep); err != nil {
				return err
			}
			if f.syncTimeout < 0 || (f.syncTimeout > 0 && !f.sync) {
				return usageError{fmt.Errorf("--sync-timeout %v: give a positive duration, with --sync", f.syncTimeout)}
			}
			f.pointsSet = cmd.Flags().Changed("recovery-points")
			if !f.foreground && g.env(readyFDEnv) == "" {
				return startDaemon(cmd, g, f, args[0])
			}
			return runDaemon(cmd.Context(), g, f, args[0])
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.state, "state", "", "state directory `DIR` made by vhdsync create (required)")
	f.blob.register(fl)
	fl.BoolVar(&f.foreground, "foreground", false, "stay in the foreground and log to standard error")
	fl.BoolVar(&f.breakLease, "break-lease", false, "break another writer's lease on the blob (only if you are sure it is gone)")
	fl.BoolVar(&f.allowOther, "allow-other", false, "let other users reach the mount (the files stay mode 0600)")
	fl.StringVar(&f.journalCap, "journal-cap", "", "most journal bytes pending before writers wait, e.g. 8GiB (default: half the free space of the state directory's filesystem, at most 64 GiB)")
	fl.IntVar(&f.workers, "workers", 8, "parallel Put Page / Clear Pages requests")
	fl.DurationVar(&f.linger, "linger", 250*time.Millisecond, "longest time a write waits before the flusher closes its epoch on its own")
	fl.StringVar(&f.blobLimits, "blob-limits", "500,60", "the page blob's targets as `REQUESTS,MIBPS` (requests per second, MiB per second): the cost model that decides when one larger Put Page beats several small ones; a standard page blob is 500,60, a premium one up to 7500,250 by tier")
	fl.DurationVar(&f.oddWindow, "max-odd-window", 20*time.Second, "while catching up, how long one batch may keep the blob odd (not a consistent disk) at the --blob-limits byte rate; larger batches send data overwritten many times once")
	fl.DurationVar(&f.mergeWait, "merge-wait", time.Second, "how long a batch of small scattered writes may wait for more writes to merge with while writers are busy (0: never)")
	fl.BoolVar(&f.sync, "sync", false, "synchronous replication: fsync (a flush from the loop device) returns only once the blob holds every write before it, so losing the whole machine loses nothing fsync acknowledged; writes between barriers stay write-back. Direct transfer only")
	fl.DurationVar(&f.syncTimeout, "sync-timeout", 0, "with --sync, the longest a barrier waits for the blob (e.g. 30s); past it barriers return as in write-back mode, logged and counted, and status says degraded until the blob has caught up (default: wait for ever)")
	fl.StringVar(&f.prefetch, "prefetch", "on", "a thin disk (create --from-blob --thin): fetch the chunks not yet local in the background; `MODE` is on (as fast as the blob serves), off, or a cap in MiB/s (e.g. 20); reads and writes fetch what they need first either way")
	fl.BoolVar(&f.noFills, "no-fills", false, "send only pending ranges, never clean sectors between them (measurement only)")
	f.staged.register(fl)
	fl.BoolVar(&f.fuseDebug, "fuse-debug", false, "log every FUSE request (very verbose)")
	registerPointFlags(fl, &f.points, &f.keep)
	registerMetricsFlag(fl, &f.metrics)
	fl.BoolVar(&f.fuseNoDirectIO, "fuse-no-direct-io", false, "serve through the kernel page cache (measurement only)")
	fl.BoolVar(&f.fuseNoParallel, "fuse-no-parallel-writes", false, "serialise writes per file in the kernel (measurement only)")
	fl.IntVar(&f.fuseMaxWrite, "fuse-max-write", 256<<10, "largest FUSE write request (measurement only)")
	fl.IntVar(&f.fuseMaxBg, "fuse-max-background", 64, "kernel limit of outstanding async FUSE requests (measurement only)")
	fl.StringVar(&f.pprofAddr, "debug-pprof", "", "serve Go's pprof profiles (CPU, block, mutex) on `ADDR`, e.g. 127.0.0.1:6060 (measurement only)")
	for _, h := range []string{"fuse-no-direct-io", "fuse-no-parallel-writes", "fuse-max-write", "fuse-max-background", "debug-pprof", "no-fills"} {
		_ = fl.MarkHidden(h)
	}
	_ = cmd.MarkFlagRequired("state")
	return cmd
}

// startDaemon re-runs this command in the background and waits until the
// daemon reports the mount ready, or its failure.
func startDaemon(cmd *cobra.Command, g *globals, f mountFlags, mp string) error {
	d, err := statedir.Open(f.state)
	if err != nil {
		return err
	}
	if err := d.CheckWritable(); err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	logPath := filepath.Join(d.Path, statedir.LogFile)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	defer logf.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	c := exec.Command(exe, rebuildMountArgs(g, f, mp)...)
	// A SAS goes to the daemon in its environment, never on its command
	// line, which every user can read in /proc/PID/cmdline (ps).
	c.Env = append(os.Environ(), readyFDEnv+"=3")
	if f.blob.sas != "" {
		c.Env = append(c.Env, "VHDSYNC_SAS="+f.blob.sas)
	}
	if f.staged.staging != "" {
		c.Env = append(c.Env, stagingEnv+"="+f.staged.staging)
	}
	c.ExtraFiles = []*os.File{pw}
	c.Stdout, c.Stderr = logf, logf
	c.Stdin = nil
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		return fmt.Errorf("start daemon: %w", err)
	}
	pw.Close()
	line, rerr := bufio.NewReader(pr).ReadString('\n')
	pr.Close()
	line = strings.TrimSpace(line)
	if strings.HasPrefix(line, "OK") {
		pid := c.Process.Pid
		_ = c.Process.Release()
		fmt.Fprintf(g.stdout, "mounted %s at %s (daemon pid %d, log %s)\n  %s/%s.img  raw disk for losetup\n  %s/%s.vhd  fixed VHD for qemu-nbd -f vpc\n",
			d.State.BlobURL, mp, pid, logPath, mp, d.State.Name, mp, d.State.Name)
		var recs, bytes, remote int64
		if n, _ := fmt.Sscanf(line, "OK %d %d %d", &recs, &bytes, &remote); n == 3 && recs > 0 {
			fmt.Fprintf(g.stdout, "  replayed %d journal records (%s) left by a crash; %d were already on the blob, the rest are being sent\n", recs, humanBytes(bytes), remote)
		}
		printPointsRemembered(g.stdout, f)
		return nil
	}
	_ = c.Wait()
	if code, msg, ok := strings.Cut(strings.TrimPrefix(line, "ERR "), " "); ok && strings.HasPrefix(line, "ERR ") {
		n, _ := strconv.Atoi(code)
		return exitError{code: n, msg: msg}
	}
	return fmt.Errorf("the daemon exited before the mount was ready (%v); see %s", rerr, logPath)
}

func rebuildMountArgs(g *globals, f mountFlags, mp string) []string {
	a := []string{"mount", "--state", f.state, "--log-level", g.logLevel}
	if g.logJSON {
		a = append(a, "--log-json")
	}
	if f.breakLease {
		a = append(a, "--break-lease")
	}
	if f.allowOther {
		a = append(a, "--allow-other")
	}
	if f.journalCap != "" {
		a = append(a, "--journal-cap", f.journalCap)
	}
	if f.staged.transfer != "" {
		a = append(a, "--transfer", f.staged.transfer)
	}
	a = append(a, "--blob-limits", f.blobLimits, "--max-odd-window", f.oddWindow.String(), "--merge-wait", f.mergeWait.String(), "--prefetch", f.prefetch)
	if f.noFills {
		a = append(a, "--no-fills")
	}
	if f.sync {
		a = append(a, "--sync")
		if f.syncTimeout > 0 {
			a = append(a, "--sync-timeout", f.syncTimeout.String())
		}
	}
	a = append(a, "--workers", strconv.Itoa(f.workers), "--linger", f.linger.String(),
		"--fuse-max-write", strconv.Itoa(f.fuseMaxWrite), "--fuse-max-background", strconv.Itoa(f.fuseMaxBg))
	if f.fuseNoDirectIO {
		a = append(a, "--fuse-no-direct-io")
	}
	if f.fuseNoParallel {
		a = append(a, "--fuse-no-parallel-writes")
	}
	if f.fuseDebug {
		a = append(a, "--fuse-debug")
	}
	if f.pprofAddr != "" {
		a = append(a, "--debug-pprof", f.pprofAddr)
	}
	if f.pointsSet {
		a = append(a, "--recovery-points", f.points.String())
		if f.points > 0 {
			a = append(a, "--keep", strconv.Itoa(f.keep))
		}
	}
	a = append(a, metricsArgs(f)...)
	return append(a, mp)
}

// exitError carries a daemon's failure, with its exit code, to the parent.
type exitError struct {
	code int
	msg  string
}

// Error implements error.
func (e exitError) Error() string { return e.msg }

// lastStop is what the daemon writes when it stops.
type lastStop struct {
	Time           time.Time `json:"time"`
	Drained        bool      `json:"drained"`
	Error          string    `json:"error,omitempty"`
	PendingRecords int64     `json:"pending_records"`
	PendingBytes   int64     `json:"pending_bytes"`
	// LeaseKept: the disk is thin and not every chunk is local, so its
	// state directory keeps the blob's lease.
	LeaseKept bool `json:"lease_kept,omitempty"`
}

// runDaemon is the mount itself.
// daemonMemoryLimit is the Go heap's soft limit in the daemon unless
// GOMEMLIMIT says otherwise: a flusher batch (up to 64 MiB, plus what
// coalescing copies) can be the live heap, and the default GC pacing would
// let the heap reach twice that before collecting. 128 MiB rather than
// 160: badger's tables are memory-mapped and count in the RSS too, more of
// them the more records are pending (bench stage 1 with the remote
// detached: VmHWM 159 against 203 MiB, same IOPS).
const daemonMemoryLimit = 128 << 20

func runDaemon(ctx context.Context, g *globals, f mountFlags, mp string) (err error) {
	if g.env("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(daemonMemoryLimit)
	}
	log := g.logger()
	if f.pprofAddr != "" {
		if err := servePprof(f.pprofAddr, log); err != nil {
			return err
		}
	}
	mx, err := listenMetrics(f.metrics, log)
	if err != nil {
		return err
	}
	defer mx.close()
	sd := newServiceNotifier(g, log) // systemd's Type=notify (notify.go)
	defer sd.close()
	var ready *os.File
	if fd := g.env(readyFDEnv); fd != "" {
		n, _ := strconv.Atoi(fd)
		ready = os.NewFile(uintptr(n), "ready")
		defer func() {
			if ready != nil { // failed before the mount was ready
				msg := "unknown failure"
				if err != nil {
					msg = strings.ReplaceAll(err.Error(), "\n", " ")
				}
				fmt.Fprintf(ready, "ERR %d %s\n", exitCode(err), msg)
				ready.Close()
			}
		}()
	}
	d, err := statedir.Open(f.state)
	if err != nil {
		return err
	}
	if err := d.CheckWritable(); err != nil {
		return err
	}
	defer handleHangup(g, d.Path, log)()
	absMP, err := filepath.Abs(mp)
	if err != nil {
		return err
	}
	if err := checkMountpoint(absMP); err != nil {
		return err
	}
	lock, err := d.TryLock("mounted at " + absMP)
	if err != nil {
		return err
	}
	defer lock.Unlock()
	_ = os.Remove(filepath.Join(d.Path, lastStopFile))

	if d.State.Thin && f.breakLease {
		return usageError{writeback.ErrThinBreakLease}
	}
	if d.State.Thin && f.staged.transfer == transferStaged {
		return usageError{writeback.ErrThinStaged}
	}
	client, err := connect(g, d, f.blob, true)
	if err != nil {
		return err
	}
	if err := finishPendingResize(ctx, log, d, client, f.breakLease); err != nil {
		return err
	}
	if err := checkBlob(ctx, client, d); err != nil {
		return err
	}
	capBytes, err := journalCap(f.journalCap, d.Path)
	if err != nil {
		return err
	}
	limits, err := parseBlobLimits(f.blobLimits)
	if err != nil {
		return err
	}
	prefetch, err := parsePrefetch(f.prefetch)
	if err != nil {
		return err
	}
	if err := rememberPoints(d, &f); err != nil {
		return err
	}
	rp, err := startRecoveryPoints(g, d, f, log)
	if err != nil {
		return err
	}
	store, releaseStaging, err := setupTransfer(ctx, g, d, f.staged, f.breakLease, log)
	if err != nil {
		return err
	}
	if f.sync && store != nil {
		releaseStaging()
		return usageError{writeback.ErrSyncStaged}
	}
	o := diskOptions(d, client, store, f.breakLease)
	o.Sync, o.SyncTimeout = f.sync, f.syncTimeout
	o.Journal = journal.Options{MaxPendingBytes: capBytes}
	o.NoFills = f.noFills
	o.Sender = replicate.SenderOptions{Workers: f.workers, OnSend: onSendHook(rp)}
	o.Flusher = replicate.FlusherOptions{Linger: f.linger, AfterBatch: afterBatchHook(rp),
		RequestCost: limits.requestCost(), MaxBatchDistinct: limits.bytesIn(f.oddWindow), MergeWait: mergeWaitOption(f.mergeWait)}
	o.Logger = log
	if err := thinOptions(d, client, &o, log); err != nil {
		releaseStaging()
		return err
	}
	o.Prefetch, o.NoPrefetch = prefetch.opts, prefetch.off
	disk, err := writeback.Open(ctx, o)
	if err != nil && o.Thin != nil {
		_ = o.Thin.Close()
	}
	if err != nil {
		return blobMovedAdvice(err, d)
	}
	views := &fusefs.Views{}
	server, counters, err := fusefs.Mount(absMP, disk, fusefs.Options{
		Views:            views,
		Name:             d.State.Name,
		FsName:           d.Path,
		Footer:           d.FooterBytes(),
		AllowOther:       f.allowOther,
		Debug:            f.fuseDebug,
		NoDirectIO:       f.fuseNoDirectIO,
		NoParallelWrites: f.fuseNoParallel,
		MaxWrite:         f.fuseMaxWrite,
		MaxBackground:    f.fuseMaxBg,
		Logger:           log,
		Latency:          mx.observeLatency(),
	})
	if err != nil {
		cerr := disk.Close(ctx, false)
		return errors.Join(fmt.Errorf("%w (is %s a directory you may mount on? as a user, fusermount3 must be installed)", err, absMP), cerr)
	}
	started := time.Now()
	var phaseMu sync.Mutex
	phase, note := "serving", ""
	setPhase := func(p, n string) { phaseMu.Lock(); phase, note = p, n; phaseMu.Unlock() }
	setPhase = sd.wrapPhase(setPhase, disk.Stats)
	rate := newRateMeter()
	ctl, err := control.ServeWith(d.Path, control.Handlers{Resize: resizeHandler(d, disk, views, log), Status: func() control.Status {
		s := disk.Stats()
		phaseMu.Lock()
		p, n := phase, note
		phaseMu.Unlock()
		out := buildStatus(s, counters, rate, control.Status{
			PID: os.Getpid(), Mountpoint: absMP, StateDir: d.Path, BlobURL: d.State.BlobURL,
			Started: started, Phase: p, Note: n,
		})
		if store != nil {
			stagedStatus(ctx, &out, store.URL(), pageblob.Remote{C: client}, s.Flusher)
		}
		out.RecoveryPoints = recoveryStatus(rp)
		out.Thin = thinStatus(s.Thin, disk.ThinErr(), f.prefetch, started)
		return out
	}})
	if err != nil {
		_ = server.Unmount()
		return errors.Join(err, disk.Close(ctx, false))
	}
	defer ctl.Close()
	if err := mx.serve(disk, counters, rp, d.State.BlobURL); err != nil {
		_ = server.Unmount()
		return errors.Join(err, disk.Close(ctx, false))
	}
	log.Info("mounted", "mountpoint", absMP, "blob", d.State.BlobURL, "replayed_records", disk.Replay().Records, "journal_cap", capBytes)
	if ready != nil {
		rs := disk.Replay()
		fmt.Fprintf(ready, "OK %d %d %d\n", rs.Records, rs.Bytes, rs.AlreadyRemote)
		ready.Close()
		ready = nil
	}
	sd.ready(absMP)

	// Serve until the mount goes away (umount, vhdsync unmount) or a signal.
	gone := make(chan struct{})
	go func() { server.Wait(); close(gone) }()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	forced := false
wait:
	for {
		select {
		case <-gone:
			break wait
		case s := <-sigs:
			log.Info("signal: draining the journal, then unmounting", "signal", s.String())
			setPhase("draining", "signal "+s.String())
			dctx, cancel := context.WithCancel(context.Background())
			watched := make(chan struct{})
			go func() {
				defer close(watched)
				select {
				case <-sigs:
					log.Warn("second signal: stopping without draining; the journal is kept and replayed at the next mount")
					forced = true
					cancel()
				case <-dctx.Done():
				}
			}()
			derr := disk.Drain(dctx)
			cancel()
			<-watched // forced is settled
			if derr != nil && !forced {
				log.Error("drain failed; still serving", "err", derr)
				setPhase("serving", "drain failed: "+derr.Error())
				continue
			}
			if uerr := server.Unmount(); uerr != nil {
				// Busy (a loop device, qemu-nbd): keep serving, say why. A
				// later unmount drains as usual, even after a second signal.
				msg := fmt.Sprintf("cannot unmount %s (%v); still serving. Detach what uses it first", absMP, uerr)
				if loops := loopDevicesOn(absMP); len(loops) > 0 {
					msg += ": loop device " + strings.Join(loops, ", ") + " (losetup -d)"
				}
				log.Warn(msg)
				setPhase("serving", msg)
				forced = false
				continue
			}
			<-gone
			break wait
		}
	}
	setPhase("draining", "unmounted")
	log.Info("unmounted; draining the journal", "pending_bytes", disk.Stats().Journal.PendingBytes)
	stop := lastStop{Time: time.Now()}
	var cerr error
	if forced {
		cerr = disk.Close(context.Background(), false)
	} else {
		dctx, cancel := context.WithCancel(context.Background())
		go func() {
			select {
			case s := <-sigs:
				log.Warn("signal during the final drain: stopping; the journal is kept", "signal", s.String())
				cancel()
			case <-dctx.Done():
			}
		}()
		// With recovery points, the blob as this mount leaves it is a
		// point: a writer that takes it over records its changes from
		// there, and `vhdsync resync` can bring this state directory
		// back by diff.
		if rp != nil && store == nil {
			if derr := disk.Drain(dctx); derr == nil {
				rp.Final(dctx, disk.Stats().Flusher.RemoteEpoch)
			}
		}
		cerr = disk.Close(dctx, true)
		stop.Drained = cerr == nil
		cancel()
	}
	st := disk.Stats()
	saveCarried(d.Path, rp, st.Flusher.RemoteSequence, log)
	stop.PendingRecords, stop.PendingBytes = st.Journal.PendingRecords, st.Journal.PendingBytes
	stop.LeaseKept = st.Thin != nil && st.Thin.MissingChunks > 0
	if cerr != nil {
		stop.Error = cerr.Error()
	} else if forced {
		stop.Error = "stopped by a second signal before the journal was drained"
	}
	writeLastStop(d.Path, stop)
	setPhase("stopped", "")
	if stop.Drained {
		if store != nil {
			releaseStaging()
			log.Info("journal drained into the staging container; `vhdsync apply` brings the blob up to date", "staging", store.URL())
			return nil
		}
		if stop.LeaseKept {
			log.Info("journal drained; the blob holds every write; its lease is kept, as the disk is thin (the blob holds the chunks not yet local)")
			return nil
		}
		log.Info("journal drained, lease released; the blob holds every write")
		return nil
	}
	return fmt.Errorf("%w: stopped with %d records (%d bytes) not yet on the blob: %s; they are kept and sent by the next mount or `vhdsync replay`", errNotDrained, stop.PendingRecords, stop.PendingBytes, stop.Error)
}

func writeLastStop(dir string, s lastStop) {
	b, _ := json.MarshalIndent(s, "", "  ")
	_ = os.WriteFile(filepath.Join(dir, lastStopFile), append(b, '\n'), 0o600)
}

// checkMountpoint refuses a missing mountpoint, a non-directory, a dead
// FUSE mount and anything already mounted there.
func checkMountpoint(mp string) error {
	st, err := os.Stat(mp)
	if errors.Is(err, syscall.ENOTCONN) {
		return busyf("%s is a dead FUSE mount (its daemon died): detach loop devices on it (losetup -d), run `umount -l %s`, then mount again; the journal is replayed", mp, mp)
	}
	if errors.Is(err, os.ErrNotExist) {
		return usageError{fmt.Errorf("mountpoint %s does not exist: make it first with `mkdir -p %s`", mp, mp)}
	}
	if err != nil {
		return fmt.Errorf("mountpoint: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("mountpoint %s is not a directory", mp)
	}
	if m, ok, _ := findMount(mp); ok {
		return busyf("%s is already a vhdsync mount (state %s)", mp, m.StateDir)
	}
	parent, err := os.Stat(filepath.Dir(mp))
	if err == nil && mp != "/" {
		if st.Sys().(*syscall.Stat_t).Dev != parent.Sys().(*syscall.Stat_t).Dev {
			return busyf("something is already mounted on %s; choose an empty directory", mp)
		}
	}
	return nil
}

// journalCap parses --journal-cap or sizes the default from the free space
// of the state directory's filesystem.
func journalCap(flag, dir string) (int64, error) {
	if flag != "" {
		n, err := vhdlayer.ParseSize(flag)
		if err != nil {
			return 0, usageError{fmt.Errorf("--journal-cap: %w", err)}
		}
		if n < 1<<20 {
			return 0, usageError{fmt.Errorf("--journal-cap %s: at least 1 MiB", flag)}
		}
		return int64(n), nil
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("size the journal cap: %w", err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	c := min(free/2, 64<<30)
	return max(c, 64<<20), nil
}

// rateMeter turns the flusher's counters into recent rates: requests and
// bytes sent over the last rateWindow, journal bytes drained over the last
// drainWindow (batches commit in steps, so the drain rate needs the longer
// view).
type rateMeter struct {
	mu      sync.Mutex
	samples []rateSample // oldest first, at most drainWindow old
}

type rateSample struct {
	at                      time.Time
	requests, sent, drained uint64
}

const (
	rateWindow  = 10 * time.Second
	drainWindow = 60 * time.Second
)

func newRateMeter() *rateMeter { return &rateMeter{} }

// rates records the counters now and returns requests/s, bytes/s and
// drained journal bytes/s (0 until two samples a second apart exist).
func (r *rateMeter) rates(requests, sent, drained uint64) (rps, bps, dps float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	r.samples = append(r.samples, rateSample{now, requests, sent, drained})
	for len(r.samples) > 2 && now.Sub(r.samples[0].at) > drainWindow {
		r.samples = r.samples[1:]
	}
	since := func(window time.Duration) (rateSample, float64) {
		for _, s := range r.samples {
			if now.Sub(s.at) <= window {
				return s, now.Sub(s.at).Seconds()
			}
		}
		return r.samples[len(r.samples)-1], 0
	}
	if s, dt := since(rateWindow); dt >= 1 {
		rps = float64(requests-s.requests) / dt
		bps = float64(sent-s.sent) / dt
	}
	if s, dt := since(drainWindow); dt >= 1 {
		dps = float64(drained-s.drained) / dt
	}
	return rps, bps, dps
}

func buildStatus(s writeback.Stats, c *fusefs.Counters, rate *rateMeter, base control.Status) control.Status {
	out := base
	out.JournalRecords = s.Journal.PendingRecords
	out.JournalBytes = s.Journal.PendingBytes
	out.JournalCapBytes = s.Journal.MaxBytes
	out.JournalDisk = s.Journal.DiskBytes
	if !s.Journal.OldestNotOnRemote.IsZero() {
		out.OldestPending = s.Journal.OldestNotOnRemote
		out.LagSeconds = time.Since(s.Journal.OldestNotOnRemote).Seconds()
	}
	out.BlockedWriters = s.Journal.BlockedWriters
	out.ImageBacked, out.Captures, out.CapturedBytes, out.Binds = s.Journal.ImageBacked, s.Journal.Captures, s.Journal.CapturedBytes, s.Journal.Binds
	out.Sync, out.SyncDegraded, out.SyncTimeouts = s.Sync.On, s.Sync.Degraded, s.Sync.Timeouts
	out.OpenEpoch = s.Journal.OpenEpoch
	out.EpochsClosed = s.Journal.EpochsClosed
	out.RemoteEpoch = s.Flusher.RemoteEpoch
	out.RemoteSequence = s.Flusher.RemoteSequence
	out.LeaseID = s.LeaseID
	out.FlusherState = string(s.Flusher.State)
	out.LastError = s.Flusher.LastError
	out.Batches = s.Flusher.Batches
	out.PutCalls = s.Flusher.PutCalls
	out.ClearCalls = s.Flusher.ClearCalls
	out.SequenceCalls = s.Flusher.SequenceCalls
	out.BytesSent = s.Flusher.BytesSent
	out.BytesCleared = s.Flusher.BytesCleared
	out.Retries = s.Flusher.Retries
	requests := s.Flusher.PutCalls + s.Flusher.ClearCalls + s.Flusher.SequenceCalls
	rps, bps, dps := rate.rates(requests, s.Flusher.BytesSent, s.Flusher.DrainedBytes)
	out.SendRate = bps
	out.RequestRate = rps
	out.MiBPerSecond = bps / (1 << 20)
	out.Throttled = s.Flusher.Throttled
	out.InFlightLimit = s.Flusher.InFlightLimit
	out.FilledBytes = s.Flusher.FilledBytes
	if s.Journal.PendingBytes > 0 && dps > 0 {
		out.CatchUpSeconds = float64(s.Journal.PendingBytes) / dps
	}
	if c != nil {
		out.FuseWrites = c.Writes.Load()
		out.FuseBytesWritten = c.BytesWritten.Load()
		out.FuseReads = c.Reads.Load()
		out.FuseFsyncs = c.Fsyncs.Load()
		out.FuseDiscards = c.Discards.Load()
		out.FuseRefused = c.Refused.Load()
	}
	return out
}

// blobLimits are a page blob's scalability targets (--blob-limits).
type blobLimits struct{ rps, mibps float64 }

// parseBlobLimits reads "REQUESTS,MIBPS".
func parseBlobLimits(s string) (blobLimits, error) {
	r, m, ok := strings.Cut(s, ",")
	rps, err1 := strconv.ParseFloat(strings.TrimSpace(r), 64)
	mibps, err2 := strconv.ParseFloat(strings.TrimSpace(m), 64)
	if !ok || err1 != nil || err2 != nil || rps < 1 || mibps < 1 {
		return blobLimits{}, usageError{fmt.Errorf("--blob-limits %q: give requests per second and MiB per second, both at least 1, e.g. 500,60 for a standard page blob", s)}
	}
	return blobLimits{rps, mibps}, nil
}

// requestCost is what one request costs in bytes of payload: the bytes
// the blob takes in the time of one request.
func (l blobLimits) requestCost() int64 { return int64(l.mibps * (1 << 20) / l.rps) }

// bytesIn is how many bytes the blob takes in d (at least 64 MiB).
func (l blobLimits) bytesIn(d time.Duration) int64 {
	return max(int64(d.Seconds()*l.mibps*(1<<20)), 64<<20)
}

// mergeWaitOption maps --merge-wait to the flusher's option (0 there
// means the default, negative never).
func mergeWaitOption(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}
