package fuseconn

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/vhdsync/vhdsync/internal/testenv"
)

// stuckRoot answers no lookup until release is closed: a server that will
// never answer, as a killed one.
type stuckRoot struct {
	fs.Inode
	once    sync.Once
	entered chan struct{}
	release chan struct{}
}

func (r *stuckRoot) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	r.once.Do(func() { close(r.entered) })
	<-r.release
	return nil, syscall.ENOENT
}

// fusectlMounts counts the fusectl mounts this process sees.
func fusectlMounts(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), " - fusectl ")
}

// TestAbortFailsAWaitingRequest: a request the server never answers
// returns, with an error, once Abort aborts the mount's connection, whether
// or not fusectl was mounted; Abort leaves no fusectl mount behind, and a
// connection that is gone is no error.
func TestAbortFailsAWaitingRequest(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Missing(t, "root", "run the tests as root (FUSE mounts and fusectl)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Missing(t, "/dev/fuse", "modprobe fuse")
	}
	dir := t.TempDir()
	root := &stuckRoot{entered: make(chan struct{}), release: make(chan struct{})}
	server, err := fs.Mount(dir, root, &fs.Options{MountOptions: fuse.MountOptions{DirectMount: true, DirectMountStrict: true, Name: "fuseconn-test"}})
	if err != nil {
		t.Fatal(err)
	}
	released := false
	defer func() {
		if !released {
			close(root.release)
		}
		if err := server.Unmount(); err != nil {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	}()
	id, err := ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	if id != unix.Minor(st.Dev) {
		t.Fatalf("ID gives %d, the mount's device is 0:%d", id, unix.Minor(st.Dev))
	}
	if _, err := ID(filepath.Join(dir, "not-a-mount")); err == nil {
		t.Fatal("ID of a path that is no mount point gave no error")
	}
	mountsBefore := fusectlMounts(t)
	done := make(chan error, 1)
	go func() {
		_, err := os.Stat(filepath.Join(dir, "x"))
		done <- err
	}()
	select {
	case <-root.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the lookup never reached the server")
	}
	select {
	case err := <-done:
		t.Fatalf("the lookup returned (%v) before the abort", err)
	default:
	}
	if err := Abort(id); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the aborted lookup succeeded")
		}
		t.Logf("the waiting lookup returned: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the lookup still waits 10 s after the abort")
	}
	if n := fusectlMounts(t); n != mountsBefore {
		t.Fatalf("fusectl mounts: %d before Abort, %d after", mountsBefore, n)
	}
	close(root.release)
	released = true
	if err := Abort(1<<20 - 1); err != nil {
		t.Fatalf("abort of a connection that does not exist: %v", err)
	}
}
