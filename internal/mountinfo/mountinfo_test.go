package mountinfo

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/mnt/a\040b`:      "/mnt/a b",
		`/mnt/tab\011x`:    "/mnt/tab\tx",
		`/mnt/back\134sl`:  `/mnt/back\sl`,
		`/plain`:           "/plain",
		`/short\04`:        `/short\04`,
		`/not\9octal\040z`: `/not\9octal z`,
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestReadFindsTheRoot: the root file system is listed, with the device
// stat gives it.
func TestReadFindsTheRoot(t *testing.T) {
	mounts, err := Read()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat("/", &st); err != nil {
		t.Fatal(err)
	}
	var root *Mount
	for i := range mounts {
		if mounts[i].Mountpoint == "/" {
			root = &mounts[i] // the last one is on top
		}
	}
	if root == nil {
		t.Fatal("no mount at / in mountinfo")
	}
	minor, err := root.Minor()
	if err != nil {
		t.Fatal(err)
	}
	if root.FSType == "" || minor != unix.Minor(st.Dev) {
		t.Fatalf("root mount %+v: minor %d, stat says %d", *root, minor, unix.Minor(st.Dev))
	}
}
