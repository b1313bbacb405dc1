package statedir

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/powercut"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

func newState(size uint64) State {
	f := vhdlayer.NewFixedFooter(size, time.Now())
	b := f.Encode()
	return State{Name: "disk", BlobURL: "http://127.0.0.1:1/devstoreaccount1/c/disk.vhd", VirtualSize: size,
		DiskID: f.UniqueID.String(), Geometry: f.Geometry.String(), Footer: b[:], CreatedAt: time.Now().UTC()}
}

func TestCreateOpen(t *testing.T) {
	p := filepath.Join(t.TempDir(), "st")
	d, err := Create(p, newState(20*vhdlayer.MiB))
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(d.ImagePath())
	if err != nil || fi.Size() != int64(20*vhdlayer.MiB) || fi.Mode().Perm() != 0o600 {
		t.Fatalf("image: %v %v", fi, err)
	}
	if di, _ := os.Stat(p); di.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode %v", di.Mode())
	}
	d2, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	if d2.State.DiskID != d.State.DiskID || d2.FooterBytes() != d.FooterBytes() {
		t.Fatal("state did not round trip")
	}
	if _, err := Create(p, newState(20*vhdlayer.MiB)); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v", err)
	}
	// A damaged state file and a wrong-size image are refused.
	if err := os.Truncate(d.ImagePath(), 100); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p); !errors.Is(err, ErrNotState) {
		t.Fatalf("short image: %v", err)
	}
	if err := os.WriteFile(filepath.Join(p, StateFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p); !errors.Is(err, ErrNotState) {
		t.Fatalf("damaged state: %v", err)
	}
	if _, err := Open(t.TempDir()); !errors.Is(err, ErrNotState) {
		t.Fatalf("empty dir: %v", err)
	}
}

// TestCreateSurvivesPowerCut: once Create returns, a power cut keeps the
// state directory whole, its own name included (its parent directory is
// fsynced), and a lease id saved later too. Without the parent's fsync the
// directory vanished at a cut right after `vhdsync create` (found by the
// power-cut loop).
func TestCreateSurvivesPowerCut(t *testing.T) {
	pc := powercut.Start(t)
	p := pc.Path("a/b/st")
	d, err := Create(p, newState(20*vhdlayer.MiB))
	if err != nil {
		t.Fatal(err)
	}
	pc.Cut()
	d2, err := Open(p)
	if err != nil {
		t.Fatalf("after a power cut right after Create: %v", err)
	}
	if d2.State.DiskID != d.State.DiskID {
		t.Fatal("the state did not survive the cut")
	}
	d2.State.LeaseID = "lease-1"
	if err := d2.Save(); err != nil {
		t.Fatal(err)
	}
	pc.Cut()
	if d3, err := Open(p); err != nil || d3.State.LeaseID != "lease-1" {
		t.Fatalf("after a power cut right after Save: %v, lease %q", err, d3.State.LeaseID)
	}
}
