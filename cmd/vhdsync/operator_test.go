package main

// The operator's path, tried as a new user would: a managed disk made
// from a promoted copy, a state directory pointed at a moved endpoint, and
// each error of the README's exit-code table with its message. In process,
// against Azurite; no root needed.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/azure/pageblob"
	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/control"
	"github.com/vhdsync/vhdsync/internal/statedir"
	"github.com/vhdsync/vhdsync/points"
	"github.com/vhdsync/vhdsync/remote"
	"github.com/vhdsync/vhdsync/replicate"
	"github.com/vhdsync/vhdsync/vhdlayer"
	"github.com/vhdsync/vhdsync/writeback"
)

// noEnv is the environment of a client that uses the emulator's account.
func noEnv(string) string { return "" }

// openClient is a pageblob client for url with the emulator's account.
func openClient(t *testing.T, url string) *pageblob.Client {
	t.Helper()
	c, err := pageblob.Open(url, &pageblob.Options{Env: noEnv, MaxRetries: -1})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestPromote: `vhdsync points promote` copies a recovery point to a new
// page blob in the storage service, byte for byte the point (not the live
// blob, changed since), checks it and prints the az disk create for it;
// without --point it copies the live blob at an even mark and waits out
// an odd one; its temporary snapshot is gone afterwards; an existing
// destination is refused untouched.
func TestPromote(t *testing.T) {
	s := azurite.Start(t)
	ctx := context.Background()
	dir := t.TempDir()
	src := s.BlobURL("disks", "prod.vhd")
	mustRun(t, nil, "create", "--blob", src, "--size", "24MiB", "--state", filepath.Join(dir, "st"), "--create-container")
	c := openClient(t, src)
	pb := pageBlobClient(t, src)
	putPage(t, pb, 0, pattern("point-a", 1<<20))
	putPage(t, pb, 7<<20+4096, pattern("point-b", 8192))
	if err := c.RaiseSequence(ctx, 4, ""); err != nil {
		t.Fatal(err)
	}
	pointID, err := c.CreateSnapshot(ctx, map[string]string{points.PointMetaEpoch: "2", points.PointMetaTime: time.Now().UTC().Format(time.RFC3339Nano)})
	if err != nil {
		t.Fatal(err)
	}
	// The live blob moves on after the point.
	putPage(t, pb, 0, pattern("after-the-point", 1<<20))
	pointBytes := snapshotBytes(t, src, pointID)

	to := s.BlobURL("disks", "restore.vhd")
	out := mustRun(t, nil, "points", "promote", "--blob", src, "--point", pointID, "--to", to, "--resource-group", "rg-dr")
	t.Logf("points promote:\n%s", out)
	if got := blobRange(t, to, 0, 24<<20+512); !bytes.Equal(got, pointBytes) {
		t.Fatalf("the promoted blob differs from the point, first at byte %d", firstDiff(got, pointBytes))
	}
	for _, want := range []string{
		"copied: a fixed VHD of 24 MiB (blob 25166336 bytes = size + 512), footer checked",
		"ACCOUNT_ID=$(az storage account show --name devstoreaccount1 --query id --output tsv)",
		`az disk create --resource-group rg-dr --name restore --location "$LOCATION" --source ` + to + ` --source-storage-account-id "$ACCOUNT_ID"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("promote output lacks %q", want)
		}
	}
	if bs := getBlobState(t, to); bs.lease != "available" {
		t.Errorf("the promoted blob's lease is %q: az disk create needs it unleased", bs.lease)
	}

	// Again to the same blob: refused, the blob untouched.
	code, _, errOut := vhdsync(t, nil, "points", "promote", "--blob", src, "--point", pointID, "--to", to)
	if code != ExitExists || !strings.Contains(errOut, "--overwrite") {
		t.Errorf("promote onto an existing blob: exit %d, %s", code, errOut)
	}

	// The live blob: at an odd mark it is not a consistent disk, so
	// promote waits for an even one (here: in vain, --wait 1s).
	if err := c.RaiseSequence(ctx, 5, ""); err != nil {
		t.Fatal(err)
	}
	live := s.BlobURL("disks", "live.vhd")
	start := time.Now()
	code, _, errOut = vhdsync(t, nil, "points", "promote", "--blob", src, "--to", live, "--wait", "1s")
	if code != ExitFailure || !strings.Contains(errOut, "odd sequence number (5") || !strings.Contains(errOut, "--point") || time.Since(start) > 20*time.Second {
		t.Errorf("promote of an odd live blob: exit %d after %v, %s", code, time.Since(start), errOut)
	}
	if err := c.RaiseSequence(ctx, 6, ""); err != nil {
		t.Fatal(err)
	}
	liveBytes := blobRange(t, src, 0, 24<<20+512)
	out = mustRun(t, nil, "points", "promote", "--blob", src, "--to", live, "--storage-account-id", "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/devstoreaccount1")
	if !strings.Contains(out, "as of epoch 3 (sequence number 6") || strings.Contains(out, "ACCOUNT_ID=") ||
		!strings.Contains(out, "--source-storage-account-id /subscriptions/x/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/devstoreaccount1") {
		t.Errorf("live promote output:\n%s", out)
	}
	if got := blobRange(t, live, 0, 24<<20+512); !bytes.Equal(got, liveBytes) {
		t.Fatalf("the promoted live blob differs from the live blob, first at byte %d", firstDiff(got, liveBytes))
	}
	snaps, err := c.ListSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 1 || snaps[0].ID != pointID {
		t.Errorf("snapshots after the promotes: %+v, want only the point (the temporary one deleted)", snaps)
	}
}

// snapshotBytes reads a whole snapshot of url with the official SDK.
func snapshotBytes(t *testing.T, url, id string) []byte {
	t.Helper()
	bc, err := blobClient(t, url).WithSnapshot(id)
	if err != nil {
		t.Fatal(err)
	}
	p, err := bc.GetProperties(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, *p.ContentLength)
	if _, err := bc.DownloadBuffer(context.Background(), buf, nil); err != nil {
		t.Fatal(err)
	}
	return buf
}

// refusingRemote is a blob that takes no writes (the network is down),
// so a disk's journal keeps what is written to it.
type refusingRemote struct{ pageblob.Remote }

var errRefused = &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}

// PutPages implements remote.Remote: refused.
func (refusingRemote) PutPages(context.Context, int64, remote.Pages, remote.Cond) error {
	return errRefused
}

// ClearPages implements remote.Remote: refused.
func (refusingRemote) ClearPages(context.Context, int64, int64, remote.Cond) error {
	return errRefused
}

// RaiseSequence implements remote.Remote: refused.
func (refusingRemote) RaiseSequence(context.Context, int64, string) error { return errRefused }

// leaveJournal writes through the disk of state while the blob takes no
// writes and stops without draining: the journal keeps the writes, the
// blob's lease stays held, as after a crash.
func leaveJournal(t *testing.T, state string, writes map[int64][]byte) {
	t.Helper()
	ctx := context.Background()
	sd, err := statedir.Open(state)
	if err != nil {
		t.Fatal(err)
	}
	o := diskOptions(sd, openClient(t, sd.State.BlobURL), nil, false)
	o.Remote = refusingRemote{pageblob.Remote{C: openClient(t, sd.State.BlobURL)}}
	o.Flusher = replicate.FlusherOptions{Linger: time.Hour}
	disk, err := writeback.Open(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	for off, b := range writes {
		if err := disk.WriteAt(ctx, b, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := disk.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := disk.Close(ctx, false); err != nil {
		t.Fatal(err)
	}
}

// drainIntoBlob writes through the disk of state and drains: the blob
// holds the writes, the journal records the epoch as drained.
func drainIntoBlob(t *testing.T, state string, writes map[int64][]byte) {
	t.Helper()
	ctx := context.Background()
	sd, err := statedir.Open(state)
	if err != nil {
		t.Fatal(err)
	}
	o := diskOptions(sd, openClient(t, sd.State.BlobURL), nil, false)
	disk, err := writeback.Open(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	for off, b := range writes {
		if err := disk.WriteAt(ctx, b, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := disk.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := disk.Close(ctx, true); err != nil {
		t.Fatal(err)
	}
}

// slowProxy forwards to target, each Put Page delay late: a blob whose
// drain takes seconds.
func slowProxy(t *testing.T, target string, delay time.Duration) *httptest.Server {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: u.Scheme, Host: u.Host})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && r.URL.Query().Get("comp") == "page" {
			time.Sleep(delay)
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestSetBlobAndReplayProgress: set-blob points a state directory at the
// same blob through another address (checked by the footer) and refuses
// another disk or an older copy of this one (exit 8, nothing changed);
// replay through a slow endpoint reports its real rate and an ETA.
func TestSetBlobAndReplayProgress(t *testing.T) {
	s := azurite.Start(t)
	dir := t.TempDir()
	url := s.BlobURL("disks", "moved.vhd")
	state := filepath.Join(dir, "st")
	mustRun(t, nil, "create", "--blob", url, "--size", "160MiB", "--state", state, "--create-container")
	mustRun(t, nil, "create", "--blob", s.BlobURL("disks", "other.vhd"), "--size", "160MiB", "--state", filepath.Join(dir, "other"))
	// A copy of the disk as it is now (epoch 0), then a drained epoch.
	mustRun(t, nil, "points", "promote", "--blob", url, "--to", s.BlobURL("disks", "old-copy.vhd"))
	drainIntoBlob(t, state, map[int64][]byte{0: pattern("drained", 64<<10)})
	before, err := os.ReadFile(filepath.Join(state, statedir.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ url, want string }{
		{s.BlobURL("disks", "other.vhd"), "it is another disk"},
		{s.BlobURL("disks", "old-copy.vhd"), "older copy"},
	} {
		code, _, errOut := vhdsync(t, nil, "set-blob", "--state", state, "--blob", c.url)
		if code != ExitState || !strings.Contains(errOut, c.want) || !strings.Contains(errOut, "nothing was changed") {
			t.Errorf("set-blob to %s: exit %d, %s; want exit %d and %q", c.url, code, errOut, ExitState, c.want)
		}
	}
	if after, _ := os.ReadFile(filepath.Join(state, statedir.StateFile)); !bytes.Equal(before, after) {
		t.Error("a refused set-blob changed vhdsync.json")
	}

	// A crash left 30 writes of 64 KiB in the journal, 5 MiB apart (no two
	// can share a Put Page); the blob is now reached through an endpoint
	// that answers each Put Page 0.7 s late: with 8 in parallel, four
	// rounds, about 3 s of drain.
	writes := map[int64][]byte{}
	for i := range 30 {
		writes[int64(i)*(5<<20)] = pattern(fmt.Sprint("w", i), 64<<10)
	}
	leaveJournal(t, state, writes)
	slow := slowProxy(t, s.Endpoint, 700*time.Millisecond)
	slowURL := strings.Replace(url, strings.TrimPrefix(strings.TrimSuffix(s.Endpoint, "/"+azurite.DevAccount), "http://"), strings.TrimPrefix(slow.URL, "http://"), 1)
	out := mustRun(t, nil, "set-blob", "--state", state, "--blob", slowURL)
	if !strings.Contains(out, "now replicates to "+slowURL) {
		t.Errorf("set-blob output: %s", out)
	}
	if sd, err := statedir.Open(state); err != nil || sd.State.BlobURL != slowURL {
		t.Fatalf("state after set-blob: %v %+v", err, sd)
	}
	code, stdout, stderr := vhdsync(t, nil, "replay", "--state", state)
	if code != ExitOK {
		t.Fatalf("replay: exit %d\n%s%s", code, stdout, stderr)
	}
	t.Logf("replay progress:\n%s", stderr)
	rateRE := regexp.MustCompile(`draining: .* left, ([0-9.]+) MiB/s, ETA (\S+)`)
	rated := false
	for _, m := range rateRE.FindAllStringSubmatch(stderr, -1) {
		if r, _ := strconv.ParseFloat(m[1], 64); r > 0 && m[2] != "?" {
			rated = true
		}
	}
	if !rated {
		t.Errorf("no progress line of replay shows a rate and an ETA:\n%s", stderr)
	}
	mustRun(t, nil, "verify", "--state", state)
}

// TestErrorsAndExitCodes: each failure of the README's list, with its
// exit code and a message that says what to do.
func TestErrorsAndExitCodes(t *testing.T) {
	s := azurite.Start(t)
	dir := t.TempDir()

	// A state directory that is a file: exit 8 from every command.
	file := filepath.Join(dir, "a-file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "src.raw")
	if err := os.WriteFile(src, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"create", "--blob", s.BlobURL("disks", "f.vhd"), "--size", "20MiB", "--state", file, "--create-container"},
		{"import", "--blob", s.BlobURL("disks", "f.vhd"), "--state", file, "--create-container", src},
		{"mount", "--state", file, dir},
		{"status", "--state", file},
		{"replay", "--state", file},
		{"verify", "--state", file},
		{"set-blob", "--state", file, "--blob", s.BlobURL("disks", "f.vhd")},
		{"resize", "--state", file, "--size", "40MiB"},
	} {
		code, _, errOut := vhdsync(t, nil, args...)
		if code != ExitState || !strings.Contains(errOut, "is a file") {
			t.Errorf("%s with a file as --state: exit %d, %s; want exit %d saying it is a file", args[0], code, errOut, ExitState)
		}
	}

	// An emulator account nobody knows: said so, with the sources tried.
	typo := strings.Replace(s.BlobURL("disks", "t.vhd"), azurite.DevAccount, "devstoreacount1", 1)
	code, _, errOut := vhdsync(t, nil, "create", "--blob", typo, "--size", "20MiB", "--state", filepath.Join(dir, "typo"), "--create-container")
	for _, want := range []string{"not recognised", `"devstoreacount1"`, "devstoreaccount1", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "Entra ID"} {
		if code != ExitAuth || !strings.Contains(errOut, want) {
			t.Errorf("unknown emulator account: exit %d, %s; want exit %d and %q", code, errOut, ExitAuth, want)
		}
	}
	if strings.Contains(errOut, "non-TLS") {
		t.Errorf("unknown emulator account: the message is still the token policy's: %s", errOut)
	}

	// An endpoint nothing listens on: at once, what and what to check.
	dead := "http://127.0.0.1:1/devstoreaccount1/disks/x.vhd"
	for _, args := range [][]string{
		{"create", "--blob", dead, "--size", "20MiB", "--state", filepath.Join(dir, "dead"), "--create-container"},
		{"points", "--blob", dead},
		{"inspect", dead},
	} {
		start := time.Now()
		code, _, errOut := vhdsync(t, nil, args...)
		took := time.Since(start)
		if code != ExitUnreachable || took > 2*time.Second || !strings.Contains(errOut, "could not reach 127.0.0.1:1") || !strings.Contains(errOut, "connection refused") || !strings.Contains(errOut, "check that") {
			t.Errorf("%s on an endpoint nothing listens on: exit %d after %v, %s; want exit %d at once saying what to check", args[0], code, took.Round(time.Millisecond), errOut, ExitUnreachable)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "dead")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a create that could not reach the endpoint left its state directory: %v", err)
	}

	// status of an unmounted disk: no zero start, no pid, no lease id of
	// a released lease; exit 0 when clean.
	url := s.BlobURL("disks", "st.vhd")
	state := filepath.Join(dir, "st")
	mustRun(t, nil, "create", "--blob", url, "--size", "20MiB", "--state", state, "--create-container")
	drainIntoBlob(t, state, map[int64][]byte{1 << 20: pattern("st", 8192)})
	code, out, errOut := vhdsync(t, nil, "status", "--state", state, "--json")
	var rep map[string]any
	if err := json.Unmarshal([]byte(out), &rep); code != ExitOK || err != nil {
		t.Fatalf("status of a clean unmounted disk: exit %d, %v\n%s%s", code, err, out, errOut)
	}
	for _, k := range []string{"started", "pid", "lease_id", "problem"} {
		if v, ok := rep[k]; ok {
			t.Errorf("status --json of an unmounted disk has %q: %v", k, v)
		}
	}
	if rep["blob_lease_state"] != "available" || rep["mounted"] != false {
		t.Errorf("status --json: lease %v, mounted %v", rep["blob_lease_state"], rep["mounted"])
	}
	// Writes the blob lacks and no daemon: exit 11, the report as usual.
	leaveJournal(t, state, map[int64][]byte{2 << 20: pattern("pending", 4096)})
	code, out, errOut = vhdsync(t, nil, "status", "--state", state, "--json")
	rep = nil
	if err := json.Unmarshal([]byte(out), &rep); code != ExitNotDrained || err != nil || rep["journal_records"] != 1.0 || !strings.Contains(errOut, "vhdsync replay") {
		t.Errorf("status with a pending journal: exit %d (want %d), %v\n%s%s", code, ExitNotDrained, err, out, errOut)
	}
	if rep["lease_id"] == nil || rep["blob_lease_state"] != "leased" {
		t.Errorf("status after a crash: the held lease should show its id: %v %v", rep["lease_id"], rep["blob_lease_state"])
	}
	// The blob gone: its class (4), the report still printed.
	mustDeleteBlob(t, url)
	code, out, errOut = vhdsync(t, nil, "status", "--state", state)
	if code != ExitNotFound || !strings.Contains(out, "blob sequence:  unknown") || !strings.Contains(errOut, "could not be read") {
		t.Errorf("status with the blob gone: exit %d (want %d)\n%s%s", code, ExitNotFound, out, errOut)
	}
}

// mustDeleteBlob deletes url, breaking any lease first.
func mustDeleteBlob(t *testing.T, url string) {
	t.Helper()
	c := openClient(t, url)
	if err := c.BreakLease(context.Background()); err != nil && !errors.Is(err, pageblob.ErrBlobNotFound) {
		t.Fatal(err)
	}
	if err := c.Delete(context.Background()); err != nil && !errors.Is(err, pageblob.ErrBlobNotFound) {
		t.Fatal(err)
	}
}

// TestStatusVerdict: the exit codes status gives a monitor for a mounted
// disk (what the daemon reports) and for a dead mount.
func TestStatusVerdict(t *testing.T) {
	for _, c := range []struct {
		name string
		rep  statusReport
		code int
	}{
		{"serving", statusReport{Mounted: true, Status: statusWith("draining", "")}, ExitOK},
		{"idle", statusReport{Mounted: true, Status: statusWith("idle", "")}, ExitOK},
		{"retrying", statusReport{Mounted: true, Status: statusWith("retrying", "put page: connection refused")}, ExitUnhealthy},
		{"failed", statusReport{Mounted: true, Status: statusWith("failed", "lease lost")}, ExitUnhealthy},
		{"dead mount", statusReport{DeadMount: "/mnt/x", Status: statusWith("", "")}, ExitUnhealthy},
	} {
		err := statusVerdict(&c.rep)
		if got := exitCode(err); got != c.code || (c.code != ExitOK) != (c.rep.Problem != "") {
			t.Errorf("%s: exit %d (want %d), problem %q", c.name, got, c.code, c.rep.Problem)
		}
	}
}

func statusWith(state, lastErr string) control.Status {
	return control.Status{FlusherState: state, LastError: lastErr}
}

// TestSmallerMessages: the small frictions of the issue, each gone.
func TestSmallerMessages(t *testing.T) {
	s := azurite.Start(t)
	dir := t.TempDir()
	// import --help says the size rule once (in the rounding paragraph).
	_, out, _ := vhdsync(t, nil, "import", "--help")
	if n := strings.Count(out, "whole number of MiB"); n != 1 {
		t.Errorf("import --help states the disk-size rule %d times:\n%s", n, out)
	}
	// One hint, not two.
	code, _, errOut := vhdsync(t, nil, "unmount", "/")
	if code != ExitUsage || strings.Count(errOut, "(see") != 1 {
		t.Errorf("unmount /: exit %d, %q", code, errOut)
	}
	// create and import print their results, no log lines.
	url := s.BlobURL("disks", "quiet.vhd")
	code, _, errOut = vhdsync(t, nil, "create", "--blob", url, "--size", "20MiB", "--state", filepath.Join(dir, "q"), "--create-container")
	if code != ExitOK || strings.Contains(errOut, "level=") {
		t.Errorf("create: exit %d, log lines on standard error: %q", code, errOut)
	}
	raw := filepath.Join(dir, "d.raw")
	if err := os.WriteFile(raw, bytes.Repeat([]byte{7}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = vhdsync(t, nil, "import", "--blob", s.BlobURL("disks", "imp.vhd"), "--state", filepath.Join(dir, "i"), raw)
	if code != ExitOK || strings.Contains(errOut, "level=") {
		t.Errorf("import: exit %d, log lines on standard error: %q", code, errOut)
	}
	// download refuses an existing file before it says it downloads.
	existing := filepath.Join(dir, "exists.vhd")
	if err := os.WriteFile(existing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = vhdsync(t, nil, "download", "--blob", url, existing)
	if code != ExitExists || strings.Contains(out, "downloading") {
		t.Errorf("download onto an existing file: exit %d\n%s%s", code, out, errOut)
	}
	// A missing mountpoint: how to make it.
	st := filepath.Join(dir, "q")
	mp := filepath.Join(dir, "no", "such", "mnt")
	code, _, errOut = vhdsync(t, nil, "mount", "--foreground", "--state", st, mp)
	if code != ExitUsage || !strings.Contains(errOut, "mkdir -p "+mp) {
		t.Errorf("mount on a missing mountpoint: exit %d, %s", code, errOut)
	}
}

// TestRecoveryPointsRemembered: a mount without --recovery-points takes
// the interval and --keep the last mount gave; --recovery-points 0 turns
// them off and forgets them.
func TestRecoveryPointsRemembered(t *testing.T) {
	p := filepath.Join(t.TempDir(), "st")
	f := vhdlayer.NewFixedFooter(20*vhdlayer.MiB, vhdTime)
	raw := f.Encode()
	d, err := statedir.Create(p, statedir.State{Name: "d", BlobURL: "http://127.0.0.1:1/devstoreaccount1/c/d.vhd", VirtualSize: 20 * vhdlayer.MiB, DiskID: f.UniqueID.String(), Footer: raw[:]})
	if err != nil {
		t.Fatal(err)
	}
	given := mountFlags{state: p, points: 5 * time.Minute, keep: 7, pointsSet: true}
	if err := rememberPoints(d, &given); err != nil {
		t.Fatal(err)
	}
	d, _ = statedir.Open(p)
	next := mountFlags{state: p, keep: 24}
	if err := rememberPoints(d, &next); err != nil || next.points != 5*time.Minute || next.keep != 7 {
		t.Fatalf("a mount without the flag after one with --recovery-points 5m --keep 7: %v, %v keep %d", err, next.points, next.keep)
	}
	off := mountFlags{state: p, keep: 24, pointsSet: true}
	if err := rememberPoints(d, &off); err != nil || off.points != 0 {
		t.Fatalf("--recovery-points 0: %v, %v", err, off.points)
	}
	d, _ = statedir.Open(p)
	after := mountFlags{state: p, keep: 24}
	if err := rememberPoints(d, &after); err != nil || after.points != 0 || d.State.RecoveryPoints != "" {
		t.Fatalf("after --recovery-points 0 the next mount takes points: %v, %v (%q)", err, after.points, d.State.RecoveryPoints)
	}
	var buf bytes.Buffer
	printPointsRemembered(&buf, given)
	if buf.Len() != 0 {
		t.Errorf("nothing remembered, yet printed: %s", buf.String())
	}
}
