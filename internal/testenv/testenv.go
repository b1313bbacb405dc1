// Package testenv holds the helpers tests use to find the real components
// they need (qemu-img, Azurite, root, /dev/fuse, loop devices). A missing
// component skips the test with the command that installs it, except in CI
// (CI=true), where every component must be present and a missing one fails
// the test so that nothing is silently left unchecked.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run under CI (the environment variable
// CI is "true"), where missing components are failures, not skips.
func InCI() bool { return os.Getenv("CI") == "true" }

// Missing skips t, or fails it under CI, explaining what is missing and how
// to install it.
func Missing(t testing.TB, what, install string) {
	t.Helper()
	if InCI() {
		t.Fatalf("%s is missing, and CI=true requires it; install with: %s", what, install)
	}
	t.Skipf("skipping: %s is missing; install with: %s", what, install)
}

// RequireTool returns the path of the executable name, or skips/fails the
// test (see Missing) with the install hint.
func RequireTool(t testing.TB, name, install string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, name, install)
	}
	return p
}

// QemuImg returns the path of qemu-img (Debian package qemu-utils).
func QemuImg(t testing.TB) string {
	t.Helper()
	return RequireTool(t, "qemu-img", "make deps (or: apt-get install qemu-utils)")
}

// RequireRoot skips (or fails under CI) when the test is not running as root.
func RequireRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "root ("+why+")", "run the tests as root: sudo make test")
	}
}

// Run runs a command and fails the test with its combined output if it
// does not succeed. It returns the standard output.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stderr []byte
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); ok {
		stderr = ee.Stderr
	}
	if err != nil {
		t.Fatalf("%s %v: %v\nstdout: %s\nstderr: %s", name, args, err, out, stderr)
	}
	return string(out)
}
