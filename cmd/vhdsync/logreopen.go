package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/internal/statedir"
)

// handleHangup makes SIGHUP reopen the daemon's log, for logrotate: a
// daemon that `vhdsync mount` started in the background has DIR/vhdsync.log
// as its standard output and error (startDaemon), so after the file is
// renamed, SIGHUP opens DIR/vhdsync.log anew and puts it in place of both
// descriptors (dup3). Everything written to them follows: slog's lines and
// the Go runtime's own last words (a panic, a data race report). A daemon
// logging elsewhere (--foreground: the terminal, or the journal under
// systemd) has nothing to reopen and says so; either way SIGHUP no longer
// stops the daemon, as it would by default. The returned func stops the
// handling.
func handleHangup(g *globals, stateDir string, log *slog.Logger) func() {
	path := filepath.Join(stateDir, statedir.LogFile)
	// Reopen only what startDaemon set up: standard error is that file.
	ownLog := g.env(readyFDEnv) != "" && sameFile(os.Stderr, path)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case <-hup:
				if !ownLog {
					log.Info("SIGHUP: logging to standard error, no log file to reopen")
					continue
				}
				if err := reopenLog(path); err != nil {
					// The old descriptors still work: log there.
					log.Error("SIGHUP: cannot reopen the log; still writing to the old file", "path", path, "err", err)
					continue
				}
				log.Info("log reopened (SIGHUP)", "path", path)
			}
		}
	}()
	return func() { signal.Stop(hup); close(done) }
}

// sameFile reports whether f is the file at path.
func sameFile(f *os.File, path string) bool {
	a, err := f.Stat()
	if err != nil {
		return false
	}
	b, err := os.Stat(path)
	return err == nil && os.SameFile(a, b)
}

// reopenLog opens path for appending (creating it) and makes it the
// process's standard output and error.
func reopenLog(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, fd := range []int{1, 2} {
		if err := unix.Dup3(int(f.Fd()), fd, 0); err != nil {
			return fmt.Errorf("dup3 onto descriptor %d: %w", fd, err)
		}
	}
	return nil
}
