package main

// Security: the mount is not allow_other unless asked;
// every file vhdsync makes is private (0600 files, 0700 directories, the
// badger journal included); a SAS never reaches the daemon's command line,
// its log, the state directory or `status`.

import (
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/mountinfo"
)

func TestE2ESecurity(t *testing.T) {
	e := newE2E(t)
	url, state := e.createDisk("sec", 20)
	sasTok := blobSAS(t, url, azurite.DevKey, time.Hour)
	_, sig, ok := strings.Cut(sasTok, "sig=")
	if !ok || len(sig) < 10 {
		t.Fatalf("SAS without a signature: %s", sasTok)
	}
	sig, _, _ = strings.Cut(sig, "&")

	mp := e.path("mnt")
	d := e.mount(state, mp, "--sas", sasTok, "--linger", "10ms")
	if !strings.Contains(d.log(), "mounted") {
		t.Fatalf("daemon log: %s", d.log())
	}

	// Not allow_other; the views are 0600.
	opts := superOpts(t, mp)
	if strings.Contains(opts, "allow_other") {
		t.Errorf("mounted with allow_other without --allow-other: %s", opts)
	}
	for _, name := range []string{"sec.img", "sec.vhd"} {
		st, err := os.Stat(filepath.Join(mp, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", name, st.Mode().Perm())
		}
	}

	// Write through the SAS, so the journal and the flusher run.
	chunks := map[int64][]byte{0: pattern("sec0", 256<<10), 3 << 20: pattern("sec1", 64<<10)}
	writeAtSync(t, filepath.Join(mp, "sec.img"), chunks)
	waitFor(t, 30*time.Second, "the journal to drain", func() (bool, error) {
		s, err := e.status(state)
		return err == nil && s.JournalRecords == 0, err
	})
	checkBlobHas(t, url, chunks)

	// The SAS is in neither the daemon's command line nor status.
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(d.pid) + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	places := map[string]string{"daemon command line": string(cmdline)}
	r := e.mustVhdsync("status", "--state", state)
	places["status"] = r.stdout + r.stderr
	r = e.mustVhdsync("status", "--state", state, "--json")
	places["status --json"] = r.stdout + r.stderr

	e.mustVhdsync("unmount", mp)
	d.waitExit(30 * time.Second)

	// Every file of the state directory: private, and without the SAS.
	n := 0
	err = filepath.WalkDir(state, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := de.Info()
		if err != nil {
			return err
		}
		if info.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v: readable by others", p, info.Mode().Perm())
		}
		if info.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			places[p] = string(b)
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for where, text := range places {
		if strings.Contains(text, sig) {
			t.Errorf("the SAS signature reached the %s", where)
		}
	}
	t.Logf("checked %d files of the state directory, the daemon's command line and status: modes private, no SAS", n)
}

// superOpts returns the super options of the mount at mp (mountinfo's
// last field), where allow_other shows.
func superOpts(t *testing.T, mp string) string {
	t.Helper()
	mounts, err := mountinfo.Read()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts {
		if m.Mountpoint == mp && m.SuperOptions != "" {
			return m.SuperOptions
		}
	}
	t.Fatalf("%s is not in mountinfo", mp)
	return ""
}
