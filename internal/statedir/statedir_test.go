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

// TestResizeIntent: a recorded resize survives reopening; while it is
// recorded the image may have either size (a crash between the image's
// truncate and the state file) but no other; finishing it records the
// new size, footer and geometry.
func TestResizeIntent(t *testing.T) {
	const from, to = 20 * vhdlayer.MiB, 48 * vhdlayer.MiB
	p := filepath.Join(t.TempDir(), "st")
	d, err := Create(p, newState(from))
	if err != nil {
		t.Fatal(err)
	}
	old, _ := vhdlayer.DecodeFooter(d.State.Footer)
	grown := old.Resized(to).Encode()
	if err := d.BeginResize(ResizeIntent{From: from, To: to, Epoch: 7, Footer: grown[:]}); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int64{int64(from), int64(to)} {
		if err := os.Truncate(d.ImagePath(), size); err != nil {
			t.Fatal(err)
		}
		d2, err := Open(p)
		if err != nil {
			t.Fatalf("image of %d bytes with a resize recorded: %v", size, err)
		}
		if r := d2.State.Resize; r == nil || r.Epoch != 7 || r.To != to || d2.State.VirtualSize != from {
			t.Fatalf("the intent after reopening: %+v, size %d", r, d2.State.VirtualSize)
		}
	}
	if err := os.Truncate(d.ImagePath(), 30<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p); !errors.Is(err, ErrNotState) {
		t.Fatalf("an image of neither size: %v", err)
	}
	if err := os.Truncate(d.ImagePath(), int64(to)); err != nil {
		t.Fatal(err)
	}
	if err := d.FinishResize(); err != nil {
		t.Fatal(err)
	}
	d3, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	f, _ := vhdlayer.DecodeFooter(d3.State.Footer)
	if d3.State.Resize != nil || d3.State.VirtualSize != to || f.CurrentSize != to || f.UniqueID != old.UniqueID || d3.State.Geometry != f.Geometry.String() || d3.State.DiskID != old.UniqueID.String() {
		t.Fatalf("after FinishResize: %+v", d3.State)
	}
}
