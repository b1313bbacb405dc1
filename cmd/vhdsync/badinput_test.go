package main

// Bad input to `vhdsync mount`: each case gives a clear
// message and its class's exit code, and leaves the blob (properties,
// ETag, sequence number, lease) and the state directory (every file's
// mode, size and content) as they were. The table in RELIABILITY.md is
// this test's.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	sdkpb "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/azurite/throttle"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// badAttempt is one refused mount: what to run and what must stay as it is.
type badAttempt struct {
	state, mp string
	url       string            // the blob to watch ("" : the state's)
	env       map[string]string // extra environment of the command
	args      []string          // extra mount flags
	skipDirs  []string          // state subdirectories a live mount changes
	// badgerOnly: badger's own files (not the segments) are compared by
	// after, not byte for byte: badger's open and close of a journal it
	// cannot use flushes its memtable into a table (same keys).
	badgerOnly bool
	after      func(t *testing.T) // further checks after the refusal
}

type badCase struct {
	name    string
	prepare func(t *testing.T, e *e2e) badAttempt
	code    int
	want    []string // in the message
	secret  string   // must not appear in the message or the log
}

func TestBadInputMount(t *testing.T) {
	e := newE2E(t)
	cases := []badCase{
		{"wrong account key", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("key", 20)
			return badAttempt{state: state, url: url, env: map[string]string{"AZURE_STORAGE_KEY": badKey}}
		}, ExitAuth, []string{"authentication failed", "AZURE_STORAGE_KEY"}, badKey},
		{"SAS signed with another key", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("sas", 20)
			return badAttempt{state: state, url: url, args: []string{"--sas", blobSAS(t, url, badKey, time.Hour)}}
		}, ExitAuth, []string{"authentication failed", "SAS"}, "sig="},
		{"expired SAS", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("expired", 20)
			return badAttempt{state: state, url: url, env: map[string]string{"VHDSYNC_SAS": blobSAS(t, url, azurite.DevKey, -time.Hour)}}
		}, ExitAuth, []string{"authentication failed", "the SAS in the URL"}, "sig="},
		{"missing container", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDiskIn("gone", "nocont", 20)
			if _, err := containerClient(t, e.az.ContainerURL("gone")).Delete(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
			return badAttempt{state: state, url: url}
		}, ExitNotFound, []string{"container"}, ""},
		{"missing blob", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("noblob", 20)
			if _, err := blobClient(t, url).Delete(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
			return badAttempt{state: state, url: url}
		}, ExitNotFound, []string{"blob not found"}, ""},
		{"blob is a block blob", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("block", 20)
			if _, err := blobClient(t, url).Delete(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
			if _, err := blockBlobClient(t, url).UploadBuffer(context.Background(), pattern("block", 4096), nil); err != nil {
				t.Fatal(err)
			}
			return badAttempt{state: state, url: url}
		}, ExitNotVHD, []string{"not a page blob"}, ""},
		{"blob is not a VHD (no footer)", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("novhd", 20)
			if _, err := pageBlobClient(t, url).ClearPages(context.Background(), blob.HTTPRange{Offset: 20 << 20, Count: 512}, nil); err != nil {
				t.Fatal(err)
			}
			return badAttempt{state: state, url: url}
		}, ExitNotVHD, []string{"not a VHD"}, ""},
		{"blob size does not match its footer", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("grown", 20)
			foot := stateFooter(t, state)
			pb := pageBlobClient(t, url)
			if _, err := pb.Resize(context.Background(), 21<<20+512, nil); err != nil {
				t.Fatal(err)
			}
			putPage(t, pb, 21<<20, foot)
			return badAttempt{state: state, url: url}
		}, ExitNotVHD, []string{"22020608"}, ""},
		{"corrupt footer (checksum)", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("corrupt", 20)
			foot := stateFooter(t, state)
			foot[0x48] ^= 0xff // a byte of the disk id: the checksum no longer matches
			putPage(t, pageBlobClient(t, url), 20<<20, foot)
			return badAttempt{state: state, url: url}
		}, ExitNotVHD, []string{"checksum"}, ""},
		{"size not a whole MiB", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("odd", 20)
			const odd = 20<<20 + 512
			pb := pageBlobClient(t, url)
			if _, err := pb.Resize(context.Background(), odd+512, nil); err != nil {
				t.Fatal(err)
			}
			f := vhdlayer.NewFixedFooter(odd, vhdTime).Encode()
			putPage(t, pb, odd, f[:])
			return badAttempt{state: state, url: url}
		}, ExitNotVHD, []string{"MiB"}, ""},
		{"state directory of another blob", func(t *testing.T, e *e2e) badAttempt {
			// The blob was replaced by another disk of the same size at the
			// same URL (another create), so the state describes another disk.
			url, state := e.createDisk("replaced", 20)
			if _, err := blobClient(t, url).Delete(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
			e.mustVhdsync("create", "--blob", url, "--size", "20MiB", "--state", e.path("state-replaced-2"))
			return badAttempt{state: state, url: url}
		}, ExitState, []string{"another blob", "disk id"}, ""},
		{"vhdsync.json damaged", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("json", 20)
			truncateHalf(t, filepath.Join(state, "vhdsync.json"))
			return badAttempt{state: state, url: url}
		}, ExitState, []string{"vhdsync.json is damaged"}, ""},
		{"badger MANIFEST damaged", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("badger", 20)
			e.pendingJournal(state, url)
			// Badger's manifest (which tables and value logs exist) with a
			// wrong magic number: badger refuses to open it. (Cut short, it
			// opens: badger then replays its write-ahead log.)
			overwrite(t, filepath.Join(state, "journal", "MANIFEST"), 0, []byte("garbage!"))
			return badAttempt{state: state, url: url}
		}, ExitState, []string{"journal", "damaged"}, ""},
		{"journal segment missing", func(t *testing.T, e *e2e) badAttempt {
			// Acknowledged writes (fsync returned) the blob does not have:
			// a segment of theirs missing is damage. (Unacknowledged ones
			// whose segment is missing are what a power loss leaves, and
			// are dropped: see journal/torn.go.)
			url, state := e.syncedPendingJournal("seg")
			segs, _ := filepath.Glob(filepath.Join(state, "journal", "seg-*.dat"))
			if len(segs) == 0 {
				t.Fatal("no journal segment after unsynced writes")
			}
			saved := map[string][]byte{}
			for _, s := range segs {
				b, err := os.ReadFile(s)
				if err != nil {
					t.Fatal(err)
				}
				saved[s] = b
				if err := os.Remove(s); err != nil {
					t.Fatal(err)
				}
			}
			before := len(saved)
			return badAttempt{state: state, url: url, badgerOnly: true, after: func(t *testing.T) {
				// The index still holds every record: put the segments back
				// and status counts them all again.
				for p, b := range saved {
					if err := os.WriteFile(p, b, 0o600); err != nil {
						t.Fatal(err)
					}
				}
				if s := e.mustStatus(state); s.JournalRecords != 2 || before == 0 {
					t.Errorf("with the segments back the journal holds %d records, want 2", s.JournalRecords)
				}
			}}
		}, ExitState, []string{"segment", "missing", "damaged"}, ""},
		{"read-only state directory", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("ro", 20)
			e.must("mount", "--bind", state, state)
			t.Cleanup(func() { umountFS(t, state) })
			e.must("mount", "-o", "remount,bind,ro", state)
			return badAttempt{state: state, url: url}
		}, ExitState, []string{"not writable", "read-only file system"}, ""},
		{"mountpoint busy (tmpfs mounted there)", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("busymp", 20)
			mp := e.path("busy")
			e.mountFS("tmpfs", mp, "-t", "tmpfs", "-o", "size=1m")
			return badAttempt{state: state, url: url, mp: mp}
		}, ExitBusy, []string{"already mounted"}, ""},
		{"second mount of the same state", func(t *testing.T, e *e2e) badAttempt {
			url, state := e.createDisk("twice", 20)
			e.mount(state, e.path("first"))
			return badAttempt{state: state, url: url, skipDirs: []string{"journal"}}
		}, ExitBusy, []string{"in use", "mounted at"}, ""},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			se := *e
			se.t, se.dir = t, t.TempDir()
			a := c.prepare(t, &se)
			if a.mp == "" {
				a.mp = se.path("mnt")
			}
			ensureDir(t, a.mp)
			wasMounted := isMounted(a.mp)
			blobBefore := snapshotBlob(t, a.url)
			stateBefore := snapshotState(t, a.state, a.skipDirs, a.badgerOnly)

			r := se.runEnv(a.env, append(append([]string{"mount", "--state", a.state}, a.args...), a.mp)...)
			if !wasMounted && isMounted(a.mp) {
				d := &daemon{e: &se, state: a.state, mp: a.mp}
				t.Cleanup(d.cleanup)
				t.Fatalf("the mount succeeded: %s", r)
			}
			msg := strings.TrimSpace(r.stderr)
			if r.code != c.code {
				t.Errorf("exit %d, want %d: %s", r.code, c.code, r)
			}
			for _, w := range c.want {
				if !strings.Contains(strings.ToLower(msg), strings.ToLower(w)) {
					t.Errorf("the message lacks %q: %s", w, msg)
				}
			}
			if c.secret != "" {
				logb, _ := os.ReadFile(filepath.Join(a.state, "vhdsync.log"))
				for where, text := range map[string]string{"message": r.stderr + r.stdout, "log": string(logb)} {
					if strings.Contains(text, c.secret) {
						t.Errorf("the secret %q reached the %s", c.secret, where)
					}
				}
			}
			if got := snapshotBlob(t, a.url); got != blobBefore {
				t.Errorf("the blob changed:\nbefore %s\nafter  %s", blobBefore, got)
			}
			if got := snapshotState(t, a.state, a.skipDirs, a.badgerOnly); got != stateBefore {
				t.Errorf("the state directory changed:\nbefore %s\nafter  %s", stateBefore, got)
			}
			if a.after != nil {
				a.after(t)
			}
			t.Logf("RELIABILITY | %s | %s | %d | blob and state untouched: %v", c.name, firstLine(msg), r.code, !t.Failed())
		})
	}
}

// badKey is a well-formed account key that is not Azurite's.
const badKey = "YmFkIGtleSBiYWQga2V5IGJhZCBrZXk="

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// runEnv runs the binary (timeout 2 minutes) with extra environment
// variables on top of e2eEnv's (which drops the test's own AZURE_ and
// VHDSYNC_ variables).
func (e *e2e) runEnv(env map[string]string, args ...string) result {
	e.t.Helper()
	var extra []string
	for k, v := range env {
		extra = append(extra, k+"="+v)
	}
	r, err := runTimeoutEnv(e.dir, 2*time.Minute, extra, e.bin, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

// createDiskIn is createDisk in a container of its own.
func (e *e2e) createDiskIn(cont, name string, sizeMiB int) (url, state string) {
	e.t.Helper()
	url = e.az.BlobURL(cont, name+".vhd")
	state = e.path("state-" + name)
	e.mustVhdsync("create", "--blob", url, "--size", fmt.Sprintf("%dMiB", sizeMiB), "--state", state, "--create-container")
	return url, state
}

// pendingJournal mounts state with a long linger, writes without fsync,
// kills the daemon and cleans up the dead mount: the journal then holds
// pending records in badger and in segment files.
func (e *e2e) pendingJournal(state, url string) {
	e.t.Helper()
	mp := e.path("pending-mnt")
	d := e.mount(state, mp, "--linger", "1h")
	name := strings.TrimSuffix(filepath.Base(url), ".vhd")
	e.unsyncedWrites(state, url, filepath.Join(mp, name+".img"), map[int64][]byte{0: pattern("p0", 64<<10), 1 << 20: pattern("p1", 64<<10)})
	if err := syscall.Kill(d.pid, syscall.SIGKILL); err != nil {
		e.t.Fatal(err)
	}
	d.waitExit(10 * time.Second)
	if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
		e.t.Fatalf("umount -l %s: %v", mp, err)
	}
}

// syncedPendingJournal creates disk name behind a throttling proxy,
// mounts it, and leaves two writes acknowledged by fsync pending in its
// journal: the proxy refuses every request meanwhile (503), so the flusher
// cannot send them before the daemon is killed. The proxy lets everything
// through again before it returns; url is the blob through it.
func (e *e2e) syncedPendingJournal(name string) (url, state string) {
	e.t.Helper()
	px := throttle.Start(e.t, e.az.Endpoint, throttle.Limits{})
	url, state = px.BlobURL("disks", name+".vhd"), e.path("state-"+name)
	e.mustVhdsync("create", "--blob", url, "--size", "20MiB", "--state", state, "--create-container")
	mp := e.path("pending-mnt")
	d := e.mount(state, mp)
	if err := px.Proxy.SetLimits(throttle.Limits{RequestsPerSecond: 0.001}); err != nil {
		e.t.Fatal(err)
	}
	// 48 KiB: above what the intent log carries, below what the image
	// alone holds (journal.ImageMin): each payload in a segment.
	writeAtSync(e.t, filepath.Join(mp, name+".img"), map[int64][]byte{0: pattern("p0", 48<<10), 1 << 20: pattern("p1", 48<<10)})
	if s := e.mustStatus(state); s.JournalRecords != 2 {
		e.t.Fatalf("the acknowledged writes are not pending in the journal: %+v", s)
	}
	if err := syscall.Kill(d.pid, syscall.SIGKILL); err != nil {
		e.t.Fatal(err)
	}
	d.waitExit(10 * time.Second)
	if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
		e.t.Fatalf("umount -l %s: %v", mp, err)
	}
	if err := px.Proxy.SetLimits(throttle.Limits{}); err != nil {
		e.t.Fatal(err)
	}
	return url, state
}

func overwrite(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func truncateHalf(t *testing.T, path string) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, st.Size()/2); err != nil {
		t.Fatal(err)
	}
}

// snapshotBlob describes the blob as Azure shows it ("absent" if gone).
func snapshotBlob(t *testing.T, url string) string {
	t.Helper()
	p, err := blobClient(t, url).GetProperties(context.Background(), nil)
	if err != nil {
		if strings.Contains(err.Error(), "NotFound") {
			return "absent"
		}
		t.Fatalf("blob properties: %v", err)
	}
	s := func(p *string) string {
		if p == nil {
			return ""
		}
		return *p
	}
	var seq, length int64
	if p.BlobSequenceNumber != nil {
		seq = *p.BlobSequenceNumber
	}
	if p.ContentLength != nil {
		length = *p.ContentLength
	}
	var lease, typ string
	if p.LeaseState != nil {
		lease = string(*p.LeaseState)
	}
	if p.BlobType != nil {
		typ = string(*p.BlobType)
	}
	return fmt.Sprintf("type=%s etag=%s modified=%v seq=%d length=%d lease=%s", typ, s((*string)(p.ETag)), p.LastModified, seq, length, lease)
}

// snapshotState hashes every file of a state directory (mode, size,
// content), except the log the refused mount appends its failure to, the
// lock file's holder line, badger's LOCK (a pid file a kill -9 leaves and
// badger's next open removes), and subdirectories in skip.
func snapshotState(t *testing.T, dir string, skip []string, badgerOnly bool) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		for _, s := range skip {
			if rel == s {
				return filepath.SkipDir
			}
		}
		if rel == "vhdsync.log" || rel == "lock" || rel == filepath.Join("journal", "LOCK") {
			return nil
		}
		if badgerOnly && filepath.Dir(rel) == "journal" && !strings.HasPrefix(filepath.Base(rel), "seg-") {
			return nil
		}
		info, err := de.Info()
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%s %v %d", rel, info.Mode(), info.Size())
		if info.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			line += fmt.Sprintf(" %x", sha256.Sum256(b))
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("snapshot %s: %v", dir, err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func sharedKey(t *testing.T) *blob.SharedKeyCredential {
	t.Helper()
	cred, err := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	return cred
}

func pageBlobClient(t *testing.T, url string) *sdkpb.Client {
	t.Helper()
	c, err := sdkpb.NewClientWithSharedKeyCredential(url, sharedKey(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func blockBlobClient(t *testing.T, url string) *blockblob.Client {
	t.Helper()
	c, err := blockblob.NewClientWithSharedKeyCredential(url, sharedKey(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func containerClient(t *testing.T, url string) *container.Client {
	t.Helper()
	c, err := container.NewClientWithSharedKeyCredential(url, sharedKey(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func putPage(t *testing.T, pb *sdkpb.Client, off int64, data []byte) {
	t.Helper()
	if _, err := pb.UploadPages(context.Background(), streaming.NopCloser(bytes.NewReader(data)), blob.HTTPRange{Offset: off, Count: int64(len(data))}, nil); err != nil {
		t.Fatalf("put page at %d: %v", off, err)
	}
}

// blobSAS signs a read/write SAS for url with key, valid for validFor from
// now (negative: already expired).
func blobSAS(t *testing.T, url, key string, validFor time.Duration) string {
	t.Helper()
	cred, err := blob.NewSharedKeyCredential(azurite.DevAccount, key)
	if err != nil {
		t.Fatal(err)
	}
	parts, err := blob.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now().Add(-2 * time.Hour)
	q, err := sas.BlobSignatureValues{
		Protocol:      sas.ProtocolHTTPSandHTTP,
		StartTime:     start,
		ExpiryTime:    time.Now().Add(validFor),
		Permissions:   (&sas.BlobPermissions{Read: true, Write: true, Create: true}).String(),
		ContainerName: parts.ContainerName,
		BlobName:      parts.BlobName,
	}.SignWithSharedKey(cred)
	if err != nil {
		t.Fatal(err)
	}
	return q.Encode()
}
