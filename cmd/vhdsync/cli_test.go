package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/testenv"
	"github.com/vhdsync/vhdsync/vhdlayer"
)

// vhdsync runs one command line in-process and returns exit code, stdout
// and stderr. env holds the environment the command sees (nothing else
// leaks in from the test's own environment).
func vhdsync(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, &out, &errb, func(k string) string { return env[k] })
	return code, out.String(), errb.String()
}

// download fetches a blob with the official SDK, independently of our
// pageblob package.
func download(t *testing.T, url, path string) {
	t.Helper()
	cred, err := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := blob.NewClientWithSharedKeyCredential(url, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := c.DownloadFile(context.Background(), f, nil); err != nil {
		t.Fatalf("download %s: %v", url, err)
	}
}

// downloadTail fetches the last 512 bytes and the length of a blob with the
// official SDK.
func downloadTail(t *testing.T, url string) ([]byte, int64) {
	t.Helper()
	cred, _ := blob.NewSharedKeyCredential(azurite.DevAccount, azurite.DevKey)
	c, err := blob.NewClientWithSharedKeyCredential(url, cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.GetProperties(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	if _, err := c.DownloadBuffer(context.Background(), buf, &blob.DownloadBufferOptions{Range: blob.HTTPRange{Offset: *p.ContentLength - 512, Count: 512}}); err != nil {
		t.Fatal(err)
	}
	return buf, *p.ContentLength
}

func TestCreateIsAValidVHDForQemu(t *testing.T) {
	qemu := testenv.QemuImg(t)
	s := azurite.Start(t)
	dir := t.TempDir()
	url := s.BlobURL("disks", "one.vhd")
	state := filepath.Join(dir, "state")

	code, out, errOut := vhdsync(t, nil, "create", "--blob", url, "--size", "1GiB", "--state", state, "--create-container")
	if code != ExitOK {
		t.Fatalf("create: exit %d\n%s%s", code, out, errOut)
	}
	if !strings.Contains(out, "1073742336") {
		t.Fatalf("create output should give the blob size: %s", out)
	}

	// The blob as any client sees it.
	local := filepath.Join(dir, "one.vhd")
	download(t, url, local)
	st, _ := os.Stat(local)
	if st.Size() != 1<<30+512 {
		t.Fatalf("blob is %d bytes", st.Size())
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(testenv.Run(t, qemu, "info", "-f", "vpc", "--output=json", local)), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 1<<30 {
		t.Fatalf("qemu-img sees virtual size %d", info.VirtualSize)
	}
	zero := filepath.Join(dir, "zero.raw")
	if err := os.WriteFile(zero, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(zero, 1<<30); err != nil {
		t.Fatal(err)
	}
	testenv.Run(t, qemu, "compare", "-f", "vpc", "-F", "raw", local, zero)

	// inspect agrees, for the blob and for the downloaded file.
	for _, src := range []string{url, local} {
		code, out, errOut = vhdsync(t, nil, "inspect", "--json", src)
		if code != ExitOK {
			t.Fatalf("inspect %s: exit %d %s", src, code, errOut)
		}
		var rep inspectReport
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatal(err)
		}
		if !rep.Valid || rep.Footer.CurrentSize != 1<<30 || rep.Footer.DiskType != "fixed" || !rep.Footer.ChecksumValid {
			t.Fatalf("inspect %s: %+v", src, rep)
		}
	}

	// The state directory describes the same disk.
	b, err := os.ReadFile(filepath.Join(state, "vhdsync.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"virtual_size": 1073741824`) || strings.Contains(string(b), "sig=") {
		t.Fatalf("state file: %s", b)
	}
	img, err := os.Stat(filepath.Join(state, "disk.img"))
	if err != nil || img.Size() != 1<<30 {
		t.Fatalf("image: %v %v", img, err)
	}

	// A second create without --overwrite fails, exit 5, and leaves the
	// blob and the second state directory untouched.
	// Its footer and length before: a 1 GiB file is not read whole (under
	// -race a GiB of heap costs about 4 GiB of memory).
	before, beforeLen := downloadTail(t, url)
	code, _, errOut = vhdsync(t, nil, "create", "--blob", url, "--size", "2GiB", "--state", filepath.Join(dir, "state2"))
	if code != ExitExists || !strings.Contains(errOut, "--overwrite") {
		t.Fatalf("second create: exit %d: %s", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "state2")); !os.IsNotExist(err) {
		t.Fatalf("a refused create made its state directory: %v", err)
	}
	if tail, n := downloadTail(t, url); !bytes.Equal(before, tail) || beforeLen != n {
		t.Fatal("a refused create changed the blob")
	}

	// An existing state directory is refused before Azure is touched.
	code, _, errOut = vhdsync(t, nil, "create", "--blob", s.BlobURL("disks", "other.vhd"), "--size", "1GiB", "--state", state)
	if code != ExitState || !strings.Contains(errOut, "already holds a vhdsync disk") {
		t.Fatalf("reused state dir: exit %d: %s", code, errOut)
	}
}

func TestCreateErrors(t *testing.T) {
	s := azurite.Start(t)
	dir := t.TempDir()
	url := s.BlobURL("disks", "e.vhd")
	cases := []struct {
		name string
		env  map[string]string
		args []string
		code int
		want []string
	}{
		{"size not MiB and too small", nil, []string{"--size", "1000000"}, ExitBadSize, []string{"not a whole number of MiB", "20 MiB", "20971520"}},
		{"size not MiB", nil, []string{"--size", "1GB"}, ExitBadSize, []string{"999292928 (953 MiB)", "1000341504 (954 MiB)"}},
		{"size too big", nil, []string{"--size", "8TiB"}, ExitBadSize, []string{"8 TiB page-blob limit"}},
		{"size unparseable", nil, []string{"--size", "lots"}, ExitBadSize, []string{"examples"}},
		{"missing container", nil, []string{"--size", "20MiB"}, ExitNotFound, []string{"--create-container"}},
		{"bad key", map[string]string{"AZURE_STORAGE_KEY": "YmFkIGtleSBiYWQga2V5IGJhZCBrZXk="}, []string{"--size", "20MiB", "--create-container"}, ExitAuth, []string{"authentication failed", "AZURE_STORAGE_KEY"}},
		{"missing flag", nil, []string{"--size", "20MiB", "--blob", ""}, ExitUsage, nil},
	}
	for i, c := range cases {
		args := append([]string{"create", "--blob", url, "--state", filepath.Join(dir, "s", string(rune('a'+i)))}, c.args...)
		code, _, errOut := vhdsync(t, c.env, args...)
		if code != c.code {
			t.Errorf("%s: exit %d, want %d: %s", c.name, code, c.code, errOut)
		}
		for _, w := range c.want {
			if !strings.Contains(errOut, w) {
				t.Errorf("%s: message %q lacks %q", c.name, errOut, w)
			}
		}
		if strings.Contains(errOut, "YmFkIGtleSBiYWQga2V5IGJhZCBrZXk=") {
			t.Errorf("%s: the key leaked into the message", c.name)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "s")); !os.IsNotExist(err) {
		t.Fatalf("failed creates left state directories: %v", err)
	}
}

func TestInspectFiles(t *testing.T) {
	qemu := testenv.QemuImg(t)
	dir := t.TempDir()
	good := filepath.Join(dir, "good.vhd")
	f := vhdlayer.NewFixedFooter(20*vhdlayer.MiB, vhdTime)
	raw := f.Encode()
	writeDisk(t, good, 20*vhdlayer.MiB, raw[:])
	if code, out, _ := vhdsync(t, nil, "inspect", good); code != ExitOK || !strings.Contains(out, "valid fixed VHD") || !strings.Contains(out, "602/4/17") {
		t.Fatalf("good: exit %d\n%s", code, out)
	}

	// A corrupted footer: one reserved byte flipped.
	bad := filepath.Join(dir, "bad.vhd")
	corrupt := raw
	corrupt[200] = 0x55
	writeDisk(t, bad, 20*vhdlayer.MiB, corrupt[:])
	code, out, errOut := vhdsync(t, nil, "inspect", bad)
	want := "checksum is 0x"
	if code != ExitNotVHD || !strings.Contains(errOut, want) || !strings.Contains(errOut, "expected 0x") || !strings.Contains(out, "WRONG") {
		t.Fatalf("corrupt footer: exit %d\n%s\n%s", code, out, errOut)
	}

	// Not a VHD at all, and a dynamic VHD made by qemu.
	rawImg := filepath.Join(dir, "raw.img")
	writeDisk(t, rawImg, 20*vhdlayer.MiB, make([]byte, 512))
	if code, _, errOut := vhdsync(t, nil, "inspect", rawImg); code != ExitNotVHD || !strings.Contains(errOut, "not a VHD") {
		t.Fatalf("raw: exit %d %s", code, errOut)
	}
	dyn := filepath.Join(dir, "dyn.vhd")
	testenv.Run(t, qemu, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", dyn, "64M")
	if code, out, errOut := vhdsync(t, nil, "inspect", dyn); code != ExitNotVHD || !strings.Contains(out, "dynamic") || !strings.Contains(errOut, "import") {
		t.Fatalf("dynamic: exit %d\n%s\n%s", code, out, errOut)
	}
	// A file whose length does not match its footer.
	short := filepath.Join(dir, "short.vhd")
	writeDisk(t, short, 19*vhdlayer.MiB, raw[:])
	if code, _, errOut := vhdsync(t, nil, "inspect", short); code != ExitNotVHD || !strings.Contains(errOut, "should be 20972032") {
		t.Fatalf("short: exit %d %s", code, errOut)
	}
	if code, _, errOut := vhdsync(t, nil, "inspect", filepath.Join(dir, "missing.vhd")); code != ExitFailure || !strings.Contains(errOut, "no such file") {
		t.Fatalf("missing: exit %d %s", code, errOut)
	}
}

func TestHelpForEveryCommand(t *testing.T) {
	for _, c := range newRootCmd(&globals{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}}).Commands() {
		if c.Name() == "help" || c.Name() == "completion" {
			continue
		}
		code, out, _ := vhdsync(t, nil, c.Name(), "--help")
		if code != ExitOK || !strings.Contains(out, "Usage:") || !strings.Contains(out, "Examples:") || len(c.Long) < 80 {
			t.Errorf("%s --help: exit %d, needs Usage, Examples and a long description:\n%s", c.Name(), code, out)
		}
	}
}

// TestMountCatchUpFlagErrors: bad --blob-limits, --max-odd-window and
// --sync-timeout values are usage errors that say what to give, before anything is
// opened or started.
func TestMountCatchUpFlagErrors(t *testing.T) {
	state := filepath.Join(t.TempDir(), "never-made")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--blob-limits", "500"}, "e.g. 500,60"},
		{[]string{"--blob-limits", "500,zero"}, "MiB per second"},
		{[]string{"--blob-limits", "0,60"}, "at least 1"},
		{[]string{"--max-odd-window", "100ms"}, "at least 1s"},
		{[]string{"--sync-timeout", "30s"}, "with --sync"},
		{[]string{"--sync", "--sync-timeout", "-1s"}, "positive duration"},
	} {
		args := append([]string{"mount", "--state", state}, c.args...)
		code, _, errOut := vhdsync(t, nil, append(args, t.TempDir())...)
		if code != ExitUsage || !strings.Contains(errOut, c.want) {
			t.Errorf("%v: exit %d, %q; want exit %d and %q", c.args, code, errOut, ExitUsage, c.want)
		}
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("a refused mount made the state directory: %v", err)
	}
}
