package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vhdsync/vhdsync/internal/control"
)

func newUnmountCmd(g *globals) *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "unmount MOUNTPOINT",
		Short: "Unmount, drain the journal to the blob and release the lease",
		Long: `Unmount a vhdsync mount and wait until the daemon has sent every journaled
write to the blob and released its lease. Shows a progress bar (bytes left,
MiB/s, ETA) on a terminal and plain progress lines otherwise.

Exit status 0 means the blob holds every write. If the mount is in use (a
loop device attached, qemu-nbd running), nothing is unmounted and the message
says what to detach. A plain ` + "`umount MOUNTPOINT`" + ` drains too, without the progress.`,
		Example: `  losetup -d /dev/loop0 && vhdsync unmount /mnt/vhd`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runUnmount(cmd.Context(), g, args[0], timeout)
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "give up waiting for the drain after this long (0: wait as long as it takes; the daemon keeps draining either way)")
	return cmd
}

func runUnmount(ctx context.Context, g *globals, mp string, timeout time.Duration) error {
	m, ok, err := findMount(mp)
	if err != nil {
		return err
	}
	if !ok {
		abs, _ := filepath.Abs(mp)
		if _, serr := os.Stat(abs); errors.Is(serr, syscall.ENOTCONN) {
			return fmt.Errorf("%s is a dead mount (the daemon died): detach loop devices on it (losetup -d), run `umount -l %s`, then `vhdsync replay --state DIR` or mount again", abs, abs)
		}
		return usageError{fmt.Errorf("%s is not a vhdsync mount (see `mount -t fuse.vhdsync`)", abs)}
	}
	st, err := control.Get(ctx, m.StateDir)
	if err != nil {
		// A dead daemon's mount stays listed (as fuse.vhdsync) until it is
		// unmounted, so it is found above: give the same advice.
		if _, serr := os.Stat(m.Mountpoint); errors.Is(serr, syscall.ENOTCONN) {
			return fmt.Errorf("%s is a dead mount (the daemon died): detach loop devices on it (losetup -d), run `umount -l %s`, then `vhdsync replay --state %s` or mount again", m.Mountpoint, m.Mountpoint, m.StateDir)
		}
		return fmt.Errorf("%s is mounted but its daemon does not answer: %w", m.Mountpoint, err)
	}
	if err := unmountFS(m.Mountpoint); err != nil {
		return err
	}
	fmt.Fprintf(g.stderr, "unmounted %s; draining %s to %s\n", m.Mountpoint, humanBytes(st.JournalBytes), st.BlobURL)
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	prog := newDrainProgress(g.stderr, st.JournalBytes)
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		s, err := control.Get(ctx, m.StateDir)
		if err != nil {
			if processAlive(st.PID) {
				// The socket closes just before the daemon exits.
				select {
				case <-ctx.Done():
					prog.finish(false)
					return fmt.Errorf("%w: gave up waiting; the daemon (pid %d) keeps draining, see `vhdsync status --state %s`", errNotDrained, st.PID, m.StateDir)
				case <-tick.C:
					continue
				}
			}
			break
		}
		prog.update(s.JournalBytes, s.SendRate)
		select {
		case <-ctx.Done():
			prog.finish(false)
			return fmt.Errorf("%w: gave up waiting; the daemon (pid %d) keeps draining, see `vhdsync status --state %s`", errNotDrained, st.PID, m.StateDir)
		case <-tick.C:
		}
	}
	var ls lastStop
	b, err := os.ReadFile(filepath.Join(m.StateDir, lastStopFile))
	if err == nil {
		err = json.Unmarshal(b, &ls)
	}
	prog.finish(err == nil && ls.Drained)
	if err != nil {
		return fmt.Errorf("%w: the daemon exited without reporting its drain (%v); run `vhdsync replay --state %s`", errNotDrained, err, m.StateDir)
	}
	if !ls.Drained {
		return fmt.Errorf("%w: the daemon stopped with %d records not on the blob: %s; run `vhdsync replay --state %s`", errNotDrained, ls.PendingRecords, ls.Error, m.StateDir)
	}
	if st.Transfer == transferStaged {
		fmt.Fprintf(g.stdout, "the staging container %s holds every write; `vhdsync apply --staging %s --blob %s` brings the blob up to date\n", st.StagingURL, st.StagingURL, st.BlobURL)
		return nil
	}
	if ls.LeaseKept {
		fmt.Fprintf(g.stdout, "the blob %s holds every write; lease kept: the disk is thin, and the blob holds the chunks not yet local (mount it again to fetch them)\n", st.BlobURL)
		return nil
	}
	fmt.Fprintf(g.stdout, "the blob %s holds every write; lease released\n", st.BlobURL)
	return nil
}

// unmountFS detaches the FUSE mount, explaining a busy one.
func unmountFS(mp string) error {
	var err error
	if os.Geteuid() == 0 {
		err = syscall.Unmount(mp, 0)
	} else {
		out, cerr := exec.Command("fusermount3", "-u", mp).CombinedOutput()
		if cerr != nil {
			err = fmt.Errorf("%v: %s", cerr, strings.TrimSpace(string(out)))
			if strings.Contains(string(out), "busy") {
				err = syscall.EBUSY
			}
		}
	}
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.EBUSY) {
		msg := fmt.Sprintf("%s is in use, nothing was unmounted", mp)
		if loops := loopDevicesOn(mp); len(loops) > 0 {
			msg += fmt.Sprintf(": loop device %s is attached; unmount any filesystem on it, then detach it with `losetup -d %s`", strings.Join(loops, ", "), strings.Fields(loops[0])[0])
		} else {
			msg += " (a process has a file open, e.g. qemu-nbd; see `fuser -vm " + mp + "`)"
		}
		return busyf("%s", msg)
	}
	return fmt.Errorf("unmount %s: %w", mp, err)
}

// processAlive reports whether pid runs (a zombie counts as gone: it has
// exited and only waits to be reaped).
func processAlive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] != 'Z' && b[i+2] != 'X'
	}
	return true
}
