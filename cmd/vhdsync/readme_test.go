package main

// The README's walk-through, run as written: the commands between its
// walkthrough markers are extracted from README.md and run, in order, in
// one bash, so the README and the code cannot drift apart. The run has
// namespaces of its own (mount, network, pid): tmpfs over the directories
// the walk-through writes (/var/lib, /mnt, /usr/local/bin, the clone's
// bin/), a loopback of its own (Azurite's fixed port 10000 is free there),
// and every process it starts ends with it.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/testenv"
)

// Markers of the walk-through in README.md.
const (
	walkBegin = "<!-- walkthrough:begin -->"
	walkEnd   = "<!-- walkthrough:end -->"
)

// walkStep is one command of the walk-through and the output the README
// shows for it.
type walkStep struct {
	line int    // in README.md
	cmd  string // as typed
	out  []string
}

// failsInREADME: the README shows the command refused (its output is
// vhdsync's error line), so it must fail.
func (s walkStep) failsInREADME() bool {
	return len(s.out) > 0 && strings.HasPrefix(s.out[0], "vhdsync: ")
}

// parseWalkthrough extracts the steps between the markers: every line of
// a sh block that is not a comment, and every "# " line of a console
// block with the lines after it as its output.
func parseWalkthrough(readme []byte) ([]walkStep, error) {
	var steps []walkStep
	in, block := false, ""
	sc := bufio.NewScanner(bytes.NewReader(readme))
	for n := 1; sc.Scan(); n++ {
		l := sc.Text()
		switch {
		case strings.TrimSpace(l) == walkBegin:
			in = true
			continue
		case strings.TrimSpace(l) == walkEnd:
			if !in || block != "" {
				return nil, fmt.Errorf("README.md:%d: %s without a begin marker or inside a code block", n, walkEnd)
			}
			return steps, nil
		case !in:
			continue
		case strings.HasPrefix(l, "```"):
			if block == "" {
				block = strings.TrimPrefix(l, "```")
				if block != "sh" && block != "console" {
					return nil, fmt.Errorf("README.md:%d: a ```%s block in the walk-through: use sh or console", n, block)
				}
			} else {
				block = ""
			}
			continue
		}
		switch block {
		case "sh":
			if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "#") {
				steps = append(steps, walkStep{line: n, cmd: l})
			}
		case "console":
			if c, ok := strings.CutPrefix(l, "# "); ok {
				steps = append(steps, walkStep{line: n, cmd: c})
			} else if len(steps) > 0 {
				steps[len(steps)-1].out = append(steps[len(steps)-1].out, l)
			}
		}
	}
	return nil, fmt.Errorf("README.md has no %s ... %s section", walkBegin, walkEnd)
}

// walkScript is the bash that runs the steps, marking each one's output
// and exit status, and stopping at the first that ends otherwise than the
// README shows.
func walkScript(steps []walkStep) string {
	var b strings.Builder
	for i, s := range steps {
		fmt.Fprintf(&b, "printf '\\n@@STEP %d@@\\n'\n%s\nrc=$?\nprintf '\\n@@RC %d %%d@@\\n' \"$rc\"\n", i, s.cmd, i)
		if s.failsInREADME() {
			fmt.Fprintf(&b, "[ \"$rc\" != 0 ] || exit 1\n")
		} else {
			fmt.Fprintf(&b, "[ \"$rc\" = 0 ] || exit 1\n")
		}
	}
	return b.String()
}

// walkWrapper prepares the namespaces' private directories, runs the
// script, and on any exit undoes what the walk-through may have left
// (loop devices are the kernel's, not the namespace's).
const walkWrapper = `set +e
ip link set lo up || { echo "@@SETUP ip link set lo up failed"; exit 97; }
# /usr/local/bin gets a tmpfs too (make install writes there), holding
# links to what it held, which may include the go command.
mkdir -p "$WALK_TMP/usr-local-bin" && mount --bind /usr/local/bin "$WALK_TMP/usr-local-bin" || { echo "@@SETUP bind of /usr/local/bin failed"; exit 97; }
for d in /var/lib /mnt /usr/local/bin; do
  mount -t tmpfs -o mode=0755 tmpfs "$d" || { echo "@@SETUP tmpfs on $d failed"; exit 97; }
done
for f in "$WALK_TMP/usr-local-bin"/*; do
  case "${f##*/}" in vhdsync) continue ;; esac # the walk-through installs its own
  [ -e "$f" ] && ln -s "$f" /usr/local/bin/
done
mount --bind "$WALK_BIN" "$WALK_REPO/bin" || { echo "@@SETUP bind over bin/ failed"; exit 97; }
cd "$WALK_REPO" || exit 97
# Only what the walk-through made is undone: its mounts are all under /mnt,
# a tmpfs of this namespace (the copies of the host's mounts it inherited
# are left alone).
cleanup() {
  for m in $(awk '$3 == "ext4" && $2 ~ "^/mnt/" {print $2}' /proc/self/mounts); do umount -l "$m"; done
  for f in $(awk '$3 == "fuse.vhdsync" && $2 ~ "^/mnt/" {print $2}' /proc/self/mounts); do
    for l in $(losetup -n -O NAME -j "$f"/*.img 2>/dev/null); do losetup -d "$l"; done
    timeout 60 vhdsync unmount "$f" >/dev/null 2>&1 || umount -l "$f"
  done
}
trap cleanup EXIT
. "$WALK_SCRIPT"
`

var (
	walkMarkerRE = regexp.MustCompile(`(?m)^@@(STEP|RC) (\d+)(?: (-?\d+))?@@$`)
	digitsRE     = regexp.MustCompile(`[0-9]+`)
)

// firstWord is the first field of the first non-empty line, digits
// replaced (pids, loop device numbers): the shape a README line shows.
func firstWord(lines []string) string {
	for _, l := range lines {
		if f := strings.Fields(l); len(f) > 0 {
			return digitsRE.ReplaceAllString(f[0], "N")
		}
	}
	return ""
}

func TestReadmeWalkthrough(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	steps, err := parseWalkthrough(readme)
	if err != nil {
		t.Fatal(err)
	}
	// The walk-through is the whole user path: guard against markers that
	// drifted around a fragment of it.
	var all strings.Builder
	for _, s := range steps {
		all.WriteString(s.cmd + "\n")
	}
	for _, want := range []string{"make build install", "azurite-run", "vhdsync create", "mkdir -p", "vhdsync mount", "losetup", "vhdsync status", "vhdsync unmount", "vhdsync verify", "vhdsync set-blob", "--stop"} {
		if !strings.Contains(all.String(), want) {
			t.Fatalf("the README's walk-through lacks %q; its commands:\n%s", want, all.String())
		}
	}

	testenv.RequireRoot(t, "namespaces, a FUSE mount, a loop device and mount(8)")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Missing(t, "/dev/fuse", "modprobe fuse (or run the tests where FUSE is available)")
	}
	for _, tool := range []string{"unshare", "ip", "make", "losetup", "mkfs.ext4", "mount", "umount", "timeout"} {
		testenv.RequireTool(t, tool, "apt-get install util-linux iproute2 make e2fsprogs mount coreutils")
	}
	if _, err := azurite.Binary(); err != nil {
		testenv.Missing(t, "Azurite ("+err.Error()+")", azurite.InstallHint)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		testenv.Missing(t, "go", "install Go")
	}
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	// bin/ of the clone is where make build writes; the run sees a private
	// directory there (the mount point must exist; it is git-ignored).
	if err := os.MkdirAll(filepath.Join(repo, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for name, body := range map[string]string{"walk.sh": walkScript(steps), "wrapper.sh": walkWrapper} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	gocache, _ := exec.Command(goBin, "env", "GOCACHE").Output()
	gomod, _ := exec.Command(goBin, "env", "GOMODCACHE").Output()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	// --kill-child: if the test is killed or times out, the namespace's
	// first process, and with it every process of the namespace, dies.
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
		"bash", filepath.Join(dir, "wrapper.sh"))
	cmd.Env = []string{
		"PATH=/usr/local/bin:" + filepath.Dir(goBin) + ":/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + os.Getenv("HOME"),
		"GOCACHE=" + strings.TrimSpace(string(gocache)),
		"GOMODCACHE=" + strings.TrimSpace(string(gomod)),
		"GOFLAGS=-mod=readonly", "GOPROXY=off", "GOTOOLCHAIN=local",
		"WALK_REPO=" + repo, "WALK_BIN=" + filepath.Join(dir, "bin"), "WALK_SCRIPT=" + filepath.Join(dir, "walk.sh"), "WALK_TMP=" + dir,
	}
	cmd.Dir = repo
	start := time.Now()
	outb, runErr := cmd.CombinedOutput()
	out := string(outb)
	t.Logf("walk-through: %d commands in %v (exit %v); its output:\n%s", len(steps), time.Since(start).Round(time.Second), runErr, out)
	// Loop devices are global: any the walk-through attached and its own
	// clean-up did not detach are detached here.
	t.Cleanup(func() { detachWalkLoops(t, out) })
	if strings.Contains(out, "@@SETUP") {
		t.Fatalf("setting up the namespaces failed:\n%s", out)
	}

	// Each step's output and exit status, in order.
	type result struct {
		out []string
		rc  int
		ran bool
	}
	res := make([]result, len(steps))
	locs := walkMarkerRE.FindAllStringSubmatchIndex(out, -1)
	for k, loc := range locs {
		kind := out[loc[2]:loc[3]]
		i, _ := strconv.Atoi(out[loc[4]:loc[5]])
		if i < 0 || i >= len(steps) {
			t.Fatalf("marker of step %d of %d", i, len(steps))
		}
		if kind == "RC" {
			res[i].rc, _ = strconv.Atoi(out[loc[6]:loc[7]])
			res[i].ran = true
			continue
		}
		end := len(out)
		if k+1 < len(locs) {
			end = locs[k+1][0]
		}
		res[i].out = strings.Split(strings.Trim(out[loc[1]:end], "\n"), "\n")
	}
	for i, s := range steps {
		r := res[i]
		show := func() string {
			return fmt.Sprintf("README.md:%d: # %s\nexit %d, output:\n%s", s.line, s.cmd, r.rc, strings.Join(r.out, "\n"))
		}
		switch {
		case !r.ran:
			t.Fatalf("README.md:%d: # %s did not run (an earlier step failed?); whole output:\n%s", s.line, s.cmd, out)
		case s.failsInREADME() && r.rc == 0:
			t.Fatalf("the README shows this refused, but it succeeded:\n%s", show())
		case !s.failsInREADME() && r.rc != 0:
			t.Fatalf("failed:\n%s", show())
		}
		if len(s.out) > 0 && firstWord(s.out) != firstWord(r.out) {
			t.Errorf("the output does not begin as the README shows (%q):\n%s", s.out[0], show())
		}
	}
	if runErr != nil {
		t.Fatalf("the walk-through ended with %v:\n%s", runErr, out)
	}
}

// detachWalkLoops detaches the loop devices the walk-through's output
// names (losetup --show) that still hold a file of the walk-through's
// mount, the namespace being gone.
func detachWalkLoops(t *testing.T, out string) {
	for _, dev := range regexp.MustCompile(`(?m)^/dev/loop[0-9]+$`).FindAllString(out, -1) {
		b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
		if err != nil || !strings.HasPrefix(strings.TrimSpace(string(b)), "/mnt/") {
			continue
		}
		f, err := os.OpenFile(dev, os.O_RDONLY, 0)
		if err != nil {
			continue
		}
		const loopClrFD = 0x4C01
		if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), loopClrFD, 0); errno != 0 {
			t.Logf("detach %s: %v", dev, errno)
		} else {
			t.Logf("detached %s, which the walk-through left attached", dev)
		}
		f.Close()
	}
}
