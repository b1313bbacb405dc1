package main

import (
	"bytes"
	crand "crypto/rand"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vhdsync/vhdsync/internal/azurite"
	"github.com/vhdsync/vhdsync/internal/azurite/throttle"
	"github.com/vhdsync/vhdsync/internal/powercut"
	"github.com/vhdsync/vhdsync/internal/testenv"
	"github.com/vhdsync/vhdsync/internal/transfer"
)

// importPowerCuts is how many cuts TestImportPowerCut makes before it lets
// an import run to its end.
const importPowerCuts = 6

// TestImportPowerCut runs `vhdsync import` with its state directory on the
// power-cut file system (internal/powercut) and cuts the power, killing
// the import at the same instant, right after it saved its progress, right
// after it synced the local image (the progress record that claims the
// image's windows comes next), or at a random moment; then runs it again,
// as a user would. Each run must resume or start over by itself (never
// fail for what the cut left), and once one completes, the blob and the
// local image must both equal the source: a progress record surviving a
// cut while the image data it claims did not would leave the image short.
func TestImportPowerCut(t *testing.T) {
	qemu := testenv.QemuImg(t)
	pc := powercut.Start(t)
	bin := e2eBinary(t)
	az := azurite.Start(t)
	// A slow link keeps the import running across several progress saves
	// (one a second).
	px := throttle.Start(t, az.Endpoint, throttle.Limits{BytesPerSecond: 8 << 20})
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 7))
	t.Logf("seed %d", seed)

	dir := t.TempDir()
	src := filepath.Join(dir, "disk.raw")
	const size = 48 << 20
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for range 40 {
		b := make([]byte, 4096*(1+rng.IntN(256)))
		_, _ = crand.Read(b)
		if _, err := f.WriteAt(b, rng.Int64N((size-int64(len(b)))/4096)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	state := pc.Path("state")
	args := []string{"import", "--blob", px.BlobURL("disks", "pc.vhd"), "--state", state, "--workers", "4", "--create-container", src}

	progressSaved := func(op powercut.Op) bool {
		return op.Kind == powercut.OpRename && strings.HasSuffix(op.NewPath, "/"+transfer.ProgressFile)
	}
	imageSynced := func(op powercut.Op) bool {
		return op.Kind == powercut.OpFsync && op.Path == "state/disk.img"
	}
	nthOf := func(n int, match func(powercut.Op) bool) func(powercut.Op) bool {
		return func(op powercut.Op) bool {
			if !match(op) {
				return false
			}
			n--
			return n == 0
		}
	}

	cuts, resumed, fresh := 0, 0, 0
	fired := map[string]int{}
	for run := 1; ; run++ {
		if run > importPowerCuts+10 {
			t.Fatalf("no import completed in %d runs", run-1)
		}
		cmd := exec.Command(bin, args...)
		cmd.Dir = dir
		cmd.Env = e2eEnv()
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		var cut <-chan powercut.CutStats
		moment := ""
		var random *time.Timer
		if cuts < importPowerCuts {
			switch run % 3 {
			case 1:
				moment = "progress saved"
				cut = pc.FS().CutAfter(nthOf(1+rng.IntN(3), progressSaved))
			case 2:
				moment = "image synced"
				cut = pc.FS().CutAfter(nthOf(1+rng.IntN(3), imageSynced))
			default:
				// At a random moment: right after the first operation
				// once a random delay has passed.
				moment = "random"
				var armed atomic.Bool
				cut = pc.FS().CutAfter(func(powercut.Op) bool { return armed.Load() })
				random = time.AfterFunc(time.Duration(rng.Int64N(int64(4*time.Second))), func() { armed.Store(true) })
			}
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		waited := make(chan error, 1)
		go func() { waited <- cmd.Wait() }()
		var runErr error
		select {
		case s := <-cut:
			_ = cmd.Process.Kill()
			<-waited
			cuts++
			fired[moment]++
			t.Logf("run %d: cut after %q, %d bytes in %d files dropped", run, moment, s.Bytes, s.Files)
			pc.Remount()
			if strings.Contains(out.String(), "resuming an interrupted import") {
				resumed++
			}
			continue
		case runErr = <-waited:
		}
		if random != nil {
			random.Stop()
		}
		if cut != nil && !pc.FS().Disarm() {
			// The cut fired as the import ended: count it, and run again.
			s := <-cut
			cuts++
			fired[moment]++
			t.Logf("run %d: cut after %q as the import ended (exit: %v), %d bytes in %d files dropped", run, moment, runErr, s.Bytes, s.Files)
			pc.Remount()
			continue
		}
		if runErr != nil {
			t.Fatalf("import run %d after %d cuts failed by itself (a state the cut left that it cannot handle): %v\n%s", run, cuts, runErr, out.String())
		}
		if strings.Contains(out.String(), "resuming an interrupted import") {
			resumed++
		} else if run > 1 {
			fresh++
		}
		break
	}
	dl := filepath.Join(dir, "out.vhd")
	mustRun(t, nil, "download", "--blob", az.BlobURL("disks", "pc.vhd"), dl)
	testenv.Run(t, qemu, "compare", "-f", "vpc", "-F", "raw", dl, src)
	testenv.Run(t, qemu, "compare", "-f", "raw", "-F", "raw", filepath.Join(state, "disk.img"), src)
	t.Logf("RELIABILITY | import power cuts | %d cuts (%s) | runs that resumed: %d, completed from the start again: %d | blob and local image equal the source: true |",
		cuts, fmt.Sprint(fired), resumed, fresh)
}
