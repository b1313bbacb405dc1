package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/points"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/writeback"
)

// TestPointsCLI: recovery points taken through writeback.Disk on a disk
// made by `vhdsync create`; `vhdsync points` lists them (text and JSON),
// `vhdsync download --point` restores each byte for byte as the disk was
// at its epoch (one while the disk is still leased), status shows them,
// and an unknown or malformed ID, a missing blob and bad mount flags fail
// with their exit codes and a message saying what to do.
func TestPointsCLI(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	dir := t.TempDir()
	url := s.BlobURL("disks", "pts.vhd")
	state := filepath.Join(dir, "state")
	if code, out, errOut := vhdsync(t, nil, "create", "--blob", url, "--size", "20MiB", "--state", state, "--create-container"); code != ExitOK {
		t.Fatalf("create: exit %d\n%s%s", code, out, errOut)
	}
	sd, err := statedir.Open(state)
	if err != nil {
		t.Fatal(err)
	}
	size := int64(sd.State.VirtualSize)
	c, err := pageblob.Open(url, &pageblob.Options{Env: func(string) string { return "" }, MaxRetries: -1})
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := c.CreateSnapshot(ctx, nil) // someone else's snapshot
	if err != nil {
		t.Fatal(err)
	}
	rp, err := points.NewRecoveryPoints(c, points.RecoveryPointsOptions{Interval: time.Nanosecond, Keep: 10})
	if err != nil {
		t.Fatal(err)
	}
	disk, err := writeback.Open(ctx, writeback.DiskOptions{
		ImagePath: sd.ImagePath(), JournalDir: sd.JournalPath(), VirtualSize: size,
		Remote:  pageblob.Remote{C: c},
		Flusher: replicate.FlusherOptions{Linger: time.Hour, AfterBatch: rp.AfterBatch},
	})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			disk.Close(ctx, false)
		}
	})
	// Three points, each after a round of writes and a flush; the image
	// at each is what its point must restore.
	type rec struct {
		id    string
		epoch uint64
		image []byte
	}
	var recs []rec
	for i := range 3 {
		for k := range 4 {
			p := bytes.Repeat([]byte(fmt.Sprintf("point %d chunk %d|", i, k)), 3000)
			if err := disk.WriteAt(ctx, p, int64(k)*(3<<20)+int64(i)*12345); err != nil {
				t.Fatal(err)
			}
		}
		if i == 2 {
			if err := disk.Zero(ctx, 1<<20, 2<<20, true); err != nil {
				t.Fatal(err)
			}
		}
		if err := disk.Flush(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for rp.Stats().Taken < uint64(i+1) {
			if time.Now().After(deadline) {
				t.Fatalf("point %d not taken: %+v", i, rp.Stats())
			}
			time.Sleep(5 * time.Millisecond)
		}
		img, err := os.ReadFile(sd.ImagePath())
		if err != nil {
			t.Fatal(err)
		}
		st := rp.Stats()
		recs = append(recs, rec{id: st.LastID, epoch: st.LastEpoch, image: img})
	}
	footer := sd.FooterBytes()
	restore := func(r rec, name string) {
		t.Helper()
		out := filepath.Join(dir, name)
		code, stdout, stderr := vhdsync(t, nil, "download", "--blob", url, "--point", r.id, out)
		if code != ExitOK {
			t.Fatalf("download --point %s: exit %d\n%s%s", r.id, code, stdout, stderr)
		}
		if !strings.Contains(stdout, fmt.Sprintf("the disk as of epoch %d", r.epoch)) || !strings.Contains(stdout, "?snapshot="+r.id) {
			t.Errorf("download --point output does not name the point: %s", stdout)
		}
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(got)) != size+512 || !bytes.Equal(got[:size], r.image) || !bytes.Equal(got[size:], footer[:]) {
			t.Errorf("point %s (epoch %d): the restored file differs from the disk at that epoch", r.id, r.epoch)
		}
	}
	// While the disk is open its blob is leased: a point needs no --allow-leased.
	restore(recs[1], "mid.vhd")
	if err := disk.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
	closed = true
	restore(recs[0], "first.vhd")
	restore(recs[2], "last.vhd")

	code, out, errOut := vhdsync(t, nil, "points", "--blob", url)
	if code != ExitOK {
		t.Fatalf("points: exit %d %s", code, errOut)
	}
	t.Logf("vhdsync points:\n%s", out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 6 || !strings.HasPrefix(lines[1], "ID") || !strings.Contains(lines[5], "1 other snapshot") {
		t.Fatalf("points output:\n%s", out)
	}
	for i, r := range recs {
		if f := strings.Fields(lines[2+i]); len(f) != 4 || f[0] != r.id || f[1] != fmt.Sprint(r.epoch) || f[3] != "yes" {
			t.Errorf("points line %d: %q, want %s epoch %d consistent (newest last)", i, lines[2+i], r.id, r.epoch)
		}
	}
	if strings.Contains(out, foreign) {
		t.Error("the foreign snapshot is listed as a point")
	}
	code, out, _ = vhdsync(t, nil, "points", "--blob", url, "--json")
	var rep pointsReport
	if err := json.Unmarshal([]byte(out), &rep); code != ExitOK || err != nil || len(rep.Points) != 3 || rep.ForeignSnapshots != 1 || rep.Points[2].ID != recs[2].id || !rep.Points[2].Consistent {
		t.Fatalf("points --json: exit %d, %v: %s", code, err, out)
	}

	code, out, errOut = vhdsync(t, nil, "status", "--state", state)
	if code != ExitOK || !strings.Contains(out, "recovery points:  3 on the blob, newest "+recs[2].id) {
		t.Errorf("status: exit %d\n%s%s", code, out, errOut)
	}

	// Failures, each with its exit code and a way forward.
	code, _, errOut = vhdsync(t, nil, "download", "--blob", url, "--point", "2020-01-02T03:04:05.0000000Z", filepath.Join(dir, "x.vhd"))
	if code != ExitNotFound || !strings.Contains(errOut, "snapshot not found") || !strings.Contains(errOut, "vhdsync points") {
		t.Errorf("unknown point: exit %d, %s", code, errOut)
	}
	code, _, errOut = vhdsync(t, nil, "download", "--blob", url, "--point", "yesterday", filepath.Join(dir, "x.vhd"))
	if code != ExitUsage || !strings.Contains(errOut, "not a snapshot id") {
		t.Errorf("malformed point: exit %d, %s", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "x.vhd")); err == nil {
		t.Error("a failed download left its file")
	}
	code, _, errOut = vhdsync(t, nil, "points", "--blob", s.BlobURL("disks", "nope.vhd"))
	if code != ExitNotFound {
		t.Errorf("points of a missing blob: exit %d, %s", code, errOut)
	}
	for _, bad := range [][]string{
		{"--recovery-points", "500ms"},
		{"--recovery-points", "0s", "--keep", "3"},
		{"--recovery-points", "5m", "--keep", "0"},
		{"--keep", "3"},
	} {
		args := append(append([]string{"mount", "--state", state}, bad...), filepath.Join(dir, "mnt"))
		code, _, errOut = vhdsync(t, nil, args...)
		if code != ExitUsage || !strings.Contains(errOut, bad[len(bad)-2]) {
			t.Errorf("mount %v: exit %d, %s", bad, code, errOut)
		}
	}
}

// TestE2EMountRecoveryPoints: a real mount with --recovery-points 1s
// --keep 2 and writes + fsync through FUSE, each round after the interval:
// status shows every point as it is taken, retention leaves the newest two,
// and each restores to the disk as of its epoch (read through the mount
// right after the fsync that closed it: with --linger 1h only fsync closes
// an epoch).
func TestE2EMountRecoveryPoints(t *testing.T) {
	e := newE2E(t)
	const size = 20 << 20
	url, state := e.createDisk("rp", 20)
	mp := e.path("mnt")
	e.mount(state, mp, "--linger", "1h", "--recovery-points", "1s", "--keep", "2")
	img := filepath.Join(mp, "rp.img")
	if s := e.mustStatus(state); s.RecoveryPoints == nil || !s.RecoveryPoints.Enabled || s.RecoveryPoints.Keep != 2 || s.RecoveryPoints.Interval != "1s" {
		t.Fatalf("status after mount: %+v", s.RecoveryPoints)
	}
	images := map[uint64][]byte{}
	for i := range 3 {
		time.Sleep(1100 * time.Millisecond)
		writeAtSync(t, img, map[int64][]byte{int64(i) * (5 << 20): pattern(fmt.Sprint("rp-", i), 3<<20+512)})
		var rp *struct{ epoch uint64 }
		waitFor(t, 30*time.Second, "recovery point taken", func() (bool, error) {
			s, err := e.status(state)
			if err != nil || s.RecoveryPoints == nil {
				return false, err
			}
			if r := s.RecoveryPoints; r.Taken == uint64(i+1) {
				rp = &struct{ epoch uint64 }{r.LastEpoch}
				return true, nil
			}
			return false, nil
		})
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		images[rp.epoch] = b
	}
	s := e.mustStatus(state)
	if r := s.RecoveryPoints; r.Count != 2 || r.Deleted != 1 || r.Failures != 0 || r.LastError != "" {
		t.Errorf("recovery points in status: %+v", r)
	}
	r := e.mustVhdsync("status", "--state", state)
	if !strings.Contains(r.stdout, "recovery points:  every 1s, keep 2: 2 on the blob") {
		t.Errorf("status text: %s", r.stdout)
	}
	e.mustVhdsync("unmount", mp)

	// The next mount, without the flag (a restart after a crash), takes
	// recovery points as the last one did, and says so.
	if d := e.mount(state, mp, "--linger", "1h"); !strings.Contains(d.out, "recovery points every 1s, keep 2 (remembered") {
		t.Errorf("mount without --recovery-points does not say it remembers them: %s", d.out)
	}
	if s := e.mustStatus(state); s.RecoveryPoints == nil || !s.RecoveryPoints.Enabled || s.RecoveryPoints.Interval != "1s" || s.RecoveryPoints.Keep != 2 {
		t.Errorf("the next mount forgot the recovery points: %+v", s.RecoveryPoints)
	}
	e.mustVhdsync("unmount", mp)

	r = e.mustVhdsync("points", "--blob", url, "--json")
	var rep pointsReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || len(rep.Points) != 2 {
		t.Fatalf("points after unmount: %v %s", err, r.stdout)
	}
	for i, p := range rep.Points {
		want, ok := images[p.Epoch]
		if !ok || !p.Consistent {
			t.Fatalf("point %+v: not one the test saw taken", p)
		}
		out := e.path(fmt.Sprintf("point-%d.img", i))
		e.mustVhdsync("download", "--raw", "--blob", url, "--point", p.ID, out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("point %s (epoch %d) differs from the disk at that epoch", p.ID, p.Epoch)
		}
	}
}

// TestE2EStagedRecoveryPoints: with --transfer staged the apply worker
// writes the blob, so `vhdsync apply --recovery-points` takes the points
// (a mount refuses the flag then). Three rounds of writes + fsync, each
// applied by its own `apply --once` run more than the interval after the
// previous one: each run takes a point (a new worker finds the newest
// point and counts the interval from it), retention keeps two, and each
// restores to the disk as of its epoch.
func TestE2EStagedRecoveryPoints(t *testing.T) {
	e := newE2E(t)
	url, state := e.createDisk("srp", 20)
	stagingURL := e.az.ContainerURL("staging")
	mp := e.mkdir("mnt")
	r := e.vhdsync("mount", "--state", state, "--transfer", "staged", "--staging", stagingURL, "--recovery-points", "1s", mp)
	if r.code != ExitUsage || !strings.Contains(r.stderr, "vhdsync apply") {
		t.Fatalf("a staged mount with --recovery-points: %s", r)
	}
	e.mount(state, mp, "--transfer", "staged", "--staging", stagingURL, "--linger", "1h")
	img := filepath.Join(mp, "srp.img")
	images := map[uint64][]byte{}
	var staged uint64
	for i := range 3 {
		time.Sleep(1100 * time.Millisecond)
		writeAtSync(t, img, map[int64][]byte{int64(i) * (5 << 20): pattern(fmt.Sprint("srp-", i), 2<<20+512)})
		waitFor(t, 30*time.Second, "segment staged", func() (bool, error) {
			s, err := e.status(state)
			if err != nil {
				return false, err
			}
			if s.StagedEpoch > staged && s.JournalRecords == 0 {
				staged = s.StagedEpoch
				return true, nil
			}
			return false, nil
		})
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		images[staged] = b
		r := e.mustVhdsync("apply", "--once", "--staging", stagingURL, "--blob", url, "--recovery-points", "1s", "--keep", "2")
		if !strings.Contains(r.stdout, "applied 1 segments") {
			t.Fatalf("apply round %d: %s", i, r)
		}
	}
	e.mustVhdsync("unmount", mp)
	r = e.mustVhdsync("points", "--blob", url, "--json")
	var rep pointsReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || len(rep.Points) != 2 {
		t.Fatalf("points: %v %s", err, r.stdout)
	}
	for i, p := range rep.Points {
		want, ok := images[p.Epoch]
		if !ok || !p.Consistent {
			t.Fatalf("point %+v: not an epoch the test recorded (%d recorded)", p, len(images))
		}
		out := e.path(fmt.Sprintf("spoint-%d.img", i))
		e.mustVhdsync("download", "--raw", "--blob", url, "--point", p.ID, out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("point %s (epoch %d) differs from the disk at that epoch", p.ID, p.Epoch)
		}
	}
	if rep.Points[1].Epoch != staged {
		t.Errorf("newest point holds epoch %d, want the last staged %d", rep.Points[1].Epoch, staged)
	}
	// Each apply began with the blob at the newest point, so each point
	// records what its segment wrote: the older copy becomes the newer
	// point by reading only that.
	if p := rep.Points[1]; p.Record != "recorded" || p.Prev != rep.Points[0].ID {
		t.Fatalf("the apply worker's point: record %q, prev %q (want recorded, %s)", p.Record, p.Prev, rep.Points[0].ID)
	}
	out := e.path("spoint-0.img")
	r = e.mustVhdsync("download", "--blob", url, "--point", rep.Points[1].ID, "--since", rep.Points[0].ID, out)
	if !strings.Contains(r.stdout, "updated ") {
		t.Errorf("download --since between the apply worker's points: %s", r.stdout)
	}
	if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, images[rep.Points[1].Epoch]) {
		t.Errorf("download --since between the apply worker's points: the file differs from the disk at the newer one (%v)", err)
	}
}
