package statedir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// LockFile is the file whose flock marks a state directory in use.
const LockFile = "lock"

// ErrBusy: another vhdsync process uses the state directory.
var ErrBusy = errors.New("state directory in use")

// Lock is an exclusive hold on a state directory. The kernel drops it when
// the process dies, so a crash never leaves a stale lock.
type Lock struct{ f *os.File }

// TryLock takes the state directory's lock without waiting. what is
// recorded in the lock file (e.g. "mounted at /mnt/x") so that a refused
// caller can say who holds it.
func (d *Dir) TryLock(what string) (*Lock, error) {
	p := filepath.Join(d.Path, LockFile)
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(p)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			h := strings.TrimSpace(string(holder))
			if h == "" {
				h = "another vhdsync process"
			}
			return nil, fmt.Errorf("%w: %s is used by %s; unmount it (vhdsync unmount MOUNTPOINT) or stop that process first", ErrBusy, d.Path, h)
		}
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(fmt.Sprintf("vhdsync pid %d %s\n", os.Getpid(), what)), 0)
	}
	return &Lock{f: f}, nil
}

// Unlock releases the lock.
func (l *Lock) Unlock() {
	if l == nil || l.f == nil {
		return
	}
	_ = l.f.Truncate(0)
	_ = syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	l.f.Close()
	l.f = nil
}
